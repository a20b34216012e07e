"""Symmetry deduplication of candidate structures and symmetrised output."""

from __future__ import annotations

import logging

from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from cspml_flows.core.equivalence import DistinctStructures

logger = logging.getLogger(__name__)


def deduplicate(structures: list[Structure]) -> list[int]:
    """Indices of the first structure of each StructureMatcher-equivalence class, in input order."""
    distinct = DistinctStructures()
    return [i for i, s in enumerate(structures) if distinct.add(s)]


def symmetrize(structure: Structure, symprec: float = 0.1) -> tuple[Structure, int, str]:
    """spglib-refined conventional cell, space-group number and symbol (input returned if spglib fails)."""
    try:
        sga = SpacegroupAnalyzer(structure, symprec=symprec)
        return sga.get_refined_structure(), sga.get_space_group_number(), sga.get_space_group_symbol()
    except Exception:  # spglib and pymatgen raise assorted errors on odd cells: the cell is written as given
        logger.debug("no symmetry found for %s: written in P1", structure.composition.reduced_formula, exc_info=True)
        return structure, 1, "P1"


def to_cif(structure: Structure, symprec: float | None = 0.1) -> str:
    """CIF text with space-group symmetry when spglib finds it."""
    try:
        return str(CifWriter(structure, symprec=symprec))
    except Exception:  # spglib and pymatgen raise assorted errors on odd cells: written without symmetry
        logger.debug("CIF without symmetry for %s", structure.composition.reduced_formula, exc_info=True)
        return str(CifWriter(structure))
