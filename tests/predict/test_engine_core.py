"""Checks of engine shortcuts against the library calls they replace."""

from __future__ import annotations

import numpy as np
import pytest
from benchmarks.diagnostics import MISS_KINDS, miss_breakdown, miss_kind
from benchmarks.scoring import query_rms, summarize
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from cspml_flows.core.equivalence import structure_matcher
from cspml_flows.core.prototype import prototype_info, prototype_label
from cspml_flows.core.structure_checks import min_periodic_distance
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.schema import template_doc_from_structure


def _index(structs: dict[str, Structure]) -> TemplateIndex:
    return TemplateIndex.from_docs(
        [template_doc_from_structure(s, mid).model_dump(mode="json") for mid, s in structs.items()]
    )


def test_fast_rms_equals_get_rms_dist(nacl, kbr, cscl, zincblende):
    """Scoring reduces the ground truth once; results must equal StructureMatcher.get_rms_dist."""
    sm = structure_matcher()
    gt = kbr
    preds = [nacl.copy(), zincblende.copy(), cscl.copy()]
    preds[0].replace_species({"Na": "K", "Cl": "Br"})
    preds[0].perturb(0.05, min_distance=0.01)
    preds[1].replace_species({"Zn": "K", "S": "Br"})
    preds[2].replace_species({"Cs": "K", "Cl": "Br"})
    fast = query_rms((gt.as_dict(), [p.as_dict() for p in preds]))
    for p, f in zip(preds, fast, strict=True):
        ref = sm.get_rms_dist(p, gt)
        if ref is None:
            assert f is None
        else:
            assert f == pytest.approx(ref[0], abs=1e-6)
    assert fast[0] is not None


def test_summarize_topk_and_rmse():
    rms = [[None, 0.1, None], [0.2, None, None], [None, None, None], [None, None, 0.3]]
    out = summarize(rms, ks=(1, 2, 3))
    assert out["top1"] == 0.25
    assert out["top2"] == 0.5
    assert out["top3"] == 0.75
    assert out["rmse_top1"] == pytest.approx(0.2)
    assert out["rmse_top2"] == pytest.approx(0.15)


def test_role_symmetries_detects_swap_equivalence(nacl):
    # rocksalt: swapping the two elements gives the same crystal
    # NiAs-type: no symmetry maps Ni sites onto As sites (the loose benchmark matcher may still pair them)
    nias = Structure(
        Lattice.hexagonal(3.6, 5.0),
        ["Ni", "Ni", "As", "As"],
        [[0, 0, 0], [0, 0, 0.5], [1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]],
    )
    idx = _index({"rs": nacl, "nias": nias})
    rs = int(np.flatnonzero(idx.ids == "rs")[0])
    ni = int(np.flatnonzero(idx.ids == "nias")[0])
    assert (1, 0) in idx.role_symmetries(rs)
    assert idx.role_symmetries(ni) == [(0, 1)]


def test_min_periodic_distance_matches_pymatgen(zincblende, cscl):
    for s in (zincblende, cscl, Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]])):
        dm = s.lattice.get_all_distances(s.frac_coords, s.frac_coords)
        if len(s) == 1:
            expected = min(s.lattice.abc)
        else:
            np.fill_diagonal(dm, np.inf)
            expected = min(dm.min(), min(s.lattice.abc))
        assert min_periodic_distance(s.lattice.matrix, s.frac_coords) == pytest.approx(expected, abs=1e-6)


def test_prototype_info_fast_path_matches_spacegroup_analyzer(srtio3, bazro3, zincblende):
    for s in (srtio3, bazro3, zincblende):
        info = prototype_info(s)
        assert info.label == prototype_label(SpacegroupAnalyzer(s, symprec=0.1, angle_tolerance=5))
    assert prototype_info(srtio3).label == prototype_info(bazro3).label


def test_precomputed_template_geometry_equals_lazy(hand_structures):
    """The index build computes distances and role symmetries in one pass; the lazy path agrees."""
    nias = Structure(
        Lattice.hexagonal(3.6, 5.0),
        ["Ni", "Ni", "As", "As"],
        [[0, 0, 0], [0, 0, 0.5], [1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]],
    )
    idx = _index({**hand_structures, "nias": nias})
    assert idx.min_dist is not None and idx.role_syms is not None
    lazy = _index({**hand_structures, "nias": nias})
    lazy.min_dist, lazy.role_syms = None, None
    for i in range(len(idx)):
        assert idx.role_symmetries(i) == lazy.role_symmetries(i)
        assert idx.cell(i)[3] == pytest.approx(lazy.cell(i)[3])
    sub = idx.subset(idx.ids != "nias")
    assert sub.role_syms == [idx.role_syms[i] for i in np.flatnonzero(idx.ids != "nias")]


# ---------------------------------------------------------------- miss diagnostics


@pytest.mark.parametrize(
    ("row", "smact_ok", "covered", "anonymous", "kind"),
    [
        ([0.1, None], True, True, True, None),  # top-1 matched
        ([None, 0.2], False, True, False, "composition_not_smact_valid"),
        ([None, None], True, True, True, "right_prototype_wrong_assignment"),
        ([None, 0.2, float("nan")], True, True, False, "match_elsewhere_in_top20"),
        ([None, None], True, True, False, "match_only_outside_top20"),
        ([], True, True, False, "match_only_outside_top20"),  # no candidate at all
        ([None, None], True, False, False, "no_template_matches"),
    ],
)
def test_miss_kind(row, smact_ok, covered, anonymous, kind):
    assert miss_kind(row, smact_ok, covered, anonymous) == kind


def test_miss_breakdown_finds_wrong_assignment(srtio3, kbr):
    """A perovskite with Sr and Ti swapped is the right prototype with the wrong assignment; rocksalt
    for rocksalt matched; the shares are of all queries."""
    swapped = srtio3.copy()
    swapped.replace_species({"Sr": "Ti", "Ti": "Sr"})
    gts = [srtio3, kbr, kbr, srtio3]
    top1 = [swapped, kbr, None, kbr]
    rms = [[None], [0.0], [], [None]]
    out = miss_breakdown(rms, gts, top1, [True, True, True, True], [True, True, False, True], workers=1)
    assert set(out) == set(MISS_KINDS)
    assert out["right_prototype_wrong_assignment"] == 0.25
    assert out["no_template_matches"] == 0.25  # the query without any candidate, not covered
    assert out["match_only_outside_top20"] == 0.25  # KBr's rocksalt offered for SrTiO3: no anonymous fit
    assert sum(out.values()) == 0.75  # one hit
