"""Energy as a ranking feature: relative energies and scores, the blend of the two, the weight fitted on
held-out queries, and the paired comparison of two candidate orders (the arithmetic of
:mod:`benchmarks.energy`, independent of any calculator)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymatgen.core import Structure
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ENERGY_FLOOR = -15.0  # eV/atom: below every element and compound in PBE (W, the lowest, -13.0): an artefact
ENERGY_CAP = 1.0  # eV/atom above the query's lowest: beyond it a candidate is as bad as it gets for ranking


def relative_energy(e: np.ndarray, floor: float = ENERGY_FLOOR, cap: float = ENERGY_CAP) -> np.ndarray:
    """Energy per atom minus the query's lowest, clipped to ``[0, cap]``. Missing energies (NaN) and
    unphysical ones (below ``floor``: a potential extrapolating on a bad candidate, e.g. -110 eV/atom) count
    as the query's highest."""
    e = np.asarray(e, dtype=float)
    ok = np.isfinite(e) & (e >= floor)
    if not ok.any():
        return np.zeros_like(e)
    rel = np.minimum(e - e[ok].min(), cap)
    rel[~ok] = rel[ok].max()
    return rel


def relative_score(s: np.ndarray) -> np.ndarray:
    """Ranker score minus the query's best (<= 0): only differences within a query carry meaning."""
    s = np.asarray(s, dtype=float)
    return s - s.max() if len(s) else s


def spread(parts: Sequence[np.ndarray]) -> float:
    """Standard deviation over all candidates of all queries (1 where it is zero or undefined)."""
    flat = np.concatenate([np.asarray(p, dtype=float) for p in parts]) if parts else np.zeros(0)
    sd = float(np.std(flat)) if len(flat) > 1 else 0.0
    return sd if sd > 0 and math.isfinite(sd) else 1.0


def blend(s_rel: np.ndarray, e_rel: np.ndarray, w: float, s_scale: float = 1.0, e_scale: float = 1.0) -> np.ndarray:
    """``s_rel / s_scale - w * e_rel / e_scale``: higher is better."""
    return np.asarray(s_rel, dtype=float) / s_scale - w * np.asarray(e_rel, dtype=float) / e_scale


def order(score: np.ndarray) -> np.ndarray:
    """Candidate positions best first (higher score first; ties keep the incoming order)."""
    return np.argsort(-np.asarray(score, dtype=float), kind="stable")


def hits_at(hits: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int = 1) -> np.ndarray:
    """Per query: whether one of the ``k`` best-scored candidates matches (no candidates: miss)."""
    return np.array(
        [
            bool(len(h)) and bool(np.asarray(h, dtype=bool)[order(s)[:k]].any())
            for h, s in zip(hits, scores, strict=True)
        ]
    )


def reciprocal_rank(hits: Sequence[np.ndarray], scores: Sequence[np.ndarray]) -> float:
    """Mean over queries of 1 / (position of the first match), 0 without a match."""
    rr = []
    for h, s in zip(hits, scores, strict=True):
        pos = np.flatnonzero(np.asarray(h, dtype=bool)[order(s)]) if len(h) else []
        rr.append(1.0 / (pos[0] + 1) if len(pos) else 0.0)
    return float(np.mean(rr)) if rr else float("nan")


DEFAULT_GRID = tuple(float(w) for w in np.round(np.concatenate([[0.0], np.geomspace(0.01, 30.0, 70)]), 4))


def fit_weight(
    s_rel: Sequence[np.ndarray],
    e_rel: Sequence[np.ndarray],
    hits: Sequence[np.ndarray],
    s_scale: float = 1.0,
    e_scale: float = 1.0,
    grid: Sequence[float] = DEFAULT_GRID,
) -> tuple[float, list[dict[str, float]]]:
    """The blend weight with the best top-1 on these queries (ties: best mean reciprocal rank, then the
    smallest weight, so ``w = 0``, the ranker's own order, wins unless energy helps). Returns the weight and
    the curve (w, top-1, MRR)."""
    curve = []
    for w in grid:
        sc = [blend(s, e, w, s_scale, e_scale) for s, e in zip(s_rel, e_rel, strict=True)]
        curve.append({"w": float(w), "top1": float(hits_at(hits, sc, 1).mean()), "mrr": reciprocal_rank(hits, sc)})
    best = max(curve, key=lambda c: (round(c["top1"], 12), round(c["mrr"], 12), -c["w"]))
    return best["w"], curve


def fit_logistic(
    features: Sequence[np.ndarray], hits: Sequence[np.ndarray], seed: int = 0
) -> Callable[[np.ndarray], np.ndarray]:
    """A pointwise logistic second stage on per-candidate feature rows (standardised inside); returns a
    scorer ``f(rows) -> scores``."""
    pairs = [(f, h) for f, h in zip(features, hits, strict=True) if len(h)]  # queries without candidates: none
    if not pairs:
        return lambda rows: np.zeros(len(rows))
    x = np.concatenate([np.asarray(f, dtype=float).reshape(len(h), -1) for f, h in pairs])
    y = np.concatenate([np.asarray(h, dtype=int) for _, h in pairs])
    if len(set(y.tolist())) < 2:
        return lambda rows: np.zeros(len(rows))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, random_state=seed)).fit(x, y)
    return lambda rows: clf.decision_function(np.asarray(rows, dtype=float)) if len(rows) else np.zeros(0)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Rate of ``a`` with its standard error sqrt(p(1-p)/n), and the paired difference ``a - b`` with the
    standard error of the mean difference; wins/losses count queries where only one of them hits."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(a)
    p = float(a.mean()) if n else float("nan")
    d = a - b
    return {
        "n": n,
        "rate": p,
        "se": math.sqrt(p * (1 - p) / n) if n else float("nan"),
        "diff": float(d.mean()) if n else float("nan"),
        "diff_se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
    }


@dataclass
class QuerySet:
    """Candidates of a set of queries: per query its structures, ranker scores and match flags."""

    name: str
    formulas: list[str] = field(default_factory=list)
    structures: list[list[Structure]] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    hits: list[np.ndarray] = field(default_factory=list)

    def informative(self, k: int) -> list[int]:
        """Queries whose first ``k`` candidates hold a match and a non-match: only there can a reorder of
        those candidates change a top-j rate."""
        return [i for i, h in enumerate(self.hits) if 0 < int(np.asarray(h[:k], dtype=bool).sum()) < len(h[:k])]

    def subset(self, rows: Sequence[int]) -> QuerySet:
        """The queries ``rows`` of this set, in that order."""
        return QuerySet(
            self.name,
            [self.formulas[i] for i in rows],
            [self.structures[i] for i in rows],
            [self.scores[i] for i in rows],
            [self.hits[i] for i in rows],
        )


def order_rows(
    name: str,
    qs: QuerySet,
    orders: dict[str, list[np.ndarray]],
    base: str,
    ks: Sequence[int],
) -> list[dict[str, Any]]:
    """One table row per order of the candidates: its top-1 paired against the order ``base``, and top-k."""
    out = []
    ref = hits_at(qs.hits, orders[base], 1)
    for label, sc in orders.items():
        h1 = hits_at(qs.hits, sc, 1)
        row = {"set": name, "order": label, **paired(h1, ref)}
        for kk in ks:
            row[f"top{kk}"] = float(hits_at(qs.hits, sc, kk).mean())
        out.append(row)
    return out
