"""Symmetry and prototype labels (spglib through pymatgen) and prototype clustering by StructureMatcher."""

from __future__ import annotations

from dataclasses import dataclass

from pymatgen.analysis.prototypes import get_protostructure_label_from_spg_analyzer
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

# The matcher of the standard CSP evaluation (DiffCSP compute_metrics.py).
MATCHER_KWARGS = {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}
_CENTERING = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "F": 4, "R": 3, "S": 2}


def structure_matcher() -> StructureMatcher:
    return StructureMatcher(**MATCHER_KWARGS)


@dataclass(frozen=True)
class PrototypeInfo:
    label: str | None
    spacegroup_number: int | None
    spacegroup_symbol: str | None
    nsites_primitive: int


def prototype_info(structure: Structure, symprec: float = 0.1) -> PrototypeInfo:
    """AFLOW-style prototype label (without chemical system), space group and primitive-cell size."""
    try:
        sga = SpacegroupAnalyzer(structure, symprec=symprec, angle_tolerance=5)
        number, symbol = sga.get_space_group_number(), sga.get_space_group_symbol()
        label = get_protostructure_label_from_spg_analyzer(sga).split(":")[0]
        if label.startswith("Invalid"):
            label = None
        pearson = sga.get_pearson_symbol()
        n_conv = int(pearson[2:])
        nprim = n_conv // _CENTERING.get(pearson[1], 1)
        return PrototypeInfo(label, number, symbol, nprim)
    except Exception:  # spglib can fail on odd cells; fall back to the cell as given
        return PrototypeInfo(None, None, None, len(structure))
