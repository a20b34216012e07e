"""``python -m benchmarks csp``: one protocol and setting, the learned model beside the baselines, JSON +
Markdown (:mod:`benchmarks.csp_tables`).

The model is trained on the pool without any query's ``material_id`` (and, in the strict setting, without
any query's reduced formula), so nothing about a query leaks into the learned similarity
(:mod:`benchmarks.csp_model`). Prediction then uses the whole pool with the protocol's per-query exclusions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymatgen.core import Composition, Structure

from benchmarks.baselines import pymatgen_rank, random_rank
from benchmarks.ceiling import coverage
from benchmarks.config import BenchmarkConfig
from benchmarks.csp_model import benchmark_model
from benchmarks.diagnostics import miss_breakdown
from benchmarks.protocols import (
    SETTINGS,
    formula_from_cif,
    is_tie_heavy,
    load_queries,
    pool_store,
    query_structures,
)
from benchmarks.scoring import (
    EXTRA_TOLERANCE_SETS,
    TOLERANCE_SETS,
    paired_rmse,
    rms_tables,
    summarize,
    tolerance_key,
)
from benchmarks.speed import SPEED_TOP, prediction_speed
from cspml_flows.core.composition import Roles, roles
from cspml_flows.core.equivalence import CSP_TOLERANCES, Tolerances
from cspml_flows.core.errors import ConfigError
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.predict.predictor import CSPPredictor, Prediction, freeze_gc
from cspml_flows.predict.retrieve import allowed_rows, rank
from cspml_flows.templates.index import TemplateIndex

logger = logging.getLogger(__name__)
TOP = 20
CAP_ABLATION = 6  # the assignment cap before lazy enumeration, run beside the current one where it matters
NO_RANKER = "pair score only (no ranker)"
STANDARD = CSP_TOLERANCES.name  # the tolerance set of the result's top-level rates
RmsByTolerance = dict[str, list[list[float | None]]]


@dataclass
class Sample:
    """The queries of one run: ids, ground-truth structures, compositions, roles and exclusions."""

    ids: list[str]
    gts: list[Structure]
    comps: list[Composition]
    roles: list[Roles]
    exclude: list[set[str]]
    strict: bool

    @property
    def formulas(self) -> list[str]:
        """Reduced formulas of the queries."""
        return [r.reduced_formula for r in self.roles]


def candidate_rms(gts: list[Structure], preds: list[Prediction], workers: int) -> RmsByTolerance:
    """RMS of every candidate of every prediction against its ground truth (None: no match), for each
    tolerance set of :data:`~benchmarks.scoring.TOLERANCE_SETS` (by name), in one pass."""
    return rms_tables(gts, [[c.structure for c in p.candidates] for p in preds], TOLERANCE_SETS, workers=workers)


def load_pool(cfg: BenchmarkConfig, timings: dict[str, float]) -> TemplateIndex:
    """The protocol's pool, imported and indexed (queries still in it); times it as ``pool_seconds``."""
    t = time.perf_counter()
    store = pool_store(cfg.protocol, workers=cfg.workers)
    index = TemplateIndex.from_store(store, workers=cfg.workers)
    store.close()
    timings["pool_seconds"] = time.perf_counter() - t
    logger.info("pool: %d templates, %d prototype clusters", len(index), len(set(index.cluster.tolist())))
    return index


def load_sample(cfg: BenchmarkConfig) -> Sample:
    """The run's queries (``limit`` sample of ``subset``), parsed through the query cache."""
    q = load_queries(cfg.protocol, limit=cfg.limit, seed=cfg.seed, subset=cfg.subset)
    gts = query_structures(cfg.protocol, q.material_ids, q.cifs, cfg.workers)
    comps = [g.composition for g in gts]
    exclude = [{mid} for mid in q.material_ids]
    return Sample(q.material_ids, gts, comps, [roles(c) for c in comps], exclude, cfg.setting == "strict")


def timed_rates(cfg: BenchmarkConfig, sample: Sample, predict: Any) -> tuple[dict[str, float], RmsByTolerance]:
    """Run ``predict()`` (a list of predictions), score it; returns its summary at the standard tolerances
    with ``predict_seconds``, and the RMS tables of every tolerance set."""
    t = time.perf_counter()
    preds = predict()
    seconds = time.perf_counter() - t
    rms = candidate_rms(sample.gts, preds, cfg.workers)
    return {**summarize(rms[STANDARD]), "predict_seconds": seconds}, rms


def ablations(
    cfg: BenchmarkConfig, index: TemplateIndex, model: SimilarityModel, sample: Sample
) -> dict[str, tuple[dict[str, float], RmsByTolerance]]:
    """The same engine without the ranker, and with the earlier cap on assignments (where a query has more)."""
    out: dict[str, tuple[dict[str, float], RmsByTolerance]] = {}
    args = {"top": TOP, "exclude_ids": sample.exclude, "strict": sample.strict}
    if model.ranker is not None:  # the same pair model without the second stage
        pair_only = CSPPredictor(
            index, model.without_ranker(), workers=cfg.workers, max_assignments=cfg.max_assignments
        )
        out[NO_RANKER] = timed_rates(cfg, sample, lambda: pair_only.predict(sample.comps, **args))
        logger.info("pair score only: top1=%.4f", out[NO_RANKER][0]["top1"])
    capped = [len(r.permutations(limit=CAP_ABLATION + 1)) > CAP_ABLATION for r in sample.roles]
    if any(capped) and cfg.max_assignments > CAP_ABLATION:  # the earlier cap on assignments
        few = CSPPredictor(index, model, workers=cfg.workers, max_assignments=CAP_ABLATION)
        name = f"assignments capped at {CAP_ABLATION}"
        out[name] = timed_rates(cfg, sample, lambda: few.predict(sample.comps, **args))
        logger.info("%s: top1=%.4f (%d queries have more)", name, out[name][0]["top1"], sum(capped))
    return out


def baseline_ranking(cfg: BenchmarkConfig, index: TemplateIndex, name: str, sample: Sample) -> list:
    """The (template, assignment) lists of one baseline."""
    if name == "random":
        return random_rank(index, sample.roles, TOP, sample.exclude, sample.strict, seed=cfg.seed)
    if name == "nearest":
        return rank(
            None, index, sample.roles, top=TOP, exclude_ids=sample.exclude, strict=sample.strict, metric="nearest"
        )
    if name == "pymatgen_substitution":
        return pymatgen_rank(index, sample.roles, TOP, sample.exclude, sample.strict)
    raise ConfigError(f"unknown baseline {name!r}")


def baselines(
    cfg: BenchmarkConfig, index: TemplateIndex, predictor: CSPPredictor, sample: Sample
) -> dict[str, tuple[dict[str, float], RmsByTolerance]]:
    """Each baseline's rankings realised into structures as the engine realises its own (no deduplication)."""
    out = {}
    for name in cfg.baselines:
        out[name] = timed_rates(
            cfg,
            sample,
            lambda name=name: predictor.realize(
                sample.comps, baseline_ranking(cfg, index, name, sample), TOP, dedup=False
            ),
        )
        logger.info("baseline %s: top1=%.4f top5=%.4f", name, out[name][0]["top1"], out[name][0]["top5"])
    return out


def has_anonymous_template(index: TemplateIndex, sample: Sample) -> float:
    """Share of queries with an allowed template of their anonymous formula."""
    found = []
    for r, ex in zip(sample.roles, sample.exclude, strict=True):
        members = index.by_anon.get(r.anonymous_formula, np.zeros(0, dtype=int))
        found.append(bool(allowed_rows(index, r, ex, sample.strict)(members).any()))
    return float(np.mean(found))


def tie_heavy_summary(formulas: list[str], covered: np.ndarray, rms: list, b_rms_of: dict[str, list]) -> dict[str, Any]:
    """Match rates of every method on the run's tie-heavy queries only (:func:`is_tie_heavy`)."""
    mask = np.array([is_tie_heavy(f) for f in formulas], dtype=bool)
    if not mask.any():
        return {"n": 0}
    pick = np.flatnonzero(mask).tolist()
    methods = {"cspml": rms, **b_rms_of}
    return {
        "n": len(pick),
        "ceiling": float(np.asarray(covered, dtype=float)[mask].mean()) if len(covered) else float("nan"),
        "methods": {name: summarize([r[i] for i in pick]) for name, r in methods.items()},
    }


def summarize_ungated(preds: list[Prediction], rms: list[list[float | None]]) -> dict[str, float]:
    """Share of SMACT-invalid queries: their predictions can never count under the standard gate."""
    invalid = [not p.smact_valid for p in preds]
    return {"smact_invalid_queries": float(np.mean(invalid)) if invalid else float("nan")}


@dataclass
class EngineRun:
    """The engine's predictions of a sample, scored, with the coverage ceiling and the misses by kind.

    ``rms_by_tolerance`` and ``covered_by_tolerance`` hold every tolerance set's RMS tables and ceiling
    verdicts (by name); ``metrics``, :attr:`rms` and :attr:`covered` are the standard tolerances'.
    """

    preds: list[Prediction]
    rms_by_tolerance: RmsByTolerance
    metrics: dict[str, float]
    predict_seconds: float
    score_seconds: float
    speed: dict[str, Any]
    covered_by_tolerance: dict[str, np.ndarray]
    misses: dict[str, float]

    @property
    def rms(self) -> list[list[float | None]]:
        """The RMS table at the standard tolerances."""
        return self.rms_by_tolerance[STANDARD]

    @property
    def covered(self) -> np.ndarray:
        """The coverage ceiling's verdict per query at the standard tolerances."""
        return self.covered_by_tolerance[STANDARD]


def run_engine(
    cfg: BenchmarkConfig, index: TemplateIndex, predictor: CSPPredictor, sample: Sample, timings: dict[str, float]
) -> EngineRun:
    """Predict the sample's top ``TOP`` (and time top-5 where ``cfg.speed``), score, ceiling, misses."""
    t = time.perf_counter()
    preds = predictor.predict(sample.comps, top=TOP, exclude_ids=sample.exclude, strict=sample.strict)
    predict_seconds = time.perf_counter() - t
    logger.info("predicted %d compositions in %.1f s", len(sample.comps), predict_seconds)
    speed = prediction_speed(predictor, sample.comps, sample.exclude, sample.strict) if cfg.speed else {}
    if speed:
        logger.info(
            "top-%d with dedup: %.0f compositions/s; slowest class %s at %.1fx the average time per composition",
            SPEED_TOP,
            speed["compositions_per_second"],
            speed["slowest_class"],
            speed["slowest_class_ratio"],
        )
    t = time.perf_counter()
    rms_by_tolerance = candidate_rms(sample.gts, preds, cfg.workers)
    score_seconds = time.perf_counter() - t
    rms = rms_by_tolerance[STANDARD]
    metrics = summarize(rms)
    for name, table in rms_by_tolerance.items():
        rates = ", ".join(f"{k}={v:.4f}" for k, v in summarize(table).items())
        logger.info("scored at the %s tolerances: %s", name, rates)
    logger.info("scored at %d tolerance sets in %.1f s", len(rms_by_tolerance), score_seconds)
    t = time.perf_counter()
    covered_by_tolerance = coverage(index, sample.gts, sample.ids, sample.strict, TOLERANCE_SETS, cfg.workers)
    covered = covered_by_tolerance[STANDARD]
    timings["ceiling_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    top1 = [p.candidates[0].structure if p.candidates else None for p in preds]
    misses = miss_breakdown(rms, sample.gts, top1, [p.smact_valid for p in preds], covered, workers=cfg.workers)
    timings["miss_diagnostics_seconds"] = time.perf_counter() - t
    return EngineRun(
        preds, rms_by_tolerance, metrics, predict_seconds, score_seconds, speed, covered_by_tolerance, misses
    )


def over(value: float, ceiling: float) -> float:
    """``value / ceiling`` (``nan`` for a zero or undefined ceiling)."""
    return value / ceiling if ceiling else float("nan")


def tolerance_record(
    tolerances: Tolerances, run: EngineRun, others: dict[str, tuple[dict[str, float], RmsByTolerance]]
) -> dict[str, Any]:
    """The engine's and every other method's match rates and RMSE, and the ceiling, at one tolerance set."""
    covered = run.covered_by_tolerance[tolerances.name]
    ceiling = float(covered.mean()) if len(covered) else float("nan")
    metrics = summarize(run.rms_by_tolerance[tolerances.name])
    return {
        "tolerances": tolerances.kwargs,
        "ceiling": ceiling,
        **metrics,
        "top1_over_ceiling": over(metrics["top1"], ceiling),
        "top5_over_ceiling": over(metrics["top5"], ceiling),
        "baselines": {name: summarize(rms[tolerances.name]) for name, (_, rms) in others.items()},
    }


def result_record(
    cfg: BenchmarkConfig,
    index: TemplateIndex,
    sample: Sample,
    run: EngineRun,
    others: dict[str, tuple[dict[str, float], RmsByTolerance]],
    train_report: dict,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The JSON-ready result of a run (``timings`` without the total, which the caller adds).

    The top-level rates are at the standard CSP tolerances (``tolerances``); each further tolerance set's
    rates and ceiling sit under its own key (:func:`~benchmarks.scoring.tolerance_key`).
    """
    n, preds, metrics = len(sample.comps), run.preds, run.metrics
    ceiling = float(run.covered.mean()) if len(run.covered) else float("nan")
    return {
        "protocol": cfg.protocol,
        "setting": cfg.setting,
        "n_queries": n,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "subset": cfg.subset,
        "max_assignments": cfg.max_assignments,
        "n_templates": len(index),
        "n_prototype_clusters": len(set(index.cluster.tolist())),
        "queries_with_same_anonymous_formula_template": has_anonymous_template(index, sample),
        "ceiling": ceiling,
        **metrics,
        "top1_over_ceiling": metrics["top1"] / ceiling if ceiling else float("nan"),
        "top5_over_ceiling": metrics["top5"] / ceiling if ceiling else float("nan"),
        "ungated": summarize_ungated(preds, run.rms),
        "top1_misses": run.misses,
        "tie_heavy": tie_heavy_summary(
            sample.formulas, run.covered, run.rms, {k: v[1][STANDARD] for k, v in others.items()}
        ),
        "smact_valid_fraction": float(np.mean([p.smact_valid for p in preds])) if preds else float("nan"),
        "no_prediction_fraction": float(np.mean([not p.candidates for p in preds])) if preds else float("nan"),
        "predict_seconds": run.predict_seconds,
        "compositions_per_second": n / run.predict_seconds if run.predict_seconds else float("nan"),
        "speed_top5": run.speed,
        "score_seconds": run.score_seconds,
        "baselines": {name: summary for name, (summary, _) in others.items()},
        "paired_rmse": {name: paired_rmse(run.rms, rms[STANDARD]) for name, (_, rms) in others.items()},
        "tolerances": CSP_TOLERANCES.kwargs,
        **{tolerance_key(t): tolerance_record(t, run, others) for t in EXTRA_TOLERANCE_SETS},
        "training": train_report,
        "timings": timings,
        "workers": cfg.workers,
    }


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Train (or load) the model, predict the protocol's queries, score them beside the ablations and
    baselines; returns the JSON-ready result."""
    if cfg.setting not in SETTINGS:
        raise ConfigError(f"unknown setting {cfg.setting!r}; choose one of {', '.join(SETTINGS)}")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    index = load_pool(cfg, timings)
    t = time.perf_counter()
    full_q = load_queries(cfg.protocol)
    # The pool never holds any query of the protocol.
    index = index.subset(~np.isin(index.ids, full_q.material_ids))
    sample = load_sample(cfg)
    timings["query_parse_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    whole = cfg.limit is None and cfg.subset == "all"
    all_formulas = sample.formulas if whole else [formula_from_cif(c) for c in full_q.cifs]
    model, train_report = benchmark_model(index, full_q.material_ids, all_formulas, cfg)
    timings["train_seconds"] = time.perf_counter() - t

    freeze_gc()  # the benchmark owns its process: the index's objects leave the collector's generations
    predictor = CSPPredictor(index, model, workers=cfg.workers, max_assignments=cfg.max_assignments)
    run = run_engine(cfg, index, predictor, sample, timings)
    others = ablations(cfg, index, model, sample) | baselines(cfg, index, predictor, sample)
    return result_record(
        cfg, index, sample, run, others, train_report, {**timings, "total_seconds": time.perf_counter() - t_all}
    )
