"""One template document per structure, as stored in a maggma Store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from pymatgen.core import Structure

from cspml_flows.composition import roles
from cspml_flows.prototype import prototype_info

SCHEMA_VERSION = 1


class TemplateDoc(BaseModel):
    """A known crystal structure that predictions can reuse as a template."""

    material_id: str = Field(description="Unique id (Materials Project id, file name, or generated)")
    structure: dict[str, Any] = Field(description="pymatgen Structure.as_dict()")
    formula: str = Field(description="Reduced formula")
    anonymous_formula: str = Field(description="Anonymous formula in canonical role order, e.g. ABC3")
    chemsys: str
    elements: list[str] = Field(description="Elements in canonical role order")
    nelements: int
    nsites: int
    nsites_primitive: int
    volume_per_atom: float
    spacegroup_number: int | None = None
    spacegroup_symbol: str | None = None
    prototype: str | None = Field(None, description="AFLOW-style label from spglib, e.g. ABC3_cP5_221_a_b_c")
    energy_per_atom: float | None = None
    formation_energy_per_atom: float | None = None
    e_above_hull: float | None = None
    source: str = "unknown"
    round: int = 0
    parent_id: str | None = None
    calculator: str | None = None
    schema_version: int = SCHEMA_VERSION
    last_updated: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def get_structure(self) -> Structure:
        return Structure.from_dict(self.structure)


def template_doc_from_structure(
    structure: Structure,
    material_id: str,
    source: str = "unknown",
    **properties: Any,
) -> TemplateDoc:
    """Build a template document: formula bookkeeping plus spglib symmetry and prototype label."""
    comp = structure.composition
    r = roles(comp)
    info = prototype_info(structure)
    clean = {k: (None if v is not None and v != v else v) for k, v in properties.items()}  # NaN -> None
    return TemplateDoc(
        material_id=str(material_id),
        structure=structure.as_dict(),
        formula=comp.reduced_formula,
        anonymous_formula=r.anonymous_formula,
        chemsys=comp.chemical_system,
        elements=list(r.elements),
        nelements=len(r.elements),
        nsites=len(structure),
        nsites_primitive=info.nsites_primitive,
        volume_per_atom=structure.volume / len(structure),
        spacegroup_number=info.spacegroup_number,
        spacegroup_symbol=info.spacegroup_symbol,
        prototype=info.label,
        source=source,
        **clean,
    )
