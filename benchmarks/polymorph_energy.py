"""Metastable polymorphs ranked with energies (use 1 of the hetero model).

Each distinct polymorph candidate of a composition is relaxed with an offline potential (CHGNet 0.3.0 by
default, through the flows' relaxation code and the energy experiment's cache:
:func:`benchmarks.energy_cache.relaxed`), and the candidates are ordered by

    ``score_rel / s_scale - w * E_rel / e_scale``

where ``score_rel`` is the hetero score minus the composition's best and ``E_rel`` the relaxed energy per atom
minus the composition's lowest (clipped, :func:`benchmarks.energy_blend.relative_energy`). ``w`` is not
assumed: :func:`energy_polymorphs` learns it on held-out polymorph formulas of the template pool (2-fold
cross-validated over formulas) and reports the weight, its curve and the cost per formula.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from benchmarks.energy_blend import blend, relative_energy, relative_score
from benchmarks.energy_cache import EnergyCache, relaxed
from benchmarks.scoring import rms_table
from cspml_flows.core.engines import pin_torch_threads
from cspml_flows.flows.calculators import CalculatorSettings, relax_maker
from cspml_flows.learning.hetero.model import Bank, HeteroModel
from cspml_flows.predict.hetero_rank import HeteroPredictor
from cspml_flows.training.hetero_metrics import formula_targets

logger = logging.getLogger(__name__)

WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 1e6)  # 1e6: energy alone (score breaks ties)
E_SCALE = 0.05  # eV/atom: energy differences in units of a typical polymorph spacing
S_SCALE = 1.0  # hetero scores are logits
RECALL_K = 5  # metastable recall@k of the polymorph study
CANDIDATES = 8  # distinct predicted structures per formula, each relaxed


def energy_settings(steps: int = 200, fmax: float = 0.1) -> CalculatorSettings:
    """CHGNet 0.3.0 relaxation of a polymorph candidate (FIRE with the cell filter; stops at ``steps``)."""
    return CalculatorSettings(name="chgnet", steps=steps, fmax=fmax, relax_cell=True, optimizer="FIRE")


def _relax_chunk(args: tuple[list[dict], dict, str, str | None]) -> int:
    """Relax structures in a worker process (one torch thread) into its own cache file (records of the
    shared cache are read, not relaxed again); returns how many it holds."""
    structures, settings, part, seed_path = args
    st = CalculatorSettings(**settings)
    pin_torch_threads()
    cache = EnergyCache(part)
    cache.data = {**EnergyCache(seed_path).data, **cache.data}
    relaxed([Structure.from_dict(d) for d in structures], relax_maker(st), st, cache)
    cache.flush()
    return len(cache)


def relaxed_energies(
    structures: Sequence, settings: CalculatorSettings, cache: EnergyCache, workers: int = 1
) -> list[dict]:
    """Relaxation records (``energy_per_atom``, ``seconds``, ...) of each structure through the energy
    experiment's cached :func:`benchmarks.energy_cache.relaxed`; with ``workers`` > 1 and a cache file,
    the structures are first relaxed in spawned processes (one torch thread each, each with its own part
    file, merged here), so the final pass only reads the cache."""
    if workers > 1 and cache.path is not None and len(structures) > workers:
        cache.flush()
        parts = [cache.path.with_name(f"{cache.path.name}.part{i}") for i in range(workers)]
        args = [
            ([s.as_dict() for s in structures[i::workers]], settings.model_dump(), str(p), str(cache.path))
            for i, p in enumerate(parts)
        ]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            list(pool.map(_relax_chunk, args))
        for p in parts:
            part = EnergyCache(p)
            for k, rec in part.data.items():
                if cache.get(k) is None:
                    cache.put(k, rec, flush_every=10**9)
            p.unlink(missing_ok=True)
    recs = relaxed(list(structures), relax_maker(settings), settings, cache)
    cache.flush()
    return recs


def energy_scores(scores: np.ndarray, energies: np.ndarray, w: float) -> np.ndarray:
    """Combined score of one composition's candidates (higher first)."""
    return blend(relative_score(scores), relative_energy(energies), w, S_SCALE, E_SCALE)


@dataclass
class EnergyRanker:
    """Reorders a prediction's distinct candidates by the combined score; ``candidates`` are relaxed."""

    weight: float
    settings: CalculatorSettings
    cache: EnergyCache
    candidates: int = 8
    workers: int = 1

    def rerank(self, preds: list, k: int) -> list:
        """Relax every candidate of ``preds`` and keep the ``k`` best by the combined score, ranks renumbered."""
        flat = [c.structure for p in preds for c in p.candidates]
        recs = relaxed_energies(flat, self.settings, self.cache, self.workers)
        pos = 0
        for p in preds:
            n = len(p.candidates)
            e = np.array(
                [r["energy_per_atom"] if r["energy_per_atom"] is not None else np.nan for r in recs[pos : pos + n]]
            )
            pos += n
            if n == 0:
                continue
            z = energy_scores(np.array([c.score for c in p.candidates]), e, self.weight)
            order = np.argsort(-z, kind="stable")[:k]
            p.candidates = [replace(p.candidates[j], rank=r + 1) for r, j in enumerate(order)]
        return preds


# ------------------------------------------------------------------------------------------ evaluation
def _metrics(hits: list[np.ndarray], orders: list[np.ndarray], k: int) -> dict[str, float]:
    """hits[f]: (n_known, n_candidates) match matrix, row 0 the ground state; orders[f]: candidate order."""
    gs, meta = [], []
    for h, o in zip(hits, orders, strict=True):
        gs.append(bool(len(o)) and bool(h[0, o[0]]))
        for row in h[1:]:
            meta.append(bool(row[o[:k]].any()))
    return {
        "ground_state_first": float(np.mean(gs)) if gs else float("nan"),
        f"metastable_recall@{k}": float(np.mean(meta)) if meta else float("nan"),
        "n_formulas": len(gs),
        "n_metastable": len(meta),
    }


def _objective(m: dict[str, float], k: int) -> float:
    meta = m[f"metastable_recall@{k}"]
    return m["ground_state_first"] + (0.0 if math.isnan(meta) else meta)


def choose_weight(hits, scores, energies, k: int, weights: Sequence[float] = WEIGHTS) -> tuple[float, list[dict]]:
    """The weight with the best ground-state-first + metastable recall@k on these formulas (ties: the
    smaller weight)."""
    curve = []
    for w in weights:
        orders = [np.argsort(-energy_scores(s, e, w), kind="stable") for s, e in zip(scores, energies, strict=True)]
        curve.append({"w": float(w), **_metrics(hits, orders, k)})
    best = max(curve, key=lambda c: (round(_objective(c, k), 12), -c["w"]))
    return best["w"], curve


def polymorph_candidates(
    hetero: HeteroModel, bank: Bank, val_rows: np.ndarray, candidates: int, limit: int, rng: np.random.Generator
) -> tuple[list, list]:
    """Held-out formulas with >= 2 prototypes in the pool (a sample of ``limit``) and their ``candidates``
    distinct predicted structures (no template of the formula allowed)."""
    targets = [t for t in formula_targets(bank.index, val_rows) if len(t[4]) >= 2]
    if len(targets) > limit:
        targets = [targets[i] for i in sorted(rng.choice(len(targets), limit, replace=False))]
    if not targets:
        return [], []
    hp = HeteroPredictor(bank.index, hetero, bank)
    return targets, hp.predict([t[0] for t in targets], polymorphs=candidates, strict=True)


def polymorph_hits(index, targets: list, preds: list, workers: int) -> list[np.ndarray]:
    """Per formula: the match matrix of its known polymorphs (one per prototype, ground state first; rows)
    against its predicted candidates (columns), with the protocol's matcher."""
    gts, plist, owner = [], [], []
    for qi, (t, p) in enumerate(zip(targets, preds, strict=True)):
        members = np.flatnonzero(index.formulas == t[0])
        e = np.nan_to_num(index.e_above_hull[members], nan=0.0)
        seen: set[int] = set()
        for m in members[np.argsort(e, kind="stable")]:  # ground state first, one structure per prototype
            if int(index.cluster[m]) not in seen:
                seen.add(int(index.cluster[m]))
                gts.append(index.structure(int(m)))
                plist.append([c.structure for c in p.candidates])
                owner.append(qi)
    rms = rms_table(gts, plist, workers=workers)
    owner_arr = np.asarray(owner)
    hits = []
    for qi, p in enumerate(preds):
        rows = [rms[j] for j in np.flatnonzero(owner_arr == qi)]
        hits.append(
            np.array([[r is not None for r in row] for row in rows], dtype=bool).reshape(len(rows), len(p.candidates))
        )
    return hits


def scores_and_energies(preds: list, recs: list[dict]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per formula: its candidates' scores and relaxed energies per atom (``recs`` in candidate order)."""
    scores, energies, pos = [], [], 0
    for p in preds:
        n = len(p.candidates)
        scores.append(np.array([c.score for c in p.candidates], dtype=float))
        energies.append(
            np.array([np.nan if r["energy_per_atom"] is None else r["energy_per_atom"] for r in recs[pos : pos + n]])
        )
        pos += n
    return scores, energies


def cross_validated_orders(
    hits: list[np.ndarray], scores: list[np.ndarray], energies: list[np.ndarray], k: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[float]]:
    """2-fold cross-validation over formulas: the weight chosen on one half orders the other half's
    candidates; returns the orders and the weight of each fold."""
    n = len(hits)
    fold = rng.integers(0, 2, n)
    cv_orders: list[np.ndarray] = [np.zeros(0, dtype=int)] * n
    chosen_cv = []
    for f in (0, 1):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        w, _ = choose_weight([hits[i] for i in tr], [scores[i] for i in tr], [energies[i] for i in tr], k)
        chosen_cv.append(w)
        for i in te:
            cv_orders[i] = np.argsort(-energy_scores(scores[i], energies[i], w), kind="stable")
    return cv_orders, chosen_cv


def energy_polymorphs(
    hetero: HeteroModel,
    bank: Bank,
    val_rows: np.ndarray,
    limit: int = 150,
    settings: CalculatorSettings | None = None,
    cache_path: str | Path | None = None,
    workers: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out formulas with >= 2 prototypes in the pool: :data:`CANDIDATES` distinct structures predicted (no
    template of the formula), each relaxed; the energy weight learned by 2-fold cross-validation over the
    formulas (chosen on one half, reported on the other); ground state first and metastable recall@k
    (:data:`RECALL_K`) of the predicted structures (StructureMatcher against the formula's known polymorphs,
    one per prototype)."""
    k, candidates = RECALL_K, CANDIDATES
    settings = settings or energy_settings()
    rng = np.random.default_rng(seed)
    targets, preds = polymorph_candidates(hetero, bank, val_rows, candidates, limit, rng)
    out: dict[str, Any] = {"n_formulas": len(targets), "k": k, "candidates": candidates, "calculator": settings.calc_id}
    out["settings"] = settings.key_settings()
    if not targets:
        return out
    hits = polymorph_hits(bank.index, targets, preds, workers)
    cache = EnergyCache(cache_path)
    t0 = time.perf_counter()
    flat = [c.structure for p in preds for c in p.candidates]
    logger.info(
        "energy polymorphs: %d formulas, %d candidates to relax (%s)", len(targets), len(flat), settings.calc_id
    )
    recs = relaxed_energies(flat, settings, cache, workers)
    wall = time.perf_counter() - t0
    scores, energies = scores_and_energies(preds, recs)
    cv_orders, chosen_cv = cross_validated_orders(hits, scores, energies, k, rng)
    w_all, curve = choose_weight(hits, scores, energies, k)
    score_only = [np.argsort(-s, kind="stable") for s in scores]
    oracle = [bool(h[0].any()) for h in hits]
    out |= {
        "score_only": _metrics(hits, score_only, k),
        "energy_cv": _metrics(hits, cv_orders, k),
        "weights_cv": chosen_cv,
        "weight_all": w_all,
        "curve": curve,
        "ground_state_among_candidates": float(np.mean(oracle)),
        "n_relaxations": len(flat),
        "relax_cpu_seconds_per_formula": float(sum(r.get("seconds", 0.0) for r in recs) / len(targets)),
        "relax_wall_seconds": wall,
        "failed_relaxations": int(sum(r["energy_per_atom"] is None for r in recs)),
    }
    return out
