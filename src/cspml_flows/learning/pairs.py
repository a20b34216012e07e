"""Training pairs from a template index: compositions with the same anonymous formula, labelled by
whether their structures share a prototype cluster (``StructureMatcher.fit_anonymous``)."""

from __future__ import annotations

import numpy as np

from cspml_flows.learning.features import Standardizer, role_distance
from cspml_flows.templates.index import TemplateIndex


def sample_pairs(
    index: TemplateIndex,
    anchors: np.ndarray,
    allowed: np.ndarray,
    std: Standardizer,
    n_near: int = 24,
    n_random: int = 8,
    seed: int = 0,
    max_group: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each anchor: its ``n_near`` nearest same-anonymous-formula templates (by role distance) among
    ``allowed`` ones, plus ``n_random`` random others. Returns (anchor index, template index) arrays.

    With ``max_group``, a group with more allowed templates is first cut to a seeded random sample of that
    size (one per group), so an anchor costs at most ``max_group`` distances however large the pool."""
    rng = np.random.default_rng(seed)
    cut = np.random.default_rng(seed + 1_000_003)
    allowed_mask = np.zeros(len(index), dtype=bool)
    allowed_mask[allowed] = True
    a_out, t_out = [], []
    anchor_set = np.zeros(len(index), dtype=bool)
    anchor_set[anchors] = True
    for members in index.by_anon.values():
        cands = members[allowed_mask[members]]
        if max_group is not None and len(cands) > max_group:
            cands = np.sort(cut.choice(cands, max_group, replace=False))
        group_anchors = members[anchor_set[members]]
        if len(cands) == 0 or len(group_anchors) == 0:
            continue
        t_roles = index.role_props[cands]
        for a in group_anchors:
            others = cands[cands != a]
            if len(others) == 0:
                continue
            d = role_distance(index.role_props[a][None], t_roles[cands != a], std)
            near = others[np.argsort(d)[:n_near]]
            rest = np.setdiff1d(others, near, assume_unique=True)
            rand = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else rest
            picked = np.concatenate([near, rand])
            a_out.append(np.full(len(picked), a))
            t_out.append(picked)
    if not a_out:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return np.concatenate(a_out), np.concatenate(t_out)


def pair_labels(index: TemplateIndex, a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """1 where the pair's templates share a prototype cluster, else 0."""
    return (index.cluster[a] == index.cluster[t]).astype(np.int8)
