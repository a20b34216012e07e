"""Evaluation of the heterogeneous model (measurement only; training is :mod:`cspml_flows.hetero.train`).

- Metrics: composition -> structure retrieval (recall@1/5/10, MRR over prototype clusters) and polymorph
  ranking (ground state first, recall of metastable polymorphs in the top K) on held-out formulas.
- :func:`leave_prototype_out`: prototypes held out of training; structure -> composition retrieval
  (recall@10/@50 and MRR of the compositions known to take a held-out prototype, against the unlearned
  descriptor distance and pymatgen's substitution probabilities), and the user-template experiment (the
  prototype removed from the pool, one of its structures supplied as a user file, its other compositions
  predicted and matched with StructureMatcher).
- Polymorphs end to end with relaxed energies: :func:`cspml_flows.hetero.polymorph_energy.energy_polymorphs`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cspml_flows.composition import roles
from cspml_flows.hetero.model import Bank, HeteroModel
from cspml_flows.templates.index import TemplateIndex

KS = (1, 5, 10)
POLY_K = 5


def cluster_lists(ranked) -> list[list[int]]:
    out = []
    for lst in ranked:
        seen: list[int] = []
        for r in lst:
            if r.cluster not in seen:
                seen.append(r.cluster)
        out.append(seen)
    return out


def retrieval_metrics(ranked: Sequence[Sequence], relevant: Sequence[set], ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@k (share of relevant items in the top k, averaged over queries), hit@1 and MRR."""
    out: dict[str, float] = {}
    n = len(ranked)
    if n == 0:
        return {f"recall@{k}": float("nan") for k in ks} | {"mrr": float("nan"), "n": 0}
    for k in ks:
        out[f"recall@{k}"] = float(
            np.mean([len(set(r[:k]) & rel) / len(rel) for r, rel in zip(ranked, relevant, strict=True)])
        )
    rr = []
    for r, rel in zip(ranked, relevant, strict=True):
        pos = next((i for i, x in enumerate(r) if x in rel), None)
        rr.append(0.0 if pos is None else 1.0 / (pos + 1))
    out["mrr"] = float(np.mean(rr))
    out["n"] = n
    return out


def polymorph_metrics(ranked: Sequence[Sequence[int]], ground: Sequence[int], meta: Sequence[set], k: int = POLY_K):
    """Share of formulas whose ground-state prototype ranks first; recall of metastable prototypes in top k."""
    if not ranked:
        return {"ground_state_first": float("nan"), f"metastable_recall@{k}": float("nan"), "n": 0}
    gs = float(np.mean([bool(r) and r[0] == g for r, g in zip(ranked, ground, strict=True)]))
    rec = [len(set(r[:k]) & m) / len(m) for r, m in zip(ranked, meta, strict=True) if m]
    return {
        "ground_state_first": gs,
        f"metastable_recall@{k}": float(np.mean(rec)) if rec else float("nan"),
        "n": len(ranked),
    }


def formula_targets(index: TemplateIndex, rows: np.ndarray):
    """Per held-out formula: canonical roles, its prototype clusters, the ground-state cluster."""
    by_f: dict[str, list[int]] = {}
    for i in rows:
        by_f.setdefault(str(index.formulas[i]), []).append(int(i))
    out = []
    for f, members in by_f.items():
        others = index.by_anon.get(str(index.anon[members[0]]))
        reach = set(index.cluster[others[index.formulas[others] != f]].tolist())
        clusters = {int(index.cluster[i]) for i in members}
        e = np.array([index.e_above_hull[i] if np.isfinite(index.e_above_hull[i]) else 0.0 for i in members])
        ground = int(index.cluster[members[int(np.argmin(e))]])
        out.append((f, roles(f), clusters & reach, ground, clusters))
    return out


def significant(new: np.ndarray, old: np.ndarray) -> bool:
    """Paired per-query gain above zero by at least one standard error."""
    d = np.asarray(new) - np.asarray(old)
    if len(d) < 2:
        return False
    return float(d.mean()) > 0 and float(d.mean()) >= float(d.std(ddof=1)) / np.sqrt(len(d))


def objective(m: dict) -> float:
    """Fusion objective: top-1 prototype hit plus half the ground-state-first share (0 without polymorphs)."""
    gs = m.get("poly_ground_state_first", float("nan"))
    return m["recall@1"] + 0.5 * (0.0 if gs != gs else gs)


# ---------------------------------------------------------------------------------------------------------
def held_out_prototypes(index: TemplateIndex, fraction: float, min_formulas: int, seed: int) -> np.ndarray:
    """Cluster ids held out: a random share of the clusters taken by at least ``min_formulas`` formulas."""
    rng = np.random.default_rng(seed)
    n_formulas: dict[int, set] = {}
    for c, f in zip(index.cluster.tolist(), index.formulas.tolist(), strict=True):
        n_formulas.setdefault(c, set()).add(f)
    eligible = np.array(sorted(c for c, fs in n_formulas.items() if len(fs) >= min_formulas))
    if len(eligible) == 0:
        return eligible
    return np.sort(rng.choice(eligible, size=max(1, int(len(eligible) * fraction)), replace=False))


def held_out_split(
    index: TemplateIndex,
    seed: int = 0,
    formula_fraction: float = 0.15,
    proto_fraction: float = 0.2,
    min_formulas: int = 3,
    max_prototypes: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of held-out formulas (polymorph evaluation) and held-out prototype clusters (inverse design,
    user templates); one model trained without both serves every evaluation."""
    rng = np.random.default_rng(seed + 11)
    formulas = np.unique(index.formulas)
    val = set(rng.choice(formulas, size=max(1, int(len(formulas) * formula_fraction)), replace=False))
    held = held_out_prototypes(index, proto_fraction, min_formulas, seed)
    if len(held) > max_prototypes:
        held = np.sort(rng.choice(held, max_prototypes, replace=False))
    return np.flatnonzero(np.isin(index.formulas, list(val))), held


def prototype_queries(index: TemplateIndex, held: Sequence[int]) -> list[tuple[int, list[str], set[str]]]:
    """Structure -> composition queries of held-out prototype clusters: each queried with its lowest-energy
    structure ``t``; candidates: every other formula of its anonymous formula; relevant: the other formulas
    that take the prototype."""
    out = []
    for c in held:
        members = np.flatnonzero(index.cluster == c)
        t = int(members[np.argmin(np.nan_to_num(index.e_above_hull[members], nan=0.0))])
        pool = index.by_anon[str(index.anon[t])]
        formulas = sorted(set(index.formulas[pool].tolist()) - {str(index.formulas[t])})
        rel = set(index.formulas[members].tolist()) - {str(index.formulas[t])}
        if rel and formulas:
            out.append((t, formulas, rel))
    return out


def inverse_retrieval(index: TemplateIndex, bank: Bank, model: HeteroModel, held: np.ndarray) -> dict[str, Any]:
    """Structure -> composition retrieval on held-out prototypes: each queried with its lowest-energy
    structure, every formula of its anonymous formula ranked (relevant: the others taking the prototype), by
    the model's inverse weights (``hetero``), the CSPML logit, the logit normalised over the pool's other
    prototypes, the tower, pymatgen's substitution probabilities and the unlearned descriptor distance."""
    from cspml_flows.hetero.inverse import PoolNormaliser, assignment_parts, formula_assignments, score_assignments

    core = model.core
    weights = {
        "hetero": model.inv,
        "cspml": (1, 0, 0, 0),
        "cspml normalised": (0, 0, 0, 1),
        "tower": (0, 1, 0, 0),
        "pymatgen": (0, 0, 1, 0),
    }
    if core is None:
        weights = {k: w for k, w in weights.items() if k in ("tower", "pymatgen")}
    normaliser = PoolNormaliser(core, index) if core is not None else None
    ranked: dict[str, list[list[str]]] = {m: [] for m in [*weights, "descriptor"]}
    relevant: list[set] = []
    for t, formulas, rel in prototype_queries(index, held):
        relevant.append(rel)
        assignments, owner_arr = formula_assignments(formulas)
        _, _, parts = assignment_parts(model, bank, t, assignments, core, normaliser, int(index.cluster[t]))
        scores = {m: parts @ np.asarray(w, dtype=float) for m, w in weights.items()}
        scores["descriptor"] = score_assignments(model, bank, t, assignments, "descriptor")[2]
        for m, sc in scores.items():
            best = np.full(len(formulas), -np.inf)
            np.maximum.at(best, owner_arr, sc)
            ranked[m].append([formulas[i] for i in np.argsort(-best, kind="stable")])
    return {m: retrieval_metrics(ranked[m], relevant, ks=(1, 5, 10, 50)) for m in ranked}


def leave_prototype_out(
    index: TemplateIndex,
    geom: np.ndarray,
    model: HeteroModel,
    held: np.ndarray,
    seed: int = 0,
    user_limit: int = 60,
    workers: int = 2,
    log=print,
    emb: np.ndarray | None = None,
) -> dict[str, Any]:
    """Inverse design (structure -> composition retrieval) and user templates on held-out prototypes, with
    ``model`` trained without them (:func:`cspml_flows.hetero.train.train_without`)."""
    t0 = time.perf_counter()
    is_held = np.isin(index.cluster, held)
    log(f"leave-prototype-out: {len(held)} prototypes ({is_held.sum()} templates) held out")
    s2c = inverse_retrieval(index, model.bank(index, geom, emb=emb), model, held)
    log(f"leave-prototype-out: structure -> composition on {s2c['tower']['n']} prototypes")
    user = {"n": 0}
    if user_limit:  # a held-out prototype comes back only as one user structure
        user = _user_template_experiment(index, geom, emb, held, is_held, model, user_limit, workers, seed)
    return {
        "n_prototypes": len(held),
        "n_templates_held_out": int(is_held.sum()),
        "structure_to_composition": s2c,
        "user_templates": user,
        "fusion": {"lam": model.lam, "mu": model.mu, "stacked": model.stacker is not None},
        "inverse_weights": [float(x) for x in model.inv],
        "seconds": time.perf_counter() - t0,
    }


def _user_template_experiment(
    index: TemplateIndex,
    geom: np.ndarray,
    emb: np.ndarray | None,
    held: np.ndarray,
    is_held: np.ndarray,
    model: HeteroModel,
    limit: int,
    workers: int,
    seed: int,
) -> dict[str, Any]:
    """For held-out prototypes: pool without the prototype, plus one of its structures as a user template;
    predict its other compositions (top 1 / top 5) and match against their structures."""
    from cspml_flows.benchmark.scoring import rms_table, summarize
    from cspml_flows.hetero.rank import HeteroPredictor
    from cspml_flows.hetero.user_templates import merge_indices

    rng = np.random.default_rng(seed + 3)
    base_mask = ~is_held
    base = index.subset(base_mask)
    base_geom = geom[base_mask]
    queries, gts, users = [], [], []
    for c in held:
        members = np.flatnonzero(index.cluster == c)
        e = np.nan_to_num(index.e_above_hull[members], nan=0.0)
        user = int(members[int(np.argmin(e))])
        others = [int(m) for m in members if index.formulas[m] != index.formulas[user]]
        if not others:
            continue
        q = int(rng.choice(others))
        queries.append(q)
        gts.append(index.structure(q))
        users.append(user)
    if len(queries) > limit:
        pick = sorted(rng.choice(len(queries), limit, replace=False))
        queries, gts, users = [queries[i] for i in pick], [gts[i] for i in pick], [users[i] for i in pick]
    if not queries:
        return {"n": 0}
    # all user structures at once: each is its own cluster, ids "user:<material_id>"
    is_user = np.isin(np.arange(len(index)), users)
    ui = index.subset(is_user)
    ui.ids = np.array([f"user:{x}" for x in ui.ids])
    ui.e_above_hull = np.full(len(ui), np.nan)  # a user file carries no energy
    ugeom = geom[is_user]
    merged = merge_indices(base, ui)
    mgeom = np.vstack([base_geom, ugeom])
    comps = [index.structure(q).composition for q in queries]
    excl = [{str(index.ids[q])} for q in queries]
    out: dict[str, Any] = {"n": len(queries)}
    bemb = memb = None
    if emb is not None:
        bemb, memb = emb[base_mask], np.vstack([emb[base_mask], emb[is_user]])
    hp_without = HeteroPredictor(base, model, model.bank(base, base_geom, emb=bemb))
    hp_with = HeteroPredictor(merged, model, model.bank(merged, mgeom, emb=memb))
    for name, hp in (("without_user_file", hp_without), ("with_user_file", hp_with)):
        preds = hp.predict(comps, polymorphs=5, exclude_ids=excl, strict=True, check_distinct=False)
        rms = rms_table(gts, [[c.structure for c in p.candidates] for p in preds], workers=workers)
        m = summarize(rms, ks=(1, 5))
        used = np.mean([bool(p.candidates) and p.candidates[0].template_id.startswith("user:") for p in preds])
        out[name] = {"top1": m["top1"], "top5": m["top5"], "user_template_ranked_first": float(used)}
    from cspml_flows.predict.predictor import CSPPredictor

    cp = CSPPredictor(merged, model.core)
    preds = cp.predict(comps, top=5, exclude_ids=excl, strict=True)
    rms = rms_table(gts, [[c.structure for c in p.candidates] for p in preds], workers=workers)
    m = summarize(rms, ks=(1, 5))
    out["cspml_with_user_file"] = {"top1": m["top1"], "top5": m["top5"]}
    return out
