"""Template coverage ceiling: share of queries for which some pool template (after the protocol's
exclusions) has the same anonymous formula and matches under ``fit_anonymous``."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.composition import roles
from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.prototype import prototype_info
from cspml_flows.templates.index import TemplateIndex

MAX_CLUSTERS = 40


def covered(args: tuple[dict, list[list[dict]]]) -> bool:
    """Whether one of the representatives matches the ground truth anonymously (a matcher error: no match)."""
    gt_d, reps = args
    gt = Structure.from_dict(gt_d)
    matcher = Matcher()
    return any(matcher.fit_anonymous(Structure.from_dict(rep[0]), gt) for rep in reps)


def coverage(
    index: TemplateIndex,
    gts: list[Structure],
    query_ids: list[str],
    strict: bool,
    workers: int = 2,
) -> np.ndarray:
    """Boolean per query. One representative per prototype cluster (the first allowed member), clusters
    of the same primitive-cell size only, the query's own prototype label tried first; partitions with
    more than MAX_CLUSTERS clusters are searched among same-space-group clusters only."""
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
        tasks.append((gt.as_dict(), [[index.structures[m]] for m in order]))
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers == 1 or len(tasks) < 20:
        return np.array([covered(t) for t in tasks])
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return np.array(list(pool.map(covered, tasks, chunksize=max(1, len(tasks) // (8 * workers)))))
