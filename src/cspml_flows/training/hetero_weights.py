"""Choice of the heterogeneous model's weights on held-out formulas and prototypes of the pool.

Every weight that mixes the tower with CSPML is chosen on held-out formulas and held-out prototypes, scored by
a core model and a tower trained without them: the composition -> structure fusion (``lam``, ``mu``, or a
LightGBM second stage), kept only when its per-query gain over CSPML exceeds one standard error; and the
inverse weights (CSPML logit, tower, pymatgen substitution prior, logit normalised over the pool's other
prototypes), chosen on structure -> composition queries of the held-out formulas and prototypes: the
simplest weights within one standard error of the best, kept under the same rule against the CSPML logit
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cspml_flows.learning.hetero.model import Bank, HeteroModel, Stacker, to_logit
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.predict.hetero_rank import PairRows, aggregate, candidate_rows
from cspml_flows.predict.inverse import PoolNormaliser, assignment_parts, formula_assignments
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.hetero_metrics import (
    cluster_lists,
    formula_targets,
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
MAX_INV_PROTOTYPES = 150

#: A structure -> composition query: template row, candidate formulas, the relevant ones among them.
InverseQuery = tuple[int, list[str], set[str]]


def choose_fusion(
    model: HeteroModel,
    bank: Bank,
    index: TemplateIndex,
    val_rows: np.ndarray,
    core: SimilarityModel | None,
    stack: bool = True,
) -> dict[str, Any]:
    """Fusion weights chosen on held-out formulas (strict: no template of the formula), with their metrics.

    Retrieval and polymorph metrics for CSPML, the tower alone and each fusion weight; the chosen weights
    maximise top-1 + half ground-state-first and must beat CSPML by one standard error per query, else CSPML's
    ranking is kept (and the report says so).
    """
    targets = [t for t in formula_targets(index, val_rows) if t[2]]
    report: dict[str, Any] = {"n_val_queries": len(targets)}
    if not targets:
        report["chosen"] = {"lam": 1.0, "mu": 0.0, "stacked": False, "tower_kept": True}
        return report
    rows = candidate_rows(bank, [t[1] for t in targets], strict=True, std=model.std)
    logit, tower, ehull = model.components(bank, rows.q, rows.qi, rows.q_role, rows.ti, core)
    data = FusionData(bank, rows, targets, logit, tower)
    report["n_polymorph_queries"] = len(data.poly)
    variants: dict[str, dict] = {}
    if core is not None:
        variants["cspml"] = data.evaluate(logit)
    variants["tower"] = data.evaluate(tower)
    grid = [
        {"lam": lam, "mu": mu, **data.evaluate(model.fuse(logit, tower, ehull, lam, mu, core is not None))}
        for lam in LAMBDAS
        for mu in MUS
        if not (core is None and lam == 0.0)
    ]
    best = max(grid, key=lambda g: (objective(g), -g["lam"], g["mu"]))
    if core is not None and not significant(best["_per_query"], variants["cspml"]["_per_query"]):
        best = next(g for g in grid if g["lam"] == 0.0 and g["mu"] == 0.0)
    variants["hetero"] = {k: v for k, v in best.items() if k not in ("lam", "mu")}
    report["chosen"] = {"lam": best["lam"], "mu": best["mu"], "stacked": False}
    if core is not None and stack and len(targets) >= 40:
        _try_stacker(data, best, variants, report)
    chosen = report["chosen"]
    chosen["tower_kept"] = bool(chosen["stacked"] or chosen["lam"] > 0 or core is None)
    chosen["cspml_kept"] = bool(core is not None and not chosen["tower_kept"] and best["mu"] == 0)
    report["variants"] = {k: {a: b for a, b in v.items() if a != "_per_query"} for k, v in variants.items()}
    report["grid"] = [{a: b for a, b in g.items() if a != "_per_query"} for g in grid]
    return report


@dataclass
class FusionData:
    """Held-out formulas' candidate rows with their CSPML and tower scores, and what rankings are judged by."""

    bank: Bank
    rows: PairRows
    targets: list
    logit: np.ndarray
    tower: np.ndarray

    @property
    def relevant(self) -> list[set[int]]:
        """Prototype clusters each held-out formula takes."""
        return [t[2] for t in self.targets]

    @property
    def poly(self) -> list[int]:
        """Queries with two or more polymorphs whose ground state is among them."""
        return [i for i, t in enumerate(self.targets) if len(t[4]) >= 2 and t[3] in t[2]]

    def evaluate(self, z: np.ndarray) -> dict[str, Any]:
        """Retrieval and polymorph metrics of the ranking by scores ``z``, with the per-query objective."""
        targets, relevant, poly = self.targets, self.relevant, self.poly
        lists = cluster_lists(aggregate(self.bank, self.rows, z, top=60))
        m = retrieval_metrics(lists, relevant)
        pm = polymorph_metrics(
            [lists[i] for i in poly], [targets[i][3] for i in poly], [targets[i][2] - {targets[i][3]} for i in poly]
        )
        per_query = np.array([float(bool(lst) and lst[0] in rel) for lst, rel in zip(lists, relevant, strict=True)])
        for i in poly:
            per_query[i] += 0.5 * float(bool(lists[i]) and lists[i][0] == targets[i][3])
        return {**m, **{f"poly_{k}": v for k, v in pm.items()}, "_per_query": per_query}


def _try_stacker(data: FusionData, best: dict[str, Any], variants: dict[str, dict], report: dict[str, Any]) -> None:
    """Second stage: gradient boosting on both scores and template facts, 2-fold cross-validated; kept (in
    ``report``) when it beats the best fusion by one standard error per query."""
    rows, targets, relevant = data.rows, data.targets, data.relevant
    x = HeteroModel.stack_features(data.bank, rows.qi, rows.ti, data.logit, data.tower)
    cl = data.bank.index.cluster[rows.ti]
    y = np.array([c in relevant[q] for q, c in zip(rows.qi, cl, strict=True)], dtype=int)
    w = 1.0 + np.array([c == targets[q][3] for q, c in zip(rows.qi, cl, strict=True)], dtype=float)
    fold = np.random.default_rng(0).integers(0, 2, len(targets))[rows.qi]
    z = np.zeros(len(rows.qi))
    for f in (0, 1):
        clf = Stacker().fit(x[fold != f], y[fold != f], sample_weight=w[fold != f])
        z[fold == f] = to_logit(clf.predict_proba(x[fold == f])[:, 1])
    stacked = data.evaluate(z)
    variants["stacked (2-fold CV)"] = stacked
    if objective(stacked) > objective(best) and significant(stacked["_per_query"], best["_per_query"]):
        report["chosen"]["stacked"] = True
        report["stacker"] = Stacker().fit(x, y, sample_weight=w)
        variants["hetero"] = stacked


def inverse_queries(
    index: TemplateIndex, val_rows: np.ndarray, max_queries: int = 300, seed: int = 0
) -> list[InverseQuery]:
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


def inverse_parts(
    model: HeteroModel, bank: Bank, queries: list[InverseQuery], core: SimilarityModel | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per inverse query: (n_assignments, 4) columns and the candidate formula owning each assignment.

    The columns: CSPML logit, tower, log substitution prior, logit normalised over the pool's other prototypes.
    """
    normaliser = PoolNormaliser(core, bank.index) if core is not None else None
    out = []
    for t, formulas, _rel in queries:
        assignments, owner = formula_assignments(formulas)
        _, _, parts = assignment_parts(model, bank, t, assignments, core, normaliser, int(bank.index.cluster[t]))
        out.append((parts, owner))
    return out


def inverse_rankings(parts: list[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """Candidate formula positions, best first, per query under inverse weights."""
    out = []
    for p, owner in parts:
        s = p @ np.asarray(weights, dtype=float)
        best = np.full(int(owner.max()) + 1, -np.inf)
        np.maximum.at(best, owner, s)
        out.append(np.argsort(-best, kind="stable"))
    return out


def choose_inverse(
    model: HeteroModel,
    bank: Bank,
    index: TemplateIndex,
    val_rows: np.ndarray,
    core: SimilarityModel | None,
    held: Sequence[int] = (),
) -> dict[str, Any]:
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

    def score(w: tuple[float, ...]) -> tuple[dict[str, float], np.ndarray]:
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
