"""Scale-benchmark stages of the template index: the full build and the reopen after a store change."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from cspml_flows.templates.index import TemplateIndex


def cache_bytes(home: Path) -> int:
    """Bytes under the run's home: the caches a store's index (and retrieval) keep there (the run's home
    holds no store and no model)."""
    return sum(f.stat().st_size for f in home.rglob("*") if f.is_file()) if home.is_dir() else 0


def build(ctx: dict[str, Any]) -> dict[str, Any]:
    """Full index build: everything under the run's home removed (the index and other caches), then
    ``TemplateIndex.open``."""
    home = Path(ctx["home"])
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    t = time.perf_counter()
    idx = TemplateIndex.open(ctx["store"], workers=ctx["workers"])
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "templates": len(idx),
        "clusters": len(np.unique(np.asarray(idx.cluster))),
        "anonymous_formulas": len(idx.by_anon),
        "cache_bytes": cache_bytes(home),
    }


def reopen(ctx: dict[str, Any]) -> dict[str, Any]:
    """``TemplateIndex.open`` on whatever cache the home holds (after a store change: the index update)."""
    t = time.perf_counter()
    idx = TemplateIndex.open(ctx["store"], workers=ctx["workers"])
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "templates": len(idx),
        "clusters": len(np.unique(np.asarray(idx.cluster))),
        "cache_bytes": cache_bytes(Path(ctx["home"])),
    }
