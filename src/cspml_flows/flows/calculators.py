"""The YAML ``calculator`` section: a thin way to build an atomate2 relax Maker. ASE EMT (tests), CHGNet or
SevenNet-0 through atomate2's ForceFieldRelaxMaker (weights ship in the chgnet and sevenn wheels; SevenNet is
the optional ``sevennet`` extra), VASP through atomate2's DoubleRelaxMaker (custodian on HPC). In Python, hand
any atomate2 Maker to :class:`~cspml_flows.flows.makers.CSPMaker` instead."""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any, Literal

from atomate2.ase.jobs import AseRelaxMaker, EmtRelaxMaker
from atomate2.ase.utils import OPTIMIZERS
from atomate2.forcefields.jobs import ForceFieldRelaxMaker
from atomate2.forcefields.utils import ForceFieldMixin
from jobflow import Maker
from monty.json import jsanitize
from pydantic import BaseModel, Field, field_validator

from cspml_flows.core.engines import SEVENNET_MODEL, pin_torch_threads
from cspml_flows.flows.vasp import vasp_relax_maker


class CalculatorSettings(BaseModel):
    """Which calculator relaxes candidates, and how. Part of every relaxation's cache key."""

    model_config = {"extra": "forbid"}

    name: Literal["emt", "chgnet", "sevennet", "vasp"] = "emt"
    steps: int = Field(300, ge=1, description="maximum optimizer steps (ASE calculators)")
    fmax: float = Field(0.05, gt=0, description="force convergence (eV/A, ASE calculators)")
    relax_cell: bool = True
    optimizer: str = Field("FIRE", description="ASE optimizer by atomate2's name (ASE calculators)")
    batch_size: int = Field(25, ge=1, description="structures per relaxation job (not part of the key)")
    vasp_incar: dict[str, Any] = Field(default_factory=dict, description="user INCAR settings (VASP)")
    vasp_run: dict[str, Any] = Field(
        default_factory=dict,
        description="atomate2 run_vasp arguments (VASP): vasp_cmd, max_errors, wall_time, custodian_kwargs",
    )
    vasp_potcar_spec: bool = Field(False, description="write POTCAR.spec instead of POTCAR (VASP stand-in tests)")
    hull_window: float | None = Field(
        None, ge=0, description="tiers after the first: relax candidates within this of the previous hull (eV/atom)"
    )

    @field_validator("optimizer")
    @classmethod
    def check_optimizer(cls, value: str) -> str:
        """An optimizer atomate2 knows."""
        names = optimizer_names()
        if value not in names:
            raise ValueError(f"must be one of atomate2's optimizers: {', '.join(names)}")
        return value

    def key_settings(self) -> dict[str, Any]:
        """The settings that change a relaxation's result."""
        d = self.model_dump(exclude={"batch_size", "hull_window"})
        d.pop("vasp_run")
        if self.name != "vasp":
            for k in ("vasp_incar", "vasp_potcar_spec"):
                d.pop(k)
        else:
            for k in ("steps", "fmax", "optimizer"):
                d.pop(k)
        return d

    @property
    def calc_id(self) -> str:
        """The id of the relax Maker these settings build (one hull per id)."""
        return calculator_id(relax_maker(self))


def optimizer_names() -> list[str]:
    """The optimizer names atomate2's ASE relaxer accepts (its ``OPTIMIZERS`` table of ASE classes)."""
    return list(OPTIMIZERS)


def is_vasp_maker(maker: Maker) -> bool:
    """True for atomate2's VASP Makers (their energies get MP2020 corrections on the hull)."""
    return type(maker).__module__.startswith("atomate2.vasp")


def runs_in_process(maker: Maker) -> bool:
    """True for ASE-calculator Makers, whose ``make`` body can relax a batch in one process."""
    return isinstance(maker, AseRelaxMaker)


def calculator_label(maker: Maker) -> str:
    """Short calculator name of an atomate2 Maker: ``emt``, ``chgnet``, ``sevennet``, ``vasp``..."""
    if is_vasp_maker(maker):
        return "vasp"
    if isinstance(maker, ForceFieldMixin):
        ff = maker.force_field_name
        text = str(ff.value if isinstance(ff, Enum) else ff)  # "MLFF.CHGNet", or an atomate2 MLFF member
        return text.rsplit(".", 1)[-1].lower()
    name = type(maker).__name__
    return name.removesuffix("RelaxMaker").removesuffix("Maker").lower() or name.lower()


def strip_unkeyed(d: Any) -> Any:
    """A Maker dict without the keys that do not change a result (versions, names, how VASP is launched)."""
    if isinstance(d, dict):
        return {k: strip_unkeyed(v) for k, v in d.items() if k not in ("@version", "name", "run_vasp_kwargs")}
    if isinstance(d, list):
        return [strip_unkeyed(v) for v in d]
    return d


def calculator_id(maker: Maker) -> str:
    """Calculator id ``label/digest`` of an atomate2 relax Maker's settings: one hull per id."""
    d = strip_unkeyed(jsanitize(maker.as_dict(), strict=True, enum_values=True))
    digest = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{calculator_label(maker)}/{digest}"


def relax_maker(settings: CalculatorSettings):
    """The atomate2 Maker that relaxes one structure (or a batch, for ASE makers) with these settings."""
    if settings.name in ("emt", "chgnet", "sevennet"):
        kwargs = {
            "steps": settings.steps,
            "relax_cell": settings.relax_cell,
            "relax_kwargs": {"fmax": settings.fmax, "final_atoms_object_file": None},
            "optimizer_kwargs": {"optimizer": settings.optimizer},
        }
        if settings.name == "emt":
            return EmtRelaxMaker(**kwargs)
        if settings.name == "sevennet":
            pin_torch_threads()
            return ForceFieldRelaxMaker(
                force_field_name="SevenNet", calculator_kwargs={"model": SEVENNET_MODEL}, **kwargs
            )
        return ForceFieldRelaxMaker(force_field_name="CHGNet", **kwargs)
    return vasp_relax_maker(settings.vasp_incar, settings.vasp_run, settings.vasp_potcar_spec)
