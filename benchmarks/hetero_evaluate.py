"""Evaluation of the heterogeneous model (measurement only; training is :mod:`cspml_flows.training.hetero`).

- Metrics: composition -> structure retrieval (recall@1/5/10, MRR over prototype clusters) and polymorph
  ranking (ground state first, recall of metastable polymorphs in the top K) on held-out formulas.
- :func:`leave_prototype_out`: prototypes held out of training; structure -> composition retrieval
  (recall@10/@50 and MRR of the compositions known to take a held-out prototype, against the unlearned
  descriptor distance and pymatgen's substitution probabilities), and the user-template experiment (the
  prototype removed from the pool, one of its structures supplied as a user file, its other compositions
  predicted and matched with StructureMatcher).
- Polymorphs end to end with relaxed energies: :func:`benchmarks.polymorph_energy.energy_polymorphs`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from pymatgen.core import Structure

from benchmarks.scoring import rms_table, summarize
from cspml_flows.learning.hetero.model import Bank, HeteroModel
from cspml_flows.predict.hetero_rank import HeteroPredictor
from cspml_flows.predict.inverse import PoolNormaliser, assignment_parts, formula_assignments, score_assignments
from cspml_flows.predict.predictor import CSPPredictor, Prediction
from cspml_flows.predict.user_templates import merge_indices
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.hetero_metrics import prototype_queries, retrieval_metrics

logger = logging.getLogger(__name__)


def inverse_retrieval(index: TemplateIndex, bank: Bank, model: HeteroModel, held: np.ndarray) -> dict[str, Any]:
    """Structure -> composition retrieval on held-out prototypes: each queried with its lowest-energy
    structure, every formula of its anonymous formula ranked (relevant: the others taking the prototype), by
    the model's inverse weights (``hetero``), the CSPML logit, the logit normalised over the pool's other
    prototypes, the tower, pymatgen's substitution probabilities and the unlearned descriptor distance."""
    core = model.core
    weights = {
        "hetero": model.inv,
        "cspml": (1, 0, 0, 0),
        "cspml normalised": (0, 0, 0, 1),
        "tower": (0, 1, 0, 0),
        "pymatgen": (0, 0, 1, 0),
    }
    if core is None:
        weights = {k: w for k, w in weights.items() if k in ("tower", "pymatgen")}
    normaliser = PoolNormaliser(core, index) if core is not None else None
    ranked: dict[str, list[list[str]]] = {m: [] for m in [*weights, "descriptor"]}
    relevant: list[set] = []
    for t, formulas, rel in prototype_queries(index, held):
        relevant.append(rel)
        assignments, owner_arr = formula_assignments(formulas)
        _, _, parts = assignment_parts(model, bank, t, assignments, core, normaliser, int(index.cluster[t]))
        scores = {m: parts @ np.asarray(w, dtype=float) for m, w in weights.items()}
        scores["descriptor"] = score_assignments(model, bank, t, assignments, "descriptor")[2]
        for m, sc in scores.items():
            best = np.full(len(formulas), -np.inf)
            np.maximum.at(best, owner_arr, sc)
            ranked[m].append([formulas[i] for i in np.argsort(-best, kind="stable")])
    return {m: retrieval_metrics(ranked[m], relevant, ks=(1, 5, 10, 50)) for m in ranked}


def leave_prototype_out(
    index: TemplateIndex,
    geom: np.ndarray,
    model: HeteroModel,
    held: np.ndarray,
    seed: int = 0,
    user_limit: int = 60,
    workers: int = 2,
    emb: np.ndarray | None = None,
) -> dict[str, Any]:
    """Inverse design (structure -> composition retrieval) and user templates on held-out prototypes, with
    ``model`` trained without them (:func:`cspml_flows.training.hetero.train_without`)."""
    t0 = time.perf_counter()
    is_held = np.isin(index.cluster, held)
    logger.info("leave-prototype-out: %d prototypes (%d templates) held out", len(held), is_held.sum())
    s2c = inverse_retrieval(index, model.bank(index, geom, emb=emb), model, held)
    logger.info("leave-prototype-out: structure -> composition on %d prototypes", s2c["tower"]["n"])
    user = {"n": 0}
    if user_limit:  # a held-out prototype comes back only as one user structure
        user = user_template_experiment(index, geom, emb, held, is_held, model, user_limit, workers, seed)
    return {
        "n_prototypes": len(held),
        "n_templates_held_out": int(is_held.sum()),
        "structure_to_composition": s2c,
        "user_templates": user,
        "fusion": {"lam": model.lam, "mu": model.mu, "stacked": model.stacker is not None},
        "inverse_weights": [float(x) for x in model.inv],
        "seconds": time.perf_counter() - t0,
    }


def user_template_queries(
    index: TemplateIndex, held: np.ndarray, limit: int, rng: np.random.Generator
) -> tuple[list[int], list[Structure], list[int]]:
    """Per held-out prototype: its lowest-energy member as the user template and another formula's member
    as the query (at most ``limit``, drawn); returns query rows, their structures and the user rows."""
    queries, gts, users = [], [], []
    for c in held:
        members = np.flatnonzero(index.cluster == c)
        e = np.nan_to_num(index.e_above_hull[members], nan=0.0)
        user = int(members[int(np.argmin(e))])
        others = [int(m) for m in members if index.formulas[m] != index.formulas[user]]
        if not others:
            continue
        q = int(rng.choice(others))
        queries.append(q)
        gts.append(index.structure(q))
        users.append(user)
    if len(queries) > limit:
        pick = sorted(rng.choice(len(queries), limit, replace=False))
        queries, gts, users = [queries[i] for i in pick], [gts[i] for i in pick], [users[i] for i in pick]
    return queries, gts, users


def top_rates(gts: list[Structure], preds: list[Prediction], workers: int) -> dict[str, float]:
    """Top-1 and top-5 match rates of the predictions."""
    rms = rms_table(gts, [[c.structure for c in p.candidates] for p in preds], workers=workers)
    m = summarize(rms, ks=(1, 5))
    return {"top1": m["top1"], "top5": m["top5"]}


def user_template_experiment(
    index: TemplateIndex,
    geom: np.ndarray,
    emb: np.ndarray | None,
    held: np.ndarray,
    is_held: np.ndarray,
    model: HeteroModel,
    limit: int,
    workers: int,
    seed: int,
) -> dict[str, Any]:
    """For held-out prototypes: pool without the prototype, plus one of its structures as a user template;
    predict its other compositions (top 1 / top 5) and match against their structures."""
    rng = np.random.default_rng(seed + 3)
    base_mask = ~is_held
    base = index.subset(base_mask)
    base_geom = geom[base_mask]
    queries, gts, users = user_template_queries(index, held, limit, rng)
    if not queries:
        return {"n": 0}
    # all user structures at once: each is its own cluster, ids "user:<material_id>"
    is_user = np.isin(np.arange(len(index)), users)
    ui = index.subset(is_user)
    ui.ids = np.array([f"user:{x}" for x in ui.ids])
    ui.e_above_hull = np.full(len(ui), np.nan)  # a user file carries no energy
    merged = merge_indices(base, ui)
    mgeom = np.vstack([base_geom, geom[is_user]])
    comps = [index.structure(q).composition for q in queries]
    excl = [{str(index.ids[q])} for q in queries]
    out: dict[str, Any] = {"n": len(queries)}
    bemb = memb = None
    if emb is not None:
        bemb, memb = emb[base_mask], np.vstack([emb[base_mask], emb[is_user]])
    hp_without = HeteroPredictor(base, model, model.bank(base, base_geom, emb=bemb))
    hp_with = HeteroPredictor(merged, model, model.bank(merged, mgeom, emb=memb))
    for name, hp in (("without_user_file", hp_without), ("with_user_file", hp_with)):
        preds = hp.predict(comps, polymorphs=5, exclude_ids=excl, strict=True, check_distinct=False)
        used = np.mean([bool(p.candidates) and p.candidates[0].template_id.startswith("user:") for p in preds])
        out[name] = {**top_rates(gts, preds, workers), "user_template_ranked_first": float(used)}
    preds = CSPPredictor(merged, model.core).predict(comps, top=5, exclude_ids=excl, strict=True)
    out["cspml_with_user_file"] = top_rates(gts, preds, workers)
    return out
