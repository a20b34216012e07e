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

import bisect
import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cspml_flows.core.errors import CSPMLError
from cspml_flows.learning.features import Standardizer, role_distance

if TYPE_CHECKING:
    from cspml_flows.templates.index import TemplateIndex

log = logging.getLogger(__name__)

ANN_THRESHOLD = 1000  # groups with at least this many templates are searched through a graph
BUILD_AFTER = 4096  # query vectors a group answers exactly before its graph is built (when none was loaded)
CONNECTIVITY = 16  # graph edges per point (HNSW M)
EXPANSION_ADD = 128  # candidate list while inserting (HNSW efConstruction)
EXPANSION_SEARCH = 128  # candidate list while searching (HNSW ef; at least the points fetched)
MARGIN = 64  # points fetched beyond ``need``, so that a neighbour the graph ranks late is still re-ranked
FORMAT = 1  # version of the files GroupPrefilter.save writes


class PrefilterFileError(CSPMLError):
    """A saved prefilter group that is missing, damaged, or built under another standardiser."""


def _scale_digest(std: Standardizer) -> str:
    return hashlib.sha1(np.ascontiguousarray(std.role_sd, dtype=np.float64).tobytes()).hexdigest()[:16]


def group_vectors(role_props: np.ndarray, std: Standardizer, n_roles: int) -> tuple[np.ndarray, np.ndarray]:
    """Graph vectors (n, n_roles * properties) in float32 and a mask of the rows without NaN among them."""
    z = (role_props[:, :n_roles] / std.role_sd).reshape(len(role_props), -1)  # the mean cancels in differences
    finite = np.isfinite(z).all(axis=1)
    return np.ascontiguousarray(np.nan_to_num(z), dtype=np.float32), finite


def _search(graph, z: np.ndarray, k: int, distances: bool = False):
    """Keys (m, k) and counts (m,) of the ``k`` nearest graph points of each row of ``z`` (and distances)."""
    m = graph.search(z, k, threads=1)
    keys = np.asarray(m.keys, dtype=np.int64).reshape(len(z), -1)
    counts = np.asarray(getattr(m, "counts", [len(m.keys)])).reshape(-1)
    if distances:
        return keys, counts, np.asarray(m.distances).reshape(len(z), -1)
    return keys, counts


class GroupPrefilter:
    """HNSW graph over one anonymous-formula group's templates, with the row tables around it."""

    def __init__(self, n_roles: int, width: int, std: Standardizer):
        from usearch.index import Index

        self.n_roles, self.width, self.scale, self._std, self._view = n_roles, width, _scale_digest(std), std, False
        self.graph = Index(
            ndim=width,
            metric="l2sq",
            dtype="f32",
            connectivity=CONNECTIVITY,
            expansion_add=EXPANSION_ADD,
            expansion_search=EXPANSION_SEARCH,
        )
        self.extra: dict[int, list[int]] = {}  # point key -> the other rows with the key's vector (ascending)
        self.owner: dict[int, int] = {}  # such a row -> its point key
        self.nan_rows = np.zeros(0, dtype=np.int64)  # rows kept out of the graph (NaN among the group's roles)

    # ---- construction and updates ----------------------------------------------------------------------
    @classmethod
    def build(cls, rows: np.ndarray, role_props: np.ndarray, std: Standardizer, n_roles: int) -> GroupPrefilter:
        """Graph over ``rows`` whose role properties are ``role_props`` (aligned, shape (n, MAX_ROLES, P))."""
        new = cls(n_roles, n_roles * role_props.shape[-1], std)
        new.add(rows, role_props)
        return new

    def add(self, rows: np.ndarray, role_props: np.ndarray) -> None:
        """Add templates (rows not yet present, role properties aligned with them)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        self._writable()
        z, finite = group_vectors(role_props, self._std, self.n_roles)
        self.nan_rows = np.union1d(self.nan_rows, rows[~finite])
        rows, z = rows[finite], z[finite]
        order = np.argsort(rows, kind="stable")
        rows, z = rows[order], z[order]
        uniq, first, inverse = np.unique(z, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        keys = rows[first]  # smallest new row of each distinct vector
        found = self._existing_points(uniq) if len(self.graph) else np.full(len(uniq), -1)
        fresh = found < 0
        if fresh.any():
            self.graph.add(keys[fresh].astype(np.uint64), uniq[fresh], threads=1)
        point = np.where(fresh, keys, found)
        moved: dict[int, int] = {}  # points re-keyed by a smaller new row during this call
        for r, p in zip(rows.tolist(), point[inverse].tolist(), strict=True):
            p = moved.get(p, p)
            if r != p:
                key = self._attach_row(r, p)
                if key != p:
                    moved[p] = key

    def _existing_points(self, z: np.ndarray) -> np.ndarray:
        """Key of a graph point with exactly each vector, or -1."""
        keys, counts, dist = _search(self.graph, z, 1, distances=True)
        keys, dist = keys[:, 0], np.where(counts > 0, dist[:, 0], np.inf)
        out = np.full(len(z), -1, dtype=np.int64)
        for j in np.flatnonzero(dist == 0.0):
            if np.array_equal(np.asarray(self.graph.get(int(keys[j])), dtype=np.float32).reshape(-1), z[j]):
                out[j] = keys[j]
        return out

    def _attach_row(self, row: int, key: int) -> int:
        """Add ``row`` to the point ``key`` holds; the point's key afterwards."""
        if row < key:  # a smaller row takes over the point: re-key it
            vec = np.asarray(self.graph.get(key), dtype=np.float32).reshape(1, -1)
            self.graph.remove(key)
            self.graph.add(np.array([row], dtype=np.uint64), vec, threads=1)
            others = [key, *self.extra.pop(key, [])]
            for r in others:
                self.owner[r] = row
            self.extra[row] = sorted(others)
            return row
        bisect.insort(self.extra.setdefault(key, []), row)
        self.owner[row] = key
        return key

    def remove(self, rows: np.ndarray) -> None:
        """Remove templates (rows that are not present are ignored)."""
        rows = np.asarray(rows, dtype=np.int64)
        self._writable()
        self.nan_rows = np.setdiff1d(self.nan_rows, rows)
        for r in rows.tolist():
            if r in self.owner:
                key = self.owner.pop(r)
                rest = [x for x in self.extra[key] if x != r]
                if rest:
                    self.extra[key] = rest
                else:
                    del self.extra[key]
            elif self.graph.contains(r):
                rest = self.extra.pop(r, [])
                vec = np.asarray(self.graph.get(r), dtype=np.float32).reshape(1, -1)
                self.graph.remove(r)
                if rest:  # the next row of the tie keeps the point
                    head, tail = rest[0], rest[1:]
                    self.graph.add(np.array([head], dtype=np.uint64), vec, threads=1)
                    self.owner.pop(head, None)
                    for x in tail:
                        self.owner[x] = head
                    if tail:
                        self.extra[head] = tail

    def rows(self) -> np.ndarray:
        """Every template row held, ascending."""
        keys = np.asarray(self.graph.keys, dtype=np.int64) if len(self.graph) else np.zeros(0, dtype=np.int64)
        dup = np.fromiter(self.owner, dtype=np.int64, count=len(self.owner))
        return np.sort(np.concatenate([keys, dup, self.nan_rows]))

    def __len__(self) -> int:
        return len(self.graph) + len(self.owner) + len(self.nan_rows)

    def _expand(self, keys: np.ndarray) -> np.ndarray:
        extra = self.extra
        if not extra:
            return keys
        out = [keys]
        for k in keys.tolist():
            more = extra.get(k)
            if more:
                out.append(np.asarray(more, dtype=np.int64))
        return np.concatenate(out)

    # ---- search ----------------------------------------------------------------------------------------
    def search(
        self,
        q_props: np.ndarray,
        need: int,
        role_props: np.ndarray,
        allowed: Callable[[np.ndarray], np.ndarray] | None = None,
        few_in_row_order: bool = False,
    ) -> list[np.ndarray]:
        """For each query (``q_props`` (m, MAX_ROLES, P)): the ``need`` nearest allowed rows by
        ``role_distance``, ties by row. ``role_props`` is the index's array (the exact re-rank reads the
        fetched rows from it); ``allowed(rows)`` masks excluded rows; ``few_in_row_order``: when at most
        ``need`` rows are allowed, all of them in row order. A query with a NaN among the group's roles is
        compared with every held row."""
        z, finite = group_vectors(q_props, self._std, self.n_roles)
        n_points = len(self.graph)
        fetched: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(z)
        if not finite.all():
            every = self.rows()
            every = every[allowed(every)] if allowed is not None else every
            for qi in np.flatnonzero(~finite):
                fetched[qi] = every
        pending, k = np.flatnonzero(finite).tolist(), min(need + MARGIN, n_points)
        while pending and k > 0:
            keys, counts = _search(self.graph, z[pending], k)
            retry = []
            for j, qi in enumerate(pending):
                rows = self._expand(keys[j, : counts[j]])
                if allowed is not None:
                    rows = rows[allowed(rows)]
                fetched[qi] = rows
                if len(rows) < need + MARGIN and k < n_points:
                    retry.append(qi)  # exclusions left too few rows: fetch more points
            pending, k = retry, min(2 * k, n_points)
        side = self.nan_rows
        if allowed is not None and len(side):
            side = side[allowed(side)]
        out = []
        for qi, rows in enumerate(fetched):
            rows = np.concatenate([rows, side]) if len(side) and finite[qi] else rows
            if few_in_row_order and len(rows) <= need:  # every allowed row was fetched
                out.append(np.sort(rows))
                continue
            d = role_distance(q_props[qi][None], role_props[rows], self._std)
            out.append(rows[np.lexsort((rows, d))[:need]])
        return out

    # ---- files -----------------------------------------------------------------------------------------
    def save(self, stem: str | Path) -> None:
        """Write ``stem.usearch`` and ``stem.npz`` (each through a temporary file and a rename)."""
        stem = Path(stem)
        owner_rows = np.fromiter(self.owner, dtype=np.int64, count=len(self.owner))
        owner_keys = np.fromiter(self.owner.values(), dtype=np.int64, count=len(self.owner))
        tables = {
            "format": np.array(FORMAT),
            "n_roles": np.array(self.n_roles),
            "width": np.array(self.width),
            "scale": np.array(self.scale),
            "owner_rows": owner_rows,
            "owner_keys": owner_keys,
            "nan_rows": self.nan_rows,
        }
        graph_tmp = stem.with_name(stem.name + ".usearch.tmp")
        self.graph.save(str(graph_tmp))
        os.replace(graph_tmp, stem.with_name(stem.name + ".usearch"))
        tables_tmp = stem.with_name(stem.name + ".tmp.npz")
        np.savez(tables_tmp, **tables)
        os.replace(tables_tmp, stem.with_name(stem.name + ".npz"))

    @classmethod
    def load(cls, stem: str | Path, std: Standardizer, view: bool = True) -> GroupPrefilter:
        """Inverse of :meth:`save`; ``view`` memory-maps the graph (read-only until a row is added or
        removed, when it is loaded into memory). PrefilterFileError when the files cannot be used."""
        from usearch.index import Index

        stem = Path(stem)
        graph_path, tables_path = stem.with_name(stem.name + ".usearch"), stem.with_name(stem.name + ".npz")
        try:
            with np.load(tables_path, allow_pickle=False) as t:
                fmt, n_roles, width = int(t["format"]), int(t["n_roles"]), int(t["width"])
                scale = str(t["scale"])
                owner_rows, owner_keys, nan_rows = t["owner_rows"], t["owner_keys"], t["nan_rows"]
            graph = Index.restore(str(graph_path), view=view)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise PrefilterFileError(f"prefilter group {stem} cannot be read ({exc})") from None
        if fmt != FORMAT or graph is None or graph.ndim != width or scale != _scale_digest(std):
            raise PrefilterFileError(f"prefilter group {stem} was written by another version or standardiser")
        new = cls.__new__(cls)
        new.n_roles, new.width, new.scale, new._std = n_roles, width, scale, std
        new.graph, new._view = graph, view
        new.graph.expansion_search = EXPANSION_SEARCH
        new.nan_rows = np.asarray(nan_rows, dtype=np.int64)
        new.owner = dict(zip(owner_rows.tolist(), owner_keys.tolist(), strict=True))
        new.extra = {}
        for r, k in sorted(new.owner.items()):
            new.extra.setdefault(k, []).append(r)
        return new

    def _writable(self) -> None:
        if getattr(self, "_view", False):  # a memory-mapped graph: copy it into memory before changing it
            self.graph = self.graph.copy()
            self._view = False


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
        manifest = {"format": FORMAT, "scale": _scale_digest(self.std), "groups": names}
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
            log.warning("prefilter folder %s cannot be read (%s): groups are rebuilt on use", folder, exc)
            return new
        for anon, stem in groups.items():
            try:
                new.groups[str(anon)] = GroupPrefilter.load(Path(folder) / str(stem), std, view=view)
            except PrefilterFileError as exc:
                log.warning("%s: rebuilt on use", exc)
        return new


def _n_roles(index: TemplateIndex, members: np.ndarray) -> int:
    from cspml_flows.core.descriptors import MAX_ROLES

    return min(len(index.roles[int(members[0])].elements), MAX_ROLES) if len(members) else MAX_ROLES


_CACHE: dict[int, dict[str, Prefilter]] = {}


def prefilter_for(index: TemplateIndex, std: Standardizer) -> Prefilter:
    """The process's prefilter of ``index`` under ``std`` (created empty on first call)."""
    per_index = _CACHE.get(id(index))
    if per_index is None:
        per_index = _CACHE[id(index)] = {}
        weakref.finalize(index, _CACHE.pop, id(index), None)
    key = _scale_digest(std)
    if key not in per_index:
        per_index[key] = Prefilter(std)
    return per_index[key]


def attach(index: TemplateIndex, std: Standardizer, prefilter: Prefilter) -> None:
    """Make ``prefilter`` (e.g. from :meth:`Prefilter.load`) the one :func:`prefilter_for` returns."""
    prefilter_for(index, std)
    _CACHE[id(index)][_scale_digest(std)] = prefilter


def nearest_rows(
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
    """For each query vector of ``q_props`` (m, MAX_ROLES, P): the ``need`` nearest rows of group ``anon``
    (rows ``members``, ascending) that ``allowed`` keeps, by ``role_distance``, ties by row; with
    ``few_in_row_order``, when at most ``need`` rows are allowed, all of them in row order.

    Groups below ``threshold`` templates (``None``: every group) are answered exactly. A larger group is
    answered through its graph when the process has one (loaded, or built earlier); else exactly until it
    has answered ``build_after`` query vectors, then its graph is built (a build costs about as much as
    that many exact answers, so a group queried once is never built for; 0: built at once)."""
    out: list[np.ndarray | None] = [None] * len(q_props)
    if threshold is not None and len(members) >= threshold:
        finite = np.flatnonzero(np.isfinite(q_props[:, : _n_roles(index, members)]).all(axis=(1, 2)))
        pf = prefilter_for(index, std)
        if anon not in pf.groups and pf.exact_queries.get(anon, 0) < build_after:
            pf.exact_queries[anon] = pf.exact_queries.get(anon, 0) + len(q_props)
            finite = finite[:0]
        if len(finite):
            g = pf.group(index, anon, members)
            found = g.search(q_props[finite], need, index.role_props, allowed, few_in_row_order)
            for i, rows in zip(finite.tolist(), found, strict=True):
                out[i] = rows
    todo = [i for i, o in enumerate(out) if o is None]
    if todo and threshold is not None and len(members) >= threshold:
        mask = allowed(members) if allowed is not None else None
        if not (few_in_row_order and (len(members) if mask is None else int(mask.sum())) <= need):
            gm = prefilter_for(index, std).matrix(index, anon, members)
            for i in todo:
                rows = gm.candidates(q_props[i], need, mask)
                if rows is not None:  # the exact arithmetic below, on the rows that can be nearest
                    diff = std.roles(q_props[i][None]) - std.roles(index.role_props[rows])
                    d = np.sqrt(np.nansum(diff * diff, axis=(-1, -2)))
                    out[i] = rows[np.lexsort((rows, d))[:need]]
            todo = [i for i in todo if out[i] is None]
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
