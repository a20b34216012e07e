"""Settings of the energy experiment (:mod:`benchmarks.energy`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EnergyConfig:
    """Settings of one energy experiment (the command line's options)."""

    protocol: str = "mp20bt"
    queries: int = 200  # protocol queries (load_queries(limit, seed))
    pool_queries: int = 200  # held-out pool formulas from the ranker's outcome cache (weights fitted here)
    top: int = 5  # candidates per query re-ordered with single-point energies
    relax_top: int = 3  # the best candidates per query that are also relaxed
    steps: int = 20  # FIRE steps of the short relaxation (cell filter)
    fmax: float = 0.05
    relax: bool = True
    relax_budget_s: float = 2700.0  # no new relaxation after this much CPU time (one thread), recorded costs
    cost_probe: int = 20  # protocol queries whose single points are timed again without the cache
    seed: int = 0
    model: str | None = None  # default: the benchmark's cached model with ranker for this pool
    outcomes: list[str] | None = None  # outcome cache files (default: those of the benchmark's ranker)
    cache: str | None = None  # default: $CSPML_HOME/benchmark/energy/energies-sevennet.json
    out: str | None = "out/bench/energy"
