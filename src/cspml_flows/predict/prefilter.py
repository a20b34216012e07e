"""Candidate prefilter: the templates of an anonymous-formula group nearest to a query by role distance.

The distance is :func:`cspml_flows.learning.features.role_distance` (Euclidean distance of standardised
role-wise element properties, NaN entries ignored). :func:`nearest_rows` returns, for each query vector, the
``need`` nearest templates of a group that are not excluded, sorted by distance, ties by row (the order of a
stable sort over the group's rows). Two ways, one result:

- exactly, with numpy over every template of the group, for groups below ``threshold`` templates
  (:data:`ANN_THRESHOLD` by default);
- exactly through a :class:`GroupMatrix` for larger groups without a graph: one float32 matrix-vector
  product ranks every row, and the rows within a rounding margin of the ``need + MARGIN``-th distance (ties
  included) are re-ranked with the float64 arithmetic of the first way, which gives its answer;
- through a :class:`GroupPrefilter`, an HNSW graph (usearch) per group, whose cost per query grows with the
  logarithm of the group size. A graph that was not loaded is built once the group has answered
  :data:`BUILD_AFTER` query vectors exactly (a build costs about that many matrix answers), so a group
  queried a few hundred times never waits for a build. A search fetches ``need`` plus a margin of graph points
  (more while exclusions leave too few rows) and re-ranks the fetched rows with ``role_distance`` itself,
  so distances and tie order are the exhaustive ones; results differ only where the graph misses a true
  neighbour.

A :class:`GroupPrefilter` indexes each template as the vector of standardised properties of the group's
roles (the anonymous formula's role count; the NaN padding of the other roles is dropped), in float32 under
squared Euclidean distance:

- identical vectors (the polymorphs of one formula share their role properties) are one graph point, keyed
  by the smallest of their rows; the other rows are listed beside the graph, so a tie is fetched whole;
- rows with a NaN among the group's roles (Electronegativity of He, Ne, Ar, Rn; CovalentRadius of Bk-Lr),
  where ``role_distance`` ignores the entry, are kept out of the graph and re-ranked with every query; a
  query with such a NaN is compared with every row of the group.

API (rows are row numbers of a :class:`~cspml_flows.templates.index.TemplateIndex`):

- ``prefilter_for(index, std) -> Prefilter``: the process's prefilter of ``index`` under standardiser
  ``std`` (cached per index object and ``std.role_sd``; dropped when the index is garbage collected).
- ``Prefilter.group(index, anon, members) -> GroupPrefilter``: the group's graph, built on first use from
  ``index.role_props[members]``; when ``index.by_anon[anon]`` is later a different array, the graph is
  brought up to date by adding and removing the rows that differ (not rebuilt). A loaded graph must hold
  the same rows with the same role properties as the index it serves.
- ``GroupPrefilter.build(rows, role_props, std, n_roles)``, ``.add(rows, role_props)``, ``.remove(rows)``,
  ``.rows()``, ``.search(q_props, need, role_props, allowed, few_in_row_order)``.
- ``GroupPrefilter.save(stem)`` writes ``stem.usearch`` (the graph, usearch's own format) and ``stem.npz``
  (row tables, role count, standardiser scale; no pickle); ``GroupPrefilter.load(stem, std)`` reads them
  back, memory-mapping the graph with ``view=True``, and raises :class:`PrefilterFileError` for a missing,
  damaged or other-standardiser file (the caller rebuilds).
- ``Prefilter.save(folder)`` / ``Prefilter.load(folder, index, std)``: every built group (a manifest
  ``prefilter.json`` names the groups' files); ``attach(index, std, prefilter)`` puts a prefilter in the
  process cache so that :func:`prefilter_for` returns it: a loaded one, or that of an earlier index object
  whose rows keep their numbers in ``index`` (e.g. after a segment was appended).

Builds and searches run on one thread; the graph's levels come from usearch's fixed-seed generator, so a
build from the same rows in the same order gives the same graph and the same results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspml_flows.core.descriptors import MAX_ROLES
from cspml_flows.learning.features import Standardizer
from cspml_flows.predict.prefilter_graph import (
    FORMAT,
    MARGIN,
    GroupPrefilter,
    PrefilterFileError,
    group_vectors,
    scale_digest,
)
from cspml_flows.templates.index import TemplateIndex

logger = logging.getLogger(__name__)

ANN_THRESHOLD = 1000  # groups with at least this many templates are searched through a graph
BUILD_AFTER = 4096  # query vectors a group answers exactly before its graph is built (when none was loaded)


class GroupMatrix:
    """A group's vectors (:func:`group_vectors`, centred) as one float32 matrix with squared norms: a query's
    squared distance to every row is one matrix-vector product. :meth:`candidates` keeps the rows within a
    float32 error margin of the ``need + MARGIN``-th smallest distance (ties at the boundary included) plus
    the rows with NaN, so an exact re-rank of them gives the exhaustive answer."""

    def __init__(self, members: np.ndarray, role_props: np.ndarray, std: Standardizer, n_roles: int):
        self.members, self.std, self.n_roles = members, std, n_roles
        z, self.finite = group_vectors(role_props, std, n_roles)
        self.mu = z[self.finite].mean(axis=0) if self.finite.any() else np.zeros(z.shape[1], dtype=np.float32)
        self.z = np.ascontiguousarray(z - self.mu, dtype=np.float32)
        self.z[~self.finite] = 0.0
        self.norms = np.einsum("ij,ij->i", self.z, self.z)
        self.max_norm = float(self.norms.max()) if len(self.norms) else 0.0

    def candidates(self, q_props: np.ndarray, need: int, mask: np.ndarray | None) -> np.ndarray | None:
        """Rows (ascending) to re-rank for one query (``q_props`` (MAX_ROLES, P)), among the members ``mask``
        keeps; None for a query with NaN among the group's roles (compared exactly with every row)."""
        zq, ok = group_vectors(q_props[None], self.std, self.n_roles)
        if not ok[0]:
            return None
        zq = zq[0] - self.mu
        qq = float(zq @ zq)
        use = self.finite if mask is None else self.finite & mask
        idx = np.flatnonzero(use)
        k = need + MARGIN
        if len(idx) > k:
            d = (self.norms - 2.0 * (self.z @ zq))[idx]
            bound = np.partition(d, k - 1)[k - 1]
            tol = 1e-4 * (self.max_norm + qq) + 1e-6  # far above float32 rounding of these sums
            idx = idx[d <= bound + tol]
        side = ~self.finite if mask is None else ~self.finite & mask
        return self.members[np.sort(np.concatenate([idx, np.flatnonzero(side)]))]


class Prefilter:
    """The groups' graphs of one index under one standardiser (built on first use, kept in step with
    ``index.by_anon``), and the groups' matrices for exact answers."""

    def __init__(self, std: Standardizer):
        self.std = std
        self.matrices: dict[str, GroupMatrix] = {}
        self.groups: dict[str, GroupPrefilter] = {}
        self._members: dict[str, np.ndarray] = {}  # the by_anon array each graph was last synced with
        self.exact_queries: dict[str, int] = {}  # query vectors answered exactly per group without a graph

    def group(self, index: TemplateIndex, anon: str, members: np.ndarray) -> GroupPrefilter:
        """The graph of group ``anon`` whose current rows are ``members``."""
        g = self.groups.get(anon)
        if g is None:
            n_roles = _n_roles(index, members)
            g = GroupPrefilter.build(members, index.role_props[members], self.std, n_roles)
            self.groups[anon] = g
        elif self._members.get(anon) is not members:  # the group changed since: apply the difference
            held = g.rows()
            gone = np.setdiff1d(held, members)
            new = np.setdiff1d(members, held)
            if len(gone):
                g.remove(gone)
            if len(new):
                g.add(new, index.role_props[new])
        self._members[anon] = members
        return g

    def matrix(self, index: TemplateIndex, anon: str, members: np.ndarray) -> GroupMatrix:
        """The matrix of group ``anon`` whose current rows are ``members`` (built again when they changed)."""
        m = self.matrices.get(anon)
        if m is None or m.members is not members:
            m = self.matrices[anon] = GroupMatrix(
                members, index.role_props[members], self.std, _n_roles(index, members)
            )
        return m

    def save(self, folder: str | Path) -> None:
        """Write every built group under ``folder`` and a manifest ``prefilter.json`` (written last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = {}
        for anon, g in self.groups.items():
            stem = "group-" + hashlib.sha1(anon.encode()).hexdigest()[:16]
            g.save(folder / stem)
            names[anon] = stem
        manifest = {"format": FORMAT, "scale": scale_digest(self.std), "groups": names}
        tmp = folder / "prefilter.json.tmp"
        tmp.write_text(json.dumps(manifest, sort_keys=True))
        os.replace(tmp, folder / "prefilter.json")

    @classmethod
    def load(cls, folder: str | Path, index: TemplateIndex, std: Standardizer, view: bool = True) -> Prefilter:
        """The groups saved under ``folder`` (a group that cannot be read is left out with one log line and
        rebuilt on first use); their rows are brought in step with ``index.by_anon`` on first use."""
        new = cls(std)
        try:
            manifest = json.loads((Path(folder) / "prefilter.json").read_text())
            groups = dict(manifest["groups"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("prefilter folder %s cannot be read (%s): groups are rebuilt on use", folder, exc)
            return new
        for anon, stem in groups.items():
            try:
                new.groups[str(anon)] = GroupPrefilter.load(Path(folder) / str(stem), std, view=view)
            except PrefilterFileError as exc:
                logger.warning("%s: rebuilt on use", exc)
        return new


def _n_roles(index: TemplateIndex, members: np.ndarray) -> int:
    """Roles of the group's anonymous formula (at most ``MAX_ROLES``)."""
    return min(len(index.roles[int(members[0])].elements), MAX_ROLES) if len(members) else MAX_ROLES


_CACHE: dict[int, dict[str, Prefilter]] = {}


def prefilter_for(index: TemplateIndex, std: Standardizer) -> Prefilter:
    """The process's prefilter of ``index`` under ``std`` (created empty on first call)."""
    per_index = _CACHE.get(id(index))
    if per_index is None:
        per_index = _CACHE[id(index)] = {}
        weakref.finalize(index, _CACHE.pop, id(index), None)
    key = scale_digest(std)
    if key not in per_index:
        per_index[key] = Prefilter(std)
    return per_index[key]


def attach(index: TemplateIndex, std: Standardizer, prefilter: Prefilter) -> None:
    """Make ``prefilter`` (e.g. from :meth:`Prefilter.load`) the one :func:`prefilter_for` returns."""
    prefilter_for(index, std)
    _CACHE[id(index)][scale_digest(std)] = prefilter


def nearest_rows(  # noqa: PLR0913 - the search's keyword options
    index: TemplateIndex,
    anon: str,
    members: np.ndarray,
    q_props: np.ndarray,
    need: int,
    std: Standardizer,
    allowed: Callable[[np.ndarray], np.ndarray] | None = None,
    threshold: int | None = ANN_THRESHOLD,
    few_in_row_order: bool = False,
    build_after: int = BUILD_AFTER,
) -> list[np.ndarray]:
    """For each query vector of ``q_props`` (m, MAX_ROLES, P): the ``need`` nearest rows of group ``anon``.

    The rows are among ``members`` (ascending) that ``allowed`` keeps, by ``role_distance``, ties by row; with
    ``few_in_row_order``, when at most ``need`` rows are allowed, all of them in row order.

    Groups below ``threshold`` templates (``None``: every group) are answered exactly. A larger group is
    answered through its graph when the process has one (loaded, or built earlier); else exactly until it
    has answered ``build_after`` query vectors, then its graph is built (a build costs about as much as
    that many exact answers, so a group queried once is never built for; 0: built at once).
    """
    out: list[np.ndarray | None] = [None] * len(q_props)
    large = threshold is not None and len(members) >= threshold
    if large:
        group = GroupQuery(index, anon, members, q_props, need, std, allowed, few_in_row_order)
        group.graph_answers(out, build_after)
        group.matrix_answers(out)
    todo = [i for i, o in enumerate(out) if o is None]
    if todo:
        cand = members[allowed(members)] if allowed is not None else members
        if few_in_row_order and len(cand) <= need:
            return [cand if o is None else o for o in out]
        tz = std.roles(index.role_props[cand])  # once for every query vector
        for i in todo:
            diff = std.roles(q_props[i][None]) - tz  # role_distance's own arithmetic, term by term
            d = np.sqrt(np.nansum(diff * diff, axis=(-1, -2)))
            out[i] = cand[np.lexsort((cand, d))[:need]]
    return out  # type: ignore[return-value]


@dataclass
class GroupQuery:
    """One :func:`nearest_rows` call on one large group: the group, the query vectors and the search options."""

    index: TemplateIndex
    anon: str
    members: np.ndarray
    q_props: np.ndarray
    need: int
    std: Standardizer
    allowed: Callable[[np.ndarray], np.ndarray] | None
    few_in_row_order: bool

    def graph_answers(self, out: list[np.ndarray | None], build_after: int) -> None:
        """Fill ``out`` with the graph's answers where the group has (or is now due for) a graph."""
        index, anon, members, q_props = self.index, self.anon, self.members, self.q_props
        finite = np.flatnonzero(np.isfinite(q_props[:, : _n_roles(index, members)]).all(axis=(1, 2)))
        pf = prefilter_for(index, self.std)
        if anon not in pf.groups and pf.exact_queries.get(anon, 0) < build_after:
            pf.exact_queries[anon] = pf.exact_queries.get(anon, 0) + len(q_props)
            return
        if len(finite):
            g = pf.group(index, anon, members)
            found = g.search(q_props[finite], self.need, index.role_props, self.allowed, self.few_in_row_order)
            for i, rows in zip(finite.tolist(), found, strict=True):
                out[i] = rows

    def matrix_answers(self, out: list[np.ndarray | None]) -> None:
        """Fill the rest of ``out`` exactly through the group's matrix (queries with NaN are left for later)."""
        todo = [i for i, o in enumerate(out) if o is None]
        if not todo:
            return
        members, need, std = self.members, self.need, self.std
        mask = self.allowed(members) if self.allowed is not None else None
        if self.few_in_row_order and (len(members) if mask is None else int(mask.sum())) <= need:
            return
        gm = prefilter_for(self.index, std).matrix(self.index, self.anon, members)
        for i in todo:
            rows = gm.candidates(self.q_props[i], need, mask)
            if rows is not None:  # the exact arithmetic below, on the rows that can be nearest
                diff = std.roles(self.q_props[i][None]) - std.roles(self.index.role_props[rows])
                d = np.sqrt(np.nansum(diff * diff, axis=(-1, -2)))
                out[i] = rows[np.lexsort((rows, d))[:need]]
