"""Why the first choice missed: each top-1 miss of a benchmark run gets exactly one kind, so the next
step is chosen from numbers (fix the assignment, the ranking, the recall, or the template pool)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from pymatgen.core import Structure

from cspml_flows.core.equivalence import Matcher

# In the order they are tested: the first that applies is the miss's kind.
MISS_KINDS = (
    "composition_not_smact_valid",  # the validity gate rejects every prediction of this composition
    "right_prototype_wrong_assignment",  # top-1 matches the answer anonymously, not with these elements
    "match_elsewhere_in_top20",  # a later candidate matches: the ranking put another one first
    "match_only_outside_top20",  # the pool holds a matching template, no candidate in the top 20 uses it
    "no_template_matches",  # no template of the pool matches the answer anonymously (the ceiling)
)


def anonymous_fit(args: tuple[dict, dict]) -> bool:
    """Whether the prediction matches the ground truth anonymously (a matcher error: no match)."""
    gt, pred = args
    return Matcher().fit_anonymous(Structure.from_dict(pred), Structure.from_dict(gt))


def miss_kind(rms_row: Sequence[float | None], smact_ok: bool, covered: bool, top1_anonymous: bool) -> str | None:
    """Kind of one query's top-1 miss (None when top-1 matched).

    ``rms_row``: the scoring's RMS per candidate (None = no match; NaN = not compared because an earlier
    candidate matched); ``covered``: the coverage ceiling's verdict for the query; ``top1_anonymous``:
    whether the first candidate matches the answer under ``fit_anonymous``.
    """
    if rms_row and rms_row[0] is not None:
        return None
    if not smact_ok:
        return MISS_KINDS[0]
    if top1_anonymous:
        return MISS_KINDS[1]
    if any(r is not None for r in rms_row[1:]):
        return MISS_KINDS[2]
    return MISS_KINDS[3] if covered else MISS_KINDS[4]


def miss_breakdown(
    rms: Sequence[Sequence[float | None]],
    gts: Sequence[Structure],
    top1: Sequence[Structure | None],
    smact_ok: Sequence[bool],
    covered: Sequence[bool],
    workers: int = 2,
) -> dict[str, float]:
    """Share of all queries per miss kind (top-1 hits make up the rest). ``top1``: each query's first
    candidate (None when it has none); the anonymous fits run in ``workers`` processes."""
    need = [i for i, row in enumerate(rms) if not (row and row[0] is not None) and smact_ok[i] and top1[i] is not None]
    tasks = [(gts[i].as_dict(), top1[i].as_dict()) for i in need]
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers > 1 and len(tasks) >= 20:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            fits = list(pool.map(anonymous_fit, tasks, chunksize=max(1, len(tasks) // (8 * workers))))
    else:
        fits = [anonymous_fit(t) for t in tasks]
    anonymous = dict(zip(need, fits, strict=True))
    counts = dict.fromkeys(MISS_KINDS, 0)
    for i, row in enumerate(rms):
        kind = miss_kind(row, smact_ok[i], bool(covered[i]), anonymous.get(i, False))
        if kind is not None:
            counts[kind] += 1
    n = max(len(rms), 1)
    return {k: v / n for k, v in counts.items()}
