"""Which member of a prototype cluster realises its candidates: the most probable, or the nearest in composition."""

from __future__ import annotations

import numpy as np
import pytest

from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.predict.retrieve import aggregate_rows, rank
from cspml_flows.templates.index import TemplateIndex


def one_cluster_rows(index: TemplateIndex) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the biggest cluster (at least three members)."""
    counts = np.bincount(index.cluster)
    c = int(np.argmax(counts))
    members = np.flatnonzero(index.cluster == c)
    assert len(members) >= 3
    return members, np.full(len(members), c)


def test_nearest_member_realises_the_cluster_with_unchanged_scores(template_index):
    members, _ = one_cluster_rows(template_index)
    n = len(members)
    qi, pi = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    prob = np.linspace(0.9, 0.1, n)  # the first member is the most probable
    distance = np.linspace(1.0, 0.0, n)  # the last is the nearest
    perms = [[(0,) * 1]]
    (by_prob,) = aggregate_rows(template_index, qi, members, pi, prob, perms, top=5, vote=0.15)
    (by_distance,) = aggregate_rows(template_index, qi, members, pi, prob, perms, top=5, vote=0.15, distance=distance)
    assert by_prob[0].template == members[0] and by_distance[0].template == members[-1]
    assert by_distance[0].alternates == tuple(members[::-1][1:4].tolist())
    assert by_prob[0].score == by_distance[0].score and by_prob[0].stats == by_distance[0].stats


def test_member_option_reaches_retrieval(template_index, trained_model):
    q = [template_index.roles[0]]
    with pytest.raises(ValueError, match="member must be"):
        rank(trained_model, template_index, q, member="closest")
    a = CSPPredictor(template_index, trained_model).predict([q[0].reduced_formula], top=3)
    b = CSPPredictor(template_index, trained_model, member="nearest").predict([q[0].reduced_formula], top=3)
    assert a[0].candidates and b[0].candidates
    assert {c.prototype for c in a[0].candidates} & {c.prototype for c in b[0].candidates}
