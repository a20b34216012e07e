"""Scale-benchmark stage ``predict``: top-5 with dedup for a fixed sample of compositions."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cspml_flows.predict.predictor import CSPPredictor


def predict(ctx: dict[str, Any]) -> dict[str, Any]:
    """Top-5 with dedup for the fixed compositions, after a warm-up on the first ten."""
    queries = json.loads(Path(ctx["queries"]).read_text())
    t = time.perf_counter()
    predictor = CSPPredictor.from_paths(ctx["store"], None, workers=ctx["workers"], freeze=True)
    load_s = time.perf_counter() - t
    predictor.predict(queries[:10], top=5)
    t = time.perf_counter()
    preds = predictor.predict(queries, top=5, dedup=True)
    seconds = time.perf_counter() - t
    answers = [[p.formula, [c.template_id for c in p.candidates]] for p in preds]
    digest = hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16]
    return {
        "seconds": seconds,
        "compositions": len(queries),
        "per_s": len(queries) / seconds,
        "load_s": load_s,
        "with_candidates": sum(bool(p.candidates) for p in preds),
        "top5_digest": digest,
    }
