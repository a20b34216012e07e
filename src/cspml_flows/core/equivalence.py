"""Structure equivalence: pymatgen's ``StructureMatcher`` at a named set of tolerances, behind one wrapper.

The standard CSP evaluation's tolerances (:data:`CSP_TOLERANCES`) are the default everywhere; pymatgen's own,
stricter defaults (:data:`PYMATGEN_TOLERANCES`) serve as a second scoring of benchmark predictions.

:class:`Matcher` is the only code that calls the matcher's private steps (cell reduction, preprocessing,
matching), so that a structure is reduced once and compared many times. :class:`DistinctStructures` is the
one "same crystal?" rule of deduplication: a structure is new unless a kept one matches it.

A matcher error (a degenerate lattice, a cell that cannot be reduced) reads as "no match" everywhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerances:
    """A named set of ``StructureMatcher`` tolerances (lattice length, site distance, angle in degrees)."""

    name: str
    ltol: float
    stol: float
    angle_tol: float

    @property
    def kwargs(self) -> dict[str, float]:
        """The tolerances as ``StructureMatcher`` keyword arguments."""
        return {"stol": self.stol, "angle_tol": self.angle_tol, "ltol": self.ltol}

    def within(self, other: Tolerances) -> bool:
        """Whether no tolerance exceeds ``other``'s: every match under these is then a match under ``other``.

        The matcher tries the lattices within ``ltol`` and ``angle_tol`` and accepts a site mapping below
        ``stol``, so tighter tolerances search a subset of the looser ones' mappings with a lower bar.
        """
        return self.ltol <= other.ltol and self.stol <= other.stol and self.angle_tol <= other.angle_tol


# The matcher of the standard CSP evaluation (DiffCSP compute_metrics.py).
CSP_TOLERANCES = Tolerances("csp", ltol=0.3, stol=0.5, angle_tol=10)
# pymatgen's own StructureMatcher defaults, stricter (a distortion within the CSP tolerances can fail them).
PYMATGEN_TOLERANCES = Tolerances("pymatgen_default", ltol=0.2, stol=0.3, angle_tol=5)
MATCHER_KWARGS = CSP_TOLERANCES.kwargs


def structure_matcher(tolerances: Tolerances = CSP_TOLERANCES) -> StructureMatcher:
    """A ``StructureMatcher`` with ``tolerances`` (default: the standard CSP evaluation's)."""
    return StructureMatcher(**tolerances.kwargs)


class Matcher:
    """pymatgen's ``StructureMatcher`` (CSP tolerances unless told) with its reduction and matching steps public.

    ``reduced=True`` on a comparison says that the structures are already primitive Niggli cells from
    :meth:`reduce`; the result equals the comparison of the original structures. The reduction does not
    depend on the tolerances, so one reduced cell serves matchers of every tolerance set.
    """

    def __init__(self, tolerances: Tolerances = CSP_TOLERANCES) -> None:
        self.tolerances = tolerances
        self.sm = structure_matcher(tolerances)

    def reduce(self, structure: Structure) -> Structure | None:
        """Primitive Niggli cell, as the matcher reduces it (``None`` where it cannot be computed)."""
        try:
            return self.sm._get_reduced_structure(structure, primitive_cell=True, niggli=True)
        except Exception:  # pymatgen raises assorted errors on degenerate cells: the cell then matches nothing
            logger.debug("cell reduction failed", exc_info=True)
            return None

    def fit(self, a: Structure | None, b: Structure | None, *, reduced: bool = False) -> bool:
        """``StructureMatcher.fit(a, b)``; a missing cell or a matcher error is no match."""
        if a is None or b is None:
            return False
        try:
            return bool(self.sm.fit(a, b, skip_structure_reduction=reduced))
        except Exception:  # pymatgen raises assorted errors on degenerate cells: read as no match
            logger.debug("structure fit failed", exc_info=True)
            return False

    def fit_anonymous(self, a: Structure | None, b: Structure | None, *, reduced: bool = False) -> bool:
        """``StructureMatcher.fit_anonymous(a, b)``; a missing cell or a matcher error is no match."""
        if a is None or b is None:
            return False
        try:
            return bool(self.sm.fit_anonymous(a, b, skip_structure_reduction=reduced))
        except Exception:  # pymatgen raises assorted errors on degenerate cells: read as no match
            logger.debug("anonymous structure fit failed", exc_info=True)
            return False

    def rms(
        self, structure: Structure | None, reference: Structure | None, *, first: bool = False, reduced: bool = False
    ) -> float | None:
        """RMS displacement of ``structure`` matched onto a reduced ``reference`` (from :meth:`reduce`).

        The value of ``StructureMatcher.get_rms_dist(structure, original_reference)[0]``; ``None`` where they
        do not match (or the matcher fails). ``first`` stops at the first match under the tolerance (whether
        they match is then exact, the RMS an upper bound). ``reduced``: ``structure`` too is from
        :meth:`reduce` (a missing cell is no match).
        """
        red = structure if reduced else self.reduce(structure) if structure is not None else None
        if red is None or reference is None:
            return None
        try:
            s1, s2, fu, s1_supercell = self.sm._preprocess(red, reference, skip_structure_reduction=True)
            m = self.sm._match(s1, s2, fu, s1_supercell, use_rms=True, break_on_match=first)
        except Exception:  # pymatgen raises assorted errors on degenerate cells: read as no match
            logger.debug("structure match failed", exc_info=True)
            return None
        return None if m is None else float(m[0])

    def lattices_can_match(self, a: Structure, b: Structure) -> bool:
        """False when :meth:`fit_anonymous` of two reduced cells of as many sites must fail.

        That is when no lattice of ``a`` is within the matcher's length and angle tolerances of ``b``'s once
        both are scaled to the same volume (the matcher's own first step, before it tries each species
        mapping). True otherwise, and for cells of different sizes (left to the matcher).
        """
        sm = self.sm
        if len(a) != len(b) or not sm._scale or sm._supercell:
            return True
        ratio = (b.volume / a.volume) ** (1 / 6)
        la, lb = Lattice(a.lattice.matrix * ratio), Lattice(b.lattice.matrix / ratio)
        for _, _, scale_m in la.find_all_mappings(lb, ltol=sm.ltol, atol=sm.angle_tol, skip_rotation_matrix=True):
            if math.isclose(abs(np.linalg.det(scale_m)), 1, abs_tol=0.5, rel_tol=0):
                return True
        return False


class DistinctStructures:
    """Structures kept one per equivalence class: :meth:`add` keeps a structure that no kept one matches.

    Two structures are the same crystal when ``StructureMatcher.fit(kept, new)`` holds. Each structure is
    reduced once; cells of other reduced formulas or sizes are skipped without a fit (the matcher, with no
    supercells or subsets, cannot match them), so the result equals a fit of every pair.
    """

    def __init__(self, known: Iterable[Structure] = (), matcher: Matcher | None = None) -> None:
        self.matcher = matcher or Matcher()
        self._kept = [r for r in map(self.matcher.reduce, known) if r is not None]

    def add(self, structure: Structure) -> bool:
        """Keep ``structure`` unless a kept one is the same crystal; whether it was kept."""
        red = self.matcher.reduce(structure)
        if self._match(red):
            return False
        if red is not None:  # a cell that cannot be reduced matches nothing: no need to keep it
            self._kept.append(red)
        return True

    def _match(self, red: Structure | None) -> bool:
        if red is None:
            return False
        formula = red.composition.reduced_formula
        return any(
            len(k) == len(red) and k.composition.reduced_formula == formula and self.matcher.fit(k, red, reduced=True)
            for k in self._kept
        )
