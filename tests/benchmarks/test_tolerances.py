"""The CSP benchmark scored at two tolerance sets: the standard CSP evaluation's and pymatgen's defaults.

A distorted copy of a real Materials Project structure (one lattice angle opened by 7 degrees, or one axis
stretched by 40 %) is the same crystal within the loose tolerances (angle_tol 10, ltol 0.3) but not within
pymatgen's defaults (angle_tol 5, ltol 0.2). The benchmark result carries both sets of rates and ceilings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from benchmarks.ceiling import coverage
from benchmarks.config import BenchmarkConfig
from benchmarks.csp_tables import markdown_table
from benchmarks.runner import STANDARD, Sample, ablations, baselines, result_record, run_engine
from benchmarks.scoring import TOLERANCE_SETS, check_nested, query_rms, rms_tables, tolerance_key
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from cspml_flows.core.composition import roles
from cspml_flows.core.config import PACKAGED_MODEL
from cspml_flows.core.equivalence import CSP_TOLERANCES, PYMATGEN_TOLERANCES, Matcher
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.schema import template_doc_from_structure

TIGHT = tolerance_key(PYMATGEN_TOLERANCES)


def sheared(s: Structure, degrees: float) -> Structure:
    """``s`` with its lattice angle beta opened by ``degrees`` (fractional coordinates kept)."""
    a, b, c, alpha, beta, gamma = s.lattice.parameters
    return Structure(Lattice.from_parameters(a, b, c, alpha, beta + degrees, gamma), s.species, s.frac_coords)


def stretched(s: Structure, factor: float) -> Structure:
    """``s`` with its c axis stretched by ``factor`` (fractional coordinates kept)."""
    a, b, c, alpha, beta, gamma = s.lattice.parameters
    return Structure(Lattice.from_parameters(a, b, c * factor, alpha, beta, gamma), s.species, s.frac_coords)


@pytest.fixture(scope="module")
def limno2(data_dir: Path) -> Structure:
    """LiMnO2 (mp-1002572, 16 sites) from the MP-20 binary/ternary test split."""
    df = pd.read_csv(data_dir / "mp_20_biternary" / "test.csv.gz", nrows=8)
    row = df[df["material_id"] == "mp-1002572"].iloc[0]
    return Structure.from_str(row["cif"], fmt="cif")


def test_tolerance_sets_are_the_csp_and_pymatgen_ones():
    default = StructureMatcher()
    assert (default.ltol, default.stol, default.angle_tol) == (0.2, 0.3, 5)
    assert PYMATGEN_TOLERANCES.kwargs == {"ltol": 0.2, "stol": 0.3, "angle_tol": 5}
    assert CSP_TOLERANCES.kwargs == {"ltol": 0.3, "stol": 0.5, "angle_tol": 10}
    assert PYMATGEN_TOLERANCES.within(CSP_TOLERANCES)
    assert not CSP_TOLERANCES.within(PYMATGEN_TOLERANCES)
    assert TOLERANCE_SETS == (CSP_TOLERANCES, PYMATGEN_TOLERANCES)
    with pytest.raises(ValueError, match="loose to tight"):
        check_nested((PYMATGEN_TOLERANCES, CSP_TOLERANCES))


@pytest.mark.parametrize("distort", [lambda s: sheared(s, 7), lambda s: stretched(s, 1.4)], ids=["shear", "stretch"])
def test_a_distortion_matches_at_the_loose_and_not_at_the_tight_tolerances(limno2, distort):
    pred = distort(limno2)
    loose, tight = Matcher(CSP_TOLERANCES), Matcher(PYMATGEN_TOLERANCES)
    assert loose.fit(limno2, pred)
    assert not tight.fit(limno2, pred)
    assert StructureMatcher(**CSP_TOLERANCES.kwargs).get_rms_dist(pred, limno2) is not None
    assert StructureMatcher().get_rms_dist(pred, limno2) is None

    tables = rms_tables([limno2], [[pred, limno2]], workers=1)
    assert list(tables) == [CSP_TOLERANCES.name, PYMATGEN_TOLERANCES.name]
    (loose_row,), (tight_row,) = tables[CSP_TOLERANCES.name], tables[PYMATGEN_TOLERANCES.name]
    expected = StructureMatcher(**CSP_TOLERANCES.kwargs).get_rms_dist(pred, limno2)[0]
    assert loose_row[0] == pytest.approx(expected, abs=1e-9)
    assert tight_row[0] is None
    assert loose_row[1] == pytest.approx(0, abs=1e-9)
    assert tight_row[1] == pytest.approx(0, abs=1e-9)  # the undistorted copy matches at both
    # one pass over both sets gives what each set gives alone
    assert query_rms((limno2.as_dict(), [pred.as_dict(), limno2.as_dict()])) == loose_row
    alone = rms_tables([limno2], [[pred, limno2]], (PYMATGEN_TOLERANCES,), workers=1)
    assert alone[PYMATGEN_TOLERANCES.name] == [tight_row]


def test_a_small_distortion_matches_at_both(limno2):
    pred = sheared(limno2, 3)
    tables = rms_tables([limno2], [[pred]], workers=1)
    assert all(t[0][0] is not None for t in tables.values())


# A hand-built pool of cubic perovskites and rocksalts; queries of new compositions, two of them distorted.
PEROVSKITE = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
ROCKSALT = [[0, 0, 0], [0.5, 0.5, 0.5]]  # primitive cell, two sites


def perovskite(a: str, b: str, x: str, lattice_a: float) -> Structure:
    return Structure(Lattice.cubic(lattice_a), [a, b, x, x, x], PEROVSKITE)


def rocksalt(a: str, b: str, lattice_a: float) -> Structure:
    lattice = Lattice.from_parameters(*[lattice_a / 2**0.5] * 3, 60, 60, 60)
    return Structure(lattice, [a, b], ROCKSALT)


POOL = {
    "srtio3": perovskite("Sr", "Ti", "O", 3.905),
    "batio3": perovskite("Ba", "Ti", "O", 4.00),
    "bazro3": perovskite("Ba", "Zr", "O", 4.19),
    "nacl": rocksalt("Na", "Cl", 5.64),
    "kcl": rocksalt("K", "Cl", 6.29),
    "mgo": rocksalt("Mg", "O", 4.21),
}
QUERIES = {
    "q-cazro3": perovskite("Ca", "Zr", "O", 4.02),
    "q-srzro3": stretched(perovskite("Sr", "Zr", "O", 4.10), 1.4),
    "q-nai": rocksalt("Na", "I", 6.47),
    "q-kbr": sheared(rocksalt("K", "Br", 6.60), 7),
}


@pytest.fixture(scope="module")
def hand_pool() -> TemplateIndex:
    docs = [
        template_doc_from_structure(s, f"hand-{key}", source="hand-built", e_above_hull=0.0).model_dump(mode="json")
        for key, s in POOL.items()
    ]
    return TemplateIndex.from_docs(docs, workers=1)


def test_distorted_queries_are_covered_at_the_loose_tolerances_only(hand_pool):
    gts = list(QUERIES.values())
    covered = coverage(hand_pool, gts, list(QUERIES), strict=False, workers=1)
    assert covered[CSP_TOLERANCES.name].tolist() == [True, True, True, True]
    assert covered[PYMATGEN_TOLERANCES.name].tolist() == [True, False, True, False]


def test_benchmark_result_carries_both_tolerance_sets(hand_pool):
    cfg = BenchmarkConfig(protocol="hand", workers=1, baselines=("random", "nearest"), speed=False)
    gts = list(QUERIES.values())
    comps = [g.composition for g in gts]
    sample = Sample(list(QUERIES), gts, comps, [roles(c) for c in comps], [{q} for q in QUERIES], strict=False)
    model = SimilarityModel.load(PACKAGED_MODEL)
    predictor = CSPPredictor(hand_pool, model, workers=1)
    timings: dict[str, float] = {}
    run = run_engine(cfg, hand_pool, predictor, sample, timings)
    others = ablations(cfg, hand_pool, model, sample) | baselines(cfg, hand_pool, predictor, sample)
    result = json.loads(json.dumps(result_record(cfg, hand_pool, sample, run, others, {}, timings), default=float))

    assert result["tolerances"] == CSP_TOLERANCES.kwargs
    tight = result[TIGHT]
    assert tight["tolerances"] == PYMATGEN_TOLERANCES.kwargs
    # every query's prototype is in the pool: all match at the loose tolerances, the distorted two not at the tight
    assert (result["ceiling"], tight["ceiling"]) == (1.0, 0.5)
    assert (result["top20"], tight["top20"]) == (1.0, 0.5)
    assert tight["top1"] <= result["top1"]
    methods = {"pair score only (no ranker)", "random", "nearest"}
    assert set(tight["baselines"]) == set(result["baselines"]) == methods
    for name, loose in result["baselines"].items():
        assert tight["baselines"][name]["top20"] <= loose["top20"]
        assert set(tight["baselines"][name]) == {k for k in loose if k != "predict_seconds"}
    assert tight["top1_over_ceiling"] == pytest.approx(tight["top1"] / 0.5)
    assert set(result["paired_rmse"]) == methods and all(p["n"] <= 4 for p in result["paired_rmse"].values())
    assert run.covered.tolist() == run.covered_by_tolerance[STANDARD].tolist() == [True] * 4

    md = markdown_table([result])
    standard_table, rest = md.split("\n\nThe same predictions at the pymatgen default StructureMatcher tolerances ")
    assert "(ltol=0.2, stol=0.3, angle_tol=5)" in rest
    assert standard_table.count("| hand ") == rest.split("\n\n")[1].count("| hand ") == 4


def test_paired_rmse_compares_common_matches_only():
    from benchmarks.scoring import paired_rmse

    a = [[0.1, None], [None], [0.3], []]
    b = [[0.2], [0.05], [0.1], [0.4]]
    assert paired_rmse(a, b) == {"n": 2, "rmse_top1": pytest.approx(0.2), "other_rmse_top1": pytest.approx(0.15)}
    assert paired_rmse([[None]], [[0.1]])["n"] == 0
