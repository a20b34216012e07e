"""Scale-benchmark stages that run ``cspml`` commands: import, campaign round, training."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.stages import BenchmarkError
from cspml_flows.cli.main import main as cspml
from cspml_flows.templates.store import TemplateStore


def load(ctx: dict[str, Any]) -> dict[str, Any]:
    """Import a real pool's shared files with ``cspml import shared`` into the run's store."""
    argv = ["-q", "import", "shared", *ctx["files"], "--store", ctx["store"], "--workers", str(ctx["workers"])]
    t = time.perf_counter()
    code = cspml(argv)
    seconds = time.perf_counter() - t
    if code != 0:
        raise BenchmarkError(f"cspml import exited with {code}")
    with TemplateStore.open(ctx["store"], create=False) as ts:
        n = ts.count()
    return {"seconds": seconds, "templates": n, "per_s": n / seconds, "how": "cspml import shared (CSV, spglib)"}


def campaign(ctx: dict[str, Any]) -> dict[str, Any]:
    """``cspml campaign run`` of the run's campaign file; the round's summary."""
    out = Path(ctx["run"]) / f"campaign-{ctx['tag']}.json"
    t = time.perf_counter()
    code = cspml(["-q", "campaign", "run", ctx["campaign"], "--no-report", "--json", str(out)])
    seconds = time.perf_counter() - t
    if code != 0:
        raise BenchmarkError(f"cspml campaign run exited with {code}")
    rnd = json.loads(out.read_text())["rounds"][0]
    return {
        "seconds": seconds,
        "round_s": rnd["seconds"],
        "index_update_s": rnd.get("index_update_s"),
        "overhead_s": rnd["seconds"] + (rnd.get("index_update_s") or 0.0),
        "candidates": rnd["n_candidates"],
        "relaxed": rnd["n_computed"],
        "cached": rnd["n_cached"],
        "promoted": len(rnd["promoted"]),
    }


def train(ctx: dict[str, Any]) -> dict[str, Any]:
    """``cspml train`` on the run's store (the model goes into the run folder, not the home), without the
    outcome labels an earlier training cached in the home."""
    shutil.rmtree(Path(ctx["home"]) / "outcomes", ignore_errors=True)
    model = Path(ctx["run"]) / "trained-model.json.gz"
    t = time.perf_counter()
    code = cspml(["-q", "train", "--store", ctx["store"], "--model", str(model), "--workers", str(ctx["workers"])])
    seconds = time.perf_counter() - t
    if code != 0:
        raise BenchmarkError(f"cspml train exited with {code}")
    return {"seconds": seconds, "model_bytes": model.stat().st_size}
