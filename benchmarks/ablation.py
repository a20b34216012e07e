"""Ranking ablation: each lever of the ranker alone and together, on one protocol's queries.

The queries' candidates (the pair model's best ``k`` (cluster, assignment) pairs, as ``predict`` makes
them) are built and labelled once: substituted exactly as ``predict`` does (template, then alternates
under the 0.5 A rule) and matched against the answer with the protocol's ``StructureMatcher`` and
validity gate (a SMACT-invalid composition never counts). Every variant then only *reorders* the same
candidates, so differences between rows are differences of ranking alone, measured on the same queries
in one command. Variants are rankers trained on the pool's held-out formulas (the cached CSP outcomes of
:mod:`cspml_flows.training.outcomes`) with a subset of the features or of the training queries; nothing
is fitted or chosen on the protocol's queries. Top-k here is over the candidates without deduplication,
so it reads a little below the benchmark's deduplicated top-k.

``python -m benchmarks.ablation --protocol mp20bt --limit 1000 --json out.json --markdown out.md``
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import lightgbm as lgb
import numpy as np
from pymatgen.core import Structure

from benchmarks.protocols import formula_from_cif, load_queries, pool_store
from benchmarks.runner import BenchmarkConfig, benchmark_model, query_structures, write_reports
from cspml_flows.core.composition import MAX_ASSIGNMENTS, roles
from cspml_flows.core.config import home_dir
from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.safeio import read_json_gz, write_json_gz
from cspml_flows.learning.model import training_hash
from cspml_flows.learning.ranker import CANDIDATES, FEATURES, RANKER_PARAMS, candidate_features
from cspml_flows.predict.retrieve import Ranked, rank
from cspml_flows.predict.validity import smact_valid
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.outcomes import candidate_matches, fold_outcomes, map_chunks_forked, outcome_key

PAIR = ("pair_score", "best_prob", "mean_prob", "log_members", "pair_rank", "score_gap", "log_candidates")
PROTOTYPE = ("cluster_share", "log_cluster_size", "e_above_hull", "log_nprim")
CHEMISTRY = tuple(f for f in FEATURES if f not in PAIR + PROTOTYPE)
VARIANTS: dict[str, tuple[str, ...]] = {
    "pair-model features only": PAIR,
    "pair + prototype statistics": PAIR + PROTOTYPE,
    "pair + assignment chemistry": PAIR + CHEMISTRY,
    "prototype statistics + chemistry (no pair score)": PROTOTYPE + CHEMISTRY,
    "all features (the shipped ranker)": FEATURES,
}
TRAINING_SIZES = (250, 500, 1000)  # learning curve: held-out pool formulas the full ranker learns from

_FORKED: tuple[TemplateIndex, list, list, list] | None = None


def _label_chunk(rows: list[int]) -> list[list[int]]:
    assert _FORKED is not None
    index, q_roles, cands, gts = _FORKED
    matcher = Matcher()
    out = []
    for i in rows:
        if not smact_valid(gts[i].composition):
            out.append([0] * len(cands[i]))  # the validity gate: never counts
            continue
        gt = matcher.reduce(gts[i])
        out.append([int(candidate_matches(matcher, index, c, q_roles[i], gt)) for c in cands[i]])
    return out


def label_queries(
    index: TemplateIndex, q_roles: list, cands: list[list[Ranked]], gts: list[Structure], workers: int
) -> list[list[int]]:
    """0/1 match (with the validity gate) of every candidate of every query."""
    global _FORKED
    _FORKED = (index, q_roles, cands, gts)
    chunks = [list(range(s, min(s + 20, len(gts)))) for s in range(0, len(gts), 20)]
    try:
        return map_chunks_forked(_label_chunk, chunks, workers, len(gts))
    finally:
        _FORKED = None


def _train(x: np.ndarray, y: np.ndarray, groups: np.ndarray, rounds: int, seed: int = 0) -> lgb.Booster:
    params = {**RANKER_PARAMS, "seed": seed}
    return lgb.train(params, lgb.Dataset(x, y, group=groups), num_boost_round=rounds)


def top_k(labels: list[list[int]], scores: list[np.ndarray], ks=(1, 5, 20)) -> dict[str, float]:
    """Share of queries with a match among their ``k`` best-scored candidates (stable for ties)."""
    out = {}
    for k in ks:
        hits = [
            bool(lab) and max(np.asarray(lab)[np.argsort(-sc, kind="stable")[:k]]) == 1
            for lab, sc in zip(labels, scores, strict=True)
        ]
        out[f"top{k}"] = float(np.mean(hits)) if hits else float("nan")
    return out


def run_ablation(
    protocol: str,
    limit: int | None = 1000,
    seed: int = 0,
    setting: str = "standard",
    workers: int = 2,
    k: int = CANDIDATES,
    log=print,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    store = pool_store(protocol, workers=workers)
    index = TemplateIndex.from_store(store, workers=workers)
    store.close()
    full = load_queries(protocol)
    index = index.subset(~np.isin(index.ids, full.material_ids))
    q = load_queries(protocol, limit=limit, seed=seed)
    gts = query_structures(protocol, q.material_ids, q.cifs, workers)
    q_roles = [roles(g.composition) for g in gts]
    formulas = [formula_from_cif(c) for c in full.cifs]
    cfg = BenchmarkConfig(protocol=protocol, setting=setting, limit=limit, workers=workers, seed=seed)
    model, _ = benchmark_model(index, full.material_ids, formulas, cfg, log)
    strict = setting == "strict"
    exclude = [{m} for m in q.material_ids]
    cands = rank(model, index, q_roles, top=k, exclude_ids=exclude, strict=strict, threads=workers)

    # the pool the benchmark's ranker learnt from (index already holds no query)
    train_index = index.subset(~np.isin(index.formulas, formulas)) if strict else index
    key = outcome_key(protocol, setting, seed, k, training_hash(index), MAX_ASSIGNMENTS, "|".join(q.material_ids))
    path = home_dir() / "benchmark" / "ablation" / f"labels-{key}.json.gz"
    if path.is_file():
        labels = read_json_gz(path)
    else:
        labels = label_queries(index, q_roles, cands, gts, workers)
        write_json_gz(path, labels)
    t_labels = time.perf_counter() - t0

    # the ranker's training data: CSP outcomes of held-out pool formulas (cached by benchmark_model's fit)
    out, _ = fold_outcomes(
        train_index,
        cfg.ranker_queries,
        k,
        seed=seed,
        workers=workers,
        cache_dir=home_dir() / "benchmark" / "outcomes",
        log=log,
    )
    xt = candidate_features(
        train_index,
        [train_index.roles[i] for i in out.rows],
        out.candidates,
        model.std,
        train_index.stats[np.array(out.rows, dtype=int)],
    )
    yt = np.concatenate(out.labels)
    gt_sizes = np.array([len(c) for c in out.candidates])
    from cspml_flows.core.descriptors import magpie_stats

    xq = candidate_features(index, q_roles, cands, model.std, magpie_stats([r.reduced_formula for r in q_roles]))
    sizes = [len(c) for c in cands]
    bounds = np.cumsum([0, *sizes])

    def split(s: np.ndarray) -> list[np.ndarray]:
        return [s[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]

    rounds = int((model.ranker.meta.get("report") or {}).get("rounds", 200)) if model.ranker else 200
    rows: dict[str, dict[str, float]] = {}
    rows["pair-model order (no ranker)"] = top_k(labels, [-np.arange(n, dtype=float) for n in sizes])
    for name, feats in VARIANTS.items():
        cols = [FEATURES.index(f) for f in feats]
        booster = _train(xt[:, cols], yt, gt_sizes, rounds, seed)
        rows[f"ranker: {name}"] = top_k(labels, split(booster.predict(xq[:, cols])))
        log(f"{name}: {rows[f'ranker: {name}']}")
    starts = np.cumsum([0, *gt_sizes])
    for n in TRAINING_SIZES:
        if n >= len(gt_sizes):
            continue
        take = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in range(n)])
        booster = _train(xt[take], yt[take], gt_sizes[:n], rounds, seed)
        rows[f"ranker: all features, {n} training formulas"] = top_k(labels, split(booster.predict(xq)))
    recall = float(np.mean([max(lab, default=0) == 1 for lab in labels]))
    return {
        "protocol": protocol,
        "setting": setting,
        "n_queries": len(gts),
        "limit": limit,
        "seed": seed,
        "candidates_per_query": k,
        f"recall_at_{k}": recall,
        "training_formulas": len(gt_sizes),
        "ranker_rounds": rounds,
        "variants": rows,
        "seconds": time.perf_counter() - t0,
        "label_seconds": t_labels,
    }


def markdown(result: dict[str, Any]) -> str:
    k = result["candidates_per_query"]
    lines = [
        f"{result['protocol']} {result['setting']}, {result['n_queries']} queries (seed {result['seed']}), the same "
        f"{k} candidates per query reordered; recall@{k} {result[f'recall_at_{k}']:.1%}; rankers trained on "
        f"{result['training_formulas']} held-out pool formulas unless stated",
        "",
        "| ranking | top-1 | top-5 | top-20 |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {m['top1']:.1%} | {m['top5']:.1%} | {m['top20']:.1%} |" for name, m in result["variants"].items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", default="mp20bt", choices=["mp20bt", "mpts52"])
    p.add_argument("--setting", default="standard", choices=["standard", "strict"])
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    result = run_ablation(a.protocol, a.limit, a.seed, a.setting, a.workers, log=lambda m: print(m, file=sys.stderr))
    md = markdown(result)
    write_reports(result, a.json, a.markdown, markdown=md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
