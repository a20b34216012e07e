"""Rank (template, element assignment) candidates for many query compositions at once.

1. Candidates: templates with the query's anonymous formula, minus excluded ones (a query's own id; in
   the strict setting every template of its reduced formula).
2. Prefilter: the ``prefilter`` nearest by role-wise element-property distance, ties by row; exactly in
   small groups, through a nearest-neighbour graph with an exact re-rank in large ones
   (:mod:`cspml_flows.predict.prefilter`).
3. Score: the learned similarity for every kept template and every within-tie-group permutation of the
   query's elements (at most ``max_perms``, fewest swaps against the electronegativity order first; see
   :meth:`cspml_flows.core.composition.Roles.permutations`). The first ``FULL_PERMS`` assignments are scored
   against every prefiltered template, further ones (ties of four or five elements) only against the
   ``EXTRA_PREFILTER`` templates nearest to that assignment, so that 120 assignments cost about what 24 did.
4. Aggregate: candidates of one prototype cluster and assignment collapse to one, scored by the best
   member plus a vote of the others; every assignment of a cluster is realised on one member, the best
   under the cluster's best assignment (so symmetry-equivalent assignments need no structure fit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from cspml_flows.core import progress
from cspml_flows.core.composition import MAX_ASSIGNMENTS, Roles
from cspml_flows.core.descriptors import role_properties
from cspml_flows.learning.features import Standardizer, unlearned_distance
from cspml_flows.learning.model import QueryBatch, SimilarityModel
from cspml_flows.predict.prefilter import ANN_THRESHOLD, BUILD_AFTER, nearest_rows
from cspml_flows.templates.index import TemplateIndex


@dataclass(frozen=True)
class Ranked:
    """One ranked candidate: template row, query-role permutation, score.

    ``alternates`` are the next templates of the same cluster and assignment, best first (used when the
    template fails validity).
    """

    template: int
    perm: tuple[int, ...]
    score: float
    cluster: int
    alternates: tuple[int, ...] = ()
    stats: tuple[float, ...] = ()  # best and mean member probability, members scored (the ranker's input)


def overfetch(top: int) -> int:
    """(template, assignment) pairs retrieved for ``top`` distinct structures.

    Twice as many plus two, so that ``top`` remain after the distance rule and deduplication drop some.
    """
    return 2 * top + 2


def allowed_rows(
    index: TemplateIndex, query: Roles, exclude_ids: set[str], strict: bool
) -> Callable[[np.ndarray], np.ndarray]:
    """Mask of the given template rows that ``query`` may use.

    Not its own id (``exclude_ids``); in the strict setting, no template of its reduced formula.
    """
    excluded = list(exclude_ids)
    formula = query.reduced_formula

    def allowed(rows: np.ndarray) -> np.ndarray:
        ok = np.ones(len(rows), dtype=bool)
        if excluded:
            ok &= ~np.isin(index.ids[rows], excluded)
        if strict:
            ok &= index.formulas[rows] != formula
        return ok

    return allowed


ROW_CHUNK = 20000  # (query, template, assignment) rows scored at a time
FULL_PERMS = 6  # assignments scored against all ``prefilter`` templates (fewest swaps first) ...
EXTRA_PREFILTER = 8  # ... further ones only against their own nearest templates (ties of 4-5: 24-120 of them)


@dataclass
class ScoreRows:
    """(query, template, assignment) rows to score, with the role properties of each (query, assignment)."""

    perms_of: list[list[tuple[int, ...]]]
    rows_q: list[np.ndarray] = field(default_factory=list)
    rows_t: list[np.ndarray] = field(default_factory=list)
    rows_p: list[np.ndarray] = field(default_factory=list)
    rows_qp: list[np.ndarray] = field(default_factory=list)
    qp_props: list[np.ndarray] = field(default_factory=list)

    def add_query(self, i: int, keep: np.ndarray, qp: np.ndarray, extra: list[np.ndarray]) -> None:
        """Rows of query ``i``: its first assignments on ``keep``, further ones on their own ``extra`` rows."""
        self.qp_props.append(qp)
        for k in range(len(self.perms_of[i])):
            kept = keep if k < FULL_PERMS else extra[k - FULL_PERMS]
            self.rows_q.append(np.full(len(kept), i))
            self.rows_t.append(kept)
            self.rows_p.append(np.full(len(kept), k))
            self.rows_qp.append(np.full(len(kept), len(self.rows_qp)))


def rank(  # noqa: PLR0913 - the retrieval entry's keyword options (callers pass them by name)
    model: SimilarityModel | None,
    index: TemplateIndex,
    queries: Sequence[Roles],
    top: int = 5,
    exclude_ids: Sequence[set[str]] | None = None,
    strict: bool = False,
    prefilter: int = 48,
    max_perms: int = MAX_ASSIGNMENTS,
    vote: float = 0.15,
    metric: str = "learned",
    threads: int = 1,
    ann_threshold: int | None = ANN_THRESHOLD,
) -> list[list[Ranked]]:
    """Top candidates per query.

    ``metric='learned'`` uses the model; ``'nearest'`` the unlearned Magpie distance (then one candidate per
    template, canonical assignment, no clustering). ``threads`` score row chunks concurrently. Groups of at
    least ``ann_threshold`` templates are prefiltered through their nearest-neighbour graph once loaded or
    worth building (:mod:`cspml_flows.predict.prefilter`), smaller ones exactly (``None``: all exactly; 0: all
    through the graph).
    """
    qb = QueryBatch.from_roles(list(queries))
    std = model.std if model is not None else Standardizer(index.stats, index.role_props)
    perms_of = [q.permutations(limit=max_perms) for q in queries]
    allowed = [allowed_rows(index, q, exclude_ids[i] if exclude_ids else set(), strict) for i, q in enumerate(queries)]
    if metric == "nearest":
        return _nearest(index, queries, qb, std, allowed, perms_of, top)
    rows = ScoreRows(perms_of)
    build = 0 if ann_threshold == 0 else BUILD_AFTER
    for anon, qis in _by_group(queries).items():
        members = index.by_anon.get(anon)
        if members is None or len(members) == 0:
            continue
        for i in qis:
            near = partial(
                nearest_rows,
                index,
                anon,
                members,
                std=std,
                allowed=allowed[i],
                threshold=ann_threshold,
                build_after=build,
            )
            keep = near(qb.role_props[i][None], prefilter, few_in_row_order=True)[0]
            if len(keep) == 0:
                continue
            qp = role_properties([queries[i]] * len(perms_of[i]), perms_of[i])
            extra = near(qp[FULL_PERMS:], EXTRA_PREFILTER) if len(perms_of[i]) > FULL_PERMS else []
            rows.add_query(i, keep, qp, extra)
    if not rows.rows_q:
        return [[] for _ in queries]
    if model is None:
        raise ValueError("metric='learned' needs a model")
    qi, ti, pi = (np.concatenate(r) for r in (rows.rows_q, rows.rows_t, rows.rows_p))
    prob = _score_rows(model, index, qb, rows, threads)
    return aggregate_rows(index, qi, ti, pi, prob, perms_of, top, vote)


def _by_group(queries: Sequence[Roles]) -> dict[str, list[int]]:
    """Query positions by anonymous formula, groups in order of first appearance."""
    by_group: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_group.setdefault(q.anonymous_formula, []).append(i)
    return by_group


def _nearest(
    index: TemplateIndex,
    queries: Sequence[Roles],
    qb: QueryBatch,
    std: Standardizer,
    allowed: list[Callable[[np.ndarray], np.ndarray]],
    perms_of: list[list[tuple[int, ...]]],
    top: int,
) -> list[list[Ranked]]:
    """The ``metric='nearest'`` answer: templates by unlearned Magpie distance, canonical assignment."""
    out: list[list[Ranked]] = [[] for _ in queries]
    for anon, qis in _by_group(queries).items():
        members = index.by_anon.get(anon)
        if members is None or len(members) == 0:
            continue
        for i in qis:
            cand = members[allowed[i](members)]
            d = unlearned_distance(qb.stats[i][None], index.stats[cand], std)
            order = np.argsort(d, kind="stable")[:top]
            out[i] = [Ranked(int(cand[j]), perms_of[i][0], float(-d[j]), int(index.cluster[cand[j]])) for j in order]
    return out


def _score_rows(
    model: SimilarityModel, index: TemplateIndex, qb: QueryBatch, rows: ScoreRows, threads: int
) -> np.ndarray:
    """Match probability of every row, in chunks of ``ROW_CHUNK`` (``threads`` at a time)."""
    qi, ti, qpi = (np.concatenate(r) for r in (rows.rows_q, rows.rows_t, rows.rows_qp))
    qp_props = np.concatenate(rows.qp_props)  # role properties of each (query, assignment), rows point into it
    prob = np.empty(len(qi))
    qp_std, q_stats_std = model.std.roles(qp_props), model.std.stats(qb.stats)  # each query once
    model.standardized_index(index)  # each template once, before the threads share it

    def score(sl: slice) -> None:
        x = model.features_standardized(qp_std[qpi[sl]], qb.role_fracs[qi[sl]], q_stats_std[qi[sl]], index, ti[sl])
        prob[sl] = model.predict_proba(x, threads=1 if threads > 1 else 0)

    slices = [slice(s, s + ROW_CHUNK) for s in range(0, len(qi), ROW_CHUNK)]
    with progress.bar(len(qi), "score candidates", unit="pair") as shown:
        if threads > 1 and len(slices) > 1:
            with ThreadPoolExecutor(threads) as pool:  # numpy and LightGBM release the GIL
                for sl, _ in zip(slices, pool.map(score, slices), strict=True):
                    shown.update(min(sl.stop, len(qi)) - sl.start)
        else:
            for sl in slices:
                score(sl)
                shown.update(min(sl.stop, len(qi)) - sl.start)
    return prob


def aggregate_rows(
    index: TemplateIndex,
    qi: np.ndarray,
    ti: np.ndarray,
    pi: np.ndarray,
    prob: np.ndarray,
    perms_of: list[list[tuple[int, ...]]],
    top: int,
    vote: float,
    n_alt: int = 3,
) -> list[list[Ranked]]:
    """Collapse scored (query, template, perm) rows into one candidate per (query, cluster, perm), vectorised.

    Score = best + vote * (1 - best) * P(at least one other member matches), the members independent. All
    assignments of one cluster are realised on one template: the best member under the cluster's
    best-scoring assignment (the next best are the alternates), so that two assignments of a cluster are
    the same crystal exactly when that template's symmetry maps one onto the other (the member nearest the
    query in composition, tried instead, matched no more often and with a larger RMSE).
    """
    out: list[list[Ranked]] = [[] for _ in perms_of]
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
    count = ends - starts
    mean = np.add.reduceat(p_sorted, starts) / count
    g_query, g_cluster = qs[starts], cs[starts]
    # the (query, cluster) groups' best assignment: first of each run when sorted by query, cluster, -score
    by_cluster = np.lexsort((-score, g_cluster, g_query))
    lead = np.ones(len(by_cluster), dtype=bool)
    lead[1:] = (g_query[by_cluster][1:] != g_query[by_cluster][:-1]) | (
        g_cluster[by_cluster][1:] != g_cluster[by_cluster][:-1]
    )
    lead_of = {(int(g_query[g]), int(g_cluster[g])): int(g) for g in by_cluster[lead]}
    by_score = np.lexsort((-score, g_query))
    g_sorted = g_query[by_score]
    first = np.searchsorted(g_sorted, g_sorted, side="left")
    keep = by_score[(np.arange(len(by_score)) - first) < top]
    for g in keep:
        q, c = int(g_query[g]), int(g_cluster[g])
        lg = lead_of[(q, c)]
        group_rows = order[starts[lg] : ends[lg]]  # by probability, highest first
        members = ti[group_rows[: 1 + n_alt]].tolist()
        stats = (float(best[g]), float(mean[g]), float(count[g]))
        out[q].append(
            Ranked(members[0], perms_of[q][int(ps[starts[g]])], float(score[g]), c, tuple(members[1:]), stats)
        )
    return out
