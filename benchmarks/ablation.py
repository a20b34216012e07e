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

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
from pymatgen.core import Structure

from benchmarks.config import BenchmarkConfig
from benchmarks.csp_model import benchmark_model
from benchmarks.environment_features import ENV_FEATURES
from benchmarks.lever_columns import LEVER_FEATURES, VOLUME_FEATURES, lever_columns, training_held_out
from benchmarks.protocols import formula_from_cif, load_queries, pool_index, query_structures
from benchmarks.prototype_classifier import query_feature, training_feature
from benchmarks.study_cli import run_study, study_parser
from benchmarks.vote_features import VOTE_FEATURES
from cspml_flows.core.composition import MAX_ASSIGNMENTS, roles
from cspml_flows.core.config import home_dir
from cspml_flows.core.descriptors import magpie_stats
from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.safeio import read_json_gz, write_json_gz
from cspml_flows.core.tables import markdown_table
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.learning.ranker import CANDIDATES, DEFAULT_FEATURES, RANKER_PARAMS, candidate_features
from cspml_flows.predict.retrieve import Ranked, rank
from cspml_flows.predict.validity import smact_valid
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.outcomes import candidate_matches, map_chunks_forked, outcome_key
from cspml_flows.training.ranker import ranker_data

logger = logging.getLogger(__name__)

PAIR = ("pair_score", "best_prob", "mean_prob", "log_members", "pair_rank", "score_gap", "log_candidates")
PROTOTYPE = ("cluster_share", "log_cluster_size", "e_above_hull", "log_nprim")
ENVIRONMENT = ENV_FEATURES
VOTES = VOTE_FEATURES
VOLUME = VOLUME_FEATURES
FEATURES = (*DEFAULT_FEATURES, *LEVER_FEATURES)  # the library ranker's features, then the ablation's levers
CHEMISTRY = tuple(f for f in FEATURES if f not in PAIR + PROTOTYPE + ENVIRONMENT + VOTES + VOLUME)
PROTOTYPE_PROBABILITY = "prototype_probability"  # benchmarks.prototype_classifier
SHIPPED = "default features (the shipped ranker: pair + prototype + chemistry)"
VARIANTS: dict[str, tuple[str, ...]] = {
    "pair-model features only": PAIR,
    "pair + prototype statistics": PAIR + PROTOTYPE,
    "pair + assignment chemistry": PAIR + CHEMISTRY,
    "prototype statistics + chemistry (no pair score)": PROTOTYPE + CHEMISTRY + ENVIRONMENT + VOTES,
    SHIPPED: DEFAULT_FEATURES,
    "default features + volume fit of the member": (*DEFAULT_FEATURES, *VOLUME),
    "all but site environments": PAIR + PROTOTYPE + CHEMISTRY + VOTES + VOLUME,
    "all but bond strain and bond valence": tuple(f for f in FEATURES if not f.startswith(("bond_", "bvs_"))),
    "all but prototype votes and query class": PAIR + PROTOTYPE + CHEMISTRY + ENVIRONMENT + VOLUME,
    "all but the volume fit": PAIR + PROTOTYPE + CHEMISTRY + ENVIRONMENT + VOTES,
    "all features": FEATURES,
    "default features + prototype classifier": (*DEFAULT_FEATURES, PROTOTYPE_PROBABILITY),
    "all features + prototype classifier": (*FEATURES, PROTOTYPE_PROBABILITY),
}
COLUMNS = (*FEATURES, PROTOTYPE_PROBABILITY)  # the ablation's feature matrices: the features, then the classifier
CROSS_FIT_FOLDS = 5  # a variant's outcome folds: pair models closer to the one trained on the whole pool
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


def hits_at(labels: list[list[int]], scores: list[np.ndarray], k: int) -> np.ndarray:
    """Per query, whether its ``k`` best-scored candidates hold a match (stable for ties)."""
    return np.array(
        [
            bool(lab) and max(np.asarray(lab)[np.argsort(-sc, kind="stable")[:k]]) == 1
            for lab, sc in zip(labels, scores, strict=True)
        ],
        dtype=float,
    )


def top_k(labels: list[list[int]], scores: list[np.ndarray], ks=(1, 5, 20)) -> dict[str, float]:
    """Share of queries with a match among their ``k`` best-scored candidates, with its standard error."""
    out = {}
    for k in ks:
        hits = hits_at(labels, scores, k)
        out[f"top{k}"] = float(hits.mean()) if len(hits) else float("nan")
        out[f"top{k}_se"] = float(hits.std(ddof=1) / np.sqrt(len(hits))) if len(hits) > 1 else float("nan")
    return out


def paired_difference(
    labels: list[list[int]], a: list[np.ndarray], b: list[np.ndarray], k: int = 1
) -> tuple[float, float]:
    """Top-``k`` of ranking ``a`` minus that of ``b`` on the same queries, and the standard error of the
    difference (paired over queries)."""
    d = hits_at(labels, a, k) - hits_at(labels, b, k)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


@dataclass
class AblationData:
    """The protocol sample's candidates and labels, and the ranker's training rows (pool outcomes)."""

    labels: list[list[int]]  # 0/1 per candidate of each query
    sizes: list[int]  # candidates per query
    xq: np.ndarray  # the queries' candidate features
    xt: np.ndarray  # training candidates' features
    yt: np.ndarray  # training labels
    groups: np.ndarray  # training candidates per training formula

    def split(self, s: np.ndarray) -> list[np.ndarray]:
        """Scores of all query candidates cut into one array per query."""
        bounds = np.cumsum([0, *self.sizes])
        return [s[bounds[i] : bounds[i + 1]] for i in range(len(self.sizes))]


def query_labels(
    cfg: BenchmarkConfig, index: TemplateIndex, q_roles: list, cands: list[list[Ranked]], gts: list[Structure], key: str
) -> list[list[int]]:
    """The candidates' labels from the ablation cache, else computed (:func:`label_queries`) and cached."""
    path = home_dir() / "benchmark" / "ablation" / f"labels-{key}.json.gz"
    if path.is_file():
        return read_json_gz(path)
    labels = label_queries(index, q_roles, cands, gts, cfg.workers)
    write_json_gz(path, labels)
    return labels


def training_rows(
    cfg: BenchmarkConfig,
    train_index: TemplateIndex,
    model: SimilarityModel,
    k: int,
    strict: bool = True,
    folds: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ranker's training data: CSP outcomes of held-out pool formulas (cached by the benchmark's fit) as
    :data:`COLUMNS` rows: the library's features, the lever columns (what a query may not use as a template,
    its formula or with ``strict=False`` its own template, left out of the pool statistics) and the
    cross-fitted prototype-classifier column; ``strict=False``: outcomes of the standard setting; ``folds``: formula
    folds the outcomes' pair models are cross-fitted over (the shipped ranker's: 2)."""
    data = ranker_data(
        train_index,
        model.std,
        n_queries=cfg.ranker_queries,
        k=k,
        seed=cfg.seed,
        workers=cfg.workers,
        cache_dir=home_dir() / "benchmark" / "outcomes",
        strict=strict,
        folds=folds,
    )
    held = training_held_out(train_index, data.query_rows.tolist(), strict)
    levers = lever_columns(train_index, data.queries, data.candidates, train_index.stats[data.query_rows], held)
    proto = training_feature(train_index, data.query_rows, data.template_rows, data.groups, cfg.seed)
    return np.column_stack([data.x, levers, proto]), data.y, data.groups


def variant_rows(
    data: AblationData,
    rounds: int,
    seed: int,
    others: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = (),
) -> tuple[dict[str, dict[str, float]], dict[str, list[np.ndarray]]]:
    """Top-k (with standard errors) of the pair model's order, of each feature subset, of the full ranker on
    fewer formulas and (``others``: what differs, and the training rows) of the shipped features trained on
    other outcomes; each row's top-1 difference to the shipped ranker, paired over the same queries. Returns the
    rows and each ranking's scores of the queries' candidates."""
    rows: dict[str, dict[str, float]] = {}
    scores: dict[str, list[np.ndarray]] = {
        "pair-model order (no ranker)": [-np.arange(n, dtype=float) for n in data.sizes]
    }
    for name, feats in VARIANTS.items():
        cols = [COLUMNS.index(f) for f in feats]
        booster = _train(data.xt[:, cols], data.yt, data.groups, rounds, seed)
        scores[f"ranker: {name}"] = data.split(booster.predict(data.xq[:, cols]))
    starts = np.cumsum([0, *data.groups])
    for n in TRAINING_SIZES:
        if n >= len(data.groups):
            continue
        take = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in range(n)])
        cols = [COLUMNS.index(f) for f in FEATURES]
        booster = _train(data.xt[take][:, cols], data.yt[take], data.groups[:n], rounds, seed)
        scores[f"ranker: all features, {n} training formulas"] = data.split(booster.predict(data.xq[:, cols]))
    for name, xo, yo, go in others:
        cols = [COLUMNS.index(f) for f in DEFAULT_FEATURES]
        booster = _train(xo[:, cols], yo, go, rounds, seed)
        scores[f"ranker: default features, {name}"] = data.split(booster.predict(data.xq[:, cols]))
    full = scores[f"ranker: {SHIPPED}"]
    for name, sc in scores.items():
        rows[name] = top_k(data.labels, sc)
        rows[name]["top1_minus_shipped"], rows[name]["top1_minus_shipped_se"] = paired_difference(data.labels, sc, full)
        logger.info("%s: %s", name, rows[name])
    return rows, scores


def miss_kinds(cands: list[list[Ranked]], labels: list[list[int]], scores: list[np.ndarray]) -> dict[str, float]:
    """Why the top-1 of an order misses, per query: no match among the candidates; a match on the top-1's own
    cluster under another element assignment; or a match only on other prototype clusters (shares of all
    queries), and where the first match ranks then."""
    kinds = {"top-1 match": 0, "no match among the candidates": 0, "same cluster, other assignment": 0}
    kinds |= {"other prototype cluster": 0, "first match at rank 2": 0, "first match at rank 3-5": 0}
    kinds |= {"first match at rank 6-20": 0, "first match beyond rank 20": 0}
    for cs, lab, sc in zip(cands, labels, scores, strict=True):
        lab = np.asarray(lab)
        if not len(lab) or lab.max() == 0:
            kinds["no match among the candidates"] += 1
            continue
        order = np.argsort(-sc, kind="stable")
        if lab[order[0]]:
            kinds["top-1 match"] += 1
            continue
        top = cs[order[0]]
        same = any(cs[j].cluster == top.cluster for j in np.flatnonzero(lab))
        kinds["same cluster, other assignment" if same else "other prototype cluster"] += 1
        first = int(np.flatnonzero(lab[order])[0]) + 1
        band = "2" if first == 2 else "3-5" if first <= 5 else "6-20" if first <= 20 else None
        kinds[f"first match at rank {band}" if band else "first match beyond rank 20"] += 1
    n = max(len(cands), 1)
    return {k: v / n for k, v in kinds.items()}


def run_ablation(
    protocol: str,
    limit: int | None = 1000,
    seed: int = 0,
    setting: str = "standard",
    workers: int = 2,
    k: int = CANDIDATES,
) -> dict[str, Any]:
    """Label the sample's candidates once, then reorder them with every ranker variant; the JSON-ready result."""
    t0 = time.perf_counter()
    index = pool_index(protocol, workers=workers)
    full = load_queries(protocol)
    q = load_queries(protocol, limit=limit, seed=seed)
    gts = query_structures(protocol, q.material_ids, q.cifs, workers)
    q_roles = [roles(g.composition) for g in gts]
    formulas = [formula_from_cif(c) for c in full.cifs]
    cfg = BenchmarkConfig(protocol=protocol, setting=setting, limit=limit, workers=workers, seed=seed)
    model, _ = benchmark_model(index, full.material_ids, formulas, cfg)
    strict = setting == "strict"
    exclude = [{m} for m in q.material_ids]
    cands = rank(model, index, q_roles, top=k, exclude_ids=exclude, strict=strict, threads=workers)

    # the pool the benchmark's ranker learnt from (index already holds no query)
    train_index = index.subset(~np.isin(index.formulas, formulas)) if strict else index
    key = outcome_key(protocol, setting, seed, k, training_hash(index), MAX_ASSIGNMENTS, "|".join(q.material_ids))
    labels = query_labels(cfg, index, q_roles, cands, gts, key)
    t_labels = time.perf_counter() - t0
    xt, yt, groups = training_rows(cfg, train_index, model, k)
    q_stats = magpie_stats([r.reduced_formula for r in q_roles])
    held = [index.rows_of_formula(r) for r in q_roles] if strict else None
    xq = candidate_features(index, q_roles, cands, model.std, q_stats)
    levers = lever_columns(index, q_roles, cands, q_stats, held)
    proto = query_feature(train_index, np.arange(len(train_index)), q_roles, cands, seed)
    xq = np.column_stack([xq, levers, proto])
    data = AblationData(labels, [len(c) for c in cands], xq, xt, yt, groups)
    rounds = int((model.ranker.meta.get("report") or {}).get("rounds", 200)) if model.ranker else 200
    standard = training_rows(cfg, train_index, model, k, strict=False)  # the shipped ranker's are strict
    folds = training_rows(cfg, train_index, model, k, folds=CROSS_FIT_FOLDS)
    others = [
        ("trained for the standard setting", *standard),
        (f"outcomes cross-fitted over {CROSS_FIT_FOLDS} formula folds", *folds),
    ]
    rows, scores = variant_rows(data, rounds, seed, others)
    misses = miss_kinds(cands, labels, scores[f"ranker: {SHIPPED}"])
    recall = float(np.mean([max(lab, default=0) == 1 for lab in labels]))
    return {
        "protocol": protocol,
        "setting": setting,
        "n_queries": len(gts),
        "limit": limit,
        "seed": seed,
        "candidates_per_query": k,
        f"recall_at_{k}": recall,
        "training_formulas": len(groups),
        "ranker_rounds": rounds,
        "variants": rows,
        "shipped_ranker_misses": misses,
        "seconds": time.perf_counter() - t0,
        "label_seconds": t_labels,
    }


def markdown(result: dict[str, Any]) -> str:
    """The variants' top-k rates (± standard error) as a Markdown table under one line that says what was
    compared; the last column is each row's top-1 minus the shipped ranker's, paired over the queries."""
    k = result["candidates_per_query"]

    def pm(m: dict[str, float], key: str) -> str:
        return f"{m[key]:.1%} ± {m[key + '_se']:.1%}" if f"{key}_se" in m else f"{m[key]:.1%}"

    rows = [
        [
            name,
            pm(m, "top1"),
            pm(m, "top5"),
            pm(m, "top20"),
            pm(m, "top1_minus_shipped") if "top1_minus_shipped" in m else "",
        ]
        for name, m in result["variants"].items()
    ]
    lines = [
        f"{result['protocol']} {result['setting']}, {result['n_queries']} queries (seed {result['seed']}), the same "
        f"{k} candidates per query reordered; recall@{k} {result[f'recall_at_{k}']:.1%}; rankers trained on "
        f"{result['training_formulas']} held-out pool formulas unless stated",
        "",
        markdown_table(["ranking", "top-1", "top-5", "top-20", "top-1 minus shipped ranker"], rows, align="lrrrr"),
    ]
    misses = result.get("shipped_ranker_misses")
    if misses:
        rows = [[kind, f"{share:.1%}"] for kind, share in misses.items()]
        lines += ["", "The shipped ranker's top-1 by kind (share of the queries):", ""]
        lines.append(markdown_table(["top-1", "share"], rows, align="lr"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.ablation``: run, print the Markdown, write ``--json``/``--markdown``."""
    p = study_parser("python -m benchmarks.ablation", __doc__.splitlines()[0])
    p.add_argument("--setting", default="standard", choices=["standard", "strict"])
    a = p.parse_args(argv)
    return run_study(a, lambda a: run_ablation(a.protocol, a.limit, a.seed, a.setting, a.workers), markdown)


if __name__ == "__main__":
    sys.exit(main())
