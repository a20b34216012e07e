"""Relaxation calculators, chosen in config: ASE EMT (tests), CHGNet or SevenNet-0 through atomate2's
ForceFieldRelaxMaker (weights ship in the chgnet and sevenn wheels; SevenNet is the optional ``sevennet``
extra), VASP through atomate2's DoubleRelaxMaker (custodian on HPC)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from pymatgen.core import Structure


class CalculatorSettings(BaseModel):
    """Which calculator relaxes candidates, and how. Part of every relaxation's cache key."""

    model_config = {"extra": "forbid"}

    name: Literal["emt", "chgnet", "sevennet", "vasp"] = "emt"
    steps: int = Field(300, ge=1, description="maximum optimizer steps (ASE calculators)")
    fmax: float = Field(0.05, gt=0, description="force convergence (eV/A, ASE calculators)")
    relax_cell: bool = True
    optimizer: str = "FIRE"
    batch_size: int = Field(25, ge=1, description="structures per relaxation job (not part of the key)")
    vasp_incar: dict[str, Any] = Field(default_factory=dict, description="user INCAR settings (VASP)")

    def key_settings(self) -> dict[str, Any]:
        """The settings that change a relaxation's result."""
        d = self.model_dump(exclude={"batch_size"})
        if self.name != "vasp":
            d.pop("vasp_incar")
        else:
            for k in ("steps", "fmax", "optimizer"):
                d.pop(k)
        return d

    @property
    def calc_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.key_settings(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.name}/{digest}"


SEVENNET_MODEL = "7net-0"  # SevenNet-0 (11Jul2024), shipped in the sevenn wheel: nothing is downloaded
TORCH_THREADS_ENV = "CSPML_TORCH_THREADS"


def pin_torch_threads() -> int:
    """Limit torch to ``$CSPML_TORCH_THREADS`` threads (default 1) in this process; returns the count.

    Relaxations run one per process and share the cores: with torch's default threading, small
    structures relaxed about ten times slower here (issue 10). Called for SevenNet only, so the CHGNet
    path keeps its behaviour."""
    import torch

    n = max(1, int(os.environ.get(TORCH_THREADS_ENV, "1") or 1))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


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
    from atomate2.vasp.flows.core import DoubleRelaxMaker
    from atomate2.vasp.jobs.core import RelaxMaker
    from atomate2.vasp.sets.core import RelaxSetGenerator

    def _maker() -> RelaxMaker:
        return RelaxMaker(input_set_generator=RelaxSetGenerator(user_incar_settings=dict(settings.vasp_incar)))

    return DoubleRelaxMaker(relax_maker1=_maker(), relax_maker2=_maker())


def structure_fingerprint(structure: Structure | dict) -> str:
    """A stable hash of a structure's lattice, species and wrapped fractional coordinates (4 decimals)."""
    s = Structure.from_dict(structure) if isinstance(structure, dict) else structure
    frac = np.round(np.mod(s.frac_coords, 1.0), 4) % 1.0
    rows = sorted((str(sp), *(f"{x:.4f}" for x in fc)) for sp, fc in zip(s.species, frac, strict=True))
    lattice = [f"{x:.4f}" for x in np.asarray(s.lattice.matrix).ravel()]
    return hashlib.sha1(json.dumps([lattice, rows]).encode()).hexdigest()[:20]


def relax_key(fingerprint: str, settings: CalculatorSettings) -> str:
    """Cache key of one relaxation: (structure fingerprint, calculator, settings)."""
    return f"{fingerprint}:{settings.calc_id}"
