"""One template document per structure, as stored in a maggma Store.

Only structures a prediction can substitute onto become templates (:func:`check_template_structure`): ordered
(no partial occupancies or vacancies), real elements only, at most ``max_template_atoms`` sites (see
:func:`cspml_flows.core.config.max_template_atoms`) and ``MAX_ELEMENTS`` elements, and a sane cell and geometry
(:func:`cspml_flows.core.structure_checks.check_structure`), checked before spglib sees the structure.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from pymatgen.core import DummySpecies, Structure

from cspml_flows.core.composition import MAX_ELEMENTS, roles
from cspml_flows.core.config import max_template_atoms
from cspml_flows.core.errors import StructureReadError
from cspml_flows.core.prototype import prototype_info
from cspml_flows.core.structure_checks import check_structure
from cspml_flows.templates.geometry import doc_geometry, structure_digest

SCHEMA_VERSION = 2  # 2: min_dist and role_syms stored with the document
KEY = "material_id"  # the key of a template document in its store (also its ``_id``)


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
    relaxation_key: str | None = Field(None, description="results-store record it was promoted from")
    min_dist: float | None = Field(None, description="shortest interatomic distance (periodic images included)")
    role_syms: list[list[int]] | None = Field(
        None, description="role permutations a symmetry of the structure maps onto itself (identity first)"
    )
    geometry_of: str | None = Field(None, description="digest of the structure min_dist and role_syms are of")
    schema_version: int = SCHEMA_VERSION
    last_updated: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def get_structure(self) -> Structure:
        """The template's pymatgen Structure."""
        return Structure.from_dict(self.structure)


def check_template_structure(structure: Structure, name: str, max_atoms: int | None = None) -> None:
    """Refuse, naming ``name`` and the reason, a structure that cannot be a template: partial occupancies,
    non-element species, no sites, more than ``max_atoms`` sites (default: the configured limit), more than
    ``MAX_ELEMENTS`` elements, or a cell or geometry no crystal has (:func:`check_structure`)."""
    if len(structure) == 0:
        raise StructureReadError(f"{name} has no sites")
    for i, site in enumerate(structure):
        if not site.is_ordered:
            occ = ", ".join(f"{sp}:{amt:g}" for sp, amt in site.species.items())
            raise StructureReadError(
                f"{name} has partial occupancies (site {i}: {occ}); a template must be an ordered structure "
                "(order it first, e.g. with pymatgen's OrderDisorderedStructureTransformation)"
            )
        if any(isinstance(sp, DummySpecies) for sp in site.species):
            raise StructureReadError(f"{name} has a site without a real element (site {i}: {site.species})")
    limit = max_template_atoms() if max_atoms is None else max_atoms
    if len(structure) > limit:
        raise StructureReadError(
            f"{name} has {len(structure)} sites; a template may have at most {limit} "
            "(raise the limit with CSPML_MAX_TEMPLATE_ATOMS or the config key max_template_atoms)"
        )
    n_el = len(structure.composition.elements)
    if n_el > MAX_ELEMENTS:
        raise StructureReadError(f"{name} has {n_el} elements; a template may have at most {MAX_ELEMENTS}")
    check_structure(structure, name)


def template_doc_from_structure(
    structure: Structure,
    material_id: str,
    source: str = "unknown",
    max_atoms: int | None = None,
    **properties: Any,
) -> TemplateDoc:
    """Build a template document: formula bookkeeping, spglib symmetry and prototype label, and the geometry
    the index reads (shortest interatomic distance, role symmetries; see :mod:`cspml_flows.templates.geometry`).

    The structure is checked first (:func:`check_template_structure`; ``max_atoms`` default: the configured
    limit); a structure that cannot be a template raises StructureReadError naming ``material_id``."""
    check_template_structure(structure, f"structure {material_id}", max_atoms)
    comp = structure.composition
    r = roles(comp)
    info = prototype_info(structure)
    as_dict = structure.as_dict()
    formula = comp.reduced_formula
    dmin, syms = doc_geometry(as_dict, roles(formula))  # from the stored dict: what the index would compute
    clean = {k: (None if v is not None and v != v else v) for k, v in properties.items()}  # noqa: PLR0124 (NaN -> None)
    return TemplateDoc(
        material_id=str(material_id),
        structure=as_dict,
        formula=formula,
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
        min_dist=dmin,
        role_syms=[list(p) for p in syms],
        geometry_of=structure_digest(as_dict),
        **clean,
    )
