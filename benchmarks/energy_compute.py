"""The energies of the energy experiment (:mod:`benchmarks.energy`): single points of every query set's top
candidates, a cost probe without the cache, and short relaxations of the informative queries within a
CPU budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymatgen.core import Structure

from benchmarks.energy_blend import ENERGY_FLOOR, QuerySet
from benchmarks.energy_cache import EnergyCache, relaxed, single_point_tag, single_points
from benchmarks.energy_config import EnergyConfig
from cspml_flows.flows.calculators import CalculatorSettings, relax_maker

logger = logging.getLogger(__name__)


@dataclass
class Energies:
    """Energies per query set (arrays per query, NaN where missing) and what they cost."""

    tag: str
    load_seconds: float
    single_point: dict[str, list[np.ndarray]] = field(default_factory=dict)
    single_point_cost: dict[str, list[float]] = field(default_factory=dict)
    single_point_failed: dict[str, int] = field(default_factory=dict)
    probe: list[float] = field(default_factory=list)
    relaxed: dict[str, list[np.ndarray]] = field(default_factory=dict)
    relax_cost: dict[str, list[float]] = field(default_factory=dict)
    relaxed_queries: dict[str, list[int]] = field(default_factory=dict)
    relax_failed: dict[str, int] = field(default_factory=dict)


def energy_array(recs: Sequence[dict]) -> np.ndarray:
    """Energies per atom of these records (NaN where the calculator failed)."""
    return np.array([np.nan if r["energy_per_atom"] is None else r["energy_per_atom"] for r in recs], dtype=float)


def cpu_seconds(recs: Sequence[dict]) -> float:
    """CPU seconds of these records (wall seconds for records made before CPU time was kept)."""
    return float(sum(r.get("cpu_seconds", r.get("seconds")) or 0.0 for r in recs))


def n_bad(e: np.ndarray) -> int:
    """Missing or unphysical energies (below :data:`~benchmarks.energy_blend.ENERGY_FLOOR`)."""
    return int((~np.isfinite(e) | (e < ENERGY_FLOOR)).sum())


def energy_arrays(
    qs: QuerySet, which: Sequence[int], k: int, fn: Callable[[list[Structure]], list[dict]]
) -> tuple[list[np.ndarray], list[float], list[int]]:
    """Energy arrays (NaN where missing) for queries ``which`` (first ``k`` candidates), per-query CPU
    seconds (one thread) and the queries of each failed or unphysical energy."""
    energies: list[np.ndarray] = [np.full(len(s), np.nan) for s in qs.structures]
    seconds, failed = [], []
    for i in which:
        recs = fn(qs.structures[i][:k])
        energies[i][: len(recs)] = energy_array(recs)
        seconds.append(cpu_seconds(recs))
        failed += [i] * n_bad(energies[i][: len(recs)])
    return energies, seconds, failed


def single_point_energies(
    cfg: EnergyConfig, sets: dict[str, QuerySet], calculator: Any, cache: EnergyCache, en: Energies
) -> None:
    """Single points of the top ``cfg.top`` candidates of every set (cached), then the cost probe: the
    first ``cfg.cost_probe`` protocol queries again without the cache, CPU time."""
    for name, qs in sets.items():
        t = time.perf_counter()
        en.single_point[name], en.single_point_cost[name], failed = energy_arrays(
            qs,
            range(len(qs.structures)),
            cfg.top,
            lambda ss: single_points(ss, lambda: calculator, en.tag, cache),
        )
        en.single_point_failed[name] = len(failed)
        logger.info("%s: single points in %.0f s (wall, with cache)", name, time.perf_counter() - t)
    cache.flush()
    scratch = EnergyCache(None)
    for ss in sets["protocol"].structures[: cfg.cost_probe]:
        en.probe.append(cpu_seconds(single_points(ss[: cfg.top], lambda: calculator, en.tag, scratch)))


def relax_informative(
    cfg: EnergyConfig,
    sets: dict[str, QuerySet],
    maker: Any,
    settings: CalculatorSettings,
    cache: EnergyCache,
    en: Energies,
) -> None:
    """Relax the top ``cfg.relax_top`` candidates of the informative queries, alternating pool and protocol
    queries so that a budget stop (``cfg.relax_budget_s`` recorded CPU seconds) leaves both sets evenly
    covered."""
    todo = {name: qs.informative(cfg.relax_top) for name, qs in sets.items()}
    for name, qs in sets.items():
        en.relaxed[name] = [np.full(len(s), np.nan) for s in qs.structures]
        en.relax_cost[name] = []
    spent, j = 0.0, 0
    longest = max((len(v) for v in todo.values()), default=0)
    while j < longest and spent < cfg.relax_budget_s:
        for name in sets:
            if j >= len(todo[name]) or spent >= cfg.relax_budget_s:
                continue
            i = todo[name][j]
            recs = relaxed(sets[name].structures[i][: cfg.relax_top], maker, settings, cache)
            e = energy_array(recs)
            en.relaxed[name][i][: len(e)] = e
            sec = cpu_seconds(recs)  # the recorded cost, cached or not: a rerun relaxes the same subset
            en.relax_cost[name].append(sec)
            spent += sec
            en.relaxed_queries[name].append(i)
            en.relax_failed[name] += n_bad(e)
        j += 1
        if j % 10 == 0:
            logger.info("relaxed %d/%d rounds, %.0f CPU s", j, longest, spent)
    cache.flush()


def compute_energies(
    cfg: EnergyConfig, sets: dict[str, QuerySet], settings: CalculatorSettings, cache: EnergyCache
) -> Energies:
    """Load the potential once, then the single points (and, with ``cfg.relax``, the relaxations)."""
    t = time.perf_counter()
    maker = relax_maker(settings)
    calculator = maker.calculator  # load once
    en = Energies(tag=single_point_tag(settings), load_seconds=time.perf_counter() - t)
    en.relaxed_queries = {name: [] for name in sets}
    en.relax_failed = dict.fromkeys(sets, 0)
    logger.info("SevenNet-0 loaded in %.1f s; energy cache %d records", en.load_seconds, len(cache))
    try:
        single_point_energies(cfg, sets, calculator, cache, en)
        if cfg.relax:
            relax_informative(cfg, sets, maker, settings, cache, en)
    finally:
        cache.flush()
    return en
