"""Symmetry deduplication of candidate structures and symmetrised output."""

from __future__ import annotations

from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from cspml_flows.core.prototype import safe_fit, structure_matcher


def deduplicate(structures: list[Structure]) -> list[int]:
    """Indices of the first structure of each StructureMatcher-equivalence class, in input order."""
    sm = structure_matcher()
    kept: list[int] = []
    for i, s in enumerate(structures):
        if not any(_same(sm, structures[j], s) for j in kept):
            kept.append(i)
    return kept


def _same(sm, a: Structure, b: Structure) -> bool:
    if a.composition.reduced_formula != b.composition.reduced_formula:
        return False
    return safe_fit(sm, a, b)


def symmetrize(structure: Structure, symprec: float = 0.1) -> tuple[Structure, int, str]:
    """spglib-refined conventional cell, space-group number and symbol (input returned if spglib fails)."""
    try:
        sga = SpacegroupAnalyzer(structure, symprec=symprec)
        return sga.get_refined_structure(), sga.get_space_group_number(), sga.get_space_group_symbol()
    except Exception:
        return structure, 1, "P1"


def to_cif(structure: Structure, symprec: float | None = 0.1) -> str:
    """CIF text with space-group symmetry when spglib finds it."""
    try:
        return str(CifWriter(structure, symprec=symprec))
    except Exception:
        return str(CifWriter(structure))
