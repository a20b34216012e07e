"""Rank (template, element assignment) candidates for many query compositions at once.

1. Candidates: templates with the query's anonymous formula, minus excluded ones (a query's own id; in
   the strict setting every template of its reduced formula).
2. Prefilter: the ``prefilter`` nearest by role-wise element-property distance.
3. Score: the learned similarity for every kept template and every within-tie-group permutation of the
   query's elements.
4. Aggregate: candidates of one prototype cluster and assignment collapse to one, scored by the best
   member plus a vote of the others; the best-scoring member is the template that is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cspml_flows.composition import Roles
from cspml_flows.descriptors import role_properties
from cspml_flows.learning.features import role_distance
from cspml_flows.learning.model import QueryBatch, SimilarityModel
from cspml_flows.templates.index import TemplateIndex


@dataclass(frozen=True)
class Ranked:
    """One ranked candidate: template row, query-role permutation, score; ``alternates`` are the next
    templates of the same cluster and assignment, best first (used when the template fails validity)."""

    template: int
    perm: tuple[int, ...]
    score: float
    cluster: int
    alternates: tuple[int, ...] = ()


def _exclusion_mask(
    index: TemplateIndex, members: np.ndarray, query: Roles, exclude_ids: set[str], strict: bool
) -> np.ndarray:
    ok = np.ones(len(members), dtype=bool)
    if exclude_ids:
        ok &= ~np.isin(index.ids[members], list(exclude_ids))
    if strict:
        ok &= index.formulas[members] != query.reduced_formula
    return ok


def rank(
    model: SimilarityModel | None,
    index: TemplateIndex,
    queries: Sequence[Roles],
    top: int = 5,
    exclude_ids: Sequence[set[str]] | None = None,
    strict: bool = False,
    prefilter: int = 48,
    max_perms: int = 6,
    vote: float = 0.15,
    metric: str = "learned",
) -> list[list[Ranked]]:
    """Top candidates per query. ``metric='learned'`` uses the model; ``'nearest'`` the unlearned
    Magpie distance (then one candidate per template, canonical assignment, no clustering)."""
    qb = QueryBatch.from_roles(list(queries))
    std = model.std if model is not None else None
    if std is None:
        from cspml_flows.learning.features import Standardizer

        std = Standardizer(index.stats, index.role_props)
    rows_q, rows_t, rows_p, rows_role = [], [], [], []
    perms_of: list[list[tuple[int, ...]]] = []
    nearest_out: list[list[Ranked]] = [[] for _ in queries]
    by_group: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_group.setdefault(q.anonymous_formula, []).append(i)
        perms_of.append(q.permutations(limit=max_perms))
    for anon, qis in by_group.items():
        members = index.by_anon.get(anon)
        if members is None or len(members) == 0:
            continue
        t_roles = index.role_props[members]
        for i in qis:
            ok = _exclusion_mask(index, members, queries[i], exclude_ids[i] if exclude_ids else set(), strict)
            cand = members[ok]
            if len(cand) == 0:
                continue
            if metric == "nearest":
                from cspml_flows.learning.features import unlearned_distance

                d = unlearned_distance(qb.stats[i][None], index.stats[cand], std)
                order = np.argsort(d, kind="stable")[:top]
                nearest_out[i] = [
                    Ranked(int(cand[j]), perms_of[i][0], float(-d[j]), int(index.cluster[cand[j]])) for j in order
                ]
                continue
            d = role_distance(qb.role_props[i][None], t_roles[ok], std)
            keep = cand[np.argsort(d, kind="stable")[:prefilter]] if len(cand) > prefilter else cand
            for p in perms_of[i]:
                rows_q.append(np.full(len(keep), i))
                rows_t.append(keep)
                rows_p.append(np.full(len(keep), perms_of[i].index(p)))
                rows_role.append(np.repeat(role_properties([queries[i]], [p]), len(keep), axis=0))
    if metric == "nearest":
        return nearest_out
    if not rows_q:
        return [[] for _ in queries]
    qi = np.concatenate(rows_q)
    ti = np.concatenate(rows_t)
    pi = np.concatenate(rows_p)
    q_role = np.concatenate(rows_role)
    if model is None:
        raise ValueError("metric='learned' needs a model")
    prob = np.empty(len(qi))
    chunk = 200000
    for s in range(0, len(qi), chunk):
        sl = slice(s, s + chunk)
        prob[sl] = model.predict_proba(model.features(qb, qi[sl], q_role[sl], index, ti[sl]))
    return _aggregate(index, qi, ti, pi, prob, perms_of, len(queries), top, vote)


def _aggregate(index, qi, ti, pi, prob, perms_of, n_queries, top, vote, n_alt: int = 3) -> list[list[Ranked]]:
    """Collapse scored (query, template, perm) rows into one candidate per (query, cluster, perm), vectorised:
    score = best + vote * (1 - best) * P(at least one other member matches), the others independent."""
    out: list[list[Ranked]] = [[] for _ in range(n_queries)]
    cl = index.cluster[ti]
    order = np.lexsort((-prob, pi, cl, qi))  # by query, cluster, perm, prob desc
    qs, cs, ps, p_sorted = qi[order], cl[order], pi[order], prob[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (qs[1:] != qs[:-1]) | (cs[1:] != cs[:-1]) | (ps[1:] != ps[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(order))
    log_miss = np.log1p(-np.clip(p_sorted, 0.0, 1.0 - 1e-12))
    rest = np.exp(np.add.reduceat(log_miss, starts) - log_miss[starts])  # P(no other member matches)
    best = p_sorted[starts]
    score = best + vote * (1.0 - best) * (1.0 - rest)
    g_query = qs[starts]
    by_score = np.lexsort((-score, g_query))
    g_sorted = g_query[by_score]
    first = np.searchsorted(g_sorted, g_sorted, side="left")
    keep = by_score[(np.arange(len(by_score)) - first) < top]
    for g in keep:
        s, e, q = starts[g], ends[g], int(g_query[g])
        alt = tuple(int(x) for x in ti[order[s + 1 : min(e, s + 1 + n_alt)]])
        out[q].append(Ranked(int(ti[order[s]]), perms_of[q][int(ps[s])], float(score[g]), int(cs[s]), alt))
    return out
