"""The scale benchmark: what a user waits for, per pool size, through cspml-flows' public entry points.

``python -m benchmarks.scale --sizes 12k,27k,150k,1M --workers 2 --out benchmarks/results/scale`` writes
``scale.json`` and ``scale.md`` (the ``--out`` path with those suffixes). Sizes already in an existing
``scale.json`` and not run again are kept, so sizes can be run one at a time.

Per size, each stage runs in a fresh process (``python -m benchmarks.scale --stage ...``), so its wall time
includes what a new command pays and its memory is that stage's alone (the peak resident size of its largest
process, and the sampled sum of proportional set sizes over its processes):

- ``load``: real pools are imported with ``cspml import shared`` (CSV, CIF parsing, spglib); generated pools
  are copied from the store :mod:`benchmarks.pools` wrote, whose generation and ``TemplateStore.add`` rates
  are reported from its record;
- ``build``: ``TemplateIndex.open`` with no cache: full index build time, peak RSS, cache size on disk, the
  pool's prototype-cluster count;
- ``cold``: open the index, load the model, first prediction (``CSPPredictor``), in a new process;
- ``predict``: top-5 predictions with dedup for a fixed sample of compositions (reduced formulas of
  ``mp_20_biternary/test``), ``workers`` processes; a digest of the answers lets two runs be compared;
- ``add`` (100 and 1,000 templates): ``TemplateStore.add`` of generated templates the pool lacks, then the index update
  the next ``TemplateIndex.open`` does;
- ``campaign``: an EMT campaign round (``cspml campaign run``) on the pool: a first run (relaxations,
  promotions), then runs each after 100 templates from elsewhere were added (the round's retrieval runs
  again), until one relaxes nothing: that round's time is retrieval, index update, cached relaxations, hull
  and promotion;
- ``train`` (``--train``): ``cspml train`` on the pool.

The benchmark works in ``<root>/<size>/run`` (store copy, ``CSPML_HOME``, campaign, logs), never in the
repository. Predictions use the model shipped in the package (the run's home has no trained model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path("/tmp/cspml-scale")
DEFAULT_STAGES = ("load", "build", "cold", "predict", "add", "campaign")
ALL_STAGES = (*DEFAULT_STAGES, "train")
DEFAULT_ADDS = (100, 1000)  # templates added to the pool, one stage each
CAMPAIGN_ADD = 100  # templates from elsewhere added before each campaign run after the first
CAMPAIGN_TRIES = 3  # campaign runs after the first, at most, to reach a round that relaxes nothing
CAMPAIGN_COMPOSITIONS = ("CuAu", "Cu3Au", "AgPd", "NiAl", "PtNi")  # configs/campaign_emt.yaml
COLD_COMPOSITION = "SrTiO3"
RESULT_VERSION = 1


class BenchmarkError(Exception):
    """A stage that failed (its log names the reason)."""


# ---------------------------------------------------------------------------------------------- stages
# Each stage takes the run's context (JSON-ready) and returns a JSON-ready dict. They import cspml_flows
# inside, so that a stage process pays its imports within its own timing.


def _stage_load(ctx: dict[str, Any]) -> dict[str, Any]:
    """Import a real pool's shared files with ``cspml import shared`` into the run's store."""
    from cspml_flows.cli.main import main as cspml
    from cspml_flows.templates.store import TemplateStore

    argv = ["-q", "import", "shared", *ctx["files"], "--store", ctx["store"], "--workers", str(ctx["workers"])]
    t = time.perf_counter()
    code = cspml(argv)
    seconds = time.perf_counter() - t
    if code != 0:
        raise BenchmarkError(f"cspml import exited with {code}")
    with TemplateStore.open(ctx["store"], create=False) as ts:
        n = ts.count()
    return {"seconds": seconds, "templates": n, "per_s": n / seconds, "how": "cspml import shared (CSV, spglib)"}


def _cache_bytes(home: Path) -> int:
    """Bytes under the run's home: the caches a store's index (and retrieval) keep there (the run's home
    holds no store and no model)."""
    return sum(f.stat().st_size for f in home.rglob("*") if f.is_file()) if home.is_dir() else 0


def _stage_build(ctx: dict[str, Any]) -> dict[str, Any]:
    """Full index build: everything under the run's home removed (the index and other caches), then
    ``TemplateIndex.open``."""
    import numpy as np

    from cspml_flows.templates.index import TemplateIndex

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
        "cache_bytes": _cache_bytes(home),
    }


def _stage_open(ctx: dict[str, Any]) -> dict[str, Any]:
    """``TemplateIndex.open`` on whatever cache the home holds (after a store change: the index update)."""
    import numpy as np

    from cspml_flows.templates.index import TemplateIndex

    t = time.perf_counter()
    idx = TemplateIndex.open(ctx["store"], workers=ctx["workers"])
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "templates": len(idx),
        "clusters": len(np.unique(np.asarray(idx.cluster))),
        "cache_bytes": _cache_bytes(Path(ctx["home"])),
    }


def _stage_cold(ctx: dict[str, Any]) -> dict[str, Any]:
    """Imports, index, model and the first prediction in a new process, each timed."""
    t0 = time.perf_counter()
    from cspml_flows.core.config import model_path
    from cspml_flows.learning.model import SimilarityModel
    from cspml_flows.predict.predictor import CSPPredictor, freeze_gc
    from cspml_flows.templates.index import TemplateIndex

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
        "imports_s": t1 - t0,
        "index_s": t2 - t1,
        "model_s": t3 - t2,
        "first_prediction_s": t4 - t3,
        "composition": COLD_COMPOSITION,
        "candidates": len(preds[0].candidates),
        "model": str(model_path()),
    }


def _stage_predict(ctx: dict[str, Any]) -> dict[str, Any]:
    """Top-5 with dedup for the fixed compositions, after a warm-up on the first ten."""
    import hashlib

    from cspml_flows.predict.predictor import CSPPredictor

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


def _stage_add(ctx: dict[str, Any]) -> dict[str, Any]:
    """``TemplateStore.add`` of a slice of the reserve documents, stamped with the current time."""
    from cspml_flows.templates.store import TemplateStore

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


def _stage_campaign(ctx: dict[str, Any]) -> dict[str, Any]:
    """``cspml campaign run`` of the run's campaign file; the round's summary."""
    from cspml_flows.cli.main import main as cspml

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


def _stage_train(ctx: dict[str, Any]) -> dict[str, Any]:
    """``cspml train`` on the run's store (the model goes into the run folder, not the home), without the
    outcome labels an earlier training cached in the home."""
    from cspml_flows.cli.main import main as cspml

    shutil.rmtree(Path(ctx["home"]) / "outcomes", ignore_errors=True)
    model = Path(ctx["run"]) / "trained-model.json.gz"
    t = time.perf_counter()
    code = cspml(["-q", "train", "--store", ctx["store"], "--model", str(model), "--workers", str(ctx["workers"])])
    seconds = time.perf_counter() - t
    if code != 0:
        raise BenchmarkError(f"cspml train exited with {code}")
    return {"seconds": seconds, "model_bytes": model.stat().st_size}


STAGE_FUNCTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "load": _stage_load,
    "build": _stage_build,
    "open": _stage_open,
    "cold": _stage_cold,
    "predict": _stage_predict,
    "add": _stage_add,
    "campaign": _stage_campaign,
    "train": _stage_train,
}


# ---------------------------------------------------------------------------------------------- running
def _tree_pss(pid: int) -> int:
    """Proportional set size of a process and its descendants, in bytes (pages shared by forked workers
    counted once in all); resident size where PSS cannot be read; 0 when it is gone or psutil is missing."""
    try:
        import psutil

        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except Exception:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(Exception):
            try:
                total += p.memory_full_info().pss
            except (AttributeError, psutil.AccessDenied):
                total += p.memory_info().rss
    return total


def _own_peak_mb() -> float | None:
    """Peak resident size of this process (VmHWM, counted since its exec) and of the children it waited for
    (they are forks of it), in MB. A child's ``ru_maxrss`` seen from the parent would also count the
    parent's size at the fork that started it, which is why each stage measures itself."""
    import resource

    peak = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        peak = int(line.split()[1]) / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return max(peak or 0.0, children) or None


@contextlib.contextmanager
def _home_env(home: str) -> Iterator[None]:
    old = os.environ.get("CSPML_HOME")
    os.environ["CSPML_HOME"] = home
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CSPML_HOME", None)
        else:
            os.environ["CSPML_HOME"] = old


def run_stage(name: str, ctx: dict[str, Any], isolate: bool = True, log_name: str | None = None) -> dict[str, Any]:
    """Run one stage and return its result plus ``wall_s`` (the whole process), ``peak_rss_mb`` (the largest
    process of the stage, see :func:`_own_peak_mb`), ``tree_pss_mb`` (the largest sum of proportional set
    sizes over the stage's processes, sampled every 0.25 s) and the load average before it. ``isolate=False``
    runs it in this process (no memory figures; for tests)."""
    load = os.getloadavg()[0]
    if not isolate:
        t = time.perf_counter()
        with _home_env(ctx["home"]):
            out = STAGE_FUNCTIONS[name](ctx)
        return out | {"wall_s": time.perf_counter() - t, "peak_rss_mb": None, "tree_pss_mb": None, "load": load}
    run = Path(ctx["run"])
    logs = run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tag = log_name or name
    ctx_file, result_file, log_file = logs / f"{tag}.ctx.json", logs / f"{tag}.result.json", logs / f"{tag}.log"
    ctx_file.write_text(json.dumps(ctx))
    result_file.unlink(missing_ok=True)
    env = dict(os.environ)
    paths = [str(REPO), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env |= {"CSPML_HOME": ctx["home"], "PYTHONPATH": os.pathsep.join(paths)}
    if ctx.get("data_dir"):
        env["CSPML_DATA_DIR"] = ctx["data_dir"]  # the stage runs in the run folder, not beside the data
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `make` runs cspml
    env.pop("CSPML_CONFIG", None)
    argv = [sys.executable, "-m", "benchmarks.scale", "--stage", name, "--context", str(ctx_file)]
    argv += ["--result", str(result_file)]
    peak_tree = 0
    with log_file.open("w") as fh:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=run, env=env, stdout=fh, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_tree
            while not done.wait(0.25):
                peak_tree = max(peak_tree, _tree_pss(proc.pid))

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


def stage_main(name: str, ctx_file: Path, result_file: Path) -> int:
    """Entry point of a stage process: run the stage, write its result."""
    ctx = json.loads(ctx_file.read_text())
    result = STAGE_FUNCTIONS[name](ctx) | {"peak_rss_mb": _own_peak_mb()}
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_file)
    return 0


# ---------------------------------------------------------------------------------------------- a size
def query_formulas(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct reduced formulas of ``mp_20_biternary/test`` (a fixed sample for a seed)."""
    import numpy as np
    import pandas as pd

    from cspml_flows.core.composition import parse_composition
    from cspml_flows.core.config import data_dir

    df = pd.read_csv(data_dir() / "mp_20_biternary" / "test.csv.gz", usecols=["material_id", "cif", "pretty_formula"])
    formulas = sorted({parse_composition(f).reduced_formula for f in df["pretty_formula"]})
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(formulas), size=min(n, len(formulas)), replace=False)
    return [formulas[i] for i in sorted(pick)]


def campaign_file(run: Path, store: Path, workers: int, compositions: tuple[str, ...] = CAMPAIGN_COMPOSITIONS) -> Path:
    """The benchmark's EMT campaign (compositions and settings of configs/campaign_emt.yaml, one round)."""
    import yaml

    cfg = {
        "name": "scale_emt",
        "compositions": list(compositions),
        "top_k": 3,
        "calculator": {"name": "emt", "steps": 300, "fmax": 0.05, "batch_size": 25},
        "hull_threshold": 0.05,
        "rounds": 1,
        "max_references": 20,
        "model": "default",
        "stores": {"templates": str(store)},
        "workdir": str(run / "campaign"),
        "workers": workers,
    }
    path = run / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _pool_record(label: str, root: Path) -> dict[str, Any]:
    from benchmarks import pools

    m = pools.read_manifest(label, root) or {}
    keep = ("size", "n_real", "n_generated", "by_recipe", "n_failed", "wall_seconds", "add_seconds", "label_groups")
    out = {k: m[k] for k in keep if k in m}
    if m.get("n_generated") and m.get("wall_seconds"):
        out["generated_per_s"] = m["n_generated"] / m["wall_seconds"]
        out["seconds_per_10k"] = m["wall_seconds"] / m["n_generated"] * 10_000
    if m.get("n_generated") and m.get("add_seconds"):
        out["add_per_s"] = m["n_generated"] / m["add_seconds"]
    return out


def run_size(
    label: str,
    root: Path = DEFAULT_ROOT,
    workers: int = 2,
    stages: tuple[str, ...] = DEFAULT_STAGES,
    queries: int = 1000,
    seed: int = 0,
    isolate: bool = True,
    adds: tuple[int, ...] = DEFAULT_ADDS,
    campaign_add: int = CAMPAIGN_ADD,
    compositions: tuple[str, ...] = CAMPAIGN_COMPOSITIONS,
    note: str | None = None,
    log_fn: Callable[[str], None] = print,
    keep_run: bool = False,
) -> dict[str, Any]:
    """Every requested stage for one pool size; the size's result. ``adds``: the sizes of the add stages;
    ``campaign_add``: templates added before the measured campaign round; ``compositions``: the campaign's.
    ``keep_run``: run the stages in the size's run folder as an earlier run left it (its store, index and
    reserve; stages that need no build), instead of a fresh copy of the pool."""
    from benchmarks import pools

    spec = pools.pool_spec(label)
    folder = pools.pool_dir(label, root)
    run = folder / "run"
    kept = keep_run and (run / "store").is_dir() and (run / "reserve.json").is_file() and "build" not in stages
    if keep_run and not kept:
        raise BenchmarkError(f"--keep-run: {run} holds no earlier run to continue (or a build was asked for)")
    if run.exists() and not kept:
        shutil.rmtree(run)
    (run / "home").mkdir(parents=True, exist_ok=True)
    store = run / "store"
    from cspml_flows.core.config import data_dir

    ctx: dict[str, Any] = {"run": str(run), "home": str(run / "home"), "store": str(store), "workers": workers}
    ctx["data_dir"] = str(data_dir())
    import cspml_flows

    result: dict[str, Any] = {"label": label, "generated": spec.generated, "workers": workers, "stages": {}}
    result["code"] = {"cspml_flows": str(Path(cspml_flows.__file__).parent), "note": note}
    st = result["stages"]

    def stage(key: str, name: str, **extra: Any) -> dict[str, Any]:
        log_fn(f"{label}: {key} ...")
        st[key] = run_stage(name, ctx | extra, isolate, log_name=key)
        shown = {k: v for k, v in st[key].items() if isinstance(v, int | float) and k != "load"}
        log_fn(f"{label}: {key} " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        return st[key]

    if not (pools.read_manifest(pools.UNION, root) or {}).get("complete"):
        log_fn(f"{label}: building the union pool first (its structures are the generator's parents)")
        pools.build_pool(pools.UNION, root, seed, workers, log_fn)
    if kept:
        result["pool"] = _pool_record(label, root) if spec.generated else {"files": list(spec.files)}
    elif spec.generated:
        if not (pools.read_manifest(label, root) or {}).get("complete"):
            raise BenchmarkError(f"pool {label} is not generated yet: python -m benchmarks.pools --size {label}")
        pools.check_pool_schema(label, root)
        result["pool"] = _pool_record(label, root)
        t = time.perf_counter()
        shutil.copytree(pools.store_path(label, root), store, ignore=shutil.ignore_patterns("*.lock"))
        result["copy_s"] = time.perf_counter() - t
    else:
        result["pool"] = {"files": list(spec.files)}
    t = time.perf_counter()
    reserve = run / "reserve.json"
    qfile = run / "queries.json"
    if not kept:
        n_reserve = sum(adds) + CAMPAIGN_TRIES * campaign_add
        reserve.write_text(json.dumps(pools.reserve_docs(label, n_reserve, root, seed, workers)))
        qfile.write_text(json.dumps(query_formulas(queries, seed)))
        log_fn(f"{label}: reserve templates and queries prepared in {time.perf_counter() - t:.0f} s")

    if kept:
        log_fn(f"{label}: continuing the run in {run}")
    elif "load" in stages and not spec.generated:
        stage("load", "load", files=list(spec.files))
    elif not spec.generated:
        pools.import_real_pool(label, store, workers, log_fn)
    if "build" in stages:
        b = stage("build", "build")
        result["templates"], result["clusters"] = b["templates"], b["clusters"]
    if "cold" in stages:
        stage("cold", "cold")
    if "predict" in stages:
        stage("predict", "predict", queries=str(qfile))
    lo = 0
    for n in adds if "add" in stages else ():
        key = f"add{n}"
        a = stage(f"{key}.store", "add", reserve=str(reserve), slice=(lo, lo + n))
        o = stage(f"{key}.open", "open")
        st[key] = {"store_s": a["seconds"], "open_s": o["seconds"], "total_s": a["seconds"] + o["seconds"]}
        lo += n
    if "campaign" in stages:
        cfile = campaign_file(run, store, workers, compositions)
        stage("campaign.first", "campaign", campaign=str(cfile), tag="first")
        # Templates from elsewhere make the next run redo the round's retrieval. Its promoted templates give
        # the round new candidates once or twice: the measured round is the first run that relaxes nothing.
        for attempt in range(1, CAMPAIGN_TRIES + 1):
            lo = sum(adds) + (attempt - 1) * campaign_add
            stage(f"campaign.add{attempt}", "add", reserve=str(reserve), slice=(lo, lo + campaign_add))
            r = stage(f"campaign.run{attempt}", "campaign", campaign=str(cfile), tag=f"run{attempt}")
            if r["relaxed"] == 0:
                break
        st["campaign.round"] = r | {"runs": attempt}
    if "train" in stages:
        stage("train", "train")
    return result


# ---------------------------------------------------------------------------------------------- results
def build_exponent(sizes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The slope of log(full build seconds) against log(templates) over the sizes that have both."""
    import numpy as np

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
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, ValueError):
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_gb"] = round(int(mem[1]) / 2**20, 1)
    with contextlib.suppress(Exception):
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
    from benchmarks.render import markdown

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    for path, text in zip(paths, (json.dumps(result, indent=1) + "\n", markdown(result)), strict=True):
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
            fh.write(text)
        Path(fh.name).replace(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="12k,27k", help="comma-separated pool sizes: 12k, 27k, 150k, 1M, ...")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="pools and run folders: <root>/<size>/")
    p.add_argument("--queries", type=int, default=1000, help="compositions of the prediction-rate stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", action="store_true", help="also time 'cspml train' (long)")
    p.add_argument("--stages", help=f"comma-separated subset of {', '.join(ALL_STAGES)}")
    p.add_argument("--note", help="a note on the code measured, kept with each size's result")
    p.add_argument(
        "--keep-run", action="store_true", help="continue in the sizes' run folders (stages that need no build)"
    )
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        return stage_main(args.stage, args.context, args.result)
    stages = tuple(args.stages.split(",")) if args.stages else DEFAULT_STAGES + (("train",) if args.train else ())
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}")
    root = args.root.expanduser().resolve()
    if root == REPO or REPO in root.parents:
        p.error(f"--root {root} is inside the repository")
    sizes = {}
    for label in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        sizes[label] = run_size(
            label, root, args.workers, stages, args.queries, args.seed, note=args.note, keep_run=args.keep_run
        )
        result = merge_results(
            args.out.with_name(args.out.name + ".json"), sizes, args.workers, partial=bool(args.stages)
        )
        paths = write_results(args.out, result)  # after each size: a later failure keeps the finished ones
        print(f"{label}: written to {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
