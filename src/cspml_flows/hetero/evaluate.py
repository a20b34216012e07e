"""Evaluation of the heterogeneous model.

- :func:`fusion_grid`: composition -> structure retrieval (recall@1/5/10, MRR over prototype clusters) and
  polymorph ranking (ground state first, recall of metastable polymorphs in the top K) on held-out formulas,
  for the core CSPML ranking, the tower alone and the fused score; picks the fusion weights.
- :func:`leave_prototype_out`: prototypes held out of training; structure -> composition retrieval
  (recall@10/@50 and MRR of the compositions known to take a held-out prototype, against the unlearned
  descriptor distance and pymatgen's substitution probabilities), and the user-template experiment (the
  prototype removed from the pool, one of its structures supplied as a user file, its other compositions
  predicted and matched with StructureMatcher).
- :func:`polymorph_structures`: the polymorph use end to end (predicted structures matched to the known
  polymorphs of held-out formulas).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cspml_flows.composition import roles
from cspml_flows.hetero.model import Bank, HeteroModel
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.templates.index import TemplateIndex

KS = (1, 5, 10)
LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
MUS = (0.0, -2.0, -5.0, -10.0, -20.0)
POLY_K = 5


def _cluster_lists(ranked) -> list[list[int]]:
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


def _formula_targets(index: TemplateIndex, rows: np.ndarray):
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


def fusion_grid(
    model: HeteroModel,
    bank: Bank,
    index: TemplateIndex,
    val_rows: np.ndarray,
    core: SimilarityModel | None,
    stack: bool = True,
) -> dict[str, Any]:
    """Retrieval and polymorph metrics of held-out formulas (strict: no template of the formula) for CSPML,
    the tower alone and each fusion weight; the chosen weights maximise top-1 + ground-state-first."""
    from cspml_flows.hetero.rank import aggregate, candidate_rows

    targets = [t for t in _formula_targets(index, val_rows) if t[2]]
    report: dict[str, Any] = {"n_val_queries": len(targets)}
    if not targets:
        report["chosen"] = {"lam": 1.0, "mu": 0.0}
        return report
    queries = [t[1] for t in targets]
    rows = candidate_rows(bank, queries, strict=True, std=model.std)
    logit, tower, ehull = model.components(bank, rows.q, rows.qi, rows.q_role, rows.ti, core)
    relevant = [t[2] for t in targets]
    poly = [i for i, t in enumerate(targets) if len(t[4]) >= 2 and t[3] in t[2]]
    report["n_polymorph_queries"] = len(poly)

    def evaluate(z: np.ndarray) -> dict[str, Any]:
        lists = _cluster_lists(aggregate(bank, rows, z, top=60))
        m = retrieval_metrics(lists, relevant)
        pm = polymorph_metrics(
            [lists[i] for i in poly], [targets[i][3] for i in poly], [targets[i][2] - {targets[i][3]} for i in poly]
        )
        per_query = np.array([float(bool(lst) and lst[0] in rel) for lst, rel in zip(lists, relevant, strict=True)])
        for i in poly:
            per_query[i] += 0.5 * float(bool(lists[i]) and lists[i][0] == targets[i][3])
        return {**m, **{f"poly_{k}": v for k, v in pm.items()}, "_per_query": per_query}

    variants: dict[str, dict] = {}
    if core is not None:
        variants["cspml"] = evaluate(logit)
    variants["tower"] = evaluate(tower)
    grid = []
    for lam in LAMBDAS:
        for mu in MUS:
            if core is None and lam == 0.0:
                continue
            z = model.fuse(logit, tower, ehull, lam=lam, mu=mu, use_core=core is not None)
            m = evaluate(z)
            grid.append({"lam": lam, "mu": mu, **m})
    best = max(grid, key=lambda g: (_objective(g), -g["lam"], g["mu"]))
    if core is not None and not _significant(best["_per_query"], variants["cspml"]["_per_query"]):
        # no gain beyond one standard error over CSPML on held-out formulas: keep CSPML's ranking
        best = next(g for g in grid if g["lam"] == 0.0 and g["mu"] == 0.0)
    variants["hetero"] = {k: v for k, v in best.items() if k not in ("lam", "mu")}
    report["chosen"] = {"lam": best["lam"], "mu": best["mu"], "stacked": False}
    if core is not None and stack and len(targets) >= 40:
        # second stage: gradient boosting on both scores and template facts, 2-fold cross-validated over
        # the held-out formulas; kept only when its cross-validated objective beats the linear fusion
        x = HeteroModel.stack_features(bank, rows.qi, rows.ti, logit, tower)
        cl = bank.index.cluster[rows.ti]
        y = np.array([c in relevant[q] for q, c in zip(rows.qi, cl, strict=True)], dtype=int)
        w = 1.0 + np.array([c == targets[q][3] for q, c in zip(rows.qi, cl, strict=True)], dtype=float)
        fold = np.random.default_rng(0).integers(0, 2, len(targets))[rows.qi]
        z = np.zeros(len(rows.qi))
        for f in (0, 1):
            clf = _stacker().fit(x[fold != f], y[fold != f], sample_weight=w[fold != f])
            p = np.clip(clf.predict_proba(x[fold == f])[:, 1], 1e-6, 1 - 1e-6)
            z[fold == f] = np.log(p / (1 - p))
        stacked = evaluate(z)
        variants["stacked (2-fold CV)"] = stacked
        if _objective(stacked) > _objective(best) and _significant(stacked["_per_query"], best["_per_query"]):
            report["chosen"]["stacked"] = True
            report["stacker"] = _stacker().fit(x, y, sample_weight=w)
            variants["hetero"] = stacked
    report["variants"] = {k: {a: b for a, b in v.items() if a != "_per_query"} for k, v in variants.items()}
    report["grid"] = [{a: b for a, b in g.items() if a != "_per_query"} for g in grid]
    return report


def _significant(new: np.ndarray, old: np.ndarray) -> bool:
    """Paired per-query gain above zero by at least one standard error."""
    d = np.asarray(new) - np.asarray(old)
    if len(d) < 2:
        return False
    return float(d.mean()) > 0 and float(d.mean()) >= float(d.std(ddof=1)) / np.sqrt(len(d))


def _stacker():
    from cspml_flows.hetero.model import Stacker

    return Stacker()  # LightGBM: saved as its own text model, never pickled


def _objective(m: dict) -> float:
    """Fusion objective: top-1 prototype hit plus half the ground-state-first share (0 without polymorphs)."""
    gs = m.get("poly_ground_state_first", float("nan"))
    return m["recall@1"] + 0.5 * (0.0 if gs != gs else gs)


# ---------------------------------------------------------------------------------------------------------
def _realize_hit(gts, preds_per_query, workers: int) -> list[list[float | None]]:
    from cspml_flows.benchmark.scoring import rms_table

    return rms_table(gts, preds_per_query, workers=workers)


def polymorph_structures(
    hetero: HeteroModel,
    bank: Bank,
    val_rows: np.ndarray,
    k: int = POLY_K,
    limit: int = 150,
    workers: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """End-to-end polymorph use on held-out formulas with >= 2 prototypes: predict ``k`` structures (no
    template of the formula allowed), match each known polymorph with StructureMatcher. ``hetero`` must
    hold a core model trained without these formulas."""
    from cspml_flows.hetero.rank import HeteroPredictor
    from cspml_flows.predict.predictor import CSPPredictor

    index = bank.index
    targets = [t for t in _formula_targets(index, val_rows) if len(t[4]) >= 2]
    rng = np.random.default_rng(seed)
    if len(targets) > limit:
        targets = [targets[i] for i in sorted(rng.choice(len(targets), limit, replace=False))]
    out: dict[str, Any] = {"n_formulas": len(targets), "k": k}
    if not targets:
        return out
    hp = HeteroPredictor(index, hetero, bank)
    cp = CSPPredictor(index, hetero.core)
    comps = [t[0] for t in targets]
    for name, preds in (
        ("hetero", hp.predict(comps, polymorphs=k, strict=True)),
        ("cspml", cp.predict(comps, top=k, strict=True)),
    ):
        gts, plist, owner, is_gs = [], [], [], []
        for qi, (t, p) in enumerate(zip(targets, preds, strict=True)):
            f = t[0]
            members = np.flatnonzero(index.formulas == f)
            e = np.nan_to_num(index.e_above_hull[members], nan=0.0)
            gs_row = members[int(np.argmin(e))]
            seen_clusters = set()
            for m in members[np.argsort(e, kind="stable")]:
                if int(index.cluster[m]) in seen_clusters:
                    continue
                seen_clusters.add(int(index.cluster[m]))
                gts.append(index.structure(int(m)))
                plist.append([c.structure for c in p.candidates])
                owner.append(qi)
                is_gs.append(m == gs_row)
        rms = _realize_hit(gts, plist, workers)
        gs_first = [r[0] is not None if r else False for r, g in zip(rms, is_gs, strict=True) if g]
        meta = [any(x is not None for x in r[:k]) for r, g in zip(rms, is_gs, strict=True) if not g]
        out[name] = {
            "ground_state_first": float(np.mean(gs_first)) if gs_first else float("nan"),
            f"metastable_recall@{k}": float(np.mean(meta)) if meta else float("nan"),
            "n_metastable": len(meta),
        }
    return out


# ---------------------------------------------------------------------------------------------------------
def _held_out_prototypes(index: TemplateIndex, fraction: float, min_formulas: int, seed: int) -> np.ndarray:
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
    held = _held_out_prototypes(index, proto_fraction, min_formulas, seed)
    if len(held) > max_prototypes:
        held = np.sort(rng.choice(held, max_prototypes, replace=False))
    return np.flatnonzero(np.isin(index.formulas, list(val))), held


def train_without(
    index: TemplateIndex, geom: np.ndarray, val_rows: np.ndarray, held: np.ndarray, seed: int = 0, log=print, **kw
) -> HeteroModel:
    """A hetero model (towers, fusion and core) that never saw the held-out formulas or prototypes."""
    keep = np.ones(len(index), dtype=bool)
    keep[val_rows] = False
    keep &= ~np.isin(index.cluster, held)
    model, _ = HeteroModel.train(index.subset(keep), geom=geom[keep], seed=seed, reuse_val_core=True, log=log, **kw)
    return model


def leave_prototype_out(
    index: TemplateIndex,
    geom: np.ndarray,
    model: HeteroModel,
    held: np.ndarray,
    seed: int = 0,
    user_limit: int = 60,
    workers: int = 2,
    log=print,
) -> dict[str, Any]:
    """Inverse design (structure -> composition retrieval) and user templates on held-out prototypes, with
    ``model`` trained without them (:func:`train_without`)."""
    from cspml_flows.hetero.inverse import score_assignments

    t0 = time.perf_counter()
    is_held = np.isin(index.cluster, held)
    log(f"leave-prototype-out: {len(held)} prototypes ({is_held.sum()} templates) held out")
    core = model.core
    bank = model.bank(index, geom)
    # ---- structure -> composition: rank every formula of the anonymous formula for a held-out structure
    methods = (
        ("hetero", "tower", "cspml", "descriptor", "pymatgen")
        if core is not None
        else ("tower", "descriptor", "pymatgen")
    )
    ranked: dict[str, list[list[str]]] = {m: [] for m in methods}
    relevant: list[set] = []
    for c in held:
        members = np.flatnonzero(index.cluster == c)
        t = int(members[np.argmin(np.nan_to_num(index.e_above_hull[members], nan=0.0))])
        pool = index.by_anon[str(index.anon[t])]
        formulas = sorted(set(index.formulas[pool].tolist()) - {str(index.formulas[t])})
        rel = set(index.formulas[members].tolist()) - {str(index.formulas[t])}
        if not rel or not formulas:
            continue
        relevant.append(rel)
        assignments = []
        owner = []
        for fi, f in enumerate(formulas):
            r = roles(f)
            for p in r.permutations(limit=6):
                assignments.append(tuple(r.elements[j] for j in p))
                owner.append(fi)
        owner_arr = np.asarray(owner)
        for m in methods:
            if m == "cspml":
                sub = HeteroModel(model.std, model.geo_mu, model.geo_sd, model.A, model.B, model.w, core, 0.0, 0.0)
                _, _, s = score_assignments(sub, bank, t, assignments, "hetero")
            else:
                _, _, s = score_assignments(model, bank, t, assignments, m)
            best = np.full(len(formulas), -np.inf)
            np.maximum.at(best, owner_arr, s)
            ranked[m].append([formulas[i] for i in np.argsort(-best, kind="stable")])
    s2c = {m: retrieval_metrics(ranked[m], relevant, ks=(1, 5, 10, 50)) for m in methods}
    log(f"leave-prototype-out: structure -> composition on {len(relevant)} prototypes")
    # ---- user templates: a held-out prototype comes back only as one user structure
    user = _user_template_experiment(index, geom, held, is_held, model, user_limit, workers, seed)
    return {
        "n_prototypes": len(held),
        "n_templates_held_out": int(is_held.sum()),
        "structure_to_composition": s2c,
        "user_templates": user,
        "fusion": {"lam": model.lam, "mu": model.mu, "stacked": model.stacker is not None},
        "seconds": time.perf_counter() - t0,
    }


def _user_template_experiment(
    index: TemplateIndex,
    geom: np.ndarray,
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
    hp_without = HeteroPredictor(base, model, model.bank(base, base_geom))
    hp_with = HeteroPredictor(merged, model, model.bank(merged, mgeom))
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
