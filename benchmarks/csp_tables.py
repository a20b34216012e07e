"""The CSP benchmark's result (:func:`benchmarks.runner.run_benchmark`) as JSON and Markdown files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.scoring import EXTRA_TOLERANCE_SETS, tolerance_key
from cspml_flows.core.equivalence import Tolerances
from cspml_flows.core.tables import markdown_table as table

RATES = ["top-1", "top-5", "top-20", "RMSE top-1"]


def write_reports(
    result: dict[str, Any], json_path: str | Path | None, md_path: str | Path | None, markdown: str | None = None
) -> None:
    """Write the result as JSON and its Markdown (default: :func:`markdown_table`) where paths are given."""
    if json_path:
        p = Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2, default=float))
    if md_path:
        p = Path(md_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(markdown_table([result]) if markdown is None else markdown)


def rate_cells(m: dict[str, float]) -> list[str]:
    """Top-1/5/20 match rates and the top-1 RMSE of one method."""
    return [f"{m['top1']:.1%}", f"{m['top5']:.1%}", f"{m['top20']:.1%}", f"{m['rmse_top1']:.4f}"]


def methods_table(results: list[dict[str, Any]]) -> str:
    """One row per method and protocol/setting: match rates beside the ceiling, RMSE and speed."""
    rows = []
    for r in results:
        methods = [("cspml (learned)", r, r["compositions_per_second"])]
        methods += [
            (name, b, r["n_queries"] / b["predict_seconds"] if b.get("predict_seconds") else float("nan"))
            for name, b in r["baselines"].items()
        ]
        rows += [
            [
                r["protocol"],
                r["setting"],
                r["n_queries"],
                name,
                *rate_cells(m),
                f"{r['ceiling']:.1%}",
                f"{m['top1'] / r['ceiling']:.2f}",
                f"{speed:.0f}",
            ]
            for name, m, speed in methods
        ]
    header = ["protocol", "setting", "n", "method", *RATES, "ceiling", "top-1/ceiling", "comp/s"]
    return table(header, rows, align="llrlrrrrrrr")


def ratio(value: float, ceiling: float) -> str:
    """``value / ceiling`` to two decimals (``nan`` for a zero ceiling)."""
    return f"{value / ceiling:.2f}" if ceiling else "nan"


def tolerance_block(results: list[dict[str, Any]], tolerances: Tolerances) -> list[str]:
    """Every method's rates and the ceiling at a further tolerance set (none when no result holds it)."""
    key = tolerance_key(tolerances)
    rows = []
    for r in results:
        at = r.get(key)
        if not at:
            continue
        methods = [("cspml (learned)", at), *at["baselines"].items()]
        rows += [
            [
                r["protocol"],
                r["setting"],
                r["n_queries"],
                name,
                *rate_cells(m),
                f"{at['ceiling']:.1%}",
                ratio(m["top1"], at["ceiling"]),
            ]
            for name, m in methods
        ]
    if not rows:
        return []
    title = (
        f"The same predictions at the {tolerances.name.replace('_', ' ')} StructureMatcher tolerances "
        f"(ltol={tolerances.ltol:g}, stol={tolerances.stol:g}, angle_tol={tolerances.angle_tol:g})"
    )
    header = ["protocol", "setting", "n", "method", *RATES, "ceiling", "top-1/ceiling"]
    return ["", title, "", table(header, rows, align="llrlrrrrrr")]


def misses_block(r: dict[str, Any]) -> list[str]:
    """The run's top-1 misses by kind (none when it has no breakdown)."""
    misses = r.get("top1_misses") or {}
    if not misses:
        return []
    title = f"{r['protocol']} {r['setting']}, {r['n_queries']} queries: top-1 misses by kind (share of queries)"
    rows = [[kind.replace("_", " "), f"{share:.1%}"] for kind, share in misses.items()]
    return ["", title, "", table(["miss kind", "share"], rows, align="lr")]


def tie_heavy_block(r: dict[str, Any]) -> list[str]:
    """Every method's match rates on the run's tie-heavy queries (none when it has none)."""
    tie = r.get("tie_heavy") or {}
    if not tie.get("n"):
        return []
    title = (
        f"{r['protocol']} {r['setting']}: the {tie['n']} tie-heavy queries of this run (three or more elements "
        f"in equal amounts), ceiling {tie['ceiling']:.1%}"
    )
    rows = [[name, *rate_cells(m)] for name, m in tie["methods"].items()]
    return ["", title, "", table(["method", *RATES], rows, align="lrrrr")]


def paired_rmse_block(r: dict[str, Any]) -> list[str]:
    """The engine's top-1 RMSE beside each other method's on the queries both match at top-1 (none when the
    result has no such comparison)."""
    paired = r.get("paired_rmse") or {}
    if not paired:
        return []
    rows = [[name, p["n"], f"{p['rmse_top1']:.4f}", f"{p['other_rmse_top1']:.4f}"] for name, p in paired.items()]
    title = f"{r['protocol']} {r['setting']}: top-1 RMSE on the queries both the engine and the method match at top-1"
    return ["", title, "", table(["method", "queries", "RMSE, cspml", "RMSE, method"], rows, align="lrrr")]


def speed_block(r: dict[str, Any]) -> list[str]:
    """Top-k throughput and the time per composition of each composition class (none when not measured)."""
    sp = r.get("speed_top5") or {}
    if not sp:
        return []
    title = (
        f"{r['protocol']} {r['setting']}, {r['n_queries']} queries: top-{sp['top']} prediction with deduplication "
        f"{sp['compositions_per_second']:.0f} compositions/s ({sp['seconds']:.1f} s, {r['workers']} workers); "
        f"slowest class {sp['slowest_class']}, {sp['slowest_class_ratio']:.1f}x the average time per composition"
    )
    rows = [[name, c["n"], f"{1000 * c['seconds_per_composition']:.1f}"] for name, c in sp["classes"].items()]
    header = ["composition class", "n", "ms per composition (class as one batch)"]
    return ["", title, "", table(header, rows, align="lrr")]


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The methods table of all results (standard CSP tolerances), the same at each further tolerance set,
    then each result's misses, tie-heavy rates and speed."""
    lines = [methods_table(results)]
    for tolerances in EXTRA_TOLERANCE_SETS:
        lines += tolerance_block(results, tolerances)
    for block in (misses_block, paired_rmse_block, tie_heavy_block, speed_block):
        for r in results:
            lines += block(r)
    return "\n".join(lines) + "\n"
