"""Running one scale-benchmark stage in a fresh process and measuring it: wall time, the peak resident size
the stage reports for itself, and the sum of proportional set sizes over its processes, sampled."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from benchmarks.stages import BenchmarkError, stage_function

REPO = Path(__file__).resolve().parents[1]


def tree_pss(pid: int) -> int:
    """Proportional set size of a process and its descendants, in bytes (pages shared by forked workers
    counted once in all); resident size where PSS cannot be read; 0 when it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a process that ended between the listing and the reading
            try:
                total += p.memory_full_info().pss
            except (AttributeError, psutil.AccessDenied):
                total += p.memory_info().rss
    return total


@contextlib.contextmanager
def home_env(home: str) -> Iterator[None]:
    """``CSPML_HOME`` set to ``home`` within the block (the earlier value restored after it)."""
    old = os.environ.get("CSPML_HOME")
    os.environ["CSPML_HOME"] = home
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CSPML_HOME", None)
        else:
            os.environ["CSPML_HOME"] = old


def stage_env(ctx: dict[str, Any]) -> dict[str, str]:
    """The stage process's environment: the repository importable, the run's home and data folder."""
    env = dict(os.environ)
    paths = [str(REPO), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env |= {"CSPML_HOME": ctx["home"], "PYTHONPATH": os.pathsep.join(paths)}
    if ctx.get("data_dir"):
        env["CSPML_DATA_DIR"] = ctx["data_dir"]  # the stage runs in the run folder, not beside the data
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `make` runs cspml
    env.pop("CSPML_CONFIG", None)
    return env


def run_in_process(name: str, ctx: dict[str, Any], load: float) -> dict[str, Any]:
    """The stage in this process (no memory figures; for tests)."""
    t = time.perf_counter()
    with home_env(ctx["home"]):
        fn, imports_s = stage_function(name)
        out = fn(ctx | {"imports_s": imports_s})
    return out | {"wall_s": time.perf_counter() - t, "peak_rss_mb": None, "tree_pss_mb": None, "load": load}


def run_stage(name: str, ctx: dict[str, Any], isolate: bool = True, log_name: str | None = None) -> dict[str, Any]:
    """Run one stage and return its result plus ``wall_s`` (the whole process), ``peak_rss_mb`` (the largest
    process of the stage, as the stage process reports it), ``tree_pss_mb`` (the largest sum of proportional
    set sizes over the stage's processes, sampled every 0.25 s) and the load average before it.
    ``isolate=False`` runs it in this process (no memory figures; for tests)."""
    load = os.getloadavg()[0]
    if not isolate:
        return run_in_process(name, ctx, load)
    logs = Path(ctx["run"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tag = log_name or name
    ctx_file, result_file, log_file = logs / f"{tag}.ctx.json", logs / f"{tag}.result.json", logs / f"{tag}.log"
    ctx_file.write_text(json.dumps(ctx))
    result_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "benchmarks.stages", name, "--context", str(ctx_file), "--result", str(result_file)]
    peak_tree = 0
    with log_file.open("w") as fh:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ctx["run"], env=stage_env(ctx), stdout=fh, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_tree
            while not done.wait(0.25):
                peak_tree = max(peak_tree, tree_pss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - t
        done.set()
        sampler.join()
    if proc.returncode != 0 or not result_file.is_file():
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise BenchmarkError(f"stage {tag} exited with {proc.returncode}: {tail[0][:300]} (log {log_file})")
    out = json.loads(result_file.read_text())
    return out | {"wall_s": wall, "tree_pss_mb": peak_tree / 2**20 or None, "load": load}
