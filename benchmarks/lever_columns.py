"""The ranking ablation's extra candidate columns: site environments and prototype votes.

The library's ranker reads :data:`~cspml_flows.learning.ranker.DEFAULT_FEATURES`; the ablation measures two
further groups beside them, computed here for the same candidate rows
(:class:`~cspml_flows.learning.ranker.CandidateRows`): the site-environment features of
:mod:`benchmarks.environment_features` and the prototype votes of :mod:`benchmarks.vote_features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.environment_features import ENV_FEATURES, ElementEnvironments, environment_features
from benchmarks.vote_features import VOTE_FEATURES, vote_features
from cspml_flows.core.composition import Roles
from cspml_flows.learning.ranker import CandidateRows
from cspml_flows.templates.index import TemplateIndex

LEVER_FEATURES = (*ENV_FEATURES, *VOTE_FEATURES)


def element_environments(index: TemplateIndex) -> ElementEnvironments:
    """The per-element ECoN distributions of ``index``, computed once per index."""
    return index.memo("element_environments", lambda: ElementEnvironments.from_index(index))


def lever_columns(
    index: TemplateIndex,
    queries: Sequence[Roles],
    candidates: Sequence[Sequence[Any]],
    q_stats: np.ndarray,
    held_out: list[np.ndarray] | None = None,
) -> np.ndarray:
    """The :data:`LEVER_FEATURES` (sum of candidates, len(LEVER_FEATURES)) of each query's candidate list, in
    order, rows aligned with :func:`~cspml_flows.learning.ranker.candidate_features`.

    ``candidates[i]``: the query's :class:`~cspml_flows.predict.retrieve.Ranked` list (with ``stats``);
    ``q_stats``: Magpie statistics of the queries; ``held_out[i]``: template rows of query ``i`` itself (its
    formula for a strict query, a pool template held out for training), left out of the element
    environment statistics (None: none left out).
    """
    n = sum(len(c) for c in candidates)
    x = np.zeros((n, len(LEVER_FEATURES)))
    if n == 0:
        return x
    c = CandidateRows.build(index, queries, candidates)
    stats = element_environments(index)
    n_env = len(ENV_FEATURES)
    x[:, :n_env] = environment_features(index, c.t_row, c.qz, c.tz, c.q_ox, c.real, c.q_row, stats, held_out)
    x[:, n_env:] = vote_features(index, list(queries), c.q_row, c.t_row, c.stats, q_stats)
    return x


def training_held_out(index: TemplateIndex, query_rows: Sequence[int], strict: bool) -> list[np.ndarray]:
    """What each held-out pool query may not read in the pool statistics: its formula's templates
    (``strict``), else its own template."""
    if strict:
        return [index.rows_of_formula(index.roles[i]) for i in query_rows]
    return [np.array([i]) for i in query_rows]
