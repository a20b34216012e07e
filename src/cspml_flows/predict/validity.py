"""Validity rules of the standard CSP evaluation (DiffCSP ``compute_metrics.py``).

- composition: SMACT charge neutrality with the Pauling electronegativity test; single-element and
  all-metal compositions pass. This is a *flag* on predictions, not a filter.
- structure: every interatomic distance at least 0.5 A and volume at least 0.1 A^3; candidates failing
  this are dropped.
"""

from __future__ import annotations

import itertools
from functools import cache, lru_cache

import numpy as np
import smact
from pymatgen.core import Composition, Structure
from smact.screening import pauling_test

MIN_DISTANCE = 0.5
MIN_VOLUME = 0.1


@cache
def _smact_element(symbol: str) -> smact.Element:
    """SMACT's element record (its constructor reads several data tables: once per element)."""
    return smact.Element(symbol)


@lru_cache(maxsize=100000)
def _smact_valid_formula(formula: str) -> bool:
    """SMACT charge neutrality with the Pauling test of a reduced formula (see :func:`smact_valid`)."""
    comp = Composition(formula)
    symbols = tuple(el.symbol for el in comp)
    if len(symbols) == 1:
        return True
    if all(s in smact.metals for s in symbols):
        return True
    elems = [_smact_element(s) for s in symbols]
    electronegs = [e.pauling_eneg for e in elems]
    ox_combos = [e.oxidation_states or [] for e in elems]
    counts = [round(comp[s]) for s in symbols]
    threshold = max(counts)
    for ox_states in itertools.product(*ox_combos):
        if smact.neutral_ratios(ox_states, stoichs=[(c,) for c in counts], threshold=threshold):
            try:
                ok = pauling_test(ox_states, electronegs)
            except TypeError:  # an element without a Pauling electronegativity
                ok = True
            if ok:
                return True
    return False


def smact_valid(comp: Composition | str) -> bool:
    """SMACT charge-neutrality validity of a composition (counts of the reduced formula)."""
    c = comp if isinstance(comp, Composition) else Composition(comp)
    reduced = c.reduced_composition
    return _smact_valid_formula("".join(f"{el.symbol}{round(a)}" for el, a in reduced.items()))


def min_distance(structure: Structure) -> float:
    """Shortest interatomic distance (minimum image; a one-site cell: its shortest lattice vector)."""
    if len(structure) == 1:
        return float(min(structure.lattice.abc))
    dm = structure.distance_matrix
    np.fill_diagonal(dm, np.inf)
    return float(dm.min())


def structure_valid(structure: Structure, cutoff: float = MIN_DISTANCE) -> bool:
    """Distance rule of the standard evaluation."""
    return structure.volume >= MIN_VOLUME and min_distance(structure) >= cutoff
