"""``cspml benchmark``: one protocol and setting, the learned model beside the baselines, JSON + Markdown.

The model is trained on the pool without any query's ``material_id`` (and, in the strict setting, without
any query's reduced formula), so nothing about a query leaks into the learned similarity. Prediction then
uses the whole pool with the protocol's per-query exclusions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Composition, Structure

from benchmarks.baselines import pymatgen_rank, random_rank
from benchmarks.ceiling import coverage
from benchmarks.diagnostics import miss_breakdown
from benchmarks.protocols import SETTINGS, formula_from_cif, is_tie_heavy, load_queries, pool_store
from benchmarks.scoring import rms_table, summarize
from cspml_flows.core.composition import MAX_ASSIGNMENTS, roles
from cspml_flows.core.config import home_dir
from cspml_flows.core.errors import ConfigError, ModelError
from cspml_flows.core.safeio import read_json_gz, write_json_gz
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.predict.predictor import CSPPredictor, Prediction, freeze_gc
from cspml_flows.predict.retrieve import rank
from cspml_flows.templates.importers import structure_from_cif_string
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.ranker import fit_ranker

log = logging.getLogger(__name__)
TOP = 20
SPEED_TOP = 5  # the throughput target is for top-5 prediction with deduplication


@dataclass
class BenchmarkConfig:
    protocol: str
    setting: str = "standard"
    limit: int | None = None
    workers: int = 2
    seed: int = 0
    baselines: tuple[str, ...] = ("random", "nearest", "pymatgen_substitution")
    retrain: bool = False
    hetero_extra: bool = True  # ``--model hetero``: also the polymorph / leave-prototype-out evaluations
    speed: bool = True  # also time top-5 prediction, over all queries and class by class
    ranker_queries: int = 2000  # held-out pool formulas the second-stage ranker learns from (0: no ranker)
    subset: str = "all"  # "tie-heavy": only queries with three or more elements in equal amounts
    max_assignments: int = MAX_ASSIGNMENTS  # element-to-site assignments scored per composition
    max_anchors: int = 20000  # pair sampling bounds of the training (SimilarityModel.train)
    max_group: int = 5000


def _parse(args: tuple[str, str]) -> Structure:
    return structure_from_cif_string(args[1], args[0])


def _cached_structures(path: Path, build) -> list[Structure]:
    """Structures from a gzipped-JSON cache (``Structure.as_dict``; never unpickled), else ``build()`` written
    there atomically; an unreadable cache is rebuilt."""
    if path.is_file():
        try:
            return [Structure.from_dict(d) for d in read_json_gz(path)]
        except Exception:
            log.warning("unreadable query cache %s: rebuilding it", path)
    value = build()
    write_json_gz(path, [s.as_dict() for s in value])
    return value


def query_structures(protocol: str, ids: list[str], cifs: list[str], workers: int) -> list[Structure]:
    key = hashlib.sha1("|".join(ids).encode()).hexdigest()[:12]

    def build() -> list[Structure]:
        if workers > 1 and len(ids) > 50:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(_parse, zip(ids, cifs, strict=True), chunksize=64))
        return [_parse(a) for a in zip(ids, cifs, strict=True)]

    return _cached_structures(home_dir() / "benchmark" / f"queries-{protocol}-{key}.json.gz", build)


def benchmark_model(
    index: TemplateIndex, query_ids: list[str], query_formulas: list[str], cfg: BenchmarkConfig, log_fn=print
) -> tuple[SimilarityModel, dict]:
    """Train (or load the cached) model on the pool minus the queries."""
    mask = ~np.isin(index.ids, query_ids)
    if cfg.setting == "strict":
        mask &= ~np.isin(index.formulas, list(set(query_formulas)))
    sub = index.subset(mask)
    folder = home_dir() / "benchmark"
    key = f"{cfg.protocol}-{cfg.setting}-{training_hash(sub)}"
    if (cfg.max_anchors, cfg.max_group) != (20000, 5000):
        key += f"-caps{cfg.max_anchors}x{cfg.max_group}"
    pair_path = folder / f"model-v3-{key}.json.gz"
    path = folder / f"model-v3-{key}-ranker{cfg.ranker_queries}.json.gz" if cfg.ranker_queries else pair_path
    for p in (path, pair_path):
        if p.is_file() and not cfg.retrain:
            try:
                model = SimilarityModel.load(p)
                break
            except ModelError:
                continue
    else:
        model, _ = SimilarityModel.train(
            sub, seed=cfg.seed, max_anchors=cfg.max_anchors, max_group=cfg.max_group
        )
        model.save(pair_path)
    if cfg.ranker_queries and model.ranker is None:
        model.ranker, _ = fit_ranker(
            sub,
            model.std,
            cfg.ranker_queries,
            seed=cfg.seed,
            workers=cfg.workers,
            cache_dir=folder / "outcomes",
        )
        model.save(path)
    report = dict(model.meta.get("report", {}))
    if model.ranker is not None:
        report["ranker"] = model.ranker.meta.get("report", {})
    return model, report


def run_benchmark(cfg: BenchmarkConfig, log_fn=print) -> dict[str, Any]:
    if cfg.setting not in SETTINGS:
        raise ConfigError(f"unknown setting {cfg.setting!r}; choose one of {', '.join(SETTINGS)}")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    store = pool_store(cfg.protocol, workers=cfg.workers)
    index = TemplateIndex.from_store(store, workers=cfg.workers)
    store.close()
    timings["pool_seconds"] = time.perf_counter() - t
    log_fn(f"pool: {len(index)} templates, {len(set(index.cluster.tolist()))} prototype clusters")

    t = time.perf_counter()
    full_q = load_queries(cfg.protocol)
    # The pool never holds any query of the protocol (README: 18,867 templates for mp20bt).
    index = index.subset(~np.isin(index.ids, full_q.material_ids))
    q = load_queries(cfg.protocol, limit=cfg.limit, seed=cfg.seed, subset=cfg.subset)
    gts = query_structures(cfg.protocol, q.material_ids, q.cifs, cfg.workers)
    comps = [g.composition for g in gts]
    q_roles = [roles(c) for c in comps]
    formulas = [r.reduced_formula for r in q_roles]
    timings["query_parse_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    whole = cfg.limit is None and cfg.subset == "all"
    all_formulas = formulas if whole else [formula_from_cif(c) for c in full_q.cifs]
    model, train_report = benchmark_model(index, full_q.material_ids, all_formulas, cfg, log_fn)
    timings["train_seconds"] = time.perf_counter() - t

    strict = cfg.setting == "strict"
    exclude = [{mid} for mid in q.material_ids]
    freeze_gc()  # the benchmark owns its process: the index's objects leave the collector's generations
    predictor = CSPPredictor(index, model, workers=cfg.workers, max_assignments=cfg.max_assignments)
    t = time.perf_counter()
    preds = predictor.predict(comps, top=TOP, exclude_ids=exclude, strict=strict)
    predict_seconds = time.perf_counter() - t
    log_fn(f"predicted {len(comps)} compositions in {predict_seconds:.1f} s")

    speed = prediction_speed(predictor, comps, exclude, strict) if cfg.speed else {}
    if speed:
        log_fn(
            f"top-{SPEED_TOP} with dedup: {speed['compositions_per_second']:.0f} compositions/s; slowest class "
            f"{speed['slowest_class']} at {speed['slowest_class_ratio']:.1f}x the average time per composition"
        )

    t = time.perf_counter()
    rms = rms_table(gts, [[c.structure for c in p.candidates] for p in preds], workers=cfg.workers)
    score_seconds = time.perf_counter() - t
    metrics = summarize(rms)
    log_fn(f"scored in {score_seconds:.1f} s: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    t = time.perf_counter()
    covered = coverage(index, gts, q.material_ids, strict, workers=cfg.workers)
    timings["ceiling_seconds"] = time.perf_counter() - t
    ceiling = float(covered.mean()) if len(covered) else float("nan")
    has_anon = float(
        np.mean([len(_allowed(index, r, mid, strict)) > 0 for r, mid in zip(q_roles, q.material_ids, strict=True)])
    )
    t = time.perf_counter()
    top1 = [p.candidates[0].structure if p.candidates else None for p in preds]
    misses = miss_breakdown(rms, gts, top1, [p.smact_valid for p in preds], covered, workers=cfg.workers)
    timings["miss_diagnostics_seconds"] = time.perf_counter() - t

    baselines: dict[str, Any] = {}
    b_rms_of: dict[str, list] = {}
    if model.ranker is not None:  # the ablation: the same pair model without the second stage
        t = time.perf_counter()
        pair_only = CSPPredictor(
            index, model.without_ranker(), workers=cfg.workers, max_assignments=cfg.max_assignments
        )
        bp = pair_only.predict(comps, top=TOP, exclude_ids=exclude, strict=strict)
        b_seconds = time.perf_counter() - t
        b_rms = rms_table(gts, [[c.structure for c in p.candidates] for p in bp], workers=cfg.workers)
        baselines["pair score only (no ranker)"] = {**summarize(b_rms), "predict_seconds": b_seconds}
        b_rms_of["pair score only (no ranker)"] = b_rms
        log_fn(f"pair score only: top1={baselines['pair score only (no ranker)']['top1']:.4f}")
    capped = [len(r.permutations(limit=CAP_ABLATION + 1)) > CAP_ABLATION for r in q_roles]
    if any(capped) and cfg.max_assignments > CAP_ABLATION:  # the ablation: the earlier cap on assignments
        t = time.perf_counter()
        few = CSPPredictor(index, model, workers=cfg.workers, max_assignments=CAP_ABLATION)
        bp = few.predict(comps, top=TOP, exclude_ids=exclude, strict=strict)
        b_seconds = time.perf_counter() - t
        b_rms = rms_table(gts, [[c.structure for c in p.candidates] for p in bp], workers=cfg.workers)
        name = f"assignments capped at {CAP_ABLATION}"
        baselines[name] = {**summarize(b_rms), "predict_seconds": b_seconds}
        b_rms_of[name] = b_rms
        log_fn(f"{name}: top1={baselines[name]['top1']:.4f} ({sum(capped)} queries have more)")
    for name in cfg.baselines:
        t = time.perf_counter()
        if name == "random":
            ranked = random_rank(index, q_roles, TOP, exclude, strict, seed=cfg.seed)
        elif name == "nearest":
            ranked = rank(None, index, q_roles, top=TOP, exclude_ids=exclude, strict=strict, metric="nearest")
        elif name == "pymatgen_substitution":
            ranked = pymatgen_rank(index, q_roles, TOP, exclude, strict)
        else:
            raise ConfigError(f"unknown baseline {name!r}")
        bp = predictor.realize(comps, ranked, TOP, dedup=False)
        b_seconds = time.perf_counter() - t
        b_rms = rms_table(gts, [[c.structure for c in p.candidates] for p in bp], workers=cfg.workers)
        baselines[name] = {**summarize(b_rms), "predict_seconds": b_seconds}
        b_rms_of[name] = b_rms
        log_fn(f"baseline {name}: top1={baselines[name]['top1']:.4f} top5={baselines[name]['top5']:.4f}")

    n = len(comps)
    smact_ok = float(np.mean([p.smact_valid for p in preds])) if preds else float("nan")
    result = {
        "protocol": cfg.protocol,
        "setting": cfg.setting,
        "n_queries": n,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "subset": cfg.subset,
        "max_assignments": cfg.max_assignments,
        "n_templates": len(index),
        "n_prototype_clusters": len(set(index.cluster.tolist())),
        "queries_with_same_anonymous_formula_template": has_anon,
        "ceiling": ceiling,
        **metrics,
        "top1_over_ceiling": metrics["top1"] / ceiling if ceiling else float("nan"),
        "top5_over_ceiling": metrics["top5"] / ceiling if ceiling else float("nan"),
        "ungated": summarize_ungated(preds, rms),
        "top1_misses": misses,
        "tie_heavy": tie_heavy_summary(formulas, covered, rms, b_rms_of),
        "smact_valid_fraction": smact_ok,
        "no_prediction_fraction": float(np.mean([not p.candidates for p in preds])) if preds else float("nan"),
        "predict_seconds": predict_seconds,
        "compositions_per_second": n / predict_seconds if predict_seconds else float("nan"),
        "speed_top5": speed,
        "score_seconds": score_seconds,
        "baselines": baselines,
        "training": train_report,
        "timings": {**timings, "total_seconds": time.perf_counter() - t_all},
        "workers": cfg.workers,
    }
    return result


CAP_ABLATION = 6  # the assignment cap before lazy enumeration, run beside the current one where it matters


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


def composition_class(r) -> str:
    """Speed class of a composition: element count and the largest group of equal amounts (ties multiply
    the element assignments that are scored)."""
    return f"{len(r.elements)} elements, ties of {max(len(g) for g in r.tie_groups())}"


def prediction_speed(
    predictor: CSPPredictor, comps: list[Composition], exclude: list[set[str]], strict: bool
) -> dict[str, Any]:
    """Throughput of top-5 prediction with deduplication, as users run it: over all queries at once, then
    class by class (:func:`composition_class`), each class timed as its own batch."""
    t = time.perf_counter()
    predictor.predict(comps, top=SPEED_TOP, exclude_ids=exclude, strict=strict)
    total = time.perf_counter() - t
    classes: dict[str, list[int]] = {}
    for i, c in enumerate(comps):
        classes.setdefault(composition_class(roles(c)), []).append(i)
    per_class = {}
    for name, rows in sorted(classes.items()):
        t = time.perf_counter()
        predictor.predict(
            [comps[i] for i in rows], top=SPEED_TOP, exclude_ids=[exclude[i] for i in rows], strict=strict
        )
        per_class[name] = {"n": len(rows), "seconds_per_composition": (time.perf_counter() - t) / len(rows)}
    average = total / max(len(comps), 1)
    slowest = max(per_class, key=lambda k: per_class[k]["seconds_per_composition"]) if per_class else ""
    return {
        "top": SPEED_TOP,
        "seconds": total,
        "compositions_per_second": len(comps) / total if total else float("nan"),
        "classes": per_class,
        "slowest_class": slowest,
        "slowest_class_ratio": per_class[slowest]["seconds_per_composition"] / average if slowest else float("nan"),
    }


def _allowed(index: TemplateIndex, r, mid: str, strict: bool) -> np.ndarray:
    members = index.by_anon.get(r.anonymous_formula, np.zeros(0, dtype=int))
    ok = index.ids[members] != mid
    if strict:
        ok &= index.formulas[members] != r.reduced_formula
    return members[ok]


def summarize_ungated(preds: list[Prediction], rms: list[list[float | None]]) -> dict[str, float]:
    """Share of SMACT-invalid queries: their predictions can never count under the standard gate."""
    invalid = [not p.smact_valid for p in preds]
    return {"smact_invalid_queries": float(np.mean(invalid)) if invalid else float("nan")}


def write_reports(
    result: dict[str, Any], json_path: str | Path | None, md_path: str | Path | None, markdown: str | None = None
) -> None:
    """Write the result as JSON and its Markdown (default: :func:`markdown_table`) where paths are given."""
    if json_path:
        p = Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2, default=float))
    if md_path:
        p = Path(md_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(markdown_table([result]) if markdown is None else markdown)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per method and protocol/setting: match rates beside the ceiling, RMSE and speed."""
    lines = [
        "| protocol | setting | n | method | top-1 | top-5 | top-20 | RMSE top-1 | ceiling | top-1/ceiling | comp/s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows = [("cspml (learned)", r, r["compositions_per_second"])]
        rows += [
            (name, b, r["n_queries"] / b["predict_seconds"] if b.get("predict_seconds") else float("nan"))
            for name, b in r["baselines"].items()
        ]
        for name, m, speed in rows:
            lines.append(
                f"| {r['protocol']} | {r['setting']} | {r['n_queries']} | {name} | {m['top1']:.1%} | {m['top5']:.1%} "
                f"| {m['top20']:.1%} | {m['rmse_top1']:.4f} | {r['ceiling']:.1%} | {m['top1'] / r['ceiling']:.2f} "
                f"| {speed:.0f} |"
            )
    for r in results:
        misses = r.get("top1_misses") or {}
        if misses:
            lines += [
                "",
                f"{r['protocol']} {r['setting']}, {r['n_queries']} queries: top-1 misses by kind (share of queries)",
                "",
                "| miss kind | share |",
                "|---|---:|",
            ]
            lines += [f"| {kind.replace('_', ' ')} | {share:.1%} |" for kind, share in misses.items()]
    for r in results:
        tie = r.get("tie_heavy") or {}
        if tie.get("n"):
            lines += [
                "",
                f"{r['protocol']} {r['setting']}: the {tie['n']} tie-heavy queries of this run (three or more elements "
                f"in equal amounts), ceiling {tie['ceiling']:.1%}",
                "",
                "| method | top-1 | top-5 | top-20 | RMSE top-1 |",
                "|---|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {name} | {m['top1']:.1%} | {m['top5']:.1%} | {m['top20']:.1%} | {m['rmse_top1']:.4f} |"
                for name, m in tie["methods"].items()
            ]
    for r in results:
        sp = r.get("speed_top5") or {}
        if not sp:
            continue
        lines += [
            "",
            f"{r['protocol']} {r['setting']}, {r['n_queries']} queries: top-{sp['top']} prediction with deduplication "
            f"{sp['compositions_per_second']:.0f} compositions/s ({sp['seconds']:.1f} s, {r['workers']} workers); "
            f"slowest class {sp['slowest_class']}, {sp['slowest_class_ratio']:.1f}x the average time per composition",
            "",
            "| composition class | n | ms per composition (class as one batch) |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {name} | {c['n']} | {1000 * c['seconds_per_composition']:.1f} |" for name, c in sp["classes"].items()
        ]
    return "\n".join(lines) + "\n"
