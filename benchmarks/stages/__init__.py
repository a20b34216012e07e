"""The stages of the scale benchmark (:mod:`benchmarks.scale`), each run in a fresh process.

A stage takes the run's context (JSON-ready) and returns a JSON-ready dict. The stage process
(``python -m benchmarks.stages``) imports only the module of its stage, through :data:`STAGES`, so that
it pays the imports of that stage alone and times them (``imports_s`` in the context).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

Stage = Callable[[dict[str, Any]], dict[str, Any]]

STAGES: dict[str, str] = {
    "load": "benchmarks.stages.commands:load",
    "build": "benchmarks.stages.index:build",
    "open": "benchmarks.stages.index:reopen",
    "cold": "benchmarks.stages.cold:cold",
    "predict": "benchmarks.stages.predict:predict",
    "add": "benchmarks.stages.add:add",
    "campaign": "benchmarks.stages.commands:campaign",
    "train": "benchmarks.stages.commands:train",
}


class BenchmarkError(Exception):
    """A stage that failed (its log names the reason)."""


def stage_function(name: str) -> tuple[Stage, float]:
    """The function of stage ``name``, imported now; returns it and the seconds its imports took."""
    module, func = STAGES[name].split(":")
    t = time.perf_counter()
    fn = getattr(importlib.import_module(module), func)
    return fn, time.perf_counter() - t
