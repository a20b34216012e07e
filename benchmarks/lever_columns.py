"""The ranking ablation's extra candidate columns: site environments, prototype votes and volume fit.

The library's ranker reads :data:`~cspml_flows.learning.ranker.DEFAULT_FEATURES`; the ablation measures three
further groups beside them, computed here for the same candidate rows
(:class:`~cspml_flows.learning.ranker.CandidateRows`): the site-environment features of
:mod:`benchmarks.environment_features`, the prototype votes of :mod:`benchmarks.vote_features`, and how the
template member's volume fits the pool's learned element volumes (:data:`VOLUME_FEATURES`).
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
from cspml_flows.templates.volumes import fit_element_volumes, volume_rows

# ln(template volume per atom / its composition's learned volume): how densely this member packs its elements;
# |ln(query / template learned volume)|: how far substitution rescales the cell
VOLUME_FEATURES = ("volume_residual", "volume_rescale")
LEVER_FEATURES = (*ENV_FEATURES, *VOTE_FEATURES, *VOLUME_FEATURES)


def template_volume_residuals(index: TemplateIndex) -> tuple[np.ndarray, np.ndarray]:
    """The pool's learned element volumes and each template's volume residual, computed once per index."""

    def compute() -> tuple[np.ndarray, np.ndarray]:
        volumes = fit_element_volumes(index)
        x, vpa = volume_rows(index, np.arange(len(index)))
        with np.errstate(divide="ignore", invalid="ignore"):
            return volumes, np.log(vpa / (x @ np.nan_to_num(volumes)))

    return index.memo("volume_residuals", compute)


def volume_columns(index: TemplateIndex, c: CandidateRows) -> np.ndarray:
    """The :data:`VOLUME_FEATURES` of candidate rows ``c`` (NaN where an element has no volume)."""
    volumes, residual = template_volume_residuals(index)
    frac = index.role_fracs[c.t_row]
    vq = np.where(c.real, frac * volumes[c.qz], 0.0).sum(axis=1)
    vt = np.where(c.real, frac * volumes[c.tz], 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rescale = np.abs(np.log(vq / vt))
    return np.column_stack([residual[c.t_row], rescale])


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
    n_votes = n_env + len(VOTE_FEATURES)
    x[:, n_env:n_votes] = vote_features(index, list(queries), c.q_row, c.t_row, c.stats, q_stats)
    x[:, n_votes:] = volume_columns(index, c)
    return x


def training_held_out(index: TemplateIndex, query_rows: Sequence[int], strict: bool) -> list[np.ndarray]:
    """What each held-out pool query may not read in the pool statistics: its formula's templates
    (``strict``), else its own template."""
    if strict:
        return [index.rows_of_formula(index.roles[i]) for i in query_rows]
    return [np.array([i]) for i in query_rows]
