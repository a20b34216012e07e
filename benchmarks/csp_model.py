"""The CSP benchmark's model: trained on the pool without any query's ``material_id`` (and, in the strict
setting, without any query's reduced formula), so nothing about a query leaks into the learned
similarity; cached under ``$CSPML_HOME/benchmark``."""

from __future__ import annotations

import numpy as np

from benchmarks.config import BenchmarkConfig
from cspml_flows.core.config import home_dir
from cspml_flows.core.errors import ModelError
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.ranker import fit_ranker

DEFAULT_BOUNDS = (20000, 5000)  # (max_anchors, max_group) that leave the cache key as it was


def benchmark_model(
    index: TemplateIndex, query_ids: list[str], query_formulas: list[str], cfg: BenchmarkConfig
) -> tuple[SimilarityModel, dict]:
    """Train (or load the cached) model on the pool minus the queries; returns it and its training report."""
    mask = ~np.isin(index.ids, query_ids)
    if cfg.setting == "strict":
        mask &= ~np.isin(index.formulas, list(set(query_formulas)))
    sub = index.subset(mask)
    folder = home_dir() / "benchmark"
    key = f"{cfg.protocol}-{cfg.setting}-{training_hash(sub)}"
    if (cfg.max_anchors, cfg.max_group) != DEFAULT_BOUNDS:
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
        model, _ = SimilarityModel.train(sub, seed=cfg.seed, max_anchors=cfg.max_anchors, max_group=cfg.max_group)
        model.save(pair_path)
    if cfg.ranker_queries and model.ranker is None:
        model.ranker, _ = fit_ranker(
            sub,
            model.std,
            n_queries=cfg.ranker_queries,
            seed=cfg.seed,
            workers=cfg.workers,
            cache_dir=folder / "outcomes",
        )
        model.save(path)
    report = dict(model.meta.get("report", {}))
    if model.ranker is not None:
        report["ranker"] = model.ranker.meta.get("report", {})
    return model, report
