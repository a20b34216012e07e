"""Match rate and RMSE exactly as the standard CSP evaluation (DiffCSP ``compute_metrics.py``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from pymatgen.core import Structure

from cspml_flows.predict.validity import smact_valid, structure_valid
from cspml_flows.prototype import structure_matcher

KS = (1, 5, 20)


def _rms(args: tuple[dict, list[dict]]) -> list[float | None]:
    """RMS distances (None where no match or invalid) of each prediction against the ground truth."""
    gt_d, preds = args
    gt = Structure.from_dict(gt_d)
    sm = structure_matcher()
    out: list[float | None] = []
    for p in preds:
        s = Structure.from_dict(p)
        if not (smact_valid(s.composition) and structure_valid(s)):
            out.append(None)
            continue
        try:
            r = sm.get_rms_dist(s, gt)
        except Exception:
            r = None
        out.append(None if r is None else float(r[0]))
    return out


def rms_table(gts: Sequence[Structure], preds: Sequence[Sequence[Structure]], workers: int = 2) -> list[list[float | None]]:
    """For each query, the RMS of each of its predictions (None where unmatched or invalid)."""
    tasks = [(g.as_dict(), [p.as_dict() for p in ps]) for g, ps in zip(gts, preds, strict=True)]
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers == 1 or len(tasks) < 20:
        return [_rms(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_rms, tasks, chunksize=max(1, len(tasks) // (8 * workers))))


def summarize(rms: Sequence[Sequence[float | None]], ks: Sequence[int] = KS) -> dict[str, float]:
    """Top-k match rates and RMSEs (mean over matched queries of the best matching RMS in the top k)."""
    n = len(rms)
    out: dict[str, float] = {}
    for k in ks:
        best = [min((r for r in row[:k] if r is not None), default=None) for row in rms]
        hits = [b for b in best if b is not None]
        out[f"top{k}"] = len(hits) / n if n else float("nan")
        out[f"rmse_top{k}"] = float(np.mean(hits)) if hits else float("nan")
    return out
