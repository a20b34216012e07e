"""Match rate and RMSE exactly as the standard CSP evaluation (DiffCSP ``compute_metrics.py``), at one or more
tolerance sets (:class:`~cspml_flows.core.equivalence.Tolerances`) in one pass over the predictions."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.equivalence import CSP_TOLERANCES, PYMATGEN_TOLERANCES, Matcher, Tolerances
from cspml_flows.predict.validity import smact_valid, structure_valid

KS = (1, 5, 20)
# The benchmark's tolerance sets, loosest first: the standard CSP evaluation's, then pymatgen's defaults.
TOLERANCE_SETS = (CSP_TOLERANCES, PYMATGEN_TOLERANCES)
EXTRA_TOLERANCE_SETS = tuple(t for t in TOLERANCE_SETS if t != CSP_TOLERANCES)  # reported beside the standard
RMSE_RANK = 5  # RMSE is reported for top-1 and top-5 only


def tolerance_key(tolerances: Tolerances) -> str:
    """The result key of the scores at a tolerance set other than the standard one."""
    return f"{tolerances.name}_tolerances"


def check_nested(tolerance_sets: Sequence[Tolerances]) -> None:
    """Raise ``ValueError`` unless each tolerance set is within the one before it (loosest first)."""
    for looser, tighter in itertools.pairwise(tolerance_sets):
        if not tighter.within(looser):
            raise ValueError(f"tolerance sets must go from loose to tight: {looser} before {tighter}")


def prediction_rms(
    matchers: Sequence[Matcher], pred: Structure, gt: Structure | None, wanted: Sequence[bool]
) -> list[float | None]:
    """RMS of one prediction against the reduced ground truth under each wanted matcher (``nan`` where not
    wanted, None where unmatched or invalid). The prediction is reduced once for all of them; a tighter
    matcher is not run where a looser one found no match (it cannot match either)."""
    if not (smact_valid(pred.composition) and structure_valid(pred)):
        return [None if w else float("nan") for w in wanted]
    red = matchers[0].reduce(pred)
    out: list[float | None] = []
    looser_missed = False
    for matcher, want in zip(matchers, wanted, strict=True):
        if not want:
            out.append(float("nan"))
            continue
        rms = None if looser_missed else matcher.rms(red, gt, reduced=True)
        looser_missed = rms is None
        out.append(rms)
    return out


def query_rms_sets(
    args: tuple[dict, list[dict], Sequence[Tolerances]],
) -> list[list[float | None]]:
    """For each tolerance set (loosest first), the RMS distances (None where no match or invalid) of each
    prediction against the ground truth.

    Same result as ``StructureMatcher(**tolerances).get_rms_dist(pred, gt)``; the ground truth and each
    prediction are reduced (primitive, Niggli) once for all tolerance sets. Once a prediction has matched
    under a tolerance set, those beyond rank 5 are not compared under it (marked ``nan``): they cannot
    change any top-k match, and RMSE is reported for top-1 and top-5 only.
    """
    gt_d, preds, tolerance_sets = args
    check_nested(tolerance_sets)
    matchers = [Matcher(t) for t in tolerance_sets]
    gt = matchers[0].reduce(Structure.from_dict(gt_d))
    out: list[list[float | None]] = [[] for _ in matchers]
    matched = [False] * len(matchers)
    for rank, p in enumerate(preds, start=1):
        wanted = [not (m and rank > RMSE_RANK) for m in matched]
        if any(wanted):
            row = prediction_rms(matchers, Structure.from_dict(p), gt, wanted)
        else:
            row = [float("nan")] * len(matchers)
        for i, rms in enumerate(row):
            out[i].append(rms)
            matched[i] = matched[i] or (rms is not None and not np.isnan(rms))
    return out


def query_rms(args: tuple[dict, list[dict]]) -> list[float | None]:
    """:func:`query_rms_sets` at the standard CSP tolerances only."""
    gt_d, preds = args
    return query_rms_sets((gt_d, preds, (CSP_TOLERANCES,)))[0]


def rms_tables(
    gts: Sequence[Structure],
    preds: Sequence[Sequence[Structure]],
    tolerance_sets: Sequence[Tolerances] = TOLERANCE_SETS,
    workers: int = 2,
) -> dict[str, list[list[float | None]]]:
    """For each tolerance set (by name; loosest first), the RMS of each prediction of each query (None where
    unmatched or invalid), all sets scored in one pass over the predictions."""
    sets = tuple(tolerance_sets)
    check_nested(sets)
    tasks = [(g.as_dict(), [p.as_dict() for p in ps], sets) for g, ps in zip(gts, preds, strict=True)]
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers == 1 or len(tasks) < 20:
        per_query = [query_rms_sets(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, len(tasks) // (8 * workers))
            per_query = list(pool.map(query_rms_sets, tasks, chunksize=chunk))
    return {t.name: [q[i] for q in per_query] for i, t in enumerate(sets)}


def rms_table(
    gts: Sequence[Structure], preds: Sequence[Sequence[Structure]], workers: int = 2
) -> list[list[float | None]]:
    """For each query, the RMS of each of its predictions at the standard CSP tolerances (None where
    unmatched or invalid)."""
    return rms_tables(gts, preds, (CSP_TOLERANCES,), workers=workers)[CSP_TOLERANCES.name]


def summarize(rms: Sequence[Sequence[float | None]], ks: Sequence[int] = KS) -> dict[str, float]:
    """Top-k match rates, and RMSE (mean over matched queries of the best RMS in the top k) for k <= 5."""
    n = len(rms)
    out: dict[str, float] = {}
    for k in ks:
        best = [min((r for r in row[:k] if r is not None), default=None) for row in rms]
        hits = [b for b in best if b is not None]
        out[f"top{k}"] = len(hits) / n if n else float("nan")
        if k <= RMSE_RANK:
            out[f"rmse_top{k}"] = float(np.nanmean(hits)) if hits else float("nan")
    return out


def paired_rmse(a: Sequence[Sequence[float | None]], b: Sequence[Sequence[float | None]]) -> dict[str, float]:
    """RMSE of the top-1 matches of two methods on the queries both match at top-1 (``n`` of them), so that a
    method that matches harder queries is not charged for their larger distances."""
    pairs = [
        (ra[0], rb[0]) for ra, rb in zip(a, b, strict=True) if ra and rb and ra[0] is not None and rb[0] is not None
    ]
    if not pairs:
        return {"n": 0, "rmse_top1": float("nan"), "other_rmse_top1": float("nan")}
    x = np.array(pairs, dtype=float)
    return {"n": len(pairs), "rmse_top1": float(x[:, 0].mean()), "other_rmse_top1": float(x[:, 1].mean())}
