"""Training of the candidate ranker on CSP outcomes of the pool itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np

from cspml_flows.core.composition import Roles
from cspml_flows.core.errors import ModelError
from cspml_flows.learning.features import Standardizer
from cspml_flows.learning.ranker import CANDIDATES, DEFAULT_FEATURES, CandidateRanker, candidate_features
from cspml_flows.predict.retrieve import Ranked
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


@dataclass
class RankerData:
    """The ranker's training rows: features of every candidate of the held-out pool queries, labels, groups,
    the index rows of the queries and of each candidate's template, and the labelled candidates themselves
    (each query's Ranked list, in the order of the rows) with the queries' Roles."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    report: dict[str, Any]
    query_rows: np.ndarray
    template_rows: np.ndarray
    candidates: list[list[Ranked]]
    queries: list[Roles]


class OutcomeOptions(TypedDict, total=False):
    """How the ranker's training outcomes are made (:func:`~cspml_flows.training.outcomes.fold_outcomes`)."""

    n_queries: int  # held-out pool formulas (default 2000)
    k: int  # candidates per query (default CANDIDATES)
    folds: int
    seed: int
    workers: int
    cache_dir: Path | None
    pair_kwargs: dict | None
    strict: bool  # the setting the ranker serves (default True)


def ranker_data(index: TemplateIndex, std: Standardizer, **options: Unpack[OutcomeOptions]) -> RankerData:
    """Labelled candidates of held-out pool formulas (see :mod:`cspml_flows.training.outcomes`) as
    :data:`~cspml_flows.learning.ranker.FEATURES` rows."""
    opts: dict[str, Any] = {"n_queries": 2000, "k": CANDIDATES, "strict": True, **options}
    k, strict = opts["k"], opts["strict"]
    out, timings = fold_outcomes(index, **opts)
    queries = [index.roles[i] for i in out.rows]
    rows = np.array(out.rows, dtype=int)
    x = candidate_features(index, queries, out.candidates, std, index.stats[rows])
    y = np.concatenate(out.labels) if out.labels else np.zeros(0)
    groups = np.array([len(c) for c in out.candidates])
    if len(y) == 0 or y.max() == 0:
        raise ModelError("no candidate of the held-out pool formulas matched: the pool is too small for a ranker")
    pair_order = -np.concatenate([np.arange(n) for n in groups]).astype(float)
    report = {
        "setting": "strict" if strict else "standard",
        "n_queries": len(groups),
        "n_candidates": len(y),
        "candidates_per_query": k,
        f"recall_at_{k}": top_hits(y, pair_order, groups, k),
        **timings,
    }
    templates = np.array([c.template for cands in out.candidates for c in cands], dtype=np.int64)
    return RankerData(x, y, groups, report, rows, templates, out.candidates, queries)


def fit_on(data: RankerData, features: Sequence[str] = DEFAULT_FEATURES, seed: int = 0) -> tuple[CandidateRanker, dict]:
    """A ranker reading ``features`` fitted on ``data``: 20 % of the queries are kept back to choose the number
    of rounds and to report top-k of the pair-model order against the ranker's, then it is refitted on all."""
    x, y, groups = data.x, data.y, data.groups
    val_q = np.random.default_rng(seed + 7).random(len(groups)) < 0.2
    val_rows = np.repeat(val_q, groups)
    probe = CandidateRanker.train(
        x[~val_rows], y[~val_rows], groups[~val_q], (x[val_rows], y[val_rows], groups[val_q]), features=features
    )
    best = max(int(probe.booster.best_iteration or 0), 30)
    pair_order = -np.concatenate([np.arange(n) for n in groups]).astype(float)
    yv, gv = y[val_rows], groups[val_q]
    report: dict[str, Any] = {**data.report, "rounds": best, "features": list(features)}
    for kk in (1, 5, 20):
        report[f"held_out_top{kk}_pair"] = top_hits(yv, pair_order[val_rows], gv, kk)
        report[f"held_out_top{kk}_ranker"] = top_hits(yv, probe.scores(x[val_rows]), gv, kk)
    ranker = CandidateRanker.train(x, y, groups, max_iter=best, seed=seed, features=features)
    ranker.meta["report"] = report
    return ranker, report


def fit_ranker(
    index: TemplateIndex, std: Standardizer, **options: Unpack[OutcomeOptions]
) -> tuple[CandidateRanker, dict[str, Any]]:
    """Train the ranker on CSP outcomes of the pool (:func:`ranker_data`, then :func:`fit_on`) for the setting
    it serves: ``strict`` for compositions whose formula the pool does not hold (the default), else the
    standard setting, where templates of the query's formula (other polymorphs) are candidates."""
    t0 = time.perf_counter()
    data = ranker_data(index, std, **options)
    seed = options.get("seed", 0)
    ranker, report = fit_on(data, seed=seed)
    report["train_seconds"] = time.perf_counter() - t0
    logger.info(
        "ranker on %d held-out pool formulas: top-1 %.3f (pair order) -> %.3f (ranker) on the 20 %% kept back",
        len(data.groups),
        report["held_out_top1_pair"],
        report["held_out_top1_ranker"],
    )
    return ranker, report
