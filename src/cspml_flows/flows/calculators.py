"""The YAML ``calculator`` section: a thin way to build an atomate2 relax Maker. ASE EMT (tests), CHGNet or
SevenNet-0 through atomate2's ForceFieldRelaxMaker (weights ship in the chgnet and sevenn wheels; SevenNet is
the optional ``sevennet`` extra), VASP through atomate2's DoubleRelaxMaker (custodian on HPC). In Python, hand
any atomate2 Maker to :class:`~cspml_flows.flows.makers.CSPMaker` instead."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from cspml_flows.core.engines import SEVENNET_MODEL, pin_torch_threads


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
    def _check_optimizer(cls, value: str) -> str:
        names = optimizer_names()
        if value not in names:
            raise ValueError(f"must be one of atomate2's optimizers: {', '.join(names)}")
        return value

    def relaxation(self):
        """The :class:`~cspml_flows.flows.relax.RelaxationMaker` these settings describe."""
        from cspml_flows.flows.relax import RelaxationMaker

        return RelaxationMaker(relax_maker=relax_maker(self), batch_size=self.batch_size, hull_window=self.hull_window)

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
        return self.relaxation().calc_id


def optimizer_names() -> list[str]:
    """The optimizer names atomate2's ASE relaxer accepts (its ``OPTIMIZERS`` table of ASE classes)."""
    from atomate2.ase.utils import OPTIMIZERS

    return list(OPTIMIZERS)


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
            from atomate2.ase.jobs import EmtRelaxMaker

            return EmtRelaxMaker(**kwargs)
        from atomate2.forcefields.jobs import ForceFieldRelaxMaker

        if settings.name == "sevennet":
            pin_torch_threads()
            return ForceFieldRelaxMaker(
                force_field_name="SevenNet", calculator_kwargs={"model": SEVENNET_MODEL}, **kwargs
            )
        return ForceFieldRelaxMaker(force_field_name="CHGNet", **kwargs)
    from cspml_flows.flows.vasp import vasp_relax_maker

    return vasp_relax_maker(settings.vasp_incar, settings.vasp_run, settings.vasp_potcar_spec)
