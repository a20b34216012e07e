"""How well a substituted cell's volume predicts the crystal's: element volumes of the pure elements against
volumes learned from the pool (:mod:`cspml_flows.templates.volumes`).

Two measurements, each for the template's cell unscaled, rescaled by the pure elements' volumes, and
rescaled by the learned ones (|ln(predicted / true volume per atom)|, median, mean and the shares within
5 % and 10 %):

* pool pairs: two templates of one prototype cluster and different formulas, one predicting the other's
  volume; the volumes are learned on the formulas of one hash fold and scored on pairs whose target sits in
  the other fold (both directions);
* the protocol's queries: the engine's top-1 candidate of each query (strict setting: no template of the
  query's formula) against the query's structure, the volumes learned on the pool without any query formula.

The learned volumes only set the cell volume: the CSP match rates do not change, since ``StructureMatcher``
scales both structures to one volume before comparing.

``python -m benchmarks.volumes --protocol mp20bt --limit 1000 --json out.json``
"""

from __future__ import annotations

import logging
import sys
import time
import zlib
from typing import Any

import numpy as np
from pymatgen.core import Element

from benchmarks.config import BenchmarkConfig
from benchmarks.csp_model import benchmark_model
from benchmarks.protocols import formula_from_cif, load_queries, pool_index, query_structures
from benchmarks.study_cli import run_study, study_parser
from cspml_flows.core.descriptors import elemental_volumes
from cspml_flows.core.tables import markdown_table
from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.volumes import fit_element_volumes, volume_rows

logger = logging.getLogger(__name__)

PAIRS_PER_CLUSTER = 5  # targets per prototype cluster and fold direction
METHODS = ("template cell unscaled", "pure-element volumes", "learned volumes")


def log_errors(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Median and mean |ln(predicted / true)| and the shares within 5 % and 10 % (finite pairs only)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.abs(np.log(predicted / true))
    e = e[np.isfinite(e)]
    return {
        "n": len(e),
        "median_abs_log": float(np.median(e)) if len(e) else float("nan"),
        "mean_abs_log": float(e.mean()) if len(e) else float("nan"),
        "within_5pct": float(np.mean(e < np.log(1.05))) if len(e) else float("nan"),
        "within_10pct": float(np.mean(e < np.log(1.10))) if len(e) else float("nan"),
    }


def scaled(x_query: np.ndarray, x_template: np.ndarray, v_template: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Template volumes per atom rescaled by the ratio of the composition-weighted element volumes (unscaled
    where an element has none, as :func:`cspml_flows.predict.substitute.volume_scale`)."""
    known = np.isfinite(table)
    t = np.where(known, table, 0.0)
    unknown = ((x_query > 0) | (x_template > 0)) @ ~known > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (x_query @ t) / (x_template @ t)
    return v_template * np.where(np.isfinite(ratio) & (ratio > 0) & ~unknown, ratio, 1.0)


def pool_pairs(index: TemplateIndex, seed: int = 0) -> dict[str, dict[str, float]]:
    """Same-cluster template pairs of different formulas across two formula folds (see the module doc)."""
    x, vpa = volume_rows(index, np.arange(len(index)))
    fold = np.array([zlib.crc32(f.encode()) % 2 for f in index.formulas.tolist()])
    rng = np.random.default_rng(seed)
    preds: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    truth = []
    for train in (0, 1):
        learned = fit_element_volumes(index.subset(fold == train))
        targets, sources = [], []
        for members in _clusters(index):
            a, b = members[fold[members] == train], members[fold[members] != train]
            for q in b[:PAIRS_PER_CLUSTER]:
                other = a[index.formulas[a] != index.formulas[q]]
                if len(other):
                    targets.append(q)
                    sources.append(rng.choice(other))
        q, t = np.array(targets, dtype=np.int64), np.array(sources, dtype=np.int64)
        truth.append(vpa[q])
        preds[METHODS[0]].append(vpa[t])
        preds[METHODS[1]].append(scaled(x[q], x[t], vpa[t], elemental_volumes()))
        preds[METHODS[2]].append(scaled(x[q], x[t], vpa[t], learned))
    true = np.concatenate(truth)
    return {m: log_errors(np.concatenate(p), true) for m, p in preds.items()}


def _clusters(index: TemplateIndex) -> list[np.ndarray]:
    order = np.argsort(index.cluster, kind="stable")
    cuts = np.flatnonzero(np.diff(index.cluster[order])) + 1
    return np.split(order, cuts)


def query_top1(
    protocol: str, limit: int | None, seed: int, workers: int
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The engine's strict top-1 candidate of each query against the query's volume per atom."""
    index = pool_index(protocol, workers=workers)
    full = load_queries(protocol)
    index = index.subset(~np.isin(index.ids, full.material_ids))
    q = load_queries(protocol, limit=limit, seed=seed)
    gts = query_structures(protocol, q.material_ids, q.cifs, workers)
    formulas = [formula_from_cif(c) for c in full.cifs]
    cfg = BenchmarkConfig(protocol=protocol, setting="strict", limit=limit, workers=workers, seed=seed)
    model, _ = benchmark_model(index, full.material_ids, formulas, cfg)
    learned = fit_element_volumes(index.subset(~np.isin(index.formulas, formulas)))
    predictor = CSPPredictor(index, model, workers=workers)
    preds = predictor.predict(
        [g.composition for g in gts], top=1, exclude_ids=[{m} for m in q.material_ids], strict=True
    )
    row_of = {mid: k for k, mid in enumerate(index.ids.tolist())}
    picked = [(k, p.candidates[0]) for k, p in enumerate(preds) if p.candidates]
    t = np.array([row_of[c.template_id] for _, c in picked], dtype=np.int64)
    x_t, v_t = volume_rows(index, t)
    x_q = np.zeros_like(x_t)
    for j, (_, c) in enumerate(picked):
        for el, share in zip(*_fractions(index, int(t[j]), c.assignment), strict=True):
            x_q[j, Element(el).Z] += share
    true = np.array([gts[k].volume / len(gts[k]) for k, _ in picked])
    rows = {
        METHODS[0]: log_errors(v_t, true),
        METHODS[1]: log_errors(scaled(x_q, x_t, v_t, elemental_volumes()), true),
        METHODS[2]: log_errors(scaled(x_q, x_t, v_t, learned), true),
    }
    return rows, {"n_queries": len(gts), "with_candidate": len(picked)}


def _fractions(index: TemplateIndex, t: int, assignment: dict[str, str]) -> tuple[list[str], list[float]]:
    """The query's element on each role of template ``t`` and the role's atomic fraction."""
    r = index.roles[t]
    total = sum(r.amounts)
    return [assignment.get(e, e) for e in r.elements], [a / total for a in r.amounts]


def run(protocol: str, limit: int | None, seed: int, workers: int) -> dict[str, Any]:
    """Both measurements; the JSON-ready result."""
    t0 = time.perf_counter()
    index = pool_index(protocol, workers=workers)
    full = load_queries(protocol)
    pool = index.subset(~np.isin(index.ids, full.material_ids))
    pairs = pool_pairs(pool, seed)
    queries, counts = query_top1(protocol, limit, seed, workers)
    return {
        "protocol": protocol,
        "setting": "strict",
        "limit": limit,
        "seed": seed,
        "n_templates": len(pool),
        **counts,
        "pool_pairs": pairs,
        "query_top1": queries,
        "seconds": time.perf_counter() - t0,
    }


def markdown(result: dict[str, Any]) -> str:
    """Both measurements as one Markdown table."""
    rows = []
    for part, label in (("pool_pairs", "pool pairs"), ("query_top1", f"{result['protocol']} strict top-1")):
        for method, m in result[part].items():
            rows.append(
                [
                    label,
                    method,
                    str(m["n"]),
                    f"{m['median_abs_log']:.3f}",
                    f"{m['mean_abs_log']:.3f}",
                    f"{m['within_5pct']:.1%}",
                    f"{m['within_10pct']:.1%}",
                ]
            )
    head = ["set", "cell volume from", "pairs", "median abs ln", "mean abs ln", "within 5 %", "within 10 %"]
    return markdown_table(head, rows, align="llrrrrr") + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.volumes``: run, print the Markdown, write ``--json``/``--markdown``."""
    a = study_parser("python -m benchmarks.volumes", __doc__.splitlines()[0]).parse_args(argv)
    return run_study(a, lambda a: run(a.protocol, a.limit, a.seed, a.workers), markdown)


if __name__ == "__main__":
    sys.exit(main())
