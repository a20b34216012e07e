"""The scale benchmark's result file: sizes merged into ``scale.json``, the machine, the build-time exponent,
and the Markdown beside it (:mod:`benchmarks.render`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.render import markdown
from benchmarks.scale_run import REPO

RESULT_VERSION = 1


def build_exponent(sizes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The slope of log(full build seconds) against log(templates) over the sizes that have both."""
    pts = [
        (s["stages"]["build"]["templates"], s["stages"]["build"]["seconds"])
        for s in sizes.values()
        if "build" in s.get("stages", {})
    ]
    if len(pts) < 2:
        return None
    n, t = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    slope, _ = np.polyfit(n, t, 1)
    return {"exponent": float(slope), "points": len(pts), "over": sorted(int(p[0]) for p in pts)}


def machine() -> dict[str, Any]:
    """CPUs, memory, platform, Python and the repository's commit (where git can tell)."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, ValueError):
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_gb"] = round(int(mem[1]) / 2**20, 1)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    return info


def merge_results(
    path: Path, new_sizes: dict[str, dict[str, Any]], workers: int, partial: bool = False
) -> dict[str, Any]:
    """The result file's content with ``new_sizes`` replacing sizes of the same label (others kept); with
    ``partial`` (a subset of the stages was run), only the stages run are replaced, each keeping the commit
    it was measured on."""
    old: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(ValueError):
            old = json.loads(path.read_text())
    sizes = dict(old.get("sizes") or {})
    commit = machine().get("commit")
    for label, size in new_sizes.items():
        for st in size.get("stages", {}).values():
            st.setdefault("commit", commit)
        if partial and label in sizes:
            merged = {**sizes[label], **{k: v for k, v in size.items() if k != "stages"}}
            merged["stages"] = {**sizes[label].get("stages", {}), **size.get("stages", {})}
            sizes[label] = merged
        else:
            sizes[label] = size
    return {
        "benchmark": "cspml-flows scale",
        "version": RESULT_VERSION,
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "sizes": sizes,
        "build_exponent": build_exponent(sizes),
    }


def write_results(out: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """``<out>.json`` and ``<out>.md`` (the Markdown rendered by :mod:`benchmarks.render`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    for path, text in zip(paths, (json.dumps(result, indent=1) + "\n", markdown(result)), strict=True):
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
            fh.write(text)
        Path(fh.name).replace(path)
    return paths
