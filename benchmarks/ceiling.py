"""Template coverage ceiling: share of queries for which some pool template (after the protocol's
exclusions) has the same anonymous formula and matches under ``fit_anonymous``, at each tolerance set."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from pymatgen.core import Structure

from benchmarks.scoring import TOLERANCE_SETS, check_nested
from cspml_flows.core.composition import roles
from cspml_flows.core.equivalence import Matcher, Tolerances
from cspml_flows.core.prototype import prototype_info
from cspml_flows.templates.index import TemplateIndex

MAX_CLUSTERS = 40


def covered_sets(args: tuple[dict, list[list[dict]], Sequence[Tolerances]]) -> list[bool]:
    """For each tolerance set (loosest first), whether one of the representatives matches the ground truth
    anonymously (a matcher error: no match). A tighter set is tried only where the looser one matched."""
    gt_d, reps, tolerance_sets = args
    gt = Structure.from_dict(gt_d)
    templates = [Structure.from_dict(rep[0]) for rep in reps]
    out: list[bool] = []
    for tolerances in tolerance_sets:
        matcher = Matcher(tolerances)
        out.append((not out or out[-1]) and any(matcher.fit_anonymous(t, gt) for t in templates))
    return out


def coverage(
    index: TemplateIndex,
    gts: list[Structure],
    query_ids: list[str],
    strict: bool,
    tolerance_sets: Sequence[Tolerances] = TOLERANCE_SETS,
    workers: int = 2,
) -> dict[str, np.ndarray]:
    """Boolean per query for each tolerance set (by name; loosest first). One representative per prototype
    cluster (the first allowed member), clusters of the same primitive-cell size only, the query's own
    prototype label tried first; partitions with more than MAX_CLUSTERS clusters are searched among
    same-space-group clusters only."""
    sets = tuple(tolerance_sets)
    check_nested(sets)
    tasks = []
    for gt, qid in zip(gts, query_ids, strict=True):
        r = roles(gt.composition)
        info = prototype_info(gt)
        members = index.by_anon.get(r.anonymous_formula, np.zeros(0, dtype=int))
        ok = index.ids[members] != qid
        if strict:
            ok &= index.formulas[members] != r.reduced_formula
        members = members[ok & (index.nprim[members] == info.nsites_primitive)]
        reps: dict[int, int] = {}
        for m in members:
            reps.setdefault(int(index.cluster[m]), int(m))
        order = sorted(
            reps.values(),
            key=lambda m: (index.prototype[m] != info.label, index.spacegroup[m] != info.spacegroup_number),
        )
        if len(order) > MAX_CLUSTERS:
            order = [m for m in order if index.spacegroup[m] == info.spacegroup_number][:MAX_CLUSTERS]
        tasks.append((gt.as_dict(), [[index.structures[m]] for m in order], sets))
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers == 1 or len(tasks) < 20:
        per_query = [covered_sets(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            per_query = list(pool.map(covered_sets, tasks, chunksize=max(1, len(tasks) // (8 * workers))))
    return {t.name: np.array([q[i] for q in per_query], dtype=bool) for i, t in enumerate(sets)}
