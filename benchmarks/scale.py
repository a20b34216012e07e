"""The scale benchmark: what a user waits for, per pool size, through cspml-flows' public entry points.

``python -m benchmarks.scale --sizes 12k,27k,150k,1M --workers 2 --out benchmarks/results/scale`` writes
``scale.json`` and ``scale.md`` (the ``--out`` path with those suffixes). Sizes already in an existing
``scale.json`` and not run again are kept, so sizes can be run one at a time.

Per size, each stage runs in a fresh process (``python -m benchmarks.stages ...``, :mod:`benchmarks.stages`), so
its wall time includes what a new command pays and its memory is that stage's alone (the peak resident size of
its largest process, and the sampled sum of proportional set sizes over its processes):

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
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

import cspml_flows
from benchmarks import pools
from benchmarks.logs import configure_logging
from benchmarks.scale_results import merge_results, write_results
from benchmarks.scale_run import REPO, run_stage
from benchmarks.stages import BenchmarkError
from cspml_flows.core.composition import parse_composition
from cspml_flows.core.config import data_dir

logger = logging.getLogger(__name__)
DEFAULT_ROOT = pools.DEFAULT_ROOT
DEFAULT_STAGES = ("load", "build", "cold", "predict", "add", "campaign")
ALL_STAGES = (*DEFAULT_STAGES, "train")
DEFAULT_ADDS = (100, 1000)  # templates added to the pool, one stage each
CAMPAIGN_ADD = 100  # templates from elsewhere added before each campaign run after the first
CAMPAIGN_TRIES = 3  # campaign runs after the first, at most, to reach a round that relaxes nothing
CAMPAIGN_COMPOSITIONS = ("CuAu", "Cu3Au", "AgPd", "NiAl", "PtNi")  # configs/campaign_emt.yaml


@dataclass
class SizeOptions:
    """How one pool size is run: workers, stages, sample sizes, where the run starts from."""

    workers: int = 2
    stages: tuple[str, ...] = DEFAULT_STAGES
    queries: int = 1000  # compositions of the prediction-rate stage
    seed: int = 0
    isolate: bool = True  # each stage in its own process (False: in this one, without memory figures)
    adds: tuple[int, ...] = DEFAULT_ADDS  # the sizes of the add stages
    campaign_add: int = CAMPAIGN_ADD  # templates added before the measured campaign round
    compositions: tuple[str, ...] = CAMPAIGN_COMPOSITIONS  # the campaign's
    note: str | None = None  # a note on the code measured
    keep_run: bool = False  # continue in the size's run folder as an earlier run left it


def query_formulas(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct reduced formulas of ``mp_20_biternary/test`` (a fixed sample for a seed)."""
    df = pd.read_csv(data_dir() / "mp_20_biternary" / "test.csv.gz", usecols=["material_id", "cif", "pretty_formula"])
    formulas = sorted({parse_composition(f).reduced_formula for f in df["pretty_formula"]})
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(formulas), size=min(n, len(formulas)), replace=False)
    return [formulas[i] for i in sorted(pick)]


def campaign_file(run: Path, store: Path, workers: int, compositions: tuple[str, ...] = CAMPAIGN_COMPOSITIONS) -> Path:
    """The benchmark's EMT campaign (compositions and settings of configs/campaign_emt.yaml, one round)."""
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


def pool_record(label: str, root: Path) -> dict[str, Any]:
    """What the pool's manifest says about its generation: counts, rates, prototype label groups."""
    m = pools.read_manifest(label, root) or {}
    keep = ("size", "n_real", "n_generated", "by_recipe", "n_failed", "wall_seconds", "add_seconds", "label_groups")
    out = {k: m[k] for k in keep if k in m}
    if m.get("n_generated") and m.get("wall_seconds"):
        out["generated_per_s"] = m["n_generated"] / m["wall_seconds"]
        out["seconds_per_10k"] = m["wall_seconds"] / m["n_generated"] * 10_000
    if m.get("n_generated") and m.get("add_seconds"):
        out["add_per_s"] = m["n_generated"] / m["add_seconds"]
    return out


class SizeRun:
    """The stages of one pool size in ``<root>/<size>/run``; :meth:`run` returns the size's result."""

    def __init__(self, label: str, root: Path, opts: SizeOptions):
        self.label, self.root, self.opts = label, root, opts
        self.spec = pools.pool_spec(label)
        self.run_dir = pools.pool_dir(label, root) / "run"
        self.store = self.run_dir / "store"
        self.reserve = self.run_dir / "reserve.json"
        self.queries = self.run_dir / "queries.json"
        self.kept = opts.keep_run and self.store.is_dir() and self.reserve.is_file() and "build" not in opts.stages
        self.ctx: dict[str, Any] = {
            "run": str(self.run_dir),
            "home": str(self.run_dir / "home"),
            "store": str(self.store),
            "workers": opts.workers,
            "data_dir": str(data_dir()),
        }
        self.result: dict[str, Any] = {
            "label": label,
            "generated": self.spec.generated,
            "workers": opts.workers,
            "stages": {},
            "code": {"cspml_flows": str(Path(cspml_flows.__file__).parent), "note": opts.note},
        }

    def stage(self, key: str, name: str, **extra: Any) -> dict[str, Any]:
        """Run stage ``name`` as ``key`` of the result; logs its figures."""
        logger.info("%s: %s ...", self.label, key)
        st = self.result["stages"]
        st[key] = run_stage(name, self.ctx | extra, self.opts.isolate, log_name=key)
        shown = {k: v for k, v in st[key].items() if isinstance(v, int | float) and k != "load"}
        logger.info("%s: %s %s", self.label, key, ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        return st[key]

    def prepare(self) -> None:
        """A fresh run folder with the pool's store (generated pools), reserve templates and queries."""
        if self.opts.keep_run and not self.kept:
            raise BenchmarkError(
                f"--keep-run: {self.run_dir} holds no earlier run to continue (or a build was asked for)"
            )
        if self.run_dir.exists() and not self.kept:
            shutil.rmtree(self.run_dir)
        (self.run_dir / "home").mkdir(parents=True, exist_ok=True)
        label, root, opts = self.label, self.root, self.opts
        if not (pools.read_manifest(pools.UNION, root) or {}).get("complete"):
            logger.info("%s: building the union pool first (its structures are the generator's parents)", label)
            pools.build_pool(pools.UNION, root, opts.seed, opts.workers)
        self.result["pool"] = pool_record(label, root) if self.spec.generated else {"files": list(self.spec.files)}
        if self.kept:
            return
        if self.spec.generated:
            if not (pools.read_manifest(label, root) or {}).get("complete"):
                raise BenchmarkError(f"pool {label} is not generated yet: python -m benchmarks.pools --size {label}")
            pools.check_pool_schema(label, root)
            t = time.perf_counter()
            shutil.copytree(pools.store_path(label, root), self.store, ignore=shutil.ignore_patterns("*.lock"))
            self.result["copy_s"] = time.perf_counter() - t
        t = time.perf_counter()
        n_reserve = sum(opts.adds) + CAMPAIGN_TRIES * opts.campaign_add
        self.reserve.write_text(json.dumps(pools.reserve_docs(label, n_reserve, root, opts.seed, opts.workers)))
        self.queries.write_text(json.dumps(query_formulas(opts.queries, opts.seed)))
        logger.info("%s: reserve templates and queries prepared in %.0f s", label, time.perf_counter() - t)

    def adds(self) -> None:
        """One ``add`` stage per size in ``opts.adds``, each followed by the index update (``open``)."""
        lo = 0
        for n in self.opts.adds:
            key = f"add{n}"
            a = self.stage(f"{key}.store", "add", reserve=str(self.reserve), slice=(lo, lo + n))
            o = self.stage(f"{key}.open", "open")
            self.result["stages"][key] = {
                "store_s": a["seconds"],
                "open_s": o["seconds"],
                "total_s": a["seconds"] + o["seconds"],
            }
            lo += n

    def campaign(self) -> None:
        """A first campaign run, then runs after templates from elsewhere were added, until a round that
        relaxes nothing: that round is the measured one."""
        cfile = campaign_file(self.run_dir, self.store, self.opts.workers, self.opts.compositions)
        self.stage("campaign.first", "campaign", campaign=str(cfile), tag="first")
        # Templates from elsewhere make the next run redo the round's retrieval. Its promoted templates give
        # the round new candidates once or twice: the measured round is the first run that relaxes nothing.
        for attempt in range(1, CAMPAIGN_TRIES + 1):
            lo = sum(self.opts.adds) + (attempt - 1) * self.opts.campaign_add
            self.stage(
                f"campaign.add{attempt}", "add", reserve=str(self.reserve), slice=(lo, lo + self.opts.campaign_add)
            )
            r = self.stage(f"campaign.run{attempt}", "campaign", campaign=str(cfile), tag=f"run{attempt}")
            if r["relaxed"] == 0:
                break
        self.result["stages"]["campaign.round"] = r | {"runs": attempt}

    def run(self) -> dict[str, Any]:
        """Every requested stage, in order; the size's result."""
        self.prepare()
        stages = self.opts.stages
        if self.kept:
            logger.info("%s: continuing the run in %s", self.label, self.run_dir)
        elif "load" in stages and not self.spec.generated:
            self.stage("load", "load", files=list(self.spec.files))
        elif not self.spec.generated:
            pools.import_real_pool(self.label, self.store, self.opts.workers)
        if "build" in stages:
            b = self.stage("build", "build")
            self.result["templates"], self.result["clusters"] = b["templates"], b["clusters"]
        if "cold" in stages:
            self.stage("cold", "cold")
        if "predict" in stages:
            self.stage("predict", "predict", queries=str(self.queries))
        if "add" in stages:
            self.adds()
        if "campaign" in stages:
            self.campaign()
        if "train" in stages:
            self.stage("train", "train")
        return self.result


def run_size(label: str, root: Path = DEFAULT_ROOT, opts: SizeOptions | None = None) -> dict[str, Any]:
    """Every requested stage for one pool size (:class:`SizeOptions`); the size's result."""
    return SizeRun(label, root, opts or SizeOptions()).run()


def main(argv: list[str] | None = None) -> int:
    """Run the sizes one after the other; the result file is rewritten after each."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    args = p.parse_args(argv)
    configure_logging()
    stages = tuple(args.stages.split(",")) if args.stages else DEFAULT_STAGES + (("train",) if args.train else ())
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}")
    root = args.root.expanduser().resolve()
    if root == REPO or REPO in root.parents:
        p.error(f"--root {root} is inside the repository")
    sizes = {}
    for label in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        opts = SizeOptions(args.workers, stages, args.queries, args.seed, note=args.note, keep_run=args.keep_run)
        sizes[label] = run_size(label, root, opts)
        result = merge_results(
            args.out.with_name(args.out.name + ".json"), sizes, args.workers, partial=bool(args.stages)
        )
        paths = write_results(args.out, result)  # after each size: a later failure keeps the finished ones
        print(f"{label}: written to {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
