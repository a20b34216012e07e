"""Energy as a ranking feature: the energy cache, the blend math, fitting the weight on
given arrays, and SevenNet-0 through the flows' relaxation code (skipped without ``sevenn``)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from ase.calculators.emt import EMT
from benchmarks.energy_blend import (
    QuerySet,
    blend,
    fit_logistic,
    fit_weight,
    hits_at,
    order,
    paired,
    reciprocal_rank,
    relative_energy,
    relative_score,
    spread,
)
from benchmarks.energy_cache import EnergyCache, single_points
from benchmarks.energy_sets import load_outcomes
from pymatgen.core import Lattice, Structure

from cspml_flows.core.errors import ConfigError
from cspml_flows.flows.calculators import CalculatorSettings, relax_maker
from cspml_flows.flows.relax import RelaxationMaker, relax_one
from cspml_flows.predict.retrieve import Ranked
from cspml_flows.training.outcomes import Outcomes

SI = Structure(Lattice([[0, 2.735, 2.735], [2.735, 0, 2.735], [2.735, 2.735, 0]]), ["Si"] * 2, [[0, 0, 0], [0.25] * 3])
CU = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])


def test_energy_cache_round_trip_and_keys(tmp_path: Path):
    path = tmp_path / "e" / "energies.json"
    cache = EnergyCache(path)
    k_si, k_cu = cache.key(SI, "x/sp"), cache.key(CU, "x/sp")
    assert k_si != k_cu and k_si != cache.key(SI, "y/sp")  # structure and calculator are both in the key
    assert cache.key(SI.copy(), "x/sp") == k_si  # the fingerprint, not the object
    cache.put(k_si, {"energy_per_atom": -5.4, "seconds": 0.1})
    cache.put(k_cu, {"energy_per_atom": None, "seconds": 0.2})
    assert not path.exists()  # flushed in batches
    cache.flush()
    again = EnergyCache(path)
    assert len(again) == 2 and again.get(k_si)["energy_per_atom"] == -5.4 and again.get(k_cu)["energy_per_atom"] is None
    path.write_text("{not json")
    assert len(EnergyCache(path)) == 0  # a damaged cache is only a cache


def test_single_points_use_the_cache(tmp_path: Path):
    calls = []

    def calculator():
        calls.append(1)
        return EMT()

    cache = EnergyCache(tmp_path / "c.json")
    first = single_points([CU, CU.copy()], calculator, "emt//single-point", cache)
    assert len(calls) == 1  # the second, identical structure came from the cache
    assert first[0] == first[1] and math.isfinite(first[0]["energy_per_atom"]) and first[0]["seconds"] >= 0
    cache.flush()
    again = single_points([CU], calculator, "emt//single-point", EnergyCache(tmp_path / "c.json"))
    assert len(calls) == 1 and again[0]["energy_per_atom"] == first[0]["energy_per_atom"]


def test_relative_features_and_blend():
    e = np.array([-5.0, -5.2, np.nan, -4.9])
    rel = relative_energy(e)
    assert np.allclose(rel, [0.2, 0.0, 0.3, 0.3])  # missing: the query's highest
    assert np.allclose(relative_energy(np.array([np.nan, np.nan])), 0.0)
    # an extrapolation artefact (below every PBE energy) is not the lowest, it counts as the highest
    assert np.allclose(relative_energy(np.array([-110.0, -5.0, -5.5])), [0.5, 0.5, 0.0])
    assert np.allclose(relative_energy(np.array([-5.0, -3.0, 40.0])), [0.0, 1.0, 1.0])  # clipped at 1 eV/atom
    assert np.allclose(relative_score(np.array([1.0, 3.0, 2.0])), [-2.0, 0.0, -1.0])
    assert spread([np.zeros(3)]) == 1.0 and math.isclose(spread([np.array([0.0, 2.0])]), 1.0)
    s = np.array([0.0, -1.0, -2.0])
    en = np.array([0.4, 0.0, 0.1])
    assert list(order(blend(s, en, 0.0))) == [0, 1, 2]  # w = 0: the ranker's order
    assert list(order(blend(s, en, 10.0))) == [1, 2, 0]  # large w: energy order
    assert np.allclose(blend(s, en, 2.0, s_scale=2.0, e_scale=0.2), s / 2.0 - 2.0 * en / 0.2)
    assert list(order(np.array([1.0, 1.0, 2.0]))) == [2, 0, 1]  # ties keep the incoming order


def test_hits_and_reciprocal_rank():
    hits = [np.array([0, 1, 0], bool), np.array([1, 0], bool), np.zeros(0, bool), np.array([0, 0], bool)]
    scores = [np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0]), np.zeros(0), np.array([1.0, 0.0])]
    assert list(hits_at(hits, scores, 1)) == [False, False, False, False]
    assert list(hits_at(hits, scores, 2)) == [True, True, False, False]
    assert math.isclose(reciprocal_rank(hits, scores), (0.5 + 0.5) / 4)
    qs = QuerySet("t", hits=[np.array([1, 0, 0]), np.array([1, 1, 1]), np.array([0, 0, 1]), np.array([0, 0])])
    assert qs.informative(3) == [0, 2] and qs.informative(2) == [0]


def _synthetic(n: int, energy_helps: bool, seed: int = 0):
    """Queries of 5 candidates; the ranker puts the match second half the time. The match has the lowest
    energy when ``energy_helps``, else the highest."""
    rng = np.random.default_rng(seed)
    s_rel, e_rel, hits = [], [], []
    for _ in range(n):
        s = -np.sort(rng.random(5))[::-1].copy() * 0.1
        s = s - s.max()
        h = np.zeros(5, bool)
        h[rng.integers(0, 2)] = True
        e = rng.random(5) * 0.05 + 0.02
        e[h] = 0.0 if energy_helps else 0.2
        s_rel.append(s)
        e_rel.append(relative_energy(e))
        hits.append(h)
    return s_rel, e_rel, hits


def test_fit_weight_prefers_energy_only_when_it_helps():
    s, e, h = _synthetic(200, energy_helps=True)
    w, curve = fit_weight(s, e, h, spread(s), spread(e))
    top_ranker = hits_at(h, s, 1).mean()
    assert w > 0 and max(c["top1"] for c in curve) > top_ranker + 0.3
    assert curve[0]["w"] == 0.0 and math.isclose(curve[0]["top1"], top_ranker)
    s, e, h = _synthetic(200, energy_helps=False)
    w, curve = fit_weight(s, e, h, spread(s), spread(e))
    assert w == 0.0  # no weight beats the ranker: ties go to the smallest weight


def test_fit_logistic_scores_and_degenerate_labels():
    s, e, h = _synthetic(100, energy_helps=True)
    scorer = fit_logistic([np.column_stack([a, b]) for a, b in zip(s, e, strict=True)], h)
    scores = [scorer(np.column_stack([a, b])) for a, b in zip(s, e, strict=True)]
    assert hits_at(h, scores, 1).mean() > 0.9
    with_empty = fit_logistic(
        [np.zeros((0, 2)), *[np.column_stack([a, b]) for a, b in zip(s, e, strict=True)]], [np.zeros(0, bool), *h]
    )
    assert np.allclose(with_empty(np.ones((2, 2))), scorer(np.ones((2, 2))))  # a query without candidates adds nothing
    flat = fit_logistic([np.zeros((3, 2))], [np.zeros(3, bool)])
    assert np.all(flat(np.zeros((4, 2))) == 0)


def test_paired_difference():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0])
    b = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    r = paired(a, b)
    assert r["n"] == 8 and math.isclose(r["rate"], 5 / 8)
    assert math.isclose(r["se"], math.sqrt(5 / 8 * 3 / 8 / 8))
    d = a - b
    assert math.isclose(r["diff"], 1 / 8) and math.isclose(r["diff_se"], d.std(ddof=1) / math.sqrt(8))
    assert (r["wins"], r["losses"]) == (2, 1)


def test_sevennet_is_a_calculator_setting():
    assert {"emt", "chgnet", "sevennet", "vasp"} <= set(get_args(CalculatorSettings.model_fields["name"].annotation))
    s = CalculatorSettings(name="sevennet", steps=2)
    assert s.calc_id.startswith("sevennet/") and s.calc_id != CalculatorSettings(name="chgnet", steps=2).calc_id


@pytest.mark.skipif(importlib.util.find_spec("sevenn") is None, reason="sevenn not installed (optional extra)")
def test_sevennet_single_point_and_two_step_relaxation(monkeypatch: pytest.MonkeyPatch):
    import torch  # optional extra (the test is skipped without sevenn)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights ship in the wheel: nothing may be fetched
    threads = torch.get_num_threads()
    try:
        settings = CalculatorSettings(name="sevennet", steps=2, fmax=0.01)
        maker = relax_maker(settings)
        assert torch.get_num_threads() == 1  # pinned for the relaxation path
        atoms = SI.to_ase_atoms()
        atoms.calc = maker.calculator
        e_sp = atoms.get_potential_energy() / len(atoms)
        assert -5.8 < e_sp < -5.0  # PBE scale, Si diamond
        strained = SI.copy()
        strained.scale_lattice(SI.volume * 1.08)
        rec = relax_one(RelaxationMaker(relax_maker=maker), {"structure": strained})
        assert rec.energy_per_atom is not None and -5.8 < rec.energy_per_atom < -5.0
        assert rec.n_steps is not None and rec.n_steps <= 4 and rec.calculator == settings.calc_id
    finally:
        torch.set_num_threads(threads)


def test_load_outcomes_refuses_mixed_trainings(tmp_path: Path):
    def write(name: str, rows: list[int]) -> Path:
        out = Outcomes(rows, [[Ranked(7, (0, 1), 0.5, 3, (), (0.5, 0.5, 1.0))] for _ in rows], [np.ones(1)] * len(rows))
        path = tmp_path / name
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            json.dump(out.to_json(), fh)
        return path

    a, b, c = write("outcomes-a.json.gz", [1, 2]), write("outcomes-b.json.gz", [3]), write("outcomes-c.json.gz", [2])
    got = load_outcomes([a, b])
    assert got.rows == [1, 2, 3] and got.candidates[2][0].perm == (0, 1) and got.labels[0].tolist() == [1]
    with pytest.raises(ConfigError, match="repeat held-out rows"):
        load_outcomes([a, c])  # the same held-out row twice: files of two ranker trainings
    with pytest.raises(ConfigError, match="outcome cache"):
        load_outcomes([tmp_path / "outcomes-missing.json.gz"])
