"""Settings of one CSP benchmark run (``python -m benchmarks csp``)."""

from __future__ import annotations

from dataclasses import dataclass

from cspml_flows.core.composition import MAX_ASSIGNMENTS


@dataclass
class BenchmarkConfig:
    """One protocol and setting, the sample of its queries, the baselines and the training bounds."""

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
