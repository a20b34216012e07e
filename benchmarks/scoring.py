"""Match rate and RMSE exactly as the standard CSP evaluation (DiffCSP ``compute_metrics.py``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.equivalence import Matcher
from cspml_flows.predict.validity import smact_valid, structure_valid

KS = (1, 5, 20)


def query_rms(args: tuple[dict, list[dict]]) -> list[float | None]:
    """RMS distances (None where no match or invalid) of each prediction against the ground truth.

    Same result as ``StructureMatcher.get_rms_dist(pred, gt)``; the ground truth is reduced (primitive,
    Niggli) once instead of once per prediction. Once a prediction has matched, those beyond rank 5
    are not compared (marked ``nan``): they cannot change any top-k match, and RMSE is reported
    for top-1 and top-5 only.
    """
    gt_d, preds = args
    matcher = Matcher()
    gt = matcher.reduce(Structure.from_dict(gt_d))
    out: list[float | None] = []
    matched = False
    for rank, p in enumerate(preds, start=1):
        if matched and rank > 5:
            out.append(float("nan"))
            continue
        s = Structure.from_dict(p)
        if not (smact_valid(s.composition) and structure_valid(s)):
            out.append(None)
            continue
        rms = matcher.rms(s, gt)
        out.append(rms)
        matched = matched or rms is not None
    return out


def rms_table(
    gts: Sequence[Structure], preds: Sequence[Sequence[Structure]], workers: int = 2
) -> list[list[float | None]]:
    """For each query, the RMS of each of its predictions (None where unmatched or invalid)."""
    tasks = [(g.as_dict(), [p.as_dict() for p in ps]) for g, ps in zip(gts, preds, strict=True)]
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers == 1 or len(tasks) < 20:
        return [query_rms(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(query_rms, tasks, chunksize=max(1, len(tasks) // (8 * workers))))


def summarize(rms: Sequence[Sequence[float | None]], ks: Sequence[int] = KS) -> dict[str, float]:
    """Top-k match rates, and RMSE (mean over matched queries of the best RMS in the top k) for k <= 5."""
    n = len(rms)
    out: dict[str, float] = {}
    for k in ks:
        best = [min((r for r in row[:k] if r is not None), default=None) for row in rms]
        hits = [b for b in best if b is not None]
        out[f"top{k}"] = len(hits) / n if n else float("nan")
        if k <= 5:
            out[f"rmse_top{k}"] = float(np.nanmean(hits)) if hits else float("nan")
    return out
