"""Prototype votes among a query's scored templates, and the query's chemistry class.

The pair model scores every prefiltered template of the query's anonymous formula; the templates of one
prototype that score high together are a soft nearest-neighbour vote for that prototype. Per candidate:

- ``cluster_vote``: the share of the query's candidate score mass (mean member probability times members
  scored, summed over the assignments) that falls on the candidate's prototype cluster;
- ``label_vote``: the same for its prototype label and space group (clusters that share them pool votes);
- ``query_en_range``, ``query_n_elements``, ``query_anion_fraction``: the query's electronegativity range,
  element count and atom fraction of bond-valence anions, so the ranker can condition on the chemistry class
  (intermetallic, ionic, covalent).
"""

from __future__ import annotations

import numpy as np

from benchmarks.environment_features import BV_ANIONS
from cspml_flows.core.composition import Roles
from cspml_flows.core.descriptors import MAGPIE_PROPERTIES, MAGPIE_STATS
from cspml_flows.templates.index import TemplateIndex

VOTE_FEATURES = ("cluster_vote", "label_vote", "query_en_range", "query_n_elements", "query_anion_fraction")
_EN_RANGE = MAGPIE_PROPERTIES.index("Electronegativity") * len(MAGPIE_STATS) + MAGPIE_STATS.index("range")


def _group_share(q_row: np.ndarray, key: np.ndarray, mass: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Per row, the summed ``mass`` of the rows of its query with its ``key``, over the query's ``total``."""
    _, group = np.unique(np.stack([q_row, key]), axis=1, return_inverse=True)
    group = group.ravel()
    summed = np.bincount(group, weights=mass)[group]
    return np.where(total[q_row] > 0, summed / np.maximum(total[q_row], 1e-12), 0.0)


def vote_features(
    index: TemplateIndex,
    queries: list[Roles],
    q_row: np.ndarray,
    t_row: np.ndarray,
    stats: np.ndarray,
    q_stats: np.ndarray,
) -> np.ndarray:
    """The :data:`VOTE_FEATURES` of each candidate row (``stats``: best, mean member probability, members)."""
    n = len(t_row)
    x = np.zeros((n, len(VOTE_FEATURES)))
    if n == 0:
        return x
    mass = stats[:, 1] * stats[:, 2]
    total = np.bincount(q_row, weights=mass, minlength=len(queries))
    x[:, 0] = _group_share(q_row, index.cluster[t_row].astype(np.int64), mass, total)
    labels = np.char.add(index.prototype[t_row].astype(str), index.spacegroup[t_row].astype(str))
    _, label_id = np.unique(labels, return_inverse=True)
    x[:, 1] = _group_share(q_row, label_id.ravel().astype(np.int64), mass, total)
    anion = set(BV_ANIONS)
    per_query = np.array(
        [
            [
                len(r.elements),
                sum(a for e, a in zip(r.elements, r.amounts, strict=True) if e in anion) / sum(r.amounts),
            ]
            for r in queries
        ]
    )
    x[:, 2] = q_stats[q_row, _EN_RANGE]
    x[:, 3] = per_query[q_row, 0]
    x[:, 4] = per_query[q_row, 1]
    return x
