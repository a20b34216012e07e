"""The learned composition similarity: gradient-boosted trees on pair features (CSPML-style metric
learning), saved with its descriptor version and training-data hash.

Model files are gzipped JSON: the standardiser's arrays as lists, LightGBM's own text model format, and
the metadata. Nothing in them is executed when they are read (no pickle), so a shared or downloaded model
file cannot run code. Every field is checked when the file is read (:mod:`cspml_flows.learning.checks`):
types, array lengths, finite statistics, positive scales, and the feature count each LightGBM model reads;
a file that fails gets one ModelError naming the file and the field, before any prediction.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from cspml_flows.core import progress
from cspml_flows.core.composition import Roles
from cspml_flows.core.descriptors import (
    DESCRIPTOR_VERSION,
    MAX_ROLES,
    ROLE_PROPERTIES,
    magpie_stats,
    role_fractions,
    role_properties,
)
from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.errors import ModelError
from cspml_flows.learning import checks
from cspml_flows.learning.features import (
    STAT_COLS,
    Standardizer,
    n_pair_features,
    pair_features,
    standardized_pair_features,
)
from cspml_flows.learning.pairs import pair_labels, sample_pairs
from cspml_flows.learning.ranker import CandidateRanker
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.volumes import fit_element_volumes, volume_mapping, volume_table

logger = logging.getLogger(__name__)

MODEL_FORMAT = 2  # 2: LightGBM text model in gzipped JSON (format 1 was a joblib pickle)


@dataclass
class TrainingReport:
    """Held-out pair metrics of a training run, beside the unlearned descriptor distance's."""

    n_templates: int
    n_train_pairs: int
    n_test_pairs: int
    positive_fraction: float
    pair_accuracy: float
    roc_auc: float
    baseline_accuracy: float
    baseline_roc_auc: float
    label_agreement: float | None
    train_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dict(self.__dict__)


@dataclass
class QueryBatch:
    """Descriptors of query compositions, row-aligned with a list of :class:`Roles`."""

    roles: list[Roles]
    stats: np.ndarray
    role_props: np.ndarray
    role_fracs: np.ndarray

    @classmethod
    def from_roles(cls, role_list: list[Roles]) -> QueryBatch:
        """Descriptors of the compositions of ``role_list``."""
        return cls(
            role_list,
            magpie_stats([r.reduced_formula for r in role_list]),
            role_properties(role_list),
            role_fractions(role_list),
        )


def training_hash(index: TemplateIndex) -> str:
    """Hash of the index's ids and prototype clusters (what a model was trained on)."""
    h = hashlib.sha256()
    for mid, c in zip(index.ids, index.cluster, strict=True):
        h.update(f"{mid}:{c};".encode())
    return h.hexdigest()[:16]


class SimilarityModel:
    """P(query and template take the same prototype | composition descriptors)."""

    def __init__(self, std: Standardizer, booster: lgb.Booster | None = None, meta: dict | None = None):
        self.std = std
        self.booster = booster
        self.meta = meta or {}
        self.ranker: CandidateRanker | None = None  # second stage over a query's candidates (optional)
        # volume per atom of each element (by atomic number) learned from the training pool, which rescales
        # substituted cells; None for a model file without them (the pure elements' volumes are used)
        self.volumes = volume_table(self.meta["element_volumes"]) if "element_volumes" in self.meta else None

    # ---- features -------------------------------------------------------------------------------------
    def standardized_index(self, index: TemplateIndex) -> tuple[np.ndarray, np.ndarray]:
        """Standardised role properties and Magpie statistics of every template (computed once per index)."""
        key = (id(index), len(index), index.signature)
        cached = getattr(self, "_std_index", None)
        if cached is None or cached[0] != key:
            cached = (key, self.std.roles(index.role_props), self.std.stats(index.stats))
            self._std_index = cached
        return cached[1], cached[2]

    def features_standardized(
        self, qr: np.ndarray, q_frac: np.ndarray, sq: np.ndarray, index: TemplateIndex, t: np.ndarray
    ) -> np.ndarray:
        """:meth:`features` from standardised query rows (``qr`` role properties, ``sq`` statistics)."""
        tr, st = self.standardized_index(index)
        return standardized_pair_features(
            qr,
            q_frac,
            sq,
            tr[t],
            st[t],
            index.cluster_size[t].astype(float),
            index.e_above_hull[t],
            index.nprim[t].astype(float),
        )

    def features(
        self, q: QueryBatch, qi: np.ndarray, q_role: np.ndarray, index: TemplateIndex, t: np.ndarray
    ) -> np.ndarray:
        """Pair features for query rows ``qi`` (role properties ``q_role`` already permuted), templates ``t``."""
        return pair_features(
            q_role,
            q.role_fracs[qi],
            q.stats[qi],
            index.role_props[t],
            index.stats[t],
            index.cluster_size[t].astype(float),
            index.e_above_hull[t],
            index.nprim[t].astype(float),
            self.std,
        )

    def predict_proba(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        """P(same prototype) per feature row; ``threads`` for LightGBM (default: ``CSPML_THREADS`` or all)."""
        if self.booster is None:
            raise ModelError("model is not trained")
        if len(x) == 0:
            return np.zeros(0)
        return self.booster.predict(x, num_threads=lightgbm_threads() if threads is None else threads)

    # ---- training -------------------------------------------------------------------------------------
    @staticmethod
    def _pairs_xy(
        index: TemplateIndex, model: SimilarityModel, a: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        q = QueryBatch(index.roles, index.stats, index.role_props, index.role_fracs)
        x = model.features(q, a, index.role_props[a], index, t)
        return x, pair_labels(index, a, t)

    @classmethod
    def train(  # noqa: PLR0913 - the public training entry's keyword options (callers pass them by name)
        cls,
        index: TemplateIndex,
        test_fraction: float = 0.2,
        seed: int = 0,
        max_anchors: int = 20000,
        max_test_anchors: int = 5000,
        max_group: int = 5000,
        n_near: int = 24,
        n_random: int = 8,
        max_iter: int = 150,
        check_labels: int = 200,
        refit_all: bool = True,
    ) -> tuple[SimilarityModel, TrainingReport]:
        """Train on pairs of the index; report accuracy and ROC-AUC on pairs whose query composition is
        held out (20 % of reduced formulas), beside the unlearned descriptor distance.

        On a large pool the work is bounded by subsampling, each with its own seeded draw: at most
        ``max_anchors`` training anchors and ``max_test_anchors`` held-out anchors, and an anchor's nearest
        partners are sought among at most ``max_group`` templates of its anonymous formula (see
        :func:`sample_pairs`). Pools whose groups and held-out sets are below these sizes train on exactly the
        pairs they always did."""
        t0 = time.perf_counter()
        if len(index) < 10:
            raise ModelError(f"need at least 10 templates to train, the store has {len(index)}")
        rng = np.random.default_rng(seed)
        std = Standardizer(index.stats, index.role_props)
        model = cls(std)
        anchors, train_idx, test_idx = _split_anchors(index, rng, test_fraction, max_anchors, max_test_anchors, seed)

        def pairs(rows: np.ndarray, allowed: np.ndarray, draw: int) -> tuple[np.ndarray, np.ndarray]:
            return sample_pairs(index, rows, allowed, std, n_near, n_random, draw, max_group)

        a_tr, t_tr = pairs(anchors, train_idx, seed)
        a_te, t_te = pairs(test_idx, train_idx, seed + 1)
        x_tr, y_tr = cls._pairs_xy(index, model, a_tr, t_tr)
        x_te, y_te = cls._pairs_xy(index, model, a_te, t_te)
        if len(np.unique(y_tr)) < 2:
            raise ModelError("training pairs are all of one class: the store needs more structures sharing prototypes")
        logger.info("training pairs: %d (%.1f%% positive); held-out pairs: %d", len(y_tr), 100 * y_tr.mean(), len(y_te))
        model.booster = _fit_booster(x_tr, y_tr, max_iter, seed)
        metrics = _held_out_metrics(model, x_tr, y_tr, x_te, y_te)
        agreement = _label_agreement(index, a_te, t_te, check_labels, rng) if check_labels else None
        if refit_all:
            a_all, t_all = pairs(np.concatenate([anchors, test_idx]), np.arange(len(index)), seed + 2)
            x_all, y_all = cls._pairs_xy(index, model, a_all, t_all)
            model.booster = _fit_booster(x_all, y_all, max_iter, seed)
        model.meta = _model_meta(index)
        model.volumes = volume_table(model.meta["element_volumes"])
        report = TrainingReport(
            n_templates=len(index),
            n_train_pairs=len(y_tr),
            n_test_pairs=len(y_te),
            positive_fraction=float(y_tr.mean()),
            **metrics,
            label_agreement=agreement,
            train_seconds=time.perf_counter() - t0,
        )
        model.meta["report"] = report.as_dict()
        return model, report

    # ---- persistence ----------------------------------------------------------------------------------
    def to_blob(self) -> dict[str, Any]:
        """What a model file holds (also embedded in hetero model files): JSON types only."""
        if self.booster is None:
            raise ModelError("model is not trained")
        blob = {"meta": self.meta, "std": self.std.to_dict(), "booster": self.booster.model_to_string()}
        if self.ranker is not None:
            blob["ranker"] = self.ranker.to_blob()
        return blob

    @classmethod
    def from_blob(cls, blob: Any, where: str = "") -> SimilarityModel:
        """Inverse of :meth:`to_blob`, checked field by field before anything is built: SchemaError naming the
        field (prefixed by ``where``) for a missing field, a wrong type or shape, a non-finite statistic, a
        scale that is not positive, or a booster that reads another number of features than
        :func:`~cspml_flows.learning.features.n_pair_features`."""
        meta = _check_meta(blob, where)
        std = Standardizer.from_dict(checks.field(blob, "std", dict, where), f"{where}std.")
        booster = checks.booster(f"{where}booster", checks.field(blob, "booster", str, where), n_pair_features())
        model = cls(std, booster, meta)
        ranker = checks.field(blob, "ranker", dict, where, optional=True)
        if ranker:
            model.ranker = CandidateRanker.from_blob(ranker, f"{where}ranker.")
        return model

    def without_ranker(self) -> SimilarityModel:
        """The same pair model without its second stage (for ablations)."""
        return type(self)(self.std, self.booster, self.meta)

    def save(self, path: str | Path) -> Path:
        """Write the gzipped JSON model file atomically (temporary file, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as fh:
            json.dump(self.to_blob(), fh)
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> SimilarityModel:
        """Read a model file written by :meth:`save`; every problem is one ModelError naming the file."""
        versions = {"format": MODEL_FORMAT, "descriptor_version": DESCRIPTOR_VERSION}
        return checks.load_model_file(path, "model", "booster", "train one with 'cspml train'", versions, cls.from_blob)


def lightgbm_threads() -> int:
    """Threads for LightGBM: ``CSPML_THREADS`` if set, else all cores (0 = OpenMP default)."""
    return int(os.environ.get("CSPML_THREADS", "0") or 0)


def _fit_booster(x: np.ndarray, y: np.ndarray, max_iter: int, seed: int) -> lgb.Booster:
    """Gradient-boosted trees (LightGBM, binary log-loss) with early stopping on a random 10 % of the rows."""
    rng = np.random.default_rng(seed)
    val = rng.random(len(y)) < 0.1
    params = {
        "objective": "binary",
        "learning_rate": 0.1,
        "num_leaves": 31,
        "min_data_in_leaf": 40,
        "lambda_l2": 1.0,
        "max_bin": 255,
        "feature_pre_filter": False,
        "num_threads": lightgbm_threads(),
        "seed": seed,
        "verbosity": -1,
    }
    train = lgb.Dataset(x[~val], y[~val], free_raw_data=True)
    valid = lgb.Dataset(x[val], y[val], reference=train)
    with progress.bar(max_iter, "boosting rounds", unit="round") as shown:
        return lgb.train(
            params,
            train,
            num_boost_round=max_iter,
            valid_sets=[valid],
            callbacks=[lgb.early_stopping(20, verbose=False), lambda _env: shown.update(1)],
        )


def _check_meta(blob: Any, where: str = "") -> dict[str, Any]:
    """A model's ``meta`` mapping; its ``report`` (training metrics), where present, a mapping too."""
    meta = checks.field(blob, "meta", dict, where)
    checks.field(meta, "report", dict, f"{where}meta.", optional=True)
    if "element_volumes" in meta:
        checks.element_values(f"{where}meta.element_volumes", meta["element_volumes"])
    return meta


def dist_column() -> int:
    """Column of the unlearned Magpie distance in :func:`pair_features`."""
    return 2 * MAX_ROLES * len(ROLE_PROPERTIES) + MAX_ROLES + len(STAT_COLS)


def _best_threshold(score: np.ndarray, y: np.ndarray) -> float:
    qs = np.quantile(score, np.linspace(0.01, 0.99, 99))
    accs = [((score > q) == y).mean() for q in qs]
    return float(qs[int(np.argmax(accs))])


def _label_agreement(index: TemplateIndex, a: np.ndarray, t: np.ndarray, n: int, rng) -> float | None:
    """Share of sampled pairs where the cluster label equals a direct ``fit_anonymous`` call."""
    if len(a) == 0:
        return None
    matcher = Matcher()
    pick = rng.choice(len(a), size=min(n, len(a)), replace=False)
    agree = 0
    for k in pick:
        direct = matcher.fit_anonymous(index.structure(a[k]), index.structure(t[k]))
        agree += direct == (index.cluster[a[k]] == index.cluster[t[k]])
    return agree / len(pick)


def _split_anchors(
    index: TemplateIndex,
    rng: np.random.Generator,
    test_fraction: float,
    max_anchors: int,
    max_test_anchors: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training anchors, training rows and held-out anchors: ``test_fraction`` of the reduced formulas held
    out, each anchor set subsampled to its bound."""
    formulas = np.unique(index.formulas)
    test_formulas = set(rng.choice(formulas, size=max(1, int(len(formulas) * test_fraction)), replace=False))
    is_test = np.array([f in test_formulas for f in index.formulas])
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    anchors = train_idx if len(train_idx) <= max_anchors else rng.choice(train_idx, max_anchors, replace=False)
    if len(test_idx) > max_test_anchors:
        test_idx = np.sort(np.random.default_rng(seed + 3).choice(test_idx, max_test_anchors, replace=False))
    return anchors, train_idx, test_idx


def _held_out_metrics(
    model: SimilarityModel, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray
) -> dict[str, float]:
    """Accuracy and ROC-AUC on the held-out pairs, of the model and of the unlearned descriptor distance
    (thresholded where it is most accurate on the training pairs)."""
    p_te = model.predict_proba(x_te)
    dist_col = dist_column()
    both = len(np.unique(y_te)) == 2
    thr = _best_threshold(-x_tr[:, dist_col], y_tr)
    return {
        "pair_accuracy": float(accuracy_score(y_te, p_te > 0.5) if len(y_te) else float("nan")),
        "roc_auc": float(roc_auc_score(y_te, p_te) if both else float("nan")),
        "baseline_accuracy": float(accuracy_score(y_te, -x_te[:, dist_col] > thr) if len(y_te) else float("nan")),
        "baseline_roc_auc": float(roc_auc_score(y_te, -x_te[:, dist_col]) if both else float("nan")),
    }


def _model_meta(index: TemplateIndex) -> dict[str, Any]:
    """A model's metadata: format and descriptor versions, training data, creation time."""
    return {
        "format": MODEL_FORMAT,
        "descriptor_version": DESCRIPTOR_VERSION,
        "training_hash": training_hash(index),
        "n_templates": len(index),
        "element_volumes": volume_mapping(fit_element_volumes(index)),
        "created": datetime.now(UTC).isoformat(),
        "lightgbm": lgb.__version__,
    }
