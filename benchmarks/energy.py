"""Energy as a ranking feature: whether a machine-learned-potential energy of the candidates improves the
engine's first choice.

On a fixed sample, each query's top candidates (the current engine: pair model + ranker, deduplicated, as
``predict`` returns them) get a SevenNet-0 energy per atom: a single point of the unrelaxed substituted
candidate, and for the best ``relax_top`` a short relaxation through the flows' own relaxation code
(:func:`cspml_flows.flows.relax.relax_one` with :func:`cspml_flows.flows.calculators.relax_maker`). The
feature is the energy per atom relative to the query's lowest candidate. Orders of the same candidates
are compared: the ranker's, energy only, a blend (ranker score minus ``w`` x energy, both taken relative
to the query's best candidate and divided by their spread over the pool sample) and a logistic second
stage on the two. Every weight is fitted on held-out POOL queries (the ranker's training outcomes, with a
ranker refitted without them so their scores are out of sample), never on the protocol's queries.

Energies are cached on disk (JSON, keyed by structure fingerprint and calculator settings), so a rerun
only scores. Relaxations are spent only on queries whose top ``relax_top`` holds both a match and a
non-match: for every other query each order of those candidates has the same top-1 and top-k, so the
reported rates are exact for the whole sample while the cost per composition is measured per structure.

Run: ``python -m benchmarks.energy --out out/bench/energy`` (see ``--help``); pin threads
(``OMP_NUM_THREADS=1``), the module also limits torch and BLAS to one thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.energy_blend import (
    QuerySet,
    blend,
    fit_logistic,
    fit_weight,
    order_rows,
    relative_energy,
    relative_score,
    spread,
)
from benchmarks.energy_cache import EnergyCache, cache_id, sevennet_settings
from benchmarks.energy_compute import Energies, compute_energies
from benchmarks.energy_config import EnergyConfig
from benchmarks.energy_sets import default_model, pool_set, protocol_set
from benchmarks.energy_tables import markdown
from benchmarks.logs import configure_logging
from benchmarks.protocols import pool_index
from cspml_flows.core.config import home_dir
from cspml_flows.flows.calculators import CalculatorSettings
from cspml_flows.learning.model import SimilarityModel

logger = logging.getLogger(__name__)
ENGINE = "ranker (engine order)"


def limit_threads() -> None:
    """One thread for torch, BLAS and OpenMP (LightGBM) in this process."""
    threadpool_limits(1)
    os.environ.setdefault("CSPML_TORCH_THREADS", "1")
    import torch  # optional extra (the ml extra): only this experiment's potentials need it

    torch.set_num_threads(1)


def relative(qs: QuerySet, energies: list[np.ndarray], k: int | None = None) -> tuple[list, list, list]:
    """Per query: ranker scores and energies relative to the query's best, and match flags (first ``k``)."""
    s_rel = [relative_score(s[:k]) for s in qs.scores]
    e_rel = [relative_energy(e[:k]) for e in energies]
    return s_rel, e_rel, [h[:k] for h in qs.hits]


def covered(qs: QuerySet, relaxed_queries: list[int], k: int) -> list[int]:
    """Queries whose top-``k`` reorder is known: relaxed ones, and those where no reorder can change a rate."""
    done, informative = set(relaxed_queries), set(qs.informative(k))
    return [i for i in range(len(qs.structures)) if i not in informative or i in done]


def single_point_tables(
    cfg: EnergyConfig, sets: dict[str, QuerySet], en: Energies
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Blend weight and logistic stage fitted on the pool's single points; every order's table per set."""
    s_p, e_p, h_p = relative(sets["pool"], en.single_point["pool"])
    s_scale, e_scale = spread(s_p), spread(e_p)
    w_sp, curve_sp = fit_weight(s_p, e_p, h_p, s_scale, e_scale)
    logit = fit_logistic([np.column_stack([s, e]) for s, e in zip(s_p, e_p, strict=True)], h_p, cfg.seed)
    # for the record only (never used to choose): the best weight in hindsight on the protocol's queries
    s_q, e_q, h_q = relative(sets["protocol"], en.single_point["protocol"])
    w_q, curve_q = fit_weight(s_q, e_q, h_q, s_scale, e_scale)
    weights: dict[str, Any] = {
        "single_point": {
            "w": w_sp,
            "score_scale": s_scale,
            "energy_scale_ev_per_atom": e_scale,
            "curve": curve_sp,
            "protocol_hindsight": {"w": w_q, "top1": max(c["top1"] for c in curve_q), "curve": curve_q},
        }
    }
    tables: dict[str, list[dict[str, Any]]] = {}
    for name, qs in sets.items():
        s_rel, e_rel, _ = relative(qs, en.single_point[name])
        orders = {
            ENGINE: [np.asarray(s) for s in qs.scores],
            "single-point energy only": [-e for e in e_rel],
            f"blend, single point (w={w_sp:g})": [
                blend(s, e, w_sp, s_scale, e_scale) for s, e in zip(s_rel, e_rel, strict=True)
            ],
            "logistic on (score, single-point energy)": [
                logit(np.column_stack([s, e])) if len(s) else np.zeros(0) for s, e in zip(s_rel, e_rel, strict=True)
            ],
        }
        tables[name] = order_rows(name, qs, orders, ENGINE, (3,))
    return weights, tables


def relaxed_weight(cfg: EnergyConfig, sets: dict[str, QuerySet], en: Energies) -> dict[str, Any]:
    """The blend weight of relaxed energies fitted on the pool's covered queries (scales over the relaxed
    ones), with the protocol's hindsight weight for the record."""
    k = cfg.relax_top
    done = en.relaxed_queries["pool"]
    keep = covered(sets["pool"], done, k)
    s_p3, e_p3, h_p3 = relative(sets["pool"], en.relaxed["pool"], k)
    s3, e3 = spread([s_p3[i] for i in done]), spread([e_p3[i] for i in done])
    w_rx, curve_rx = fit_weight([s_p3[i] for i in keep], [e_p3[i] for i in keep], [h_p3[i] for i in keep], s3, e3)
    s_q3, e_q3, h_q3 = relative(sets["protocol"], en.relaxed["protocol"], k)
    cov_q = covered(sets["protocol"], en.relaxed_queries["protocol"], k)
    w_q3, curve_q3 = fit_weight([s_q3[i] for i in cov_q], [e_q3[i] for i in cov_q], [h_q3[i] for i in cov_q], s3, e3)
    return {
        "w": w_rx,
        "score_scale": s3,
        "energy_scale_ev_per_atom": e3,
        "curve": curve_rx,
        "protocol_hindsight": {"w": w_q3, "top1": max(c["top1"] for c in curve_q3), "curve": curve_q3},
    }


def relaxed_tables(
    cfg: EnergyConfig, sets: dict[str, QuerySet], en: Energies, weight: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Per set, on its covered queries: the engine's order, relaxed energy only and the blend, each
    reordering the first ``relax_top`` candidates (the rest keep the engine's order below them)."""
    k, w_rx, s3, e3 = cfg.relax_top, weight["w"], weight["score_scale"], weight["energy_scale_ev_per_atom"]
    tables = {}
    for name, qs in sets.items():
        rows = covered(qs, en.relaxed_queries[name], k)
        s_rel, e_rel, _ = relative(qs, en.relaxed[name], k)

        def tail(i: int, head: np.ndarray, qs: QuerySet = qs) -> np.ndarray:
            # the first k re-ordered by ``head``; the rest keep the engine's order below them
            n = len(qs.scores[i])
            rest = np.arange(n - min(k, n), 0, -1, dtype=float) - 1e6
            return np.concatenate([np.asarray(head, dtype=float), rest])

        orders = {
            ENGINE: [qs.scores[i] for i in rows],
            f"relaxed energy only, top-{k} re-ordered": [tail(i, -e_rel[i]) for i in rows],
            f"blend, relaxed, top-{k} (w={w_rx:g})": [tail(i, blend(s_rel[i], e_rel[i], w_rx, s3, e3)) for i in rows],
        }
        tables[f"{name}, relaxed"] = order_rows(name, qs.subset(rows), orders, ENGINE, (3,))
    return tables


def cost_summary(cfg: EnergyConfig, sets: dict[str, QuerySet], en: Energies) -> dict[str, Any]:
    """CPU time per composition and per structure of single points (probe and recorded) and relaxations."""
    n_probe = sum(min(len(s), cfg.top) for s in sets["protocol"].structures[: cfg.cost_probe])
    all_sp = [c for name in sets for c in en.single_point_cost[name]]
    probe = en.probe
    cost = {
        "sevennet_load_seconds": en.load_seconds,
        "single_point_cpu_seconds_per_composition": float(np.mean(probe)) if probe else float("nan"),
        "single_point_cpu_seconds_per_structure": sum(probe) / max(n_probe, 1),
        "single_point_probe_queries": len(probe),
        "single_point_recorded_seconds_per_composition": float(np.mean(all_sp)) if all_sp else float("nan"),
        "candidates_per_composition": cfg.top,
    }
    if cfg.relax:
        all_rx = [c for name in sets for c in en.relax_cost[name]]
        cost |= {
            "relax_cpu_seconds_per_composition": float(np.mean(all_rx)) if all_rx else float("nan"),
            "relax_cpu_seconds_per_structure": float(np.mean(all_rx)) / cfg.relax_top if all_rx else float("nan"),
            "relaxed_per_composition": cfg.relax_top,
            "relax_steps": cfg.steps,
            "relaxed_queries": {name: len(v) for name, v in en.relaxed_queries.items()},
            "relax_failures": en.relax_failed,
        }
    return cost


def decision(tables: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Keep an energy stage only if the blend lifts the protocol's top-1 by more than its standard error on
    a sample of at least 200 queries (a smaller sample decides nothing)."""
    protocol_blend = next(r for r in tables["protocol"] if r["order"].startswith("blend"))
    return {
        "blend_top1_lift": protocol_blend["diff"],
        "blend_top1_se": protocol_blend["se"],
        "keep_rerank_stage": bool(protocol_blend["diff"] > protocol_blend["se"] and protocol_blend["n"] >= 200),
    }


def run_energy(cfg: EnergyConfig) -> dict[str, Any]:
    """The experiment; returns a JSON-ready result (tables, fitted weights, costs)."""
    limit_threads()
    t_all = time.perf_counter()
    index = pool_index(cfg.protocol, workers=1)
    model_file = Path(cfg.model) if cfg.model else default_model(index, cfg.protocol)
    model = SimilarityModel.load(model_file)
    logger.info("pool %d templates; model %s", len(index), model_file.name)
    prot = protocol_set(cfg, index, model)
    pool, pool_info = pool_set(cfg, index, model)
    sets = {"pool": pool, "protocol": prot}

    settings: CalculatorSettings = sevennet_settings(cfg.steps, cfg.fmax)
    cache = EnergyCache(cfg.cache or home_dir() / "benchmark" / "energy" / "energies-sevennet.json")
    en = compute_energies(cfg, sets, settings, cache)
    weights, tables = single_point_tables(cfg, sets, en)
    if cfg.relax:
        weights["relaxed"] = relaxed_weight(cfg, sets, en)
        tables |= relaxed_tables(cfg, sets, en, weights["relaxed"])
    return {
        "config": asdict(cfg),
        "model": model_file.name,
        "calculator": {"single_point": en.tag, "relax": cache_id(settings), "settings": settings.key_settings()},
        "pool": pool_info,
        "n": {name: len(qs.structures) for name, qs in sets.items()},
        "informative_top5": {name: len(qs.informative(cfg.top)) for name, qs in sets.items()},
        "informative_top_relax": {name: len(qs.informative(cfg.relax_top)) for name, qs in sets.items()},
        "single_point_failures": en.single_point_failed,
        "weights": weights,
        "tables": tables,
        "cost": cost_summary(cfg, sets, en),
        "decision": decision(tables),
        "seconds": time.perf_counter() - t_all,
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks.energy`` parser (defaults: :class:`EnergyConfig`)."""
    d = EnergyConfig()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.energy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--protocol", default=d.protocol, choices=["mp20bt", "mpts52"])
    p.add_argument("--queries", type=int, default=d.queries, help="protocol queries (fixed-seed sample)")
    p.add_argument("--pool-queries", type=int, default=d.pool_queries, help="held-out pool formulas (weights)")
    p.add_argument("--top", type=int, default=d.top, help="candidates re-ordered per query")
    p.add_argument("--relax-top", type=int, default=d.relax_top, help="candidates relaxed per query")
    p.add_argument("--steps", type=int, default=d.steps, help="FIRE steps of the short relaxation")
    p.add_argument("--fmax", type=float, default=d.fmax)
    p.add_argument("--no-relax", dest="relax", action="store_false", help="single points only")
    p.add_argument("--relax-budget", type=float, default=d.relax_budget_s, help="relaxation compute, seconds")
    p.add_argument("--cost-probe", type=int, default=d.cost_probe, help="queries timed again without the cache")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", help="benchmark model file with a ranker (default: the cached one)")
    p.add_argument("--outcomes", nargs="+", help="the ranker's outcome cache files (default: the benchmark's)")
    p.add_argument("--cache", help="energy cache JSON file")
    p.add_argument("--out", default=d.out, help="folder for energy.json and energy.md")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the experiment, print its Markdown and write ``energy.json``/``energy.md`` under ``--out``."""
    args = build_parser().parse_args(argv)
    configure_logging()
    cfg = EnergyConfig(
        protocol=args.protocol,
        queries=args.queries,
        pool_queries=args.pool_queries,
        top=args.top,
        relax_top=args.relax_top,
        steps=args.steps,
        fmax=args.fmax,
        relax=args.relax,
        relax_budget_s=args.relax_budget,
        cost_probe=args.cost_probe,
        seed=args.seed,
        model=args.model,
        outcomes=args.outcomes,
        cache=args.cache,
        out=args.out,
    )
    result = run_energy(cfg)
    text = markdown(result)
    print(text)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "energy.json").write_text(json.dumps(result, indent=2, default=float))
        (out / "energy.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
