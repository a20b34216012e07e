"""Training of the candidate ranker on CSP outcomes of the pool itself."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cspml_flows.core.errors import ModelError
from cspml_flows.learning.features import Standardizer
from cspml_flows.learning.ranker import CANDIDATES, CandidateRanker, candidate_features
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.outcomes import fold_outcomes

logger = logging.getLogger(__name__)


def top_hits(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int) -> float:
    """Share of queries whose ``k`` best-scored candidates hold a match (queries without candidates: miss)."""
    hits, start = [], 0
    for n in groups:
        lab, sc = y[start : start + n], scores[start : start + n]
        start += n
        hits.append(bool(n) and bool(lab[np.argsort(-sc, kind="stable")[:k]].max()))
    return float(np.mean(hits)) if hits else float("nan")


def fit_ranker(
    index: TemplateIndex,
    std: Standardizer,
    n_queries: int = 2000,
    k: int = CANDIDATES,
    folds: int = 2,
    seed: int = 0,
    workers: int = 2,
    cache_dir: Path | None = None,
    pair_kwargs: dict | None = None,
) -> tuple[CandidateRanker, dict[str, Any]]:
    """Train the ranker on CSP outcomes of the pool (see :mod:`cspml_flows.training.outcomes`).

    20 % of the held-out formulas are kept back to choose the number of rounds and to report top-k of
    the pair-model order against the ranker's; the ranker is then refitted on every formula.
    """
    t0 = time.perf_counter()
    out, timings = fold_outcomes(index, n_queries, k, folds, seed, workers, cache_dir, pair_kwargs)
    queries = [index.roles[i] for i in out.rows]
    x = candidate_features(index, queries, out.candidates, std, index.stats[np.array(out.rows, dtype=int)])
    y = np.concatenate(out.labels) if out.labels else np.zeros(0)
    groups = np.array([len(c) for c in out.candidates])
    if len(y) == 0 or y.max() == 0:
        raise ModelError("no candidate of the held-out pool formulas matched: the pool is too small for a ranker")
    val_q = np.random.default_rng(seed + 7).random(len(groups)) < 0.2
    val_rows = np.repeat(val_q, groups)
    probe = CandidateRanker.train(x[~val_rows], y[~val_rows], groups[~val_q], (x[val_rows], y[val_rows], groups[val_q]))
    best = max(int(probe.booster.best_iteration or 0), 30)
    pair_order = -np.concatenate([np.arange(n) for n in groups]).astype(float)
    yv, gv = y[val_rows], groups[val_q]
    report: dict[str, Any] = {
        "n_queries": len(groups),
        "n_candidates": len(y),
        "candidates_per_query": k,
        "rounds": best,
        f"recall_at_{k}": top_hits(y, pair_order, groups, k),
        **timings,
    }
    for kk in (1, 5, 20):
        report[f"held_out_top{kk}_pair"] = top_hits(yv, pair_order[val_rows], gv, kk)
        report[f"held_out_top{kk}_ranker"] = top_hits(yv, probe.scores(x[val_rows]), gv, kk)
    ranker = CandidateRanker.train(x, y, groups, max_iter=best, seed=seed)
    ranker.meta["report"] = report
    report["train_seconds"] = time.perf_counter() - t0
    logger.info(
        "ranker on %d held-out pool formulas: top-1 %.3f (pair order) -> %.3f (ranker) on the 20 %% kept back",
        len(groups),
        report["held_out_top1_pair"],
        report["held_out_top1_ranker"],
    )
    return ranker, report
