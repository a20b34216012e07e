"""The prototype classifier of the ranking ablation: probabilities of a query's candidate clusters."""

from __future__ import annotations

import numpy as np
from benchmarks.prototype_classifier import (
    MIN_TEMPLATES,
    cluster_probability,
    features,
    fit_models,
    fold_of,
    training_feature,
)


def test_cluster_probabilities_of_a_formula_sum_to_one(template_index):
    idx = template_index
    models = fit_models(idx, np.arange(len(idx)))
    anon, counts = np.unique(idx.anon, return_counts=True)
    assert set(models) == {str(a) for a, n in zip(anon, counts, strict=True) if n >= MIN_TEMPLATES}
    a = max(models, key=lambda k: len(models[k].classes))
    rows = idx.by_anon[a]
    x = features(idx.stats, idx.role_props)
    clusters = np.unique(idx.cluster[rows])
    p = cluster_probability(models, idx, x[rows[0]], a, clusters)
    assert np.all((p >= 0) & (p <= 1))
    assert abs(p.sum() - 1.0) < 1e-6  # every cluster of the formula: the classes and the pooled rest
    assert np.isnan(cluster_probability(models, idx, x[0], "A9B9", clusters[:2])).all()


def test_training_queries_are_cross_fitted(template_index):
    idx = template_index
    rows = np.array([int(idx.by_anon[a][0]) for a in list(idx.by_anon)[:12]])
    groups = np.full(len(rows), 2)
    templates = np.repeat(rows, 2)
    out = training_feature(idx, rows, templates, groups)
    assert out.shape == (len(templates),)
    assert {fold_of(str(f)) for f in idx.formulas} == {0, 1}
