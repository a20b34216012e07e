"""Validation metrics of the heterogeneous model, used to choose its settings during training.

Composition -> structure retrieval (recall@1/5/10, MRR over prototype clusters) and polymorph ranking
(ground state first, recall of metastable polymorphs in the top K) on held-out formulas.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cspml_flows.core.composition import roles
from cspml_flows.templates.index import TemplateIndex

KS = (1, 5, 10)
POLY_K = 5


def cluster_lists(ranked: Sequence[Sequence]) -> list[list[int]]:
    """Per query, its candidates' prototype clusters in rank order, each once."""
    out = []
    for lst in ranked:
        seen: list[int] = []
        for r in lst:
            if r.cluster not in seen:
                seen.append(r.cluster)
        out.append(seen)
    return out


def retrieval_metrics(ranked: Sequence[Sequence], relevant: Sequence[set], ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@k (share of relevant items in the top k, averaged over queries), hit@1 and MRR."""
    out: dict[str, float] = {}
    n = len(ranked)
    if n == 0:
        return {f"recall@{k}": float("nan") for k in ks} | {"mrr": float("nan"), "n": 0}
    for k in ks:
        out[f"recall@{k}"] = float(
            np.mean([len(set(r[:k]) & rel) / len(rel) for r, rel in zip(ranked, relevant, strict=True)])
        )
    rr = []
    for r, rel in zip(ranked, relevant, strict=True):
        pos = next((i for i, x in enumerate(r) if x in rel), None)
        rr.append(0.0 if pos is None else 1.0 / (pos + 1))
    out["mrr"] = float(np.mean(rr))
    out["n"] = n
    return out


def polymorph_metrics(ranked: Sequence[Sequence[int]], ground: Sequence[int], meta: Sequence[set], k: int = POLY_K):
    """Share of formulas whose ground-state prototype ranks first; recall of metastable prototypes in top k."""
    if not ranked:
        return {"ground_state_first": float("nan"), f"metastable_recall@{k}": float("nan"), "n": 0}
    gs = float(np.mean([bool(r) and r[0] == g for r, g in zip(ranked, ground, strict=True)]))
    rec = [len(set(r[:k]) & m) / len(m) for r, m in zip(ranked, meta, strict=True) if m]
    return {
        "ground_state_first": gs,
        f"metastable_recall@{k}": float(np.mean(rec)) if rec else float("nan"),
        "n": len(ranked),
    }


def formula_targets(index: TemplateIndex, rows: np.ndarray):
    """Per held-out formula: canonical roles, its prototype clusters, the ground-state cluster."""
    by_f: dict[str, list[int]] = {}
    for i in rows:
        by_f.setdefault(str(index.formulas[i]), []).append(int(i))
    out = []
    for f, members in by_f.items():
        others = index.by_anon.get(str(index.anon[members[0]]))
        reach = set(index.cluster[others[index.formulas[others] != f]].tolist())
        clusters = {int(index.cluster[i]) for i in members}
        e = np.array([index.e_above_hull[i] if np.isfinite(index.e_above_hull[i]) else 0.0 for i in members])
        ground = int(index.cluster[members[int(np.argmin(e))]])
        out.append((f, roles(f), clusters & reach, ground, clusters))
    return out


def significant(new: np.ndarray, old: np.ndarray) -> bool:
    """Paired per-query gain above zero by at least one standard error."""
    d = np.asarray(new) - np.asarray(old)
    if len(d) < 2:
        return False
    return float(d.mean()) > 0 and float(d.mean()) >= float(d.std(ddof=1)) / np.sqrt(len(d))


def objective(m: dict) -> float:
    """Fusion objective: top-1 prototype hit plus half the ground-state-first share (0 without polymorphs)."""
    gs = m.get("poly_ground_state_first", float("nan"))
    return m["recall@1"] + 0.5 * (0.0 if np.isnan(gs) else gs)


# ---------------------------------------------------------------------------------------------------------
def held_out_prototypes(index: TemplateIndex, fraction: float, min_formulas: int, seed: int) -> np.ndarray:
    """Cluster ids held out: a random share of the clusters taken by at least ``min_formulas`` formulas."""
    rng = np.random.default_rng(seed)
    n_formulas: dict[int, set] = {}
    for c, f in zip(index.cluster.tolist(), index.formulas.tolist(), strict=True):
        n_formulas.setdefault(c, set()).add(f)
    eligible = np.array(sorted(c for c, fs in n_formulas.items() if len(fs) >= min_formulas))
    if len(eligible) == 0:
        return eligible
    return np.sort(rng.choice(eligible, size=max(1, int(len(eligible) * fraction)), replace=False))


def held_out_split(
    index: TemplateIndex,
    seed: int = 0,
    formula_fraction: float = 0.15,
    proto_fraction: float = 0.2,
    min_formulas: int = 3,
    max_prototypes: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of held-out formulas (polymorph evaluation) and held-out prototype clusters (inverse design,
    user templates); one model trained without both serves every evaluation."""
    rng = np.random.default_rng(seed + 11)
    formulas = np.unique(index.formulas)
    val = set(rng.choice(formulas, size=max(1, int(len(formulas) * formula_fraction)), replace=False))
    held = held_out_prototypes(index, proto_fraction, min_formulas, seed)
    if len(held) > max_prototypes:
        held = np.sort(rng.choice(held, max_prototypes, replace=False))
    return np.flatnonzero(np.isin(index.formulas, list(val))), held


def prototype_queries(index: TemplateIndex, held: Sequence[int]) -> list[tuple[int, list[str], set[str]]]:
    """Structure -> composition queries of held-out prototype clusters: each queried with its lowest-energy
    structure ``t``; candidates: every other formula of its anonymous formula; relevant: the other formulas
    that take the prototype."""
    out = []
    for c in held:
        members = np.flatnonzero(index.cluster == c)
        t = int(members[np.argmin(np.nan_to_num(index.e_above_hull[members], nan=0.0))])
        pool = index.by_anon[str(index.anon[t])]
        formulas = sorted(set(index.formulas[pool].tolist()) - {str(index.formulas[t])})
        rel = set(index.formulas[members].tolist()) - {str(index.formulas[t])}
        if rel and formulas:
            out.append((t, formulas, rel))
    return out
