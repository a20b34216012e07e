"""Training of the heterogeneous model: towers, fusion weights and inverse weights, then the final refit.

The towers (:mod:`cspml_flows.training.hetero_towers`) learn from half labels, half the CSPML model's softmax
over the same candidates (``DISTILL``; the teacher never saw the held-out formulas), which ranks held-out
formulas better than labels alone. The weights that mix the tower with CSPML are chosen on
held-out formulas (15 %) and held-out prototypes (10 % of those taken by three or more formulas) of the pool
(:mod:`cspml_flows.training.hetero_weights`); the final towers are then trained on every template.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cspml_flows.core.descriptors import DESCRIPTOR_VERSION
from cspml_flows.core.errors import ModelError
from cspml_flows.learning.hetero.embeddings import EMBED_VERSION, index_embeddings
from cspml_flows.learning.hetero.encoders import GEOMETRY_VERSION
from cspml_flows.learning.hetero.model import HETERO_FORMAT, Bank, HeteroModel, index_geometry
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.hetero_metrics import held_out_prototypes
from cspml_flows.training.hetero_towers import TrainingGroups, fit_towers, init_model
from cspml_flows.training.hetero_weights import choose_fusion, choose_inverse

logger = logging.getLogger(__name__)

HELD_PROTOTYPES = 0.1  # share of the prototypes taken by >= 3 formulas held out of the weight-choosing models
DISTILL = 0.5  # share of the tower's target from CSPML's softmax (chosen on the mpts52 pool's held-out formulas)


@dataclass
class TowerSetup:
    """What every tower of one training shares: the pool, its geometry and embeddings, the tower settings."""

    index: TemplateIndex
    geom: np.ndarray
    emb: np.ndarray | None
    variant: str
    dim: int
    seed: int
    epochs: int
    distill: float

    def init(self) -> HeteroModel:
        """Untrained towers (:func:`~cspml_flows.training.hetero_towers.init_model`)."""
        return init_model(self.index, self.geom, self.emb, self.variant, dim=self.dim, seed=self.seed)

    def bank(self, model: HeteroModel) -> Bank:
        """The pool's template side under ``model``."""
        return Bank(self.index, model.psi(self.index, self.geom, self.emb))

    def fit(
        self, model: HeteroModel, bank: Bank, rows: np.ndarray, seed: int, teacher: SimilarityModel | None
    ) -> list[float]:
        """Train ``model``'s towers on the groups of ``rows`` (distilled from ``teacher``); loss per epoch."""
        groups = TrainingGroups.build(model, self.index, rows, rows, seed=seed)
        if teacher is not None:
            groups = groups.distill(teacher, self.index, self.distill)
        logger.info(
            "hetero (%s): %d training compositions, %d candidate pairs",
            self.variant,
            len(groups.phi),
            groups.valid.sum(),
        )
        return fit_towers(model, bank, groups, epochs=self.epochs, seed=self.seed)


def train_hetero(  # noqa: PLR0913 - the public training entry's keyword options
    index: TemplateIndex,
    core: SimilarityModel | None = None,
    geom: np.ndarray | None = None,
    emb: np.ndarray | None = None,
    variant: str = "species",
    val_fraction: float = 0.15,
    seed: int = 0,
    epochs: int = 40,
    dim: int = 32,
    workers: int = 2,
    reuse_val_core: bool = False,
    core_tr: SimilarityModel | None = None,
    core_kwargs: dict[str, Any] | None = None,
    distill: float = DISTILL,
) -> tuple[HeteroModel, dict[str, Any]]:
    """Train the towers, choose the fusion and inverse weights on held-out formulas, refit on everything.

    ``core``: the CSPML model trained on this same index (trained here when None and needed). A second core
    model, trained without the held-out formulas (``core_tr``, trained here when None), scores them while the
    weights are chosen; ``reuse_val_core`` keeps that one as the final core model. ``distill``: the share of
    each tower's training target taken from the CSPML model's softmax over the candidate group (``core_tr``
    for the tower measured on held-out formulas, the final core for the final tower; 0: labels only).
    """
    t0 = time.perf_counter()
    if len(index) < 10:
        raise ModelError(f"need at least 10 templates to train, the store has {len(index)}")
    geom = index_geometry(index, workers) if geom is None else geom
    if variant != "none" and emb is None:
        emb = index_embeddings(index, variant)
    setup = TowerSetup(index, geom, emb, variant, dim, seed, epochs, distill)
    is_val, held, fit_mask = _held_out(index, val_fraction, seed)
    model = setup.init()
    bank = setup.bank(model)
    if core_tr is None and int(fit_mask.sum()) >= 10:
        core_tr = _core_without(index.subset(fit_mask), seed, core_kwargs)
    losses = setup.fit(model, bank, np.flatnonzero(fit_mask), seed, core_tr)
    logger.info("hetero: tower loss %.3f -> %.3f (%.0f s)", losses[0], losses[-1], time.perf_counter() - t0)
    report = _choose_weights(model, bank, index, is_val, held, core_tr)
    c = report["chosen"]
    final = setup.init()
    final.lam, final.mu, final.use_core = c["lam"], c["mu"], core_tr is not None
    final.inv = np.asarray(report["inverse"]["chosen"], dtype=float)
    final.stacker = report.pop("stacker", None)
    if final.use_core and core is None:
        core = (
            core_tr
            if reuse_val_core
            else SimilarityModel.train(index, seed=seed, check_labels=0, **(core_kwargs or {}))[0]
        )
    final.core = core if final.use_core else None
    setup.fit(final, setup.bank(final), np.arange(len(index)), seed + 1, core if core is not None else core_tr)
    report["train_seconds"] = time.perf_counter() - t0
    report["tower_loss"] = [round(x, 4) for x in losses]
    report["distill"] = distill if core_tr is not None else 0.0
    final.meta = _meta(index, report)
    return final, report


def _choose_weights(
    model: HeteroModel,
    bank: Bank,
    index: TemplateIndex,
    is_val: np.ndarray,
    held: np.ndarray,
    core_tr: SimilarityModel | None,
) -> dict[str, Any]:
    """The fusion and inverse weights chosen on the held-out formulas (mask ``is_val``) and prototypes."""
    report = choose_fusion(model, bank, index, np.flatnonzero(is_val), core_tr)
    report["inverse"] = choose_inverse(model, bank, index, np.flatnonzero(is_val), core_tr, held)
    report["n_held_prototypes"] = len(held)
    c, inv = report["chosen"], report["inverse"]
    logger.info(
        "hetero: fusion lam=%s mu=%s stacked=%s on %s formulas",
        c["lam"],
        c["mu"],
        c["stacked"],
        report["n_val_queries"],
    )
    logger.info("hetero: inverse weights %s on %s held-out queries", inv["chosen"], inv["n"])
    return report


def _held_out(index: TemplateIndex, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out formulas (mask), held-out prototypes, and the mask of the rows the weight-choosing models see.

    A given ``core_tr`` should come from a training of this index and seed, which held out the same ones.
    """
    rng = np.random.default_rng(seed)
    formulas = np.unique(index.formulas)
    val_formulas = set(rng.choice(formulas, size=max(1, int(len(formulas) * val_fraction)), replace=False))
    is_val = np.isin(index.formulas, list(val_formulas))
    held = held_out_prototypes(index.subset(~is_val), HELD_PROTOTYPES, 3, seed)
    return is_val, held, ~is_val & ~np.isin(index.cluster, held)


def _core_without(index: TemplateIndex, seed: int, core_kwargs: dict[str, Any] | None) -> SimilarityModel | None:
    """The CSPML model that scores held-out formulas while the weights are chosen (None: too few pairs)."""
    try:
        kw = {"refit_all": False, "check_labels": 0, "seed": seed, **(core_kwargs or {})}
        return SimilarityModel.train(index, **kw)[0]
    except ModelError:
        return None


def _meta(index: TemplateIndex, report: dict[str, Any]) -> dict[str, Any]:
    """A hetero model's metadata: format and descriptor versions, training data, report."""
    return {
        "format": HETERO_FORMAT,
        "descriptor_version": DESCRIPTOR_VERSION,
        "geometry_version": GEOMETRY_VERSION,
        "embedding_version": EMBED_VERSION,
        "training_hash": training_hash(index),
        "n_templates": len(index),
        "created": datetime.now(UTC).isoformat(),
        "report": report,
    }


def train_without(
    index: TemplateIndex,
    geom: np.ndarray,
    val_rows: np.ndarray,
    held: np.ndarray,
    seed: int = 0,
    emb: np.ndarray | None = None,
    **kw: Any,
) -> HeteroModel:
    """A hetero model (towers, weights and core) that never saw the held-out formulas or prototypes."""
    keep = np.ones(len(index), dtype=bool)
    keep[val_rows] = False
    keep &= ~np.isin(index.cluster, held)
    sub_emb = None if emb is None else emb[keep]
    model, _ = train_hetero(index.subset(keep), geom=geom[keep], emb=sub_emb, seed=seed, reuse_val_core=True, **kw)
    return model
