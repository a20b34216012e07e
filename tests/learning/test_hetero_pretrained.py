"""Hetero model, issue 13: the CHGNet embedding cache, the energy-ordered polymorph ranking on a hand-made case,
the structure of the hetero package (no import cycle, module sizes)."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from cspml_flows.core.composition import roles
from cspml_flows.learning.hetero import embeddings as emb_mod
from cspml_flows.learning.hetero.embeddings import N_EMBED, embedding_features
from cspml_flows.predict.inverse import substitution_prior
from cspml_flows.predict.predictor import Candidate, Prediction
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.schema import template_doc_from_structure


def _rocksalt(elements: tuple[str, str], a: float) -> Structure:
    fcc = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    return Structure(Lattice.cubic(a), [elements[0]] * 4 + [elements[1]] * 4, fcc + [[x + 0.5 for x in p] for p in fcc])


def _b2(elements: tuple[str, str], a: float) -> Structure:
    return Structure(Lattice.cubic(a), list(elements), [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def small_index() -> TemplateIndex:
    docs = [
        template_doc_from_structure(s, mid, e_above_hull=0.0).model_dump(mode="json")
        for mid, s in (
            ("rs-NaCl", _rocksalt(("Na", "Cl"), 5.64)),
            ("rs-KCl", _rocksalt(("K", "Cl"), 5.64)),  # same cell as NaCl: only the species differ
            ("b2-CsCl", _b2(("Cs", "Cl"), 4.12)),
        )
    ]
    return TemplateIndex.from_docs(docs)


# ------------------------------------------------------------------------------------- embedding cache
def test_embeddings_species_and_role_variants(small_index):
    idx = small_index
    sp = embedding_features(list(idx.ids), idx.structures, idx.roles, "species", cache=False)
    ro = embedding_features(list(idx.ids), idx.structures, idx.roles, "role", cache=False)
    assert sp.shape == ro.shape == (3, N_EMBED) and np.all(np.isfinite(sp))
    i, j = (int(np.flatnonzero(idx.ids == m)[0]) for m in ("rs-NaCl", "rs-KCl"))
    assert not np.allclose(sp[i], sp[j])  # the potential sees Na and K
    assert np.allclose(ro[i], ro[j], atol=1e-5)  # species replaced by role: same structure, same vector
    assert not np.allclose(ro[i], ro[2], atol=1e-3)  # rocksalt and CsCl types differ
    assert np.any(sp[i, 64:128]) and np.any(sp[i, 128:192]) and not np.any(sp[i, 192:])  # two role blocks


def test_embedding_cache_hit_invalidation_and_damage(small_index, cspml_home, monkeypatch, caplog):
    idx = small_index
    calls: list[int] = []
    real = emb_mod.embed

    def counting(structures, role_list, variant="species", batch_size=32):
        calls.append(len(structures))
        return real(structures, role_list, variant, batch_size)

    monkeypatch.setattr(emb_mod, "embed", counting)
    args = (list(idx.ids), idx.structures, idx.roles, "species")
    first = embedding_features(*args)
    path = emb_mod.cache_path("species")
    assert path.is_file() and calls == [3]
    assert np.array_equal(embedding_features(*args), first) and calls == [3]  # hit: nothing computed
    # the store changed: one template's structure is different under the same id -> only it is recomputed
    changed = list(idx.structures)
    changed[0] = _rocksalt(("Na", "Cl"), 5.9).as_dict()
    again = embedding_features(list(idx.ids), changed, idx.roles, "species")
    assert calls == [3, 1]
    assert not np.allclose(again[0], first[0]) and np.array_equal(again[1:], first[1:])
    # a damaged file is recomputed (and rewritten), never trusted
    path.write_bytes(b"not an npz")
    with caplog.at_level("WARNING"):
        back = embedding_features(list(idx.ids), changed, idx.roles, "species")
    assert calls == [3, 1, 3] and "unreadable" in caplog.text
    assert np.allclose(back, again, atol=1e-6)
    assert emb_mod.read_cache(path, "species")  # valid again
    assert emb_mod.read_cache(path, "role") == {}  # another variant's file is not used


# ----------------------------------------------------------------------------- energy-ordered polymorphs
def test_energy_ordered_polymorph_ranking_chgnet(tmp_path):
    """NaCl: the rocksalt ground state and the CsCl-type (B2) polymorph, which CHGNet puts higher in energy.
    The retrieval score prefers B2; with the energy weight the rocksalt comes first, without it B2 does."""
    from benchmarks.energy_cache import EnergyCache
    from benchmarks.polymorph_energy import EnergyRanker, choose_weight, energy_settings, relaxed_energies

    rs, b2 = _rocksalt(("Na", "Cl"), 5.64), _b2(("Na", "Cl"), 3.4)
    settings = energy_settings(steps=60, fmax=0.1)
    cache = EnergyCache(tmp_path / "energies.json")
    e_rs, e_b2 = (r["energy_per_atom"] for r in relaxed_energies([rs, b2], settings, cache))
    assert e_rs < e_b2 - 0.02  # the known order under CHGNet 0.3.0

    def pred() -> Prediction:
        common = {"prototype": None, "min_distance": 2.8, "assignment": {}}
        cands = [
            Candidate(1, b2, 0.9, "b2", "CsCl", template_spacegroup=221, **common),
            Candidate(2, rs, 0.6, "rs", "KCl", template_spacegroup=225, **common),
        ]
        return Prediction(formula="NaCl", anonymous_formula="AB", smact_valid=True, candidates=cands)

    def ids(ranker: EnergyRanker) -> list[str]:
        return [c.template_id for c in ranker.rerank([pred()], k=2)[0].candidates]

    assert ids(EnergyRanker(0.0, settings, cache)) == ["b2", "rs"]  # score only
    assert ids(EnergyRanker(4.0, settings, cache)) == ["rs", "b2"]  # energy-aware
    assert set(EnergyCache(tmp_path / "energies.json").data)  # energies cached on disk: reruns are free
    # the weight is learned: with the ground state at candidate 1 (hits row 0), energy earns a weight > 0
    hits = [np.array([[False, True], [True, False]])]
    w, curve = choose_weight(hits, [np.array([0.9, 0.6])], [np.array([e_b2, e_rs])], k=2)
    assert w > 0 and curve[0]["ground_state_first"] == 0.0 and max(c["ground_state_first"] for c in curve) == 1.0
    # where the score is already right, no energy weight is taken (ties go to the smaller weight)
    w0, _ = choose_weight([hits[0][::-1]], [np.array([0.9, 0.6])], [np.array([e_b2, e_rs])], k=2)
    assert w0 == 0.0


def test_inverse_prior_is_pymatgen_substitution_probability(small_index):
    """The chemistry prior of the inverse score: K for Na on the NaCl template is likelier than Cs for Cl."""

    t = roles("NaCl")
    qs = [roles("KCl"), roles("NaCs")]
    prior = substitution_prior(t, qs, [(0, 1), (1, 0)])
    assert prior.shape == (2,) and prior[0] > prior[1]
