"""Prefilter check: rank() through nearest-neighbour graphs against exhaustive scoring, and prefilter cost.

``agreement``: the protocol's pool (imported and indexed as the benchmark does, the queries' ids removed),
a fixed-seed query sample, each query's own id excluded (and, in the strict setting, its formula), scored
with the shipped model (or ``--model``) twice: every group through its graph (``ann_threshold=0``) and
every group exhaustively (``ann_threshold=None``). Reported: queries whose prefiltered templates, top-5
and top-``k`` (cluster, assignment) candidates are identical, and the time of each pass.

``cost``: synthetic groups of ``n`` rows of role properties drawn role by role from a real group's rows
(so the rows follow the real element distribution per role, combined anew); per-query prefilter time of
the exhaustive path and of the graph (built once, its build time reported separately).

``python -m benchmarks.prefilter_check agreement --protocol mp20bt --limit 1000 --setting strict``
``python -m benchmarks.prefilter_check cost --sizes 10000,100000``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from typing import Any

import numpy as np

from benchmarks.logs import configure_logging
from benchmarks.protocols import formula_from_cif, load_queries, pool_index
from cspml_flows.core.composition import roles
from cspml_flows.core.config import PACKAGED_MODEL
from cspml_flows.learning.features import role_distance
from cspml_flows.learning.model import QueryBatch, SimilarityModel
from cspml_flows.predict.prefilter import nearest_rows
from cspml_flows.predict.prefilter_graph import GroupPrefilter
from cspml_flows.predict.retrieve import allowed_rows, rank
from cspml_flows.templates.index import TemplateIndex

logger = logging.getLogger(__name__)


def agreement(
    index: TemplateIndex, model, protocol: str, limit: int, setting: str, seed: int = 0, k: int = 40
) -> dict[str, Any]:
    """Share of sampled queries whose prefilter, top-5 and top-``k`` agree between graph and exhaustive."""
    q = load_queries(protocol, limit=limit, seed=seed)
    q_roles = [roles(formula_from_cif(c)) for c in q.cifs]
    exclude = [{mid} for mid in q.material_ids]
    strict = setting == "strict"
    out: dict[str, Any] = {"protocol": protocol, "setting": setting, "n_queries": len(q_roles), "seed": seed}
    ranked = {}
    for name, threshold in (("graph", 0), ("exhaustive", None)):
        t = time.perf_counter()
        ranked[name] = rank(model, index, q_roles, top=k, exclude_ids=exclude, strict=strict, ann_threshold=threshold)
        out[f"{name}_seconds"] = time.perf_counter() - t
    qb = QueryBatch.from_roles(q_roles)
    same_keep, scored = 0, 0
    for i, r in enumerate(q_roles):
        members = index.by_anon.get(r.anonymous_formula)
        if members is None:
            continue
        allowed = allowed_rows(index, r, exclude[i], strict)
        qv = qb.role_props[i][None]
        near = partial(nearest_rows, index, r.anonymous_formula, members, qv, 48, model.std, allowed)
        kept = [near(threshold=th, few_in_row_order=True, build_after=0)[0] for th in (0, None)]
        scored += 1
        same_keep += bool(np.array_equal(*kept))

    def key(cands, n):
        return [(c.template, c.perm, c.cluster) for c in cands[:n]]

    g, e = ranked["graph"], ranked["exhaustive"]
    out["queries_with_candidates"] = sum(bool(x) for x in e)
    out["same_prefilter"] = same_keep / max(scored, 1)
    out["same_top5"] = float(np.mean([key(a, 5) == key(b, 5) for a, b in zip(g, e, strict=True)]))
    out[f"same_top{k}"] = float(np.mean([key(a, k) == key(b, k) for a, b in zip(g, e, strict=True)]))
    out["differing_top5_queries"] = [
        q.material_ids[i] for i, (a, b) in enumerate(zip(g, e, strict=True)) if key(a, 5) != key(b, 5)
    ]
    return out


def synthetic_group(index: TemplateIndex, anon: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows of role properties whose every role is a real row's role of group ``anon``, drawn anew."""
    members = index.by_anon[anon]
    n_roles = len(index.roles[int(members[0])].elements)
    rng = np.random.default_rng(seed)
    out = np.full((n, *index.role_props.shape[1:]), np.nan)
    for r in range(n_roles):
        out[:, r] = index.role_props[members[rng.integers(0, len(members), n)], r]
    return out


def cost(index: TemplateIndex, std, sizes: list[int], anon: str, n_queries: int = 50) -> list[dict[str, Any]]:
    """Per-query prefilter time (48 nearest), exhaustive vs graph, on synthetic groups of ``sizes`` rows."""
    n_roles = len(index.roles[int(index.by_anon[anon][0])].elements)
    queries = synthetic_group(index, anon, n_queries, seed=99)
    rows_out = []
    for n in sizes:
        props = synthetic_group(index, anon, n)
        rows = np.arange(n)
        t = time.perf_counter()
        g = GroupPrefilter.build(rows, props, std, n_roles)
        build = time.perf_counter() - t
        t = time.perf_counter()
        exact = []
        for qv in queries[: max(5, n_queries * 10_000 // max(n, 1))]:
            d = role_distance(qv[None], props, std)
            exact.append(rows[np.lexsort((rows, d))[:48]])
        exact_s = (time.perf_counter() - t) / len(exact)
        t = time.perf_counter()
        found = g.search(queries, 48, props)
        graph_s = (time.perf_counter() - t) / len(queries)
        same = np.mean([np.array_equal(a, b) for a, b in zip(found, exact, strict=False)])
        rows_out.append(
            {
                "rows": n,
                "graph_points": len(g.graph),
                "build_seconds": build,
                "exhaustive_ms_per_query": exact_s * 1e3,
                "graph_ms_per_query": graph_s * 1e3,
                "same_48": float(same),
                "queries_compared": len(exact),
            }
        )
        logger.info(json.dumps(rows_out[-1]))
    return rows_out


def main(argv: list[str] | None = None) -> int:
    """Run the agreement check or the cost measurement; print (and ``--json``: write) the result."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefilter_check", description=__doc__)
    p.add_argument("what", choices=("agreement", "cost"))
    p.add_argument("--protocol", default="mp20bt")
    p.add_argument("--setting", default="standard", choices=("standard", "strict"))
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="similarity model file (default: the shipped model)")
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--group", default="ABC3", help="anonymous formula whose rows the synthetic groups draw from")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    configure_logging()
    model = SimilarityModel.load(a.model or PACKAGED_MODEL)
    index = pool_index(a.protocol, a.workers)
    if a.what == "agreement":
        result: Any = agreement(index, model, a.protocol, a.limit, a.setting, a.seed)
    else:
        result = cost(index, model.std, [int(s) for s in a.sizes.split(",")], a.group)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
