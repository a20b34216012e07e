"""Training of the heterogeneous model: towers, fusion weights and inverse weights.

The towers are trained contrastively (listwise InfoNCE, numpy + Adam): each training composition is pulled
towards the templates of the prototypes it takes and pushed from the other same-anonymous-formula templates;
the positives' target weights fall with the composition's e_above_hull in each prototype (``exp(-E/tau)``).
Half of each target comes from the CSPML model's softmax over the same candidates (knowledge distillation,
``DISTILL``; the teacher never saw the held-out formulas): on held-out formulas of both pools it moved the
tower's recall@1 up by 0.04-0.07 over labels alone.

Every weight that mixes the tower with CSPML is chosen on held-out formulas (15 %) and held-out prototypes
(10 % of those taken by three or more formulas) of the pool, scored by a core model and a tower trained
without them: the composition -> structure fusion (``lam``, ``mu``, or a LightGBM second stage), kept only
when its per-query gain over CSPML exceeds one standard error; and the inverse weights (CSPML logit, tower,
pymatgen substitution prior, logit normalised over the pool's other prototypes), chosen on structure ->
composition queries of the held-out formulas and prototypes: the simplest weights within one standard error
of the best, kept under the same rule against the CSPML logit alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cspml_flows.core.descriptors import DESCRIPTOR_VERSION
from cspml_flows.core.errors import ModelError
from cspml_flows.learning.features import Standardizer, role_distance
from cspml_flows.learning.hetero.embeddings import EMBED_VERSION
from cspml_flows.learning.hetero.encoders import GEOMETRY_VERSION
from cspml_flows.learning.hetero.model import HETERO_FORMAT, TAU, Bank, HeteroModel, Stacker, core_logit, to_logit
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.hetero_metrics import (
    cluster_lists,
    formula_targets,
    held_out_prototypes,
    objective,
    polymorph_metrics,
    prototype_queries,
    retrieval_metrics,
    significant,
)

LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
MUS = (0.0, -2.0, -5.0, -10.0, -20.0)
INV_TOWER = (0.0, 0.05, 0.1, 0.2, 0.4, 1.0)
INV_PRIOR = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
INV_NORM = (0.0, 0.25, 0.5, 1.0, 2.0)
HELD_PROTOTYPES = 0.1  # share of the prototypes taken by >= 3 formulas held out of the weight-choosing models
MAX_INV_PROTOTYPES = 150
DISTILL = 0.5  # share of the tower's target from CSPML's softmax (chosen on the mpts52 pool's held-out formulas)


def init_model(
    index: TemplateIndex, geom: np.ndarray, emb: np.ndarray | None = None, variant: str = "none", dim=32, seed=0
) -> HeteroModel:
    """Untrained towers: A and B start as one random projection of the chemistry difference."""
    std = Standardizer(index.stats, index.role_props)

    def scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sd = x.std(axis=0)
        return x.mean(axis=0), np.where(sd < 1e-6, 1.0, sd)

    mu, sd = scale(geom)
    m = HeteroModel(std, mu, sd, np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0), variant=variant)
    if variant != "none":
        if emb is None:
            raise ModelError(f"variant {variant!r} needs the templates' embeddings")
        m.emb_mu, m.emb_sd = scale(emb)
    dc = m.phi(index.role_props[:1], index.role_fracs[:1], index.stats[:1]).shape[1]
    first = np.arange(len(index)) < 1
    ds = m.psi(index.subset(first), geom[:1], None if emb is None else emb[:1]).shape[1]
    rng = np.random.default_rng(seed)
    proj = rng.normal(0, 1 / np.sqrt(dc), size=(dim, dc - 1))
    m.A = np.hstack([proj, np.zeros((dim, 1))])
    m.B = np.zeros((dim, ds))
    m.B[:, : dc - 1] = proj
    m.w = np.zeros(ds)
    return m


def loss_and_grads(model: HeteroModel, bank: Bank, groups: TrainingGroups, sel: np.ndarray, l2: float = 0.0):
    """Mean listwise InfoNCE (cross-entropy to the target weights) of groups ``sel`` and its gradient with
    respect to A, B and w (plus the L2 term's gradient)."""
    cand, y, valid = groups.cand[sel], groups.y[sel], groups.valid[sel]
    phi = groups.phi[sel]
    psi = bank.psi[np.where(valid, cand, 0)]
    u = phi @ model.A.T
    v = psi @ model.B.T
    diff = u[:, None, :] - v
    s_ = -np.sum(diff * diff, axis=2) + psi @ model.w
    s_ = np.where(valid, s_, -1e9)
    s_ -= s_.max(axis=1, keepdims=True)
    p = np.exp(s_) * valid
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.sum(y * np.log(p + 1e-300)) / len(sel))
    g = (p - y) / len(sel)
    gu = np.einsum("bm,bmd->bd", g, -2 * diff)
    gv = (g[:, :, None] * 2 * diff).reshape(-1, diff.shape[2])
    grads = [
        gu.T @ phi + l2 * model.A,
        gv.T @ psi.reshape(-1, psi.shape[2]) + l2 * model.B,
        np.einsum("bm,bmk->k", g, psi) + l2 * model.w,
    ]
    return loss, grads


def fit_towers(
    model: HeteroModel, bank: Bank, groups: TrainingGroups, epochs=40, lr=0.01, l2=1e-4, batch=256, seed=0
) -> list[float]:
    """Listwise InfoNCE with Adam on precomputed candidate groups; returns the loss per epoch."""
    rng = np.random.default_rng(seed)
    params = [model.A, model.B, model.w]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    losses = []
    n = len(groups.phi)
    for _ in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for s in range(0, n, batch):
            sel = order[s : s + batch]
            loss, grads = loss_and_grads(model, bank, groups, sel, l2)
            total += loss * len(sel)
            step += 1
            for k, (param, grad) in enumerate(zip(params, grads, strict=True)):
                m1[k] = b1 * m1[k] + (1 - b1) * grad
                m2[k] = b2 * m2[k] + (1 - b2) * grad * grad
                param -= lr * (m1[k] / (1 - b1**step)) / (np.sqrt(m2[k] / (1 - b2**step)) + eps)
        losses.append(total / n)
    return losses


class TrainingGroups:
    """Per training composition: its tower input and a padded candidate group with target weights."""

    def __init__(
        self, phi: np.ndarray, cand: np.ndarray, y: np.ndarray, valid: np.ndarray, anchors: np.ndarray | None = None
    ):
        self.phi, self.cand, self.y, self.valid = phi, cand, y, valid
        self.anchors = anchors  # index row of each group's composition

    def distill(self, core: SimilarityModel, index: TemplateIndex, alpha: float, temp: float = 1.0) -> TrainingGroups:
        """Targets mixed with the CSPML model's softmax over each candidate group (knowledge distillation):
        ``(1 - alpha) * y + alpha * softmax(logit / temp)``; the teacher must not have seen held-out formulas."""
        from cspml_flows.learning.model import QueryBatch

        if alpha <= 0 or self.anchors is None:
            return self
        b, m = self.cand.shape
        qb = QueryBatch.from_roles([index.roles[i] for i in self.anchors])
        qi = np.repeat(np.arange(b), m)
        ti = np.where(self.valid, self.cand, 0).reshape(-1)
        logit = core_logit(core, qb, qi, index.role_props[self.anchors], index, ti, role_rows=qi)
        z = np.where(self.valid, logit.reshape(b, m) / temp, -1e9)
        z -= z.max(axis=1, keepdims=True)
        q = np.exp(z) * self.valid
        q /= q.sum(axis=1, keepdims=True)
        return TrainingGroups(self.phi, self.cand, (1 - alpha) * self.y + alpha * q, self.valid, self.anchors)

    @classmethod
    def build(
        cls,
        model: HeteroModel,
        index: TemplateIndex,
        anchor_rows: np.ndarray,
        allowed_rows: np.ndarray,
        max_pos: int = 16,
        n_near: int = 32,
        n_random: int = 16,
        seed: int = 0,
    ) -> TrainingGroups:
        """One group per reduced formula among ``anchor_rows`` that has a positive among ``allowed_rows`` of
        other formulas. Positives: templates of the prototypes the formula takes, weighted by
        ``exp(-E_hull / TAU)`` of the formula in that prototype (spread over the prototype's members)."""
        rng = np.random.default_rng(seed)
        allowed = np.zeros(len(index), dtype=bool)
        allowed[allowed_rows] = True
        by_formula: dict[str, list[int]] = {}
        for i in anchor_rows:
            by_formula.setdefault(str(index.formulas[i]), []).append(int(i))
        size = max_pos + n_near + n_random
        anchors, cands, ys = [], [], []
        for rows in by_formula.values():
            a = rows[0]
            members = index.by_anon.get(str(index.anon[a]))
            cand = members[allowed[members] & (index.formulas[members] != index.formulas[a])]
            if len(cand) < 2:
                continue
            energy: dict[int, float] = {}
            for r in rows:
                e = index.e_above_hull[r]
                e = 0.0 if not np.isfinite(e) else max(float(e), 0.0)
                c = int(index.cluster[r])
                energy[c] = min(energy.get(c, np.inf), e)
            is_pos = np.isin(index.cluster[cand], list(energy))
            pos, neg = cand[is_pos], cand[~is_pos]
            if len(pos) == 0 or (len(neg) == 0 and len(np.unique(index.cluster[pos])) < 2):
                continue  # nothing to learn: no positive, or only positives of one prototype
            if len(pos) > max_pos:
                pos = rng.choice(pos, max_pos, replace=False)
            d = role_distance(index.role_props[a][None], index.role_props[neg], model.std) if len(neg) else neg
            near = neg[np.argsort(d, kind="stable")[:n_near]]
            rest = np.setdiff1d(neg, near, assume_unique=True)
            rand = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else rest
            group = np.concatenate([pos, near, rand])
            y = np.zeros(size)
            cl = index.cluster[pos]
            wk = {c: np.exp(-energy[c] / TAU) for c in np.unique(cl)}
            counts = {c: np.sum(cl == c) for c in wk}
            y[: len(pos)] = [wk[c] / counts[c] for c in cl]
            y /= y.sum()
            padded = np.full(size, -1)
            padded[: len(group)] = group
            cands.append(padded)
            ys.append(y)
            anchors.append(a)
        if not cands:
            raise ModelError("no training composition shares a prototype with another formula: need more templates")
        arows = np.asarray(anchors)
        phi = model.phi(index.role_props[arows], index.role_fracs[arows], index.stats[arows])
        cand = np.vstack(cands)
        return cls(phi, cand, np.vstack(ys), cand >= 0, arows)


# ------------------------------------------------------------------------------------------ fusion choice
def choose_fusion(
    model: HeteroModel, bank: Bank, index: TemplateIndex, val_rows: np.ndarray, core, stack: bool = True
) -> dict[str, Any]:
    """Retrieval and polymorph metrics of held-out formulas (strict: no template of the formula) for CSPML,
    the tower alone and each fusion weight; the chosen weights maximise top-1 + half ground-state-first and
    must beat CSPML by one standard error per query, else CSPML's ranking is kept (and the report says so)."""
    from cspml_flows.predict.hetero_rank import aggregate, candidate_rows

    targets = [t for t in formula_targets(index, val_rows) if t[2]]
    report: dict[str, Any] = {"n_val_queries": len(targets)}
    if not targets:
        report["chosen"] = {"lam": 1.0, "mu": 0.0, "stacked": False, "tower_kept": True}
        return report
    rows = candidate_rows(bank, [t[1] for t in targets], strict=True, std=model.std)
    logit, tower, ehull = model.components(bank, rows.q, rows.qi, rows.q_role, rows.ti, core)
    relevant = [t[2] for t in targets]
    poly = [i for i, t in enumerate(targets) if len(t[4]) >= 2 and t[3] in t[2]]
    report["n_polymorph_queries"] = len(poly)

    def evaluate(z: np.ndarray) -> dict[str, Any]:
        lists = cluster_lists(aggregate(bank, rows, z, top=60))
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
            grid.append({"lam": lam, "mu": mu, **evaluate(model.fuse(logit, tower, ehull, lam, mu, core is not None))})
    best = max(grid, key=lambda g: (objective(g), -g["lam"], g["mu"]))
    if core is not None and not significant(best["_per_query"], variants["cspml"]["_per_query"]):
        best = next(g for g in grid if g["lam"] == 0.0 and g["mu"] == 0.0)
    variants["hetero"] = {k: v for k, v in best.items() if k not in ("lam", "mu")}
    report["chosen"] = {"lam": best["lam"], "mu": best["mu"], "stacked": False}
    if core is not None and stack and len(targets) >= 40:
        # second stage: gradient boosting on both scores and template facts, 2-fold cross-validated
        x = HeteroModel.stack_features(bank, rows.qi, rows.ti, logit, tower)
        cl = bank.index.cluster[rows.ti]
        y = np.array([c in relevant[q] for q, c in zip(rows.qi, cl, strict=True)], dtype=int)
        w = 1.0 + np.array([c == targets[q][3] for q, c in zip(rows.qi, cl, strict=True)], dtype=float)
        fold = np.random.default_rng(0).integers(0, 2, len(targets))[rows.qi]
        z = np.zeros(len(rows.qi))
        for f in (0, 1):
            clf = Stacker().fit(x[fold != f], y[fold != f], sample_weight=w[fold != f])
            z[fold == f] = to_logit(clf.predict_proba(x[fold == f])[:, 1])
        stacked = evaluate(z)
        variants["stacked (2-fold CV)"] = stacked
        if objective(stacked) > objective(best) and significant(stacked["_per_query"], best["_per_query"]):
            report["chosen"]["stacked"] = True
            report["stacker"] = Stacker().fit(x, y, sample_weight=w)
            variants["hetero"] = stacked
    report["chosen"]["tower_kept"] = bool(report["chosen"]["stacked"] or report["chosen"]["lam"] > 0 or core is None)
    report["chosen"]["cspml_kept"] = bool(core is not None and not report["chosen"]["tower_kept"] and best["mu"] == 0)
    report["variants"] = {k: {a: b for a, b in v.items() if a != "_per_query"} for k, v in variants.items()}
    report["grid"] = [{a: b for a, b in g.items() if a != "_per_query"} for g in grid]
    return report


def inverse_queries(index: TemplateIndex, val_rows: np.ndarray, max_queries: int = 300, seed: int = 0):
    """Structure -> composition queries from held-out formulas: for each prototype cluster taken by a
    held-out formula, its lowest-energy template of another (training) formula; candidates: every formula of
    the anonymous formula except the training formulas known to take the cluster (as in the inverse task,
    where the whole pool competes); relevant: the held-out formulas that take it."""
    is_val = np.zeros(len(index), dtype=bool)
    is_val[val_rows] = True
    out = []
    for c in np.unique(index.cluster[val_rows]):
        members = np.flatnonzero(index.cluster == c)
        train_m = members[~is_val[members]]
        if len(train_m) == 0:
            continue
        t = int(train_m[np.argmin(np.nan_to_num(index.e_above_hull[train_m], nan=0.0))])
        pool = index.by_anon[str(index.anon[t])]
        formulas = sorted(set(index.formulas[pool].tolist()) - set(index.formulas[train_m].tolist()))
        rel = set(index.formulas[members[is_val[members]]].tolist())
        if rel and len(formulas) > 1:
            out.append((t, formulas, rel))
    rng = np.random.default_rng(seed)
    if len(out) > max_queries:
        out = [out[i] for i in sorted(rng.choice(len(out), max_queries, replace=False))]
    return out


def inverse_parts(model: HeteroModel, bank: Bank, queries, core) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per inverse query: (n_assignments, 4) columns (CSPML logit, tower, log substitution prior, logit
    normalised over the pool's other prototypes) and the candidate formula owning each assignment."""
    from cspml_flows.predict.inverse import PoolNormaliser, assignment_parts, formula_assignments

    normaliser = PoolNormaliser(core, bank.index) if core is not None else None
    out = []
    for t, formulas, _rel in queries:
        assignments, owner = formula_assignments(formulas)
        _, _, parts = assignment_parts(model, bank, t, assignments, core, normaliser, int(bank.index.cluster[t]))
        out.append((parts, owner))
    return out


def inverse_rankings(parts, weights) -> list[np.ndarray]:
    """Candidate formula positions, best first, per query under inverse weights."""
    out = []
    for p, owner in parts:
        s = p @ np.asarray(weights, dtype=float)
        best = np.full(int(owner.max()) + 1, -np.inf)
        np.maximum.at(best, owner, s)
        out.append(np.argsort(-best, kind="stable"))
    return out


def choose_inverse(
    model: HeteroModel, bank: Bank, index: TemplateIndex, val_rows: np.ndarray, core, held: Sequence[int] = ()
) -> dict:
    """Inverse weights chosen on structure -> composition queries of held-out formulas and of the held-out
    prototypes ``held`` (unseen by ``model`` and ``core``, as a new structure is): the simplest weights within
    one standard error of the best recall@10 in the grid, kept only when they beat the CSPML logit alone by
    one standard error per query."""
    formula_q = inverse_queries(index, val_rows)
    proto_q = prototype_queries(index, held)[:MAX_INV_PROTOTYPES]
    queries = formula_q + proto_q
    if not queries or core is None:
        return {"chosen": [0.0, 1.0, 0.0, 0.0] if core is None else [1.0, 0.0, 0.0, 0.0], "n": len(queries)}
    parts = inverse_parts(model, bank, queries, core)
    rel = [{i for i, f in enumerate(q[1]) if f in q[2]} for q in queries]

    def score(w):
        ranked = [list(r) for r in inverse_rankings(parts, w)]
        m = retrieval_metrics(ranked, rel, ks=(1, 5, 10))
        per = np.array([len(set(r[:10]) & s) / len(s) for r, s in zip(ranked, rel, strict=True)])
        return m, per

    grid = [(1.0, t, p, n) for t in INV_TOWER for p in INV_PRIOR for n in INV_NORM]
    results = {w: score(w) for w in grid}
    base = results[(1.0, 0.0, 0.0, 0.0)]
    top = max(grid, key=lambda w: (results[w][0]["recall@10"], results[w][0]["mrr"], -sum(w[1:])))
    # one-standard-error rule: the simplest weights (fewest components, then the smallest) that the best is not
    # significantly better than; these queries reuse training templates, so extra weight is optimistic here
    near = [w for w in grid if not significant(results[top][1], results[w][1])]
    best = min(near, key=lambda w: (sum(x != 0 for x in w[1:]), -results[w][0]["recall@10"], sum(w[1:])))
    if not significant(results[best][1], base[1]):
        best = (1.0, 0.0, 0.0, 0.0)
    return {
        "n": len(queries),
        "n_formula_queries": len(formula_q),
        "n_prototype_queries": len(proto_q),
        "chosen": list(best),
        "best_in_grid": list(top),
        "cspml": base[0],
        "fused": results[best][0],
        "tower": score((0.0, 1.0, 0.0, 0.0))[0],
        "pymatgen": score((0.0, 0.0, 1.0, 0.0))[0],
        "normalised": score((0.0, 0.0, 0.0, 1.0))[0],
    }


# ------------------------------------------------------------------------------------------------- train
def train_hetero(
    index: TemplateIndex,
    core: SimilarityModel | None = None,
    geom: np.ndarray | None = None,
    emb: np.ndarray | None = None,
    variant: str = "species",
    val_fraction: float = 0.15,
    seed: int = 0,
    epochs: int = 40,
    dim: int = 32,
    workers: int = 2,
    reuse_val_core: bool = False,
    core_tr: SimilarityModel | None = None,
    core_kwargs: dict[str, Any] | None = None,
    distill: float = DISTILL,
    log=print,
) -> tuple[HeteroModel, dict[str, Any]]:
    """Train the towers, choose the fusion and inverse weights on held-out formulas, refit on everything.

    ``core``: the CSPML model trained on this same index (trained here when None and needed). A second core
    model, trained without the held-out formulas (``core_tr``, trained here when None), scores them while the
    weights are chosen; ``reuse_val_core`` keeps that one as the final core model. ``distill``: the share of
    each tower's training target taken from the CSPML model's softmax over the candidate group (``core_tr``
    for the tower measured on held-out formulas, the final core for the final tower; 0: labels only).
    """
    from cspml_flows.learning.hetero.model import index_geometry

    t0 = time.perf_counter()
    if len(index) < 10:
        raise ModelError(f"need at least 10 templates to train, the store has {len(index)}")
    geom = index_geometry(index, workers) if geom is None else geom
    if variant != "none" and emb is None:
        from cspml_flows.learning.hetero.embeddings import index_embeddings

        emb = index_embeddings(index, variant)
    rng = np.random.default_rng(seed)
    formulas = np.unique(index.formulas)
    val_formulas = set(rng.choice(formulas, size=max(1, int(len(formulas) * val_fraction)), replace=False))
    is_val = np.isin(index.formulas, list(val_formulas))
    # prototypes held out as well (the inverse weights are chosen on them too); a given core_tr should come
    # from a training of this index and seed, which held out the same ones
    held = held_out_prototypes(index.subset(~is_val), HELD_PROTOTYPES, 3, seed)
    fit_mask = ~is_val & ~np.isin(index.cluster, held)
    model = init_model(index, geom, emb, variant, dim=dim, seed=seed)
    bank = Bank(index, model.psi(index, geom, emb))
    train_rows = np.flatnonzero(fit_mask)
    if core_tr is None and int(fit_mask.sum()) >= 10:
        try:
            kw = {"refit_all": False, "check_labels": 0, "seed": seed, **(core_kwargs or {})}
            core_tr, _ = SimilarityModel.train(index.subset(fit_mask), log=log, **kw)
        except ModelError:
            core_tr = None
    groups = TrainingGroups.build(model, index, train_rows, train_rows, seed=seed)
    if core_tr is not None:
        groups = groups.distill(core_tr, index, distill)
    log(f"hetero ({variant}): {len(groups.phi)} training compositions, {groups.valid.sum()} candidate pairs")
    losses = fit_towers(model, bank, groups, epochs=epochs, seed=seed)
    log(f"hetero: tower loss {losses[0]:.3f} -> {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    report = choose_fusion(model, bank, index, np.flatnonzero(is_val), core_tr)
    report["inverse"] = choose_inverse(model, bank, index, np.flatnonzero(is_val), core_tr, held)
    report["n_held_prototypes"] = len(held)
    stacker = report.pop("stacker", None)
    c = report["chosen"]
    log(f"hetero: fusion lam={c['lam']} mu={c['mu']} stacked={c['stacked']} on {report['n_val_queries']} formulas")
    log(f"hetero: inverse weights {report['inverse']['chosen']} on {report['inverse']['n']} held-out queries")
    all_rows = np.arange(len(index))
    final = init_model(index, geom, emb, variant, dim=dim, seed=seed)
    final.lam, final.mu, final.use_core = c["lam"], c["mu"], core_tr is not None
    final.inv = np.asarray(report["inverse"]["chosen"], dtype=float)
    final.stacker = stacker
    if final.use_core and core is None:
        if reuse_val_core:
            core = core_tr
        else:
            core, _ = SimilarityModel.train(index, seed=seed, check_labels=0, log=log, **(core_kwargs or {}))
    final.core = core if final.use_core else None
    groups = TrainingGroups.build(final, index, all_rows, all_rows, seed=seed + 1)
    teacher = core if core is not None else core_tr
    if teacher is not None:
        groups = groups.distill(teacher, index, distill)
    fit_towers(final, Bank(index, final.psi(index, geom, emb)), groups, epochs=epochs, seed=seed)
    report["train_seconds"] = time.perf_counter() - t0
    report["tower_loss"] = [round(x, 4) for x in losses]
    report["distill"] = distill if core_tr is not None else 0.0
    final.meta = {
        "format": HETERO_FORMAT,
        "descriptor_version": DESCRIPTOR_VERSION,
        "geometry_version": GEOMETRY_VERSION,
        "embedding_version": EMBED_VERSION,
        "training_hash": training_hash(index),
        "n_templates": len(index),
        "created": datetime.now(UTC).isoformat(),
        "report": report,
    }
    return final, report


def train_without(
    index: TemplateIndex,
    geom: np.ndarray,
    val_rows: np.ndarray,
    held: np.ndarray,
    seed: int = 0,
    log=print,
    emb: np.ndarray | None = None,
    **kw,
) -> HeteroModel:
    """A hetero model (towers, weights and core) that never saw the held-out formulas or prototypes."""
    keep = np.ones(len(index), dtype=bool)
    keep[val_rows] = False
    keep &= ~np.isin(index.cluster, held)
    sub_emb = None if emb is None else emb[keep]
    model, _ = train_hetero(
        index.subset(keep), geom=geom[keep], emb=sub_emb, seed=seed, reuse_val_core=True, log=log, **kw
    )
    return model
