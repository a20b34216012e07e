"""Relaxation benchmark: the top-k candidates of benchmark queries relaxed through the flow machinery
(``relax_flow`` run with jobflow, results store on disk) and by a plain ASE loop over the same structures with
the same calculator, optimizer and criteria. Reports candidates/min, the orchestration overhead, and how often
the relaxed top-1 matches the ground truth compared with the unrelaxed top-1.

The two methods alternate chunk by chunk so that load from other processes hits both alike.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from jobflow import JobStore, run_locally
from maggma.stores import MemoryStore
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from benchmarks.config import BenchmarkConfig
from benchmarks.csp_model import benchmark_model
from benchmarks.protocols import formula_from_cif, load_queries, pool_index, query_structures
from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.schemas import RelaxOutput
from cspml_flows.core.tables import markdown_table
from cspml_flows.flows.calculators import CalculatorSettings, relax_maker
from cspml_flows.flows.relax import relax_flow
from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.templates.store import TemplateStore

logger = logging.getLogger(__name__)


@dataclass
class RelaxBenchmarkConfig:
    """Settings of one relaxation benchmark (the ``relax-flow`` command's options)."""

    protocol: str = "mp20bt"
    queries: int = 100
    top: int = 5
    calculator: str = "chgnet"
    steps: int = 300
    fmax: float = 0.05
    seed: int = 0
    workers: int = 2
    out: str = "out/bench/relax"
    chunk: int = 5
    pool: str | None = None  # an existing pool store folder (default: import it under $CSPML_HOME)


def plain_ase_relax(calculator, structure: Structure, steps: int, fmax: float) -> tuple[Structure | None, float | None]:
    """The baseline: ASE FIRE on a FrechetCellFilter, no jobflow, no store; ``(None, None)`` on failure."""
    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = calculator
    try:
        opt = FIRE(FrechetCellFilter(atoms), logfile=None)
        opt.run(fmax=fmax, steps=steps)
        return AseAtomsAdaptor.get_structure(atoms), float(atoms.get_potential_energy())
    except Exception:  # any failure of the potential or optimizer on a candidate is a failed relaxation
        logger.warning("plain ASE relaxation of %s failed", structure.composition.reduced_formula, exc_info=True)
        return None, None


def matches(gt: Structure, s: Structure | None) -> bool:
    """Whether ``s`` matches ``gt`` under the CSP matcher (``StructureMatcher.get_rms_dist`` finds a match)."""
    if s is None:
        return False
    matcher = Matcher()
    return matcher.rms(s, matcher.reduce(gt)) is not None


def run_relax_benchmark(cfg: RelaxBenchmarkConfig) -> dict[str, Any]:
    """Predict the top-k candidates of a query sample with the benchmark's model, then
    :func:`compare_relaxations`."""
    t0 = time.perf_counter()
    store = TemplateStore.open(cfg.pool, create=False) if cfg.pool else None
    index = pool_index(cfg.protocol, workers=cfg.workers, store=store)
    full = load_queries(cfg.protocol)
    q = load_queries(cfg.protocol, limit=cfg.queries, seed=cfg.seed)
    gts = query_structures(cfg.protocol, q.material_ids, q.cifs, cfg.workers)
    formulas = [formula_from_cif(c) for c in full.cifs]
    model, _ = benchmark_model(index, full.material_ids, formulas, BenchmarkConfig(protocol=cfg.protocol))
    preds = CSPPredictor(index, model).predict(
        [g.composition for g in gts], top=cfg.top, exclude_ids=[{m} for m in q.material_ids]
    )
    logger.info("setup %.0f s: %d candidates", time.perf_counter() - t0, sum(len(p.candidates) for p in preds))

    settings = CalculatorSettings(name=cfg.calculator, steps=cfg.steps, fmax=cfg.fmax, batch_size=10**6)
    candidates = [[c.structure for c in p.candidates] for p in preds]
    return compare_relaxations(candidates, gts, settings, cfg)


def compare_relaxations(
    candidates: list[list[Structure]],
    ground_truths: list[Structure],
    settings: CalculatorSettings,
    cfg: RelaxBenchmarkConfig,
) -> dict[str, Any]:
    """Relax each query's ranked candidates by the plain ASE loop and through ``relax_flow``, chunk by chunk,
    and score both against the ground truths. Writes the JSON/Markdown report after every chunk."""
    if len(candidates) != len(ground_truths):
        raise ValueError(f"{len(candidates)} candidate lists for {len(ground_truths)} ground truths")
    maker = relax_maker(settings)
    calc = maker.calculator  # the plain loop uses the same calculator object type, loaded once
    work = Path(tempfile.mkdtemp(prefix="cspml-relax-bench-"))
    results_uri = str(work / "results")
    job_store = JobStore(MemoryStore())
    t_plain = t_flow = 0.0
    n_struct = 0
    energy_diff: list[float] = []
    hits: dict[str, list[bool]] = {"unrelaxed_top1": [], "relaxed_top1": [], "unrelaxed_topk": [], "relaxed_topk": []}
    result: dict[str, Any] = {}
    for start in range(0, len(candidates), cfg.chunk):
        chunk = candidates[start : start + cfg.chunk]
        structs = [s for cands in chunk for s in cands]
        n_struct += len(structs)
        t = time.perf_counter()
        plain = [plain_ase_relax(calc, s, settings.steps, settings.fmax) for s in structs]
        t_plain += time.perf_counter() - t
        t = time.perf_counter()
        flow = relax_flow([{"structure": s.as_dict()} for s in structs], settings, results_uri, "bench")
        run_locally(flow, store=job_store, create_folders=False, log=False)
        out = RelaxOutput.coerce(flow.output.resolve(job_store))
        t_flow += time.perf_counter() - t
        flow_structs = [r.structure for r in out.records]
        for (_, e_plain), r in zip(plain, out.records, strict=True):
            if e_plain is not None and r.energy is not None:
                energy_diff.append(abs(e_plain - r.energy) / max(r.nsites, 1))
        i = 0
        for gt, cands in zip(ground_truths[start : start + cfg.chunk], chunk, strict=True):
            relaxed = flow_structs[i : i + len(cands)]
            i += len(cands)
            hits["unrelaxed_top1"].append(bool(cands) and matches(gt, cands[0]))
            hits["relaxed_top1"].append(bool(relaxed) and matches(gt, relaxed[0]))
            hits["unrelaxed_topk"].append(any(matches(gt, c) for c in cands))
            hits["relaxed_topk"].append(any(matches(gt, s) for s in relaxed))
        done = start + len(chunk)
        logger.info("%d/%d queries: plain %.0f s, flow %.0f s", done, len(candidates), t_plain, t_flow)
        result = _result(cfg, settings.calc_id, done, n_struct, t_plain, t_flow, energy_diff, hits)
        _write(result, cfg)  # after every chunk: a run cut short still leaves its numbers
    return result


def _write(result: dict[str, Any], cfg: RelaxBenchmarkConfig) -> None:
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "relax_benchmark.json").write_text(json.dumps(result, indent=2))
    (out_dir / "relax_benchmark.md").write_text(result["markdown"] + "\n")


def _result(
    cfg: RelaxBenchmarkConfig,
    calc_id: str,
    n_queries: int,
    n_struct: int,
    t_plain: float,
    t_flow: float,
    energy_diff: list[float],
    hits: dict[str, list[bool]],
) -> dict[str, Any]:
    def rate(hit: list[bool]) -> float:
        return float(np.mean(hit)) if hit else float("nan")

    result = {
        "config": asdict(cfg),
        "calculator_id": calc_id,
        "n_queries": n_queries,
        "n_structures": n_struct,
        "plain_seconds": t_plain,
        "flow_seconds": t_flow,
        "plain_candidates_per_min": 60 * n_struct / t_plain if t_plain else float("nan"),
        "flow_candidates_per_min": 60 * n_struct / t_flow if t_flow else float("nan"),
        "overhead_fraction": (t_flow - t_plain) / t_plain if t_plain else float("nan"),
        "max_energy_difference_eV_per_atom": max(energy_diff) if energy_diff else float("nan"),
        "unrelaxed_top1": rate(hits["unrelaxed_top1"]),
        "relaxed_top1": rate(hits["relaxed_top1"]),
        f"unrelaxed_top{cfg.top}": rate(hits["unrelaxed_topk"]),
        f"relaxed_top{cfg.top}": rate(hits["relaxed_topk"]),
    }
    result["markdown"] = markdown(result, cfg)
    return result


def markdown(r: dict[str, Any], cfg: RelaxBenchmarkConfig) -> str:
    """The result as a one-row Markdown table: throughput of both methods, overhead, match rates."""
    k = cfg.top
    header = [
        "queries",
        "structures",
        "calculator",
        "plain ASE (cand/min)",
        "flow (cand/min)",
        "overhead",
        "top-1 unrelaxed",
        "top-1 relaxed",
        f"top-{k} unrelaxed",
        f"top-{k} relaxed",
    ]
    row = [
        r["n_queries"],
        r["n_structures"],
        cfg.calculator,
        f"{r['plain_candidates_per_min']:.1f}",
        f"{r['flow_candidates_per_min']:.1f}",
        f"{100 * r['overhead_fraction']:+.1f} %",
        f"{r['unrelaxed_top1']:.3f}",
        f"{r['relaxed_top1']:.3f}",
        f"{r[f'unrelaxed_top{k}']:.3f}",
        f"{r[f'relaxed_top{k}']:.3f}",
    ]
    return markdown_table(header, [row], align="rrlrrrrrrr")
