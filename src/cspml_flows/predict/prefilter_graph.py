"""The per-group nearest-neighbour graph of the candidate prefilter (:mod:`cspml_flows.predict.prefilter`).

A :class:`GroupPrefilter` is an HNSW graph (usearch) over one anonymous-formula group's templates, with the
row tables around it: identical vectors share one graph point (keyed by the smallest row, the other rows
listed beside it) and rows with NaN among the group's roles are kept out of the graph and re-ranked with
every query. Searches fetch ``need`` plus :data:`MARGIN` points and re-rank them exactly.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from usearch.index import Index

from cspml_flows.core.errors import CSPMLError
from cspml_flows.learning.features import Standardizer, role_distance

CONNECTIVITY = 16  # graph edges per point (HNSW M)
EXPANSION_ADD = 128  # candidate list while inserting (HNSW efConstruction)
EXPANSION_SEARCH = 128  # candidate list while searching (HNSW ef; at least the points fetched)
MARGIN = 64  # points fetched beyond ``need``, so that a neighbour the graph ranks late is still re-ranked
FORMAT = 1  # version of the files GroupPrefilter.save writes


class PrefilterFileError(CSPMLError):
    """A saved prefilter group that is missing, damaged, or built under another standardiser."""


def scale_digest(std: Standardizer) -> str:
    """Digest of a standardiser's role scales (a saved graph must have been built under the same ones)."""
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
        self.n_roles, self.width, self.scale, self._std, self._view = n_roles, width, scale_digest(std), std, False
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
        """Template rows held."""
        return len(self.graph) + len(self.owner) + len(self.nan_rows)

    def _expand(self, keys: np.ndarray) -> np.ndarray:
        """The rows of the points ``keys``: the keys, then the other rows sharing each key's vector."""
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
        if fmt != FORMAT or graph is None or graph.ndim != width or scale != scale_digest(std):
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
