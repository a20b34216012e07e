"""Updates of a store's on-disk index folder, under its update lock: a full build, or an incremental update.

When the store has moved on since the manifest's position (:meth:`TemplateStore.position`):

- the documents written since (:meth:`TemplateStore.changed_since`; a store that cannot tell is compared
  document by document through stored digests) are read; new and replaced templates go into a new segment,
  removed and replaced ones are marked dead (tombstones);
- only the prototype partitions (anonymous formula, primitive-cell size) those templates belong to are
  clustered again (:mod:`cspml_flows.templates.index_cluster`), with the fit results of representative pairs
  kept from earlier builds, so that only pairs never fitted are fitted: an updated index has the clusters a
  rebuild would give;
- small segments are merged (and dead rows dropped) when there are many (:func:`compact`), without rewriting
  the large ones on every update;
- a new manifest is written last, atomically: readers see the old index or the new one, and a kill leaves
  the old one, which the next open brings up to date.

Rows are in material-id order and cluster ids number the clusters by their first row, in an updated index
as in a rebuilt one, so that predictions do not depend on how the index came about.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cspml_flows.core.config import home_dir, max_template_atoms
from cspml_flows.core.descriptors import DESCRIPTOR_VERSION
from cspml_flows.core.errors import StoreError
from cspml_flows.templates.index_cluster import Pairs, empty_pairs, recluster
from cspml_flows.templates.index_rows import (
    CHUNK,
    doc_rows,
    id_hash,
    parallel_row_segments,
    split_usable,
    warn_left_out,
    write_row_segments,
)
from cspml_flows.templates.manifest import Generation, Manifest, remove_unreferenced
from cspml_flows.templates.segments import Segment, Table, merge_segments, write_segment, write_state
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_rows import StoredRow, position_count

logger = logging.getLogger(__name__)

INDEX_VERSION = 4  # 4: segmented on-disk index; geometry read from the documents
MAX_SEGMENTS = 8  # more segments than this: the smallest are merged
DEAD_FRACTION = 0.3  # a segment with more dead rows than this is rewritten without them
PAUSE_ENV = "CSPML_INDEX_TEST_PAUSE"  # tests: "<stage>:<seconds>", an update sleeps there (see pause)


def index_dir(store: TemplateStore) -> Path:
    """The index folder of a store: one per store location (:attr:`TemplateStore.identity`)."""
    digest = hashlib.sha1(store.identity.encode()).hexdigest()[:16]
    return home_dir() / "index" / digest


def base_signature(store: TemplateStore) -> str:
    """What an index of the store must have been built with: index and descriptor versions, the store's
    location and the site limit of templates."""
    return f"{INDEX_VERSION}|{DESCRIPTOR_VERSION}|{store.identity}|{max_template_atoms()}"


@dataclass
class IndexReport:
    """What :func:`~cspml_flows.templates.index.sync_index` did."""

    action: str  # "up to date", "updated", "built" or "rebuilt"
    templates: int = 0
    clusters: int = 0
    added: int = 0
    removed: int = 0
    left_out: int = 0
    segments: int = 0
    fits: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line saying what was done and what the index holds."""
        what = {
            "up to date": "up to date",
            "updated": f"updated: {self.added} added, {self.removed} removed, {self.fits} new prototype fits",
        }.get(self.action, f"{self.action}: {self.fits} prototype fits")
        left = f", {self.left_out} left out" if self.left_out else ""
        return (
            f"index {what}; {self.templates} templates{left}, {self.clusters} prototype clusters, "
            f"{self.segments} segment(s) ({self.seconds:.1f} s)"
        )


def make_report(action: str, gen: Generation, t0: float, fits: int = 0, **kw: int) -> IndexReport:
    """The report of an index generation reached by ``action`` since ``t0`` (``time.perf_counter``)."""
    cluster = gen.state["cluster"]
    n = len(gen.state["order"])
    return IndexReport(
        action,
        n,
        int(cluster.max()) + 1 if n else 0,
        segments=len(gen.segments),
        fits=fits,
        seconds=time.perf_counter() - t0,
        **kw,
    )


def pause(stage: str) -> None:
    """Sleep at ``stage`` when ``CSPML_INDEX_TEST_PAUSE`` is ``<stage>:<seconds>`` (tests kill an update or
    read the index there): "segment" (a new segment written), "state" (the state written, the manifest not
    yet), "manifest" (the manifest replaced, old files not yet removed)."""
    want, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if want == stage:
        time.sleep(float(seconds or 0))


def live_order(table: Table, cluster: np.ndarray) -> np.ndarray:
    """Physical positions of the live rows, in id order."""
    live = np.flatnonzero(cluster >= 0)
    return live[np.argsort(table.column("ids", live), kind="stable")]


def canonical_labels(cluster: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Cluster labels numbered by each cluster's first row in ``order`` (-1 for rows not in it)."""
    labels = np.full(len(cluster), -1, dtype=np.int64)
    if len(order):
        _, first, inv = np.unique(cluster[order], return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        labels[order] = rank[inv.reshape(-1)]
    return labels


def compact(root: Path, table: Table, cluster: np.ndarray) -> tuple[Table, np.ndarray]:
    """Merge the smallest segments while there are more than :data:`MAX_SEGMENTS`, and rewrite a segment whose
    dead rows exceed :data:`DEAD_FRACTION`; returns the new table and cluster array (same labels)."""
    segs = list(table.segments)
    alive = [cluster[table.bounds[k] : table.bounds[k + 1]] >= 0 for k in range(len(segs))]
    groups: list[list[int]] = [[k] for k in range(len(segs)) if alive[k].any()]
    groups.sort(key=lambda g: -sum(int(alive[k].sum()) for k in g))
    while len(groups) > MAX_SEGMENTS:
        a, b = groups.pop(), groups.pop()
        groups.append(a + b)
        groups.sort(key=lambda g: -sum(int(alive[k].sum()) for k in g))
    rewrite = [g for g in groups if len(g) > 1 or alive[g[0]].mean() < 1 - DEAD_FRACTION]
    if not rewrite and all(alive[k].any() for k in range(len(segs))):
        return table, cluster
    new_segs, new_cluster = [], []
    for g in groups:
        if g in rewrite:
            merged = merge_segments(root, [segs[k] for k in g], [alive[k] for k in g])
            labels = np.concatenate([cluster[table.bounds[k] : table.bounds[k + 1]][alive[k]] for k in g])
            ids = np.concatenate([segs[k].cols["ids"][alive[k]] for k in g])
            new_segs.append(merged)
            new_cluster.append(labels[np.argsort(ids, kind="stable")])
        else:
            k = g[0]
            new_segs.append(segs[k])
            new_cluster.append(cluster[table.bounds[k] : table.bounds[k + 1]])
    return Table(new_segs), np.concatenate(new_cluster) if new_cluster else np.zeros(0, dtype=np.int64)


@dataclass
class Changes:
    """What an update has done so far."""

    skipped: set[str]
    added: int = 0
    removed: int = 0
    left: int = 0
    stale: set[int] = field(default_factory=set)  # id hashes of rows removed or replaced (their fits are stale)
    touched: set[int] = field(default_factory=set)  # partitions to cluster again


class IndexUpdater:
    """One update of an index folder (the caller holds its update lock)."""

    def __init__(self, root: Path, store: TemplateStore, workers: int, base: str):
        self.root, self.store, self.workers, self.base = root, store, workers, base
        self.limit = max_template_atoms()
        self.fits = 0

    def run(self, rebuild: bool, t0: float) -> tuple[Generation, IndexReport]:
        """Bring the index folder up to the store's position: nothing to do, an incremental update, or a
        full build (``rebuild``, or no usable index there); the generation reached and its report."""
        gen, action = (None, "rebuilt") if rebuild else self._current()
        kw: dict[str, int] = {}
        if gen is not None:
            remove_unreferenced(self.root, gen.manifest)
            if gen.manifest.position == self.store.position():
                return gen, make_report("up to date", gen, t0, self.fits, left_out=len(gen.manifest.skipped))
            manifest, added, removed, left = self._update(gen)
            action, kw = "updated", {"added": added, "removed": removed, "left_out": left}
        else:
            remove_unreferenced(self.root, None)
            manifest, left = self._build()
            kw = {"left_out": left}
            digest = hashlib.sha1(self.store.identity.encode()).hexdigest()[:16]
            for old in (home_dir() / "cache").glob(f"index-{digest}.*"):  # caches of earlier versions: never read
                old.unlink(missing_ok=True)
        gen = Generation(self.root, manifest)
        return gen, make_report(action, gen, t0, self.fits, **kw)

    def _current(self) -> tuple[Generation | None, str]:
        """The generation in the folder if it is of this version and store, and the action a build would be."""
        try:
            m = Manifest.read(self.root)
            if m is not None and m.signature == self.base:
                return Generation(self.root, m), "built"
            if m is not None:
                logger.info("template index %s is of another version or store: rebuilding it", self.root)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.warning("template index %s is unreadable (%s): rebuilding it", self.root, reason)
            return None, "rebuilt"
        return None, "built"

    # ---- full build ------------------------------------------------------------------------------------
    def _build(self) -> tuple[Manifest, int]:
        position = self.store.position()
        if self.workers > 1 and self.store.sqlite_file() is not None:
            names, skipped = parallel_row_segments(self.store, self.root, self.workers, self.limit)
        else:
            names, skipped = write_row_segments(self.root, self.store.rows(), self.workers, self.limit)
        warn_left_out(len(skipped), self.store, self.limit)
        return self.assemble(names, skipped, position), len(skipped)

    def assemble(self, names: list[str], skipped: list[str], position: str) -> Manifest:
        """The index of the segments ``names`` (under the root) as of the store's ``position``: merged into
        one segment, clustered and committed as generation 1."""
        segs = [Segment(self.root, name) for name in names]
        if len(segs) > 1:
            segs = [merge_segments(self.root, segs, [np.ones(s.n, dtype=bool) for s in segs])]
        table = Table(segs)
        cluster = np.zeros(table.n_phys, dtype=np.int64)
        cluster, pairs, fits = recluster(table, cluster, None, empty_pairs(), self.workers)
        self.fits += fits
        return self._commit(table, cluster, pairs, position, sorted(set(skipped)), 1)

    # ---- incremental update --------------------------------------------------------------------------
    def _update(self, gen: Generation) -> tuple[Manifest, int, int, int]:
        m = gen.manifest
        now, changed = self.store.changed_since(m.position)
        table = Table(list(gen.segments))
        cluster = np.array(gen.state["cluster"], dtype=np.int64)
        order = np.asarray(gen.state["order"])
        pairs = gen.pairs()
        acc = Changes(set(m.skipped))
        if changed is None:
            changed, present = self._diff(table, order, acc.skipped)
        else:
            present = {r.id: r for r in self.store.rows(changed)}
        table, cluster = self._apply(table, cluster, order, changed, present, acc)
        expected = position_count(now)
        if expected is not None and int((cluster >= 0).sum()) + len(acc.skipped) != expected:
            # the count disagrees (a document removed, or written without a newer date): compare the ids
            live = np.flatnonzero(cluster >= 0)
            known = set(table.column("ids", live).tolist()) | acc.skipped
            in_store = self.store.ids()
            extra = (in_store - known) | (known - in_store)
            present = {r.id: r for r in self.store.rows(extra)}
            table, cluster = self._apply(table, cluster, live_order(table, cluster), extra, present, acc)
        warn_left_out(acc.left, self.store, self.limit)
        if acc.stale:
            stale = np.array(sorted(acc.stale), dtype=np.uint64)
            keep = ~(np.isin(pairs[1], stale) | np.isin(pairs[2], stale))
            pairs = tuple(p[keep] for p in pairs)
        touched = np.array(sorted(acc.touched), dtype=np.uint64)
        cluster, pairs, fits = recluster(table, cluster, touched, pairs, self.workers)
        self.fits += fits
        table, cluster = compact(self.root, table, cluster)
        manifest = self._commit(table, cluster, pairs, now, sorted(acc.skipped), m.generation + 1)
        return manifest, acc.added, acc.removed, acc.left

    def _apply(
        self,
        table: Table,
        cluster: np.ndarray,
        order: np.ndarray,
        changed: set[str],
        present: dict[str, StoredRow],
        acc: Changes,
    ) -> tuple[Table, np.ndarray]:
        """Mark the rows of ``changed`` ids dead unless the stored document is the same, and append a segment
        with the stored documents of ``changed`` that can be templates (``present``: their stored rows)."""
        if not changed:
            return table, cluster
        live_ids = table.column("ids", order)
        digests = table.column("digest", order)
        ids = np.array(sorted(changed), dtype=str)
        pos = np.searchsorted(live_ids, ids)
        found = pos < len(live_ids)
        found[found] = live_ids[pos[found]] == ids[found]
        dead, todo = [], []
        for mid, p, known in zip(ids.tolist(), pos.tolist(), found.tolist(), strict=True):
            r = present.get(mid)
            if known:
                if r is not None and r.digest == int(digests[p]):
                    continue  # written again with the same content
                dead.append(int(order[p]))
                acc.stale.add(id_hash(mid))
            acc.skipped.discard(mid)
            if r is not None:
                todo.append(r)
        if dead:
            dead_rows = np.array(dead, dtype=np.int64)
            cluster[dead_rows] = -1
            acc.touched.update(int(x) for x in np.unique(table.column("part", dead_rows)))
            acc.removed += len(dead)
        return self._append(table, cluster, todo, acc)

    def _append(
        self, table: Table, cluster: np.ndarray, todo: list[StoredRow], acc: Changes
    ) -> tuple[Table, np.ndarray]:
        """A new segment with those of the stored rows ``todo`` that can be templates, laid after the others."""
        good, bad = split_usable(todo, self.limit)
        acc.skipped.update(bad)
        acc.left += len(bad)
        if not good:
            return table, cluster
        rows = doc_rows([r.doc() for r in good], [r.digest for r in good], self.workers)
        seg = Segment(self.root, write_segment(self.root, rows))
        pause("segment")
        acc.touched.update(int(x) for x in np.unique(seg.cols["part"]))
        acc.added += seg.n
        return Table([*table.segments, seg]), np.concatenate([cluster, np.zeros(seg.n, dtype=np.int64)])

    def _diff(self, table: Table, order: np.ndarray, skipped: set[str]) -> tuple[set[str], dict[str, StoredRow]]:
        """Every stored document compared with the index by its digest: the ids that differ (new, changed or
        gone) and the stored rows of those that exist."""
        live_ids = table.column("ids", order)
        digests = table.column("digest", order)
        changed: set[str] = set()
        present: dict[str, StoredRow] = {}
        seen = np.zeros(len(live_ids), dtype=bool)
        stored_skipped: set[str] = set()
        batch: list[StoredRow] = []

        def flush() -> None:
            ids = np.array([r.id for r in batch], dtype=str)
            pos = np.searchsorted(live_ids, ids)
            found = pos < len(live_ids)
            found[found] = live_ids[pos[found]] == ids[found]
            same = np.zeros(len(batch), dtype=bool)
            mine = np.array([r.digest for r in batch], dtype=np.uint64)
            same[found] = digests[pos[found]] == mine[found]
            seen[pos[found]] = True
            for r, ok in zip(batch, same.tolist(), strict=True):
                if not ok:
                    changed.add(r.id)
                    present[r.id] = r
            batch.clear()

        for r in self.store.rows():
            batch.append(r)
            if r.id in skipped:
                stored_skipped.add(r.id)
            if len(batch) >= CHUNK:
                flush()
        if batch:
            flush()
        changed.update(live_ids[~seen].tolist())
        changed.update(skipped - stored_skipped)
        return changed, present

    # ---- commit ----------------------------------------------------------------------------------------
    def _commit(
        self, table: Table, cluster: np.ndarray, pairs: Pairs, position: str, skipped: list[str], generation: int
    ) -> Manifest:
        """Canonical labels and row order, the state folder, then the manifest (atomically), then the files no
        manifest names are removed."""
        order = live_order(table, cluster)
        sorted_ids = table.column("ids", order)
        if len(sorted_ids) > 1 and not (sorted_ids[1:] > sorted_ids[:-1]).all():
            raise StoreError(
                f"template index {self.root}: an id appears twice; rebuild it with 'cspml index --rebuild'"
            )
        part, a, b, fit = pairs
        arrays = {
            "cluster": canonical_labels(cluster, order),
            "order": order.astype(np.int64),
            "pair_part": part.astype(np.uint64),
            "pair_a": a.astype(np.uint64),
            "pair_b": b.astype(np.uint64),
            "pair_fit": fit.astype(bool),
        }
        state = write_state(self.root, generation, arrays)
        manifest = Manifest(self.base, position, generation, [s.name for s in table.segments], state, skipped)
        pause("state")
        manifest.write(self.root)
        pause("manifest")
        remove_unreferenced(self.root, manifest)
        return manifest
