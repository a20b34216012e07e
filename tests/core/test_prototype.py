"""Prototype clustering's pair fits: the lattice precheck never rejects a pair pymatgen's matcher accepts,
and the fits equal ``StructureMatcher.fit_anonymous`` on the original structures."""

from __future__ import annotations

import itertools
from collections import defaultdict

from pymatgen.core import Structure

from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.prototype import fit_pairs


def test_lattice_precheck_keeps_every_match_and_fits_equal_pymatgen(val_docs, hand_docs):
    parts: dict[tuple, list[dict]] = defaultdict(list)
    for d in [*hand_docs, *val_docs]:
        parts[(d["anonymous_formula"], d["nsites_primitive"])].append(d["structure"])
    pairs = [p for members in parts.values() for p in itertools.combinations(members, 2)][:400]
    matcher = Matcher()
    sm = matcher.sm

    def reduced(d: dict) -> Structure:
        return matcher.reduce(Structure.from_dict(d))

    expected = [sm.fit_anonymous(Structure.from_dict(a), Structure.from_dict(b)) for a, b in pairs]
    passed = [matcher.lattices_can_match(reduced(a), reduced(b)) for a, b in pairs]
    assert sum(expected) >= 10 and len(pairs) >= 200  # the sample holds matches and non-matches
    assert all(p for p, e in zip(passed, expected, strict=True) if e)  # a match always passes the precheck
    assert sum(passed) < 0.7 * len(pairs)  # and most non-matching lattices are told apart by it
    structures = [s for p in pairs for s in p]
    got = fit_pairs((structures, [(2 * k, 2 * k + 1) for k in range(len(pairs))]))
    assert got == [bool(e) for e in expected]
