"""P(prototype | composition) from the template pool, as a candidate feature for the ranking ablation.

For each anonymous formula with enough templates, a LightGBM multiclass model over its frequent prototype
clusters (the rest pooled as one class) learns the cluster from the composition's Magpie statistics and
role-wise element properties. A candidate's feature is the probability of its cluster (the pooled class's
probability shared among the clusters in it; NaN where its anonymous formula has no model).

The ranker's training queries are pool templates, so their probabilities are cross-fitted: formulas fall in
two folds by a hash, and a query's probability comes from the models fitted on the other fold only. The
protocol's queries use models fitted on the whole training pool.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from cspml_flows.core.composition import Roles
from cspml_flows.core.descriptors import magpie_stats, role_properties
from cspml_flows.templates.index import TemplateIndex

MIN_TEMPLATES = 30  # templates of an anonymous formula below which it gets no model
MIN_MEMBERS = 5  # members of a cluster (in the training rows) below which it joins the pooled class
PARAMS = {
    "objective": "multiclass",
    "learning_rate": 0.1,
    "num_leaves": 15,
    "min_data_in_leaf": 10,
    "feature_fraction": 0.8,
    "lambda_l2": 1.0,
    "num_threads": 2,
    "verbosity": -1,
}
ROUNDS = 80


def features(stats: np.ndarray, role_props: np.ndarray) -> np.ndarray:
    """Magpie statistics and flattened role properties, one row per composition."""
    return np.hstack([stats, role_props.reshape(len(role_props), -1)])


@dataclass
class FormulaModel:
    """One anonymous formula's classifier: its classes (cluster ids; -1 the pooled rest) and pooled sizes."""

    booster: lgb.Booster | None
    classes: np.ndarray
    pooled: int  # clusters in the pooled class


def fit_formula(x: np.ndarray, clusters: np.ndarray, seed: int) -> FormulaModel:
    """The classifier of one anonymous formula's rows ``x`` with cluster labels."""
    ids, counts = np.unique(clusters, return_counts=True)
    frequent = ids[counts >= MIN_MEMBERS]
    classes = np.append(frequent, -1)
    label = np.searchsorted(frequent, clusters)
    known = np.isin(clusters, frequent)
    label = np.where(known, label, len(frequent))
    pooled = int((counts < MIN_MEMBERS).sum())
    if len(frequent) + (pooled > 0) < 2:  # one class: no model needed
        return FormulaModel(None, frequent if len(frequent) else classes, max(pooled, 1))
    params = {**PARAMS, "num_class": len(classes), "seed": seed}
    booster = lgb.train(params, lgb.Dataset(x, label), num_boost_round=ROUNDS)
    return FormulaModel(booster, classes, max(pooled, 1))


def fit_models(index: TemplateIndex, rows: np.ndarray, seed: int = 0) -> dict[str, FormulaModel]:
    """A classifier per anonymous formula with at least MIN_TEMPLATES of ``rows``."""
    x_all = features(index.stats, index.role_props)
    models = {}
    anon = index.anon[rows]
    for a in np.unique(anon):
        sel = rows[anon == a]
        if len(sel) >= MIN_TEMPLATES:
            models[str(a)] = fit_formula(x_all[sel], index.cluster[sel], seed)
    return models


def cluster_probability(
    models: dict[str, FormulaModel], index: TemplateIndex, x: np.ndarray, anon: str, clusters: np.ndarray
) -> np.ndarray:
    """P(cluster | composition ``x``) of each candidate cluster of one query (NaN: no model)."""
    m = models.get(anon)
    if m is None:
        return np.full(len(clusters), np.nan)
    if m.booster is None:  # one class: the one frequent cluster, or every cluster pooled
        if m.classes[0] == -1:
            return np.full(len(clusters), 1.0 / m.pooled)
        return np.where(clusters == m.classes[0], 1.0, 0.0)
    p = m.booster.predict(x[None, :])[0]
    pos = {int(c): k for k, c in enumerate(m.classes[:-1])}
    return np.array([p[pos[int(c)]] if int(c) in pos else p[-1] / m.pooled for c in clusters])


def fold_of(formula: str, folds: int = 2) -> int:
    """The cross-fitting fold of a reduced formula."""
    return zlib.crc32(formula.encode()) % folds


def training_feature(
    index: TemplateIndex, query_rows: np.ndarray, template_rows: np.ndarray, groups: np.ndarray, seed: int = 0
) -> np.ndarray:
    """The cluster probability of every training candidate, cross-fitted over two formula folds."""
    fold = np.array([fold_of(str(f)) for f in index.formulas])
    out = np.full(len(template_rows), np.nan)
    starts = np.concatenate([[0], np.cumsum(groups)])
    x_all = features(index.stats, index.role_props)
    for f in (0, 1):
        models = fit_models(index, np.flatnonzero(fold != f), seed)
        for k, q in enumerate(query_rows):
            if fold[q] != f:
                continue
            sl = slice(starts[k], starts[k + 1])
            out[sl] = cluster_probability(models, index, x_all[q], str(index.anon[q]), index.cluster[template_rows[sl]])
    return out


def query_feature(
    index: TemplateIndex,
    train_rows: np.ndarray,
    queries: Sequence[Roles],
    candidates: Sequence[Sequence],
    seed: int = 0,
) -> np.ndarray:
    """The cluster probability of every candidate of the protocol's queries (models on ``train_rows``)."""
    models = fit_models(index, train_rows, seed)
    x = features(magpie_stats([q.reduced_formula for q in queries]), role_properties(list(queries)))
    parts = [
        cluster_probability(models, index, x[i], q.anonymous_formula, np.array([c.cluster for c in cands]))
        for i, (q, cands) in enumerate(zip(queries, candidates, strict=True))
    ]
    return np.concatenate(parts) if parts else np.zeros(0)
