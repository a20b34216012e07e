"""Prototype clusters of index rows, computed again only for the partitions an update touched.

A partition is the set of templates with one anonymous formula and primitive-cell size. Within it, rows of
equal prototype label form a group (its smallest id represents it), and groups are merged over the
representative pairs of :func:`~cspml_flows.core.prototype.partition_pairs` that the structure matcher fits.
The fit of each pair is kept in a cache (partition, first and second representative as id hashes, result),
so an update fits only the pairs never fitted before.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cspml_flows.core.prototype import merge_groups, partition_pairs, run_fits
from cspml_flows.templates.index_rows import id_hash
from cspml_flows.templates.segments import Table

Pairs = tuple[np.ndarray, ...]  # the fit cache: partition, first and second representative, result


@dataclass
class _Partition:
    """One partition being clustered: its rows ``start:end`` (of the sorted rows), the group of each row,
    the group representatives, the representative pairs and their fits (None: not known yet)."""

    start: int
    end: int
    group: np.ndarray
    reps: list[int]
    pairs: list[tuple[int, int]]
    fits: list[bool | None]


def empty_pairs() -> Pairs:
    """A fit cache with no pairs."""
    empty = np.zeros(0, dtype=np.uint64)
    return (empty, empty, empty, np.zeros(0, dtype=bool))


def recluster(
    table: Table, cluster: np.ndarray, touched: np.ndarray | None, pairs: Pairs, workers: int = 1
) -> tuple[np.ndarray, Pairs, int]:
    """Cluster the live rows of the partitions ``touched`` (None: all) again: groups of equal prototype
    label, merged over the representative pairs of :func:`partition_pairs`; fit results come from ``pairs``
    (the cache) where known, the rest are fitted in ``workers`` processes. Returns the cluster array with new
    labels there, the cache with those partitions' pairs replaced by the ones evaluated now, and the number
    of pairs fitted."""
    live = np.flatnonzero(cluster >= 0)
    rows = live if touched is None else live[np.isin(table.column("part", live), touched)]
    kept = _kept_pairs(pairs, touched)
    if not len(rows):
        return cluster, kept, 0
    part, ids, labels = (table.column(key, rows) for key in ("part", "ids", "prototype"))
    by = np.lexsort((ids, part))
    rows, part, ids, labels = rows[by], part[by], ids[by], labels[by]
    starts = np.concatenate([[0], np.flatnonzero(part[1:] != part[:-1]) + 1, [len(rows)]])
    known = pairs if touched is not None else empty_pairs()
    plans = [_plan(part, ids, labels, int(s), int(e), known) for s, e in itertools.pairwise(starts)]
    fitted = _fit_missing(plans, table, rows, workers)
    new, new_pairs = _label(plans, cluster, rows, part, ids)
    out = [np.concatenate([k, *n]) for k, n in zip(kept, new_pairs, strict=True)]
    srt = np.argsort(out[0], kind="stable")
    return new, tuple(o[srt] for o in out), fitted


def _kept_pairs(pairs: Pairs, touched: np.ndarray | None) -> Pairs:
    """The cached pairs of the partitions not clustered again."""
    c_part, c_a, c_b, c_fit = pairs
    if touched is not None and len(c_part):
        keep = ~np.isin(c_part, touched)
        return (c_part[keep], c_a[keep], c_b[keep], c_fit[keep])
    return (c_part[:0], c_a[:0], c_b[:0], c_fit[:0]) if touched is None else pairs


def _plan(part: np.ndarray, ids: np.ndarray, labels: np.ndarray, s: int, e: int, known: Pairs) -> _Partition:
    """The groups, representatives and representative pairs of the partition at sorted rows ``s:e``, with
    the fits the cache ``known`` (sorted by partition) holds."""
    group_of: dict[str, int] = {}
    gid = np.empty(e - s, dtype=np.int64)
    reps: list[int] = []
    for k in range(s, e):
        key = str(labels[k]) or f"__none_{ids[k]}"
        g = group_of.get(key)
        if g is None:
            g = group_of[key] = len(reps)
            reps.append(k)
        gid[k - s] = g
    pp = partition_pairs([str(labels[k]) or None for k in reps])
    fits: list[bool | None] = [None] * len(pp)
    c_part, c_a, c_b, c_fit = known
    if pp and len(c_part):
        lo, hi = np.searchsorted(c_part, part[s], "left"), np.searchsorted(c_part, part[s], "right")
        cached = {(int(x), int(y)): bool(f) for x, y, f in zip(c_a[lo:hi], c_b[lo:hi], c_fit[lo:hi], strict=True)}
        hashes = [id_hash(str(ids[k])) for k in reps]
        fits = [cached.get((hashes[i], hashes[j])) for i, j in pp]
    return _Partition(s, e, gid, reps, pp, fits)


def _fit_missing(plans: list[_Partition], table: Table, rows: np.ndarray, workers: int) -> int:
    """Fit the pairs of ``plans`` whose fit is not known (one task per partition), in place; how many."""
    tasks, task_of = [], []
    for p, plan in enumerate(plans):
        missing = [q for q, f in enumerate(plan.fits) if f is None]
        if missing:
            need = sorted({x for q in missing for x in plan.pairs[q]})
            local = {g: t for t, g in enumerate(need)}
            structs = [table.structure_ref(int(rows[plan.reps[g]])) for g in need]
            tasks.append((structs, [(local[plan.pairs[q][0]], local[plan.pairs[q][1]]) for q in missing]))
            task_of.append((p, missing))
    results = run_fits(tasks, workers) if tasks else []
    fitted = 0
    for (p, missing), res in zip(task_of, results, strict=True):
        for q, ok in zip(missing, res, strict=True):
            plans[p].fits[q] = ok
        fitted += len(res)
    return fitted


def _label(
    plans: list[_Partition], cluster: np.ndarray, rows: np.ndarray, part: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """New cluster labels (above every label in use) for the rows of ``plans``, and their pairs for the cache."""
    new = np.array(cluster, dtype=np.int64)
    next_label = int(cluster.max()) + 1 if len(cluster) else 0
    n_part, n_a, n_b, n_fit = [], [], [], []
    for plan in plans:
        roots = merge_groups(len(plan.reps), plan.pairs, [bool(f) for f in plan.fits])
        new[rows[plan.start : plan.end]] = next_label + np.asarray(roots, dtype=np.int64)[plan.group]
        next_label += len(plan.reps)
        if plan.pairs:
            hashes = [id_hash(str(ids[k])) for k in plan.reps]
            n_part.append(np.full(len(plan.pairs), part[plan.start], dtype=np.uint64))
            n_a.append(np.array([hashes[i] for i, _ in plan.pairs], dtype=np.uint64))
            n_b.append(np.array([hashes[j] for _, j in plan.pairs], dtype=np.uint64))
            n_fit.append(np.array([bool(f) for f in plan.fits], dtype=bool))
    return new, [n_part, n_a, n_b, n_fit]
