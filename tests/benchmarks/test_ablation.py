"""The ranking ablation's pieces: labels of protocol-style queries and top-k over reordered candidates."""

from __future__ import annotations

import numpy as np
from benchmarks.ablation import (
    CHEMISTRY,
    COLUMNS,
    ENVIRONMENT,
    FEATURES,
    PAIR,
    PROTOTYPE,
    PROTOTYPE_PROBABILITY,
    VOLUME,
    VOTES,
    label_queries,
    paired_difference,
    top_k,
)

from cspml_flows.core.composition import roles
from cspml_flows.core.equivalence import structure_matcher
from cspml_flows.learning.ranker import DEFAULT_FEATURES
from cspml_flows.predict.retrieve import rank
from cspml_flows.predict.substitute import substitute


def test_feature_groups_cover_every_feature_once():
    assert sorted(PAIR + PROTOTYPE + CHEMISTRY + ENVIRONMENT + VOTES + VOLUME) == sorted(FEATURES)
    # the matrices: the library ranker's columns first, then the ablation's levers, then the classifier
    assert (*DEFAULT_FEATURES, *ENVIRONMENT, *VOTES, *VOLUME, PROTOTYPE_PROBABILITY) == COLUMNS


def test_top_k_reorders_the_same_candidates():
    labels = [[0, 1, 0], [0, 0, 0], [1, 0, 0]]
    pair_order = [-np.arange(3.0)] * 3
    rates = top_k(labels, pair_order, ks=(1, 2))
    assert (rates["top1"], rates["top2"]) == (1 / 3, 2 / 3)
    assert rates["top1_se"] == np.std([0, 0, 1], ddof=1) / np.sqrt(3)
    better = [np.array([0.0, 1.0, 0.0]), np.zeros(3), np.array([1.0, 0.0, 0.0])]
    assert top_k(labels, better, ks=(1,))["top1"] == 2 / 3  # the second query has no match at all
    diff, se = paired_difference(labels, better, pair_order)
    assert diff == 1 / 3 and se == np.std([1, 0, 0], ddof=1) / np.sqrt(3)


def test_labels_agree_with_the_matcher_and_the_gate(template_index, trained_model, hand_structures):
    idx = template_index
    gts = [hand_structures["kbr"], hand_structures["bazro3"]]
    q_roles = [roles(g.composition) for g in gts]
    keep = ~np.isin(idx.formulas, ["KBr", "BaZrO3"])
    sub = idx.subset(keep)
    cands = rank(trained_model, sub, q_roles, top=6)
    labels = label_queries(sub, q_roles, cands, gts, workers=1)
    assert [len(lab) for lab in labels] == [len(c) for c in cands]
    for g, r, cs, labs in zip(gts, q_roles, cands, labels, strict=True):
        assert max(labs) == 1  # rocksalt / perovskite templates are in the pool
        for c, lab in zip(cs, labs, strict=True):
            s, _ = substitute(sub, c.template, r, c.perm)
            assert bool(lab) == (structure_matcher().get_rms_dist(s, g) is not None)


def test_miss_kinds_tell_assignment_from_prototype_errors():
    from benchmarks.ablation import miss_kinds

    from cspml_flows.predict.retrieve import Ranked

    def c(cluster: int) -> Ranked:
        return Ranked(template=0, perm=(0,), score=0.0, cluster=cluster)

    cands = [[c(1), c(1)], [c(1), c(2)], [c(1), c(2)], [c(3)]]
    labels = [[0, 1], [0, 1], [1, 0], [0]]
    scores = [np.array([1.0, 0.0])] * 3 + [np.array([1.0])]
    kinds = miss_kinds(cands, labels, scores)
    assert kinds["top-1 match"] == 0.25 and kinds["no match among the candidates"] == 0.25
    assert kinds["same cluster, other assignment"] == kinds["other prototype cluster"] == 0.25
    assert kinds["first match at rank 2"] == 0.5


def test_variant_rows_score_every_variant_on_the_same_candidates():
    from benchmarks.ablation import COLUMNS, SHIPPED, VARIANTS, AblationData, variant_rows

    rng = np.random.default_rng(0)
    groups = np.full(60, 5)
    xt = rng.random((int(groups.sum()), len(COLUMNS)))
    yt = (rng.random(len(xt)) < 0.3).astype(int)
    sizes = [4] * 10
    labels = [list((rng.random(4) < 0.3).astype(int)) for _ in sizes]
    data = AblationData(labels, sizes, rng.random((sum(sizes), len(COLUMNS))), xt, yt, groups)
    rows, scores = variant_rows(data, rounds=5, seed=0)
    assert set(rows) == set(scores) and {f"ranker: {name}" for name in VARIANTS} <= set(rows)
    assert all(len(s) == len(sizes) for s in scores.values())
    assert rows[f"ranker: {SHIPPED}"]["top1_minus_shipped"] == 0.0
