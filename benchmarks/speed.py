"""Throughput of the CSP benchmark's prediction: top-5 with deduplication, over all queries and per
composition class."""

from __future__ import annotations

import time
from typing import Any

from pymatgen.core import Composition

from cspml_flows.core.composition import Roles, roles
from cspml_flows.predict.predictor import CSPPredictor

SPEED_TOP = 5  # the throughput target is for top-5 prediction with deduplication


def composition_class(r: Roles) -> str:
    """Speed class of a composition: element count and the largest group of equal amounts (ties multiply
    the element assignments that are scored)."""
    return f"{len(r.elements)} elements, ties of {max(len(g) for g in r.tie_groups())}"


def prediction_speed(
    predictor: CSPPredictor, comps: list[Composition], exclude: list[set[str]], strict: bool
) -> dict[str, Any]:
    """Throughput of top-5 prediction with deduplication, as users run it: over all queries at once, then
    class by class (:func:`composition_class`), each class timed as its own batch."""
    t = time.perf_counter()
    predictor.predict(comps, top=SPEED_TOP, exclude_ids=exclude, strict=strict)
    total = time.perf_counter() - t
    classes: dict[str, list[int]] = {}
    for i, c in enumerate(comps):
        classes.setdefault(composition_class(roles(c)), []).append(i)
    per_class = {}
    for name, rows in sorted(classes.items()):
        t = time.perf_counter()
        predictor.predict(
            [comps[i] for i in rows], top=SPEED_TOP, exclude_ids=[exclude[i] for i in rows], strict=strict
        )
        per_class[name] = {"n": len(rows), "seconds_per_composition": (time.perf_counter() - t) / len(rows)}
    average = total / max(len(comps), 1)
    slowest = max(per_class, key=lambda k: per_class[k]["seconds_per_composition"]) if per_class else ""
    return {
        "top": SPEED_TOP,
        "seconds": total,
        "compositions_per_second": len(comps) / total if total else float("nan"),
        "classes": per_class,
        "slowest_class": slowest,
        "slowest_class_ratio": per_class[slowest]["seconds_per_composition"] / average if slowest else float("nan"),
    }
