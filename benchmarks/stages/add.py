"""Scale-benchmark stage ``add``: ``TemplateStore.add`` of templates the pool lacks."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cspml_flows.templates.store import TemplateStore


def add(ctx: dict[str, Any]) -> dict[str, Any]:
    """``TemplateStore.add`` of a slice of the reserve documents, stamped with the current time."""
    lo, hi = ctx["slice"]
    docs = json.loads(Path(ctx["reserve"]).read_text())[lo:hi]
    now = datetime.now(UTC).isoformat()
    for d in docs:
        d["last_updated"] = now
    with TemplateStore.open(ctx["store"], create=False) as ts:
        t = time.perf_counter()
        n = ts.add(docs)
        seconds = time.perf_counter() - t
        count = ts.count()
    return {"seconds": seconds, "added": n, "templates": count}
