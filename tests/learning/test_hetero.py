"""Heterogeneous composition <-> structure model: encoders, training, polymorphs, inverse design, user
templates, CLI and bad input (the hetero campaigns run through the one campaign runner, tested with it).

Real data: the session ``template_index`` (400 MP-20 val structures plus hand-built prototypes)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from cspml_flows.cli.main import main
from cspml_flows.core.composition import roles
from cspml_flows.core.equivalence import structure_matcher
from cspml_flows.core.errors import CompositionError, ModelError, StructureReadError
from cspml_flows.core.safeio import read_json_gz, write_json_gz
from cspml_flows.learning.hetero.encoders import MAX_ROLES, structure_geometry
from cspml_flows.learning.hetero.model import HeteroModel, Stacker, index_geometry
from cspml_flows.learning.model import QueryBatch
from cspml_flows.predict.hetero_rank import HeteroPredictor, candidate_rows, hetero_rank
from cspml_flows.predict.inverse import (
    NoCompositionError,
    PoolNormaliser,
    assignment_parts,
    core_logits,
    formula_assignments,
    inverse_design,
    inverse_from_structure,
    representatives,
)
from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.predict.user_templates import add_user_templates
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.schema import template_doc_from_structure
from cspml_flows.templates.store import TemplateStore
from cspml_flows.training.hetero import train_hetero
from cspml_flows.training.hetero_metrics import objective
from cspml_flows.training.hetero_towers import TrainingGroups, fit_towers, init_model, loss_and_grads


@pytest.fixture(scope="session")
def hetero_trained(template_index, trained_model):
    from threadpoolctl import threadpool_limits

    geom = index_geometry(template_index, workers=1, cache=False)
    with threadpool_limits(limits=1, user_api="openmp"):
        model, report = train_hetero(
            template_index, core=trained_model, geom=geom, variant="none", epochs=25, workers=1
        )
    return model, report, geom


@pytest.fixture(scope="session")
def hetero_model(hetero_trained) -> HeteroModel:
    return hetero_trained[0]


@pytest.fixture(scope="session")
def hetero_bank(hetero_trained, template_index):
    model, _, geom = hetero_trained
    return model.bank(template_index, geom)


def _row(index: TemplateIndex, mid: str) -> int:
    return int(np.flatnonzero(index.ids == mid)[0])


# ---------------------------------------------------------------- structure encoder


def test_geometry_is_element_agnostic_and_counts_coordination(hand_structures):
    nacl, kbr = hand_structures["nacl"], hand_structures["kbr"]
    g_nacl = structure_geometry(nacl, roles(nacl.composition), 225, 2)
    g_kbr = structure_geometry(kbr, roles(kbr.composition), 225, 2)
    cn = g_nacl[: MAX_ROLES * MAX_ROLES].reshape(MAX_ROLES, MAX_ROLES)
    assert cn[0, 1] == pytest.approx(6) and cn[1, 0] == pytest.approx(6)  # rocksalt: 6 unlike neighbours
    assert cn[0, 0] == 0
    # same prototype, other elements: identical geometry except the volume ratio (last entry)
    assert np.allclose(g_nacl[:-1], g_kbr[:-1], atol=1e-6)
    srtio3 = hand_structures["srtio3"]
    r = roles(srtio3.composition)  # Sr, Ti, O
    cn = structure_geometry(srtio3, r, 221, 5)[: MAX_ROLES * MAX_ROLES].reshape(MAX_ROLES, MAX_ROLES)
    assert cn[1, 2] == pytest.approx(6)  # Ti-O octahedra
    cscl = hand_structures["cscl"]
    cn = structure_geometry(cscl, roles(cscl.composition), 221, 2)[: MAX_ROLES * MAX_ROLES]
    assert cn.reshape(MAX_ROLES, MAX_ROLES)[0, 1] == pytest.approx(8)


def test_geometry_cache_round_trip(template_index, cspml_home):
    sub = template_index.subset(np.arange(len(template_index)) < 30)
    first = index_geometry(sub, workers=1)
    assert (cspml_home / "hetero").is_dir()
    again = index_geometry(sub, workers=1)
    assert np.array_equal(first, again)
    assert np.array_equal(first, index_geometry(sub, workers=1, cache=False))


# ---------------------------------------------------------------- training


def _polymorph_index() -> TemplateIndex:
    """Rocksalt and CsCl-type halides; NaCl and KCl exist in both, the rocksalt being the ground state."""
    rs = {"NaCl": 5.64, "KCl": 6.29, "NaBr": 5.97, "KBr": 6.6, "LiF": 4.03, "RbCl": 6.58}
    b2 = {"NaCl": 3.4, "KCl": 3.8, "CsCl": 4.12, "CsBr": 4.29, "CsI": 4.57, "TlCl": 3.84}
    docs = []
    for f, a in rs.items():
        el = roles(f).elements
        s = Structure(Lattice.cubic(a), [el[0]] * 4 + [el[1]] * 4, _fcc8())
        docs.append(template_doc_from_structure(s, f"rs-{f}", e_above_hull=0.0).model_dump(mode="json"))
    for f, a in b2.items():
        el = roles(f).elements
        s = Structure(Lattice.cubic(a), list(el), [[0, 0, 0], [0.5, 0.5, 0.5]])
        e = 0.1 if f in rs else 0.0
        docs.append(template_doc_from_structure(s, f"b2-{f}", e_above_hull=e).model_dump(mode="json"))
    return TemplateIndex.from_docs(docs)


def _fcc8():
    fcc = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    return fcc + [[(x + 0.5) % 1 for x in site] for site in fcc]


def test_training_targets_weight_positives_by_energy():
    idx = _polymorph_index()
    geom = index_geometry(idx, workers=1, cache=False)
    model = init_model(idx, geom)
    rows = np.arange(len(idx))
    groups = TrainingGroups.build(model, idx, rows, rows)
    nacl = _row(idx, "rs-NaCl")
    g = next(i for i in range(len(groups.phi)) if np.allclose(groups.phi[i], model.phi(*_q(idx, nacl))[0]))
    cand, y = groups.cand[g][groups.valid[g]], groups.y[g][groups.valid[g]]
    assert not np.isin(idx.formulas[cand], ["NaCl"]).any()  # never its own formula
    rs_mass = y[np.char.startswith(idx.ids[cand].astype(str), "rs-")].sum()
    b2_mass = y[np.char.startswith(idx.ids[cand].astype(str), "b2-")].sum()
    assert y.sum() == pytest.approx(1.0)
    assert rs_mass / b2_mass == pytest.approx(np.exp(0.1 / 0.05), rel=1e-6)  # exp(-E/TAU) per prototype


def _q(idx, i):
    return idx.role_props[[i]], idx.role_fracs[[i]], idx.stats[[i]]


def test_distilled_targets_mix_labels_with_the_core_softmax(template_index, trained_model):
    """Knowledge distillation of the tower: each group's target is (1 - a) * labels + a * softmax of the CSPML
    logits over the group's candidates (computed here pair by pair), padding kept at zero weight."""

    idx = template_index
    geom = index_geometry(idx, workers=1, cache=False)
    model = init_model(idx, geom)
    rows = np.arange(len(idx))
    groups = TrainingGroups.build(model, idx, rows, rows)
    assert groups.anchors is not None and len(groups.anchors) == len(groups.phi)
    assert groups.distill(trained_model, idx, 0.0) is groups
    mixed = groups.distill(trained_model, idx, 0.3)
    assert np.allclose(mixed.y.sum(axis=1), 1.0) and (mixed.y[~groups.valid] == 0).all()
    for g in (0, len(groups.phi) // 2, len(groups.phi) - 1):
        a, cand = groups.anchors[g], groups.cand[g][groups.valid[g]]
        qb = QueryBatch.from_roles([idx.roles[a]])
        zero = np.zeros(len(cand), dtype=int)
        p = trained_model.predict_proba(trained_model.features(qb, zero, idx.role_props[[a] * len(cand)], idx, cand))
        p = np.clip(p, 1e-6, 1 - 1e-6)
        soft = np.exp(np.log(p / (1 - p)) - np.log(p / (1 - p)).max())
        soft /= soft.sum()
        expected = 0.7 * groups.y[g][groups.valid[g]] + 0.3 * soft
        assert np.allclose(mixed.y[g][groups.valid[g]], expected, atol=1e-9)
    assert not np.allclose(mixed.y, groups.y)  # the teacher moves mass onto unlabeled candidates


def test_tower_gradient_matches_finite_differences():
    idx = _polymorph_index()
    geom = index_geometry(idx, workers=1, cache=False)
    model = init_model(idx, geom, dim=4, seed=1)
    rows = np.arange(len(idx))
    groups = TrainingGroups.build(model, idx, rows, rows)
    bank = model.bank(idx, geom)
    model.w = np.random.default_rng(0).normal(0, 0.1, model.w.shape)

    def loss(m: HeteroModel) -> float:
        total = 0.0
        for i in range(len(groups.phi)):
            c = groups.cand[i][groups.valid[i]]
            s = m.tower(np.repeat(groups.phi[[i]], len(c), axis=0), bank.psi[c])
            s = s - s.max()
            p = np.exp(s) / np.exp(s).sum()
            total -= np.sum(groups.y[i][groups.valid[i]] * np.log(p))
        return total / len(groups.phi)

    sel = np.arange(len(groups.phi))
    value, grads = loss_and_grads(model, bank, groups, sel)
    assert value == pytest.approx(loss(model), rel=1e-9)  # the training loss is the listwise InfoNCE above
    rng = np.random.default_rng(2)
    for param, grad in zip((model.A, model.B, model.w), grads, strict=True):
        for _ in range(5):
            k = tuple(rng.integers(0, n) for n in param.shape)
            old = param[k]
            param[k] = old + 1e-6
            up = loss(model)
            param[k] = old - 1e-6
            down = loss(model)
            param[k] = old
            assert grad[k] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-7)
    losses = fit_towers(model, bank, groups, epochs=30, lr=0.05, l2=0.0, batch=len(groups.phi))
    assert losses[-1] < losses[0] - 0.1


def test_training_report_tower_beats_chance_and_fusion_rule(hetero_trained):
    """Measured properties that can fail: the tower alone ranks held-out formulas' prototypes far above
    chance, and the report says whether the tower (or the energy term) was kept or CSPML's ranking."""
    model, report, _ = hetero_trained
    v = report["variants"]
    assert set(v) == {"cspml", "tower", "hetero"}
    assert report["n_val_queries"] >= 20
    assert 0 <= v["tower"]["recall@1"] <= v["tower"]["recall@5"] <= v["tower"]["recall@10"] <= 1
    assert v["tower"]["recall@5"] > 0.3  # far above chance on held-out formulas
    assert v["tower"]["mrr"] > 0.25
    chosen = report["chosen"]
    assert chosen["tower_kept"] == (chosen["lam"] > 0 or chosen["stacked"])
    assert chosen["cspml_kept"] == (not model.fused)
    if model.fused:
        assert objective(v["hetero"]) > objective(v["cspml"])
    else:
        assert objective(v["hetero"]) == objective(v["cspml"])
    inv = report["inverse"]
    assert len(inv["chosen"]) == 4 and inv["n"] >= 1
    assert inv["pymatgen"]["recall@10"] > 0 and inv["cspml"]["n"] == inv["n"] == inv["normalised"]["n"]
    assert model.core is not None and model.use_core
    assert report["tower_loss"][-1] < report["tower_loss"][0]


def test_fused_ranking_only_without_a_core_ranker(hetero_model, hetero_bank, template_index):
    """A kept tower ranks the candidates only where the core model has no learned ranker (which replaces the
    logit ordering the fusion was chosen against); otherwise the core engine's candidates come back."""
    fused = copy.copy(hetero_model)
    fused.lam, fused.mu, fused.stacker = 0.4, 0.0, None
    plain = copy.copy(fused.core)
    plain.ranker = None
    fused.core = plain
    assert fused.fused and HeteroPredictor(template_index, fused, hetero_bank).fused
    ranked = copy.copy(plain)
    ranked.ranker = object()  # any learned ranker
    fused.core = ranked
    assert not HeteroPredictor(template_index, fused, hetero_bank).fused
    kept = copy.copy(hetero_model)
    kept.lam, kept.mu, kept.stacker, kept.core = 0.0, 0.0, None, plain
    assert not kept.fused and not HeteroPredictor(template_index, kept, hetero_bank).fused


def test_save_load_and_bad_model_files(hetero_model, hetero_bank, tmp_path):
    path = hetero_model.save(tmp_path / "h.json.gz")
    back = HeteroModel.load(path)
    q = [roles("KCl"), roles("BaTiO3")]
    a = hetero_rank(hetero_model, hetero_bank, q, top=3)
    b = hetero_rank(back, hetero_bank, q, top=3)
    assert [[(r.template, r.perm) for r in x] for x in a] == [[(r.template, r.perm) for r in x] for x in b]
    assert back.meta["training_hash"] == hetero_model.meta["training_hash"]
    with pytest.raises(ModelError, match="not found"):
        HeteroModel.load(tmp_path / "missing.json.gz")
    (tmp_path / "junk.json.gz").write_text("not a model")
    with pytest.raises(ModelError, match="cannot read"):
        HeteroModel.load(tmp_path / "junk.json.gz")

    blob = read_json_gz(path)
    blob["meta"]["geometry_version"] = "geom-v0"
    write_json_gz(tmp_path / "old.json.gz", blob)
    with pytest.raises(ModelError, match="retrain"):
        HeteroModel.load(tmp_path / "old.json.gz")
    blob = read_json_gz(path)
    blob["A"] = blob["A"][:-1] if len(blob["A"]) > 1 else [[1.0]]  # tower matrices of different widths
    write_json_gz(tmp_path / "damaged.json.gz", blob)
    with pytest.raises(ModelError, match="damaged"):
        HeteroModel.load(tmp_path / "damaged.json.gz")


# ---------------------------------------------------------------- polymorphs


def test_polymorphs_are_distinct_and_ranked(hetero_model, hetero_bank, template_index):
    hp = HeteroPredictor(template_index, hetero_model, hetero_bank)
    (pred,) = hp.predict(["KCl"], polymorphs=3, strict=True)
    assert 1 <= len(pred.candidates) <= 3
    scores = [c.score for c in pred.candidates]
    assert scores == sorted(scores, reverse=True)
    sm = structure_matcher()
    structs = [c.structure for c in pred.candidates]
    for i in range(len(structs)):
        assert structs[i].composition.reduced_formula == "KCl"
        for j in range(i):
            assert not sm.fit(structs[i], structs[j])
    # KCl without its own templates: rocksalt (NaCl, KBr, ... hand-built) must come first
    assert sm.fit_anonymous(pred.candidates[0].structure, template_index.structure(_row(template_index, "hand-nacl")))


def test_energy_aware_polymorph_ranking():
    """Trained on halides where NaCl and KCl are rocksalt ground states with a CsCl-type polymorph 0.1 eV/atom
    above: a held-out rocksalt/B2 chemistry gets the rocksalt first and the B2 polymorph second."""
    idx = _polymorph_index()
    geom = index_geometry(idx, workers=1, cache=False)
    model = init_model(idx, geom, seed=0)
    rows = np.arange(len(idx))
    fit_towers(model, model.bank(idx, geom), TrainingGroups.build(model, idx, rows, rows), epochs=60)
    model.use_core, model.lam, model.mu = False, 1.0, 0.0
    hp = HeteroPredictor(idx, model, model.bank(idx, geom))
    (pred,) = hp.predict(["NaCl"], polymorphs=2, strict=True)
    assert [c.template_id.split("-")[0] for c in pred.candidates] == ["rs", "b2"]


# ---------------------------------------------------------------- inverse design


def test_inverse_design_on_a_perovskite(hetero_model, hand_structures):
    elements = ["Ba", "Ca", "Sr", "Ti", "Zr", "O", "Cl"]
    res = inverse_from_structure(hetero_model, hand_structures["srtio3"], elements, top=15)
    formulas = [c.formula for c in res.candidates]
    assert res.n_enumerated == 7 * 6 * 5
    assert 0 < res.n_charge_balanced < res.n_enumerated
    assert len(formulas) == len(set(formulas))
    assert all(c.smact_valid for c in res.candidates)
    assert all(roles(f).anonymous_formula == "ABC3" for f in formulas)
    scores = [c.score for c in res.candidates]
    assert scores == sorted(scores, reverse=True)
    known = {"BaTiO3", "CaTiO3", "BaZrO3", "SrZrO3", "CaZrO3"}
    assert len(known & set(formulas[:10])) >= 2, formulas
    for c in res.candidates:
        assert c.structure.composition.reduced_formula == c.formula
        assert c.min_distance >= 0.5
    assert all(c.assignment["O"] == "O" for c in res.candidates[:3])  # the best answers keep O on the X site
    assert all(c.assignment["O"] in ("O", "Cl") for c in res.candidates[:5])  # and an anion there in the top 5


def test_inverse_recall_on_real_prototype(hetero_model, hetero_bank, template_index):
    """A real structure of the session index: the compositions that share its prototype rank high among
    every substitution of their elements."""
    idx = template_index
    best = None
    for c in np.argsort(-np.bincount(idx.cluster)):
        members = np.flatnonzero(idx.cluster == c)
        t = int(members[0])
        others = sorted(set(idx.formulas[members].tolist()) - {str(idx.formulas[t])})
        elements = sorted({e for f in [*others, str(idx.formulas[t])] for e in roles(f).elements})
        if len(others) >= 2 and len(elements) <= 8 and not str(idx.ids[t]).startswith("hand-"):
            best = members
            break
    assert best is not None
    res = inverse_design(hetero_model, hetero_bank, t, elements, top=50, build=False)
    ranked = [c.formula for c in res.candidates]
    found = [f for f in others if f in ranked[:20]]
    assert len(found) >= 1, (others, ranked[:20], res.n_charge_balanced)


def test_normalised_logit_is_log_p_structure_given_composition(hetero_model, hetero_bank, template_index):
    """The fourth inverse component: the CSPML logit minus the log-sum-exp over this prototype and one
    representative (lowest e_above_hull) of every other prototype of the anonymous formula, the formula's own
    structures left out (they would only say that the pool knows the composition), computed here by brute
    force; 0 without a pool."""
    idx, core = template_index, hetero_model.core
    t = _row(idx, "hand-nacl")
    reps = representatives(idx, "AB", exclude_cluster=int(idx.cluster[t]))
    assert len(reps) >= 2 and int(idx.cluster[t]) not in set(idx.cluster[reps].tolist())
    assert len(set(idx.cluster[reps].tolist())) == len(reps)
    for r in reps:  # the lowest-energy member of its cluster
        members = np.flatnonzero(idx.cluster == idx.cluster[r])
        assert np.nan_to_num(idx.e_above_hull[r]) <= np.nan_to_num(idx.e_above_hull[members]).min() + 1e-12
    known = next(str(idx.formulas[r]) for r in reps if str(idx.formulas[r]) != "KBr")
    formulas = ["KBr", known]  # the second is itself a representative of another prototype
    asg, owner = formula_assignments(formulas)
    norm = PoolNormaliser(core, idx)
    _, _, parts = assignment_parts(hetero_model, hetero_bank, t, asg, core, norm, int(idx.cluster[t]))
    assert parts.shape == (len(asg), 4)
    brute = core_logits(core, idx, reps, asg)  # (assignments, representatives)
    best = np.full((len(formulas), len(reps)), -np.inf)
    np.maximum.at(best, owner, brute)
    own = np.array(formulas, dtype=object)[:, None] == idx.formulas[reps].astype(object)[None, :]
    assert own[1].any() and not own[0].any()
    lse = np.log(np.where(own, 0.0, np.exp(best)).sum(axis=1))[owner]
    expected = parts[:, 0] - np.log(np.exp(parts[:, 0]) + np.exp(lse))
    assert np.allclose(parts[:, 3], expected, atol=1e-9)
    assert (parts[:, 3] <= 1e-12).all()
    with_own = parts[:, 0] - np.log(np.exp(parts[:, 0]) + np.exp(np.log(np.exp(best).sum(axis=1))[owner]))
    assert (parts[owner == 1, 3] > with_own[owner == 1] + 1e-6).all()  # leaving its own structure out matters
    _, _, alone = assignment_parts(hetero_model, hetero_bank, t, asg, core)  # no pool: the component is 0
    assert np.allclose(alone[:, 3], 0) and np.allclose(alone[:, :3], parts[:, :3])
    assert parts[owner == 0, 3].max() > np.log(0.5)  # KBr is a rocksalt compound: p(rocksalt | KBr) > 1/2


def test_old_inverse_weight_files_load_with_zero_normalised_weight(hetero_model, tmp_path):
    path = hetero_model.save(tmp_path / "h.json.gz")
    blob = read_json_gz(path)
    blob["inv"] = [1.0, 0.0, 0.1]  # a model file written before the fourth component
    write_json_gz(path, blob)
    assert HeteroModel.load(path).inv.tolist() == [1.0, 0.0, 0.1, 0.0]
    blob["inv"] = [1.0, 0.0]
    write_json_gz(path, blob)
    with pytest.raises(ModelError, match="inverse weights of the wrong length"):
        HeteroModel.load(path)


def test_inverse_bad_input(hetero_model, hand_structures):
    s = hand_structures["srtio3"]
    with pytest.raises(CompositionError, match="empty element list"):
        inverse_from_structure(hetero_model, s, [])
    with pytest.raises(CompositionError, match="unknown element"):
        inverse_from_structure(hetero_model, s, ["Sr", "Xx", "O"])
    with pytest.raises(NoCompositionError, match="3 distinct site roles"):
        inverse_from_structure(hetero_model, s, ["Sr", "O"])
    with pytest.raises(NoCompositionError, match="charge-balanced"):
        inverse_from_structure(hetero_model, s, ["He", "Ne", "Ar"])


# ---------------------------------------------------------------- user-defined templates


def test_user_template_brings_back_a_removed_prototype(
    hetero_model, hetero_trained, template_index, hand_structures, tmp_path
):
    idx = template_index
    perov = idx.cluster[_row(idx, "hand-srtio3")]
    pool = idx.subset(idx.cluster != perov)
    geom = hetero_trained[2][idx.cluster != perov]
    folder = tmp_path / "mine"
    folder.mkdir()
    hand_structures["srtio3"].to(filename=str(folder / "SrTiO3.cif"))
    merged, mgeom = add_user_templates(pool, folder, geom)
    assert len(merged) == len(pool) + 1 and merged.ids[-1] == "user:SrTiO3.cif"
    assert merged.cluster[-1] > pool.cluster.max()
    sm = structure_matcher()
    gt = hand_structures["bazro3"]
    for predictor in (
        HeteroPredictor(merged, hetero_model, hetero_model.bank(merged, mgeom)),
        CSPPredictor(merged, hetero_model.core),
    ):
        kwargs = {"polymorphs": 8} if isinstance(predictor, HeteroPredictor) else {"top": 8}
        (pred,) = predictor.predict(["BaZrO3"], exclude_ids=[{"hand-bazro3"}], **kwargs)
        assert any(c.template_id == "user:SrTiO3.cif" for c in pred.candidates)
        assert any(sm.fit(c.structure, gt) for c in pred.candidates)
    # without the user file, no candidate reproduces the cubic perovskite
    (pred,) = HeteroPredictor(pool, hetero_model, hetero_model.bank(pool, geom)).predict(["BaZrO3"], polymorphs=8)
    assert not any(sm.fit(c.structure, gt) for c in pred.candidates)


def test_user_template_bad_files(template_index, tmp_path, nacl):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.cif").write_text("data_x\n_cell_length_a nonsense\nloop_\n")
    with pytest.raises(StructureReadError, match=r"broken\.cif"):
        add_user_templates(template_index, folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="no CIF/POSCAR"):
        add_user_templates(template_index, empty)


# ---------------------------------------------------------------- CLI


@pytest.fixture
def cli_store(tmp_path, val_docs, hand_docs) -> Path:
    path = tmp_path / "store.json"
    ts = TemplateStore.open(path)
    ts.add(val_docs[:150] + hand_docs)
    ts.close()
    return path


def test_cli_polymorphs_inverse_and_templates(
    cli_store, hetero_model, trained_model, hand_structures, tmp_path, capsys
):
    hpath = hetero_model.save(tmp_path / "hetero.json.gz")
    cpath = trained_model.save(tmp_path / "core.json.gz")
    out = tmp_path / "out"
    args = ["predict", "KCl", "--polymorphs", "2", "--store", str(cli_store), "--hetero-model", str(hpath)]
    rc = main([*args, "--out", str(out), "--workers", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "KCl" in text and len(list(out.glob("KCl_*.cif"))) >= 1
    cif = tmp_path / "perovskite.cif"
    hand_structures["srtio3"].to(filename=str(cif))
    normed = copy.copy(hetero_model)
    normed.inv = np.array([1.0, 0.0, 0.1, 1.0])  # weighs the normalised logit: the pool is read
    npath = normed.save(tmp_path / "hetero-normed.json.gz")
    inv = ["inverse", str(cif), "--elements", "Ba", "Ti", "Zr", "O", "--top", "5", "--model", str(npath)]
    assert main([*inv, "--store", str(cli_store), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "BaTiO3" in text or "BaZrO3" in text
    assert main(inv) == 0  # no store named and no default store: ranked without that component, with a note
    captured = capsys.readouterr()
    assert "BaTiO3" in captured.out or "BaZrO3" in captured.out
    assert "leaves out the logit normalised" in captured.err
    assert main([*inv, "--store", str(tmp_path / "nowhere")]) == 2  # a named store must exist
    folder = tmp_path / "user"
    folder.mkdir()
    quaternary = hand_structures["nacl"].copy()  # rocksalt cell with one K on Na and one Br on Cl sites
    quaternary.replace(0, "K")
    quaternary.replace(4, "Br")
    quaternary.to(filename=str(folder / "POSCAR_cscl"), fmt="poscar")
    rc = main(["predict", "LiNa3Cl3I", "--templates", str(folder), "--store", str(cli_store), "--model", str(cpath)])
    assert rc == 0
    assert "user:POSCAR_cscl" in capsys.readouterr().out


def test_cli_bad_input_one_line_errors(tmp_path, hand_structures, capsys):
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not a CIF\n")
    assert main(["inverse", str(bad), "--elements", "Na", "Cl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bad.cif" in err and "\n" not in err
    good = tmp_path / "nacl.cif"
    hand_structures["nacl"].to(filename=str(good))
    assert main(["inverse", str(good), "--elements"]) == 2
    assert "empty element list" in capsys.readouterr().err
    assert main(["inverse", str(good), "--elements", "Na", "Cl", "--model", str(tmp_path / "none.json.gz")]) == 2
    assert "hetero model file not found" in capsys.readouterr().err
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "x.cif").write_text("garbage")
    assert main(["predict", "NaCl", "--templates", str(folder), "--store", str(tmp_path / "nostore")]) == 2
    assert "x.cif" in capsys.readouterr().err


def test_second_stage_stacker_scores_and_persists(hetero_model, hetero_bank, tmp_path):
    """A fitted second stage replaces the linear fusion for composition -> structure ranking and is saved."""
    import copy

    rows = candidate_rows(hetero_bank, [roles("KCl"), roles("SrTiO3"), roles("GaAs")], std=hetero_model.std)
    logit, tower, _ = hetero_model.components(hetero_bank, rows.q, rows.qi, rows.q_role, rows.ti, hetero_model.core)
    x = HeteroModel.stack_features(hetero_bank, rows.qi, rows.ti, logit, tower)
    assert x.shape == (len(rows.qi), 8)
    assert np.sum(x[:, 2] == 0) >= 3  # each query's best pair is 0 relative to itself
    y = (logit > np.median(logit)).astype(int)
    m = copy.copy(hetero_model)
    m.stacker = Stacker().fit(x, y)
    z = m.score(hetero_bank, rows.q, rows.qi, rows.q_role, rows.ti)
    assert z.shape == logit.shape and np.all(np.isfinite(z))
    back = HeteroModel.load(m.save(tmp_path / "stacked.json.gz"))
    assert back.stacker is not None
    assert np.allclose(back.score(hetero_bank, rows.q, rows.qi, rows.q_role, rows.ti), z)
    assert hetero_rank(back, hetero_bank, [roles("KCl")], top=2)[0]
