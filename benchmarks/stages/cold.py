"""Scale-benchmark stage ``cold``: index, model and the first prediction in a new process, each timed."""

from __future__ import annotations

import time
from typing import Any

from cspml_flows.core.config import model_path
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.predict.predictor import CSPPredictor, freeze_gc
from cspml_flows.templates.index import TemplateIndex

COLD_COMPOSITION = "SrTiO3"


def cold(ctx: dict[str, Any]) -> dict[str, Any]:
    """Index, model and first prediction, each timed; ``imports_s`` is what importing this module took."""
    t1 = time.perf_counter()
    idx = TemplateIndex.open(ctx["store"], workers=ctx["workers"])
    t2 = time.perf_counter()
    model = SimilarityModel.load(model_path())
    t3 = time.perf_counter()
    freeze_gc()  # the benchmark owns its process: the index's objects leave the collector's generations
    preds = CSPPredictor(idx, model, workers=ctx["workers"]).predict([COLD_COMPOSITION], top=5)
    t4 = time.perf_counter()
    return {
        "seconds": t4 - t1,
        "imports_s": ctx.get("imports_s"),
        "index_s": t2 - t1,
        "model_s": t3 - t2,
        "first_prediction_s": t4 - t3,
        "composition": COLD_COMPOSITION,
        "candidates": len(preds[0].candidates),
        "model": str(model_path()),
    }
