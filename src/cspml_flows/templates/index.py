"""An array-based view of a template store for fast retrieval, kept on disk and updated by the store's changes.

The index of a store lives under ``$CSPML_HOME/index/<digest of the store identity>/`` as immutable columnar
segments (:mod:`cspml_flows.templates.segments`), a state per generation and a manifest
(:mod:`cspml_flows.templates.manifest`). Opening it (:meth:`TemplateIndex.open`) memory-maps the columns;
structures stay in their byte blob until a prediction asks for one (:mod:`cspml_flows.templates.lazy`). When
the store has moved on since the manifest's position (:meth:`TemplateStore.position`), the open brings the
index up to date first (:func:`sync_index`, :mod:`cspml_flows.templates.index_update`), under the index's
update lock. ``cspml index --rebuild`` (:func:`sync_index` with ``rebuild=True``) builds it from scratch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.composition import Roles
from cspml_flows.core.config import max_template_atoms
from cspml_flows.core.descriptors import MAX_ROLES, ROLE_PROPERTIES
from cspml_flows.core.prototype import cluster_prototypes
from cspml_flows.core.structure_checks import min_periodic_distance
from cspml_flows.templates.geometry import cell_arrays, role_symmetry_perms
from cspml_flows.templates.index_checks import STATS_WIDTH, role_counts
from cspml_flows.templates.index_rows import doc_rows, roles_of, split_usable, warn_left_out
from cspml_flows.templates.index_update import (
    IndexReport,
    IndexUpdater,
    base_signature,
    index_dir,
    make_report,
)
from cspml_flows.templates.lazy import LazyRoles, LazyRoleSyms, LazyStructures
from cspml_flows.templates.manifest import Generation, Manifest, update_lock
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_rows import doc_digest

logger = logging.getLogger(__name__)
T = TypeVar("T")

TEXT_FIELDS = ("ids", "formulas", "anon", "prototype")  # text arrays of an index
NUMERIC_FIELDS = ("nprim", "e_above_hull", "spacegroup", "stats", "role_props", "role_fracs", "min_dist")
REREADS = 5  # times a manifest is read again when an update replaced the files it named meanwhile


@dataclass
class TemplateIndex:
    """Arrays over all templates of a store (rows in material-id order for an index of a store).

    ``structures``, ``roles`` and ``role_syms`` are sequences: lists for an index built in memory
    (:meth:`from_docs`), lazy sequences over memory-mapped segments for an index read from disk."""

    ids: np.ndarray
    formulas: np.ndarray
    anon: np.ndarray
    roles: Sequence[Roles]
    nprim: np.ndarray
    prototype: np.ndarray
    e_above_hull: np.ndarray
    spacegroup: np.ndarray
    structures: Sequence[dict]
    cluster: np.ndarray
    stats: np.ndarray
    role_props: np.ndarray
    role_fracs: np.ndarray
    signature: str = ""
    min_dist: np.ndarray | None = None  # shortest interatomic distance per template (None: computed on use)
    role_syms: Sequence[list[tuple[int, ...]]] | None = None  # see role_symmetry_perms (None: computed on use)
    by_anon: dict[str, np.ndarray] = field(default_factory=dict)
    source: np.ndarray | None = None  # the documents' ``source`` (None: not known)
    round: np.ndarray | None = None  # the documents' ``round``
    digest: np.ndarray | None = None  # 64-bit digest of each stored document (uint64)
    _cells: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.by_anon and len(self.anon):
            order = np.argsort(self.anon, kind="stable")
            keys = self.anon[order]
            starts = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1])
            bounds = [*starts[1:], len(order)]
            self.by_anon = {str(keys[s]): order[s:e] for s, e in zip(starts, bounds, strict=True)}
        self.cluster_size = np.bincount(self.cluster)[self.cluster] if len(self.cluster) else self.cluster

    def __len__(self) -> int:
        return len(self.ids)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_docs(cls, docs: list[dict], workers: int = 1, signature: str = "") -> TemplateIndex:
        """An index in memory over template documents, in the order given (nothing written to disk)."""
        if not docs:
            return cls.empty()
        rows = doc_rows(docs, [doc_digest(d) for d in docs], workers, keep_dicts=True)
        c = rows.cols
        cluster = np.asarray(
            cluster_prototypes(
                list(c["anon"]), list(c["nprim"]), [p or None for p in c["prototype"]], rows.structures, workers
            ),
            dtype=np.int64,
        )
        return cls(
            ids=c["ids"],
            formulas=c["formulas"],
            anon=c["anon"],
            roles=[Roles(*r) for r in roles_of(c)],
            nprim=c["nprim"],
            prototype=c["prototype"].astype(object),
            e_above_hull=c["e_above_hull"],
            spacegroup=c["spacegroup"],
            structures=list(rows.structures),
            cluster=cluster,
            stats=c["stats"],
            role_props=c["role_props"],
            role_fracs=c["role_fracs"],
            signature=signature,
            min_dist=c["min_dist"],
            role_syms=list(rows.perms),
            source=c["source"],
            round=c["round"],
            digest=c["digest"],
        )

    @classmethod
    def empty(cls, signature: str = "") -> TemplateIndex:
        """An index over no templates."""
        z = np.zeros(0)
        return cls(
            np.array([], dtype=str),
            np.array([], dtype=str),
            np.array([], dtype=str),
            [],
            z.astype(int),
            np.array([], dtype=object),
            z,
            z.astype(int),
            [],
            z.astype(int),
            np.zeros((0, STATS_WIDTH)),
            np.zeros((0, MAX_ROLES, len(ROLE_PROPERTIES))),
            np.zeros((0, MAX_ROLES)),
            signature=signature,
            min_dist=z,
            role_syms=[],
            source=np.array([], dtype=str),
            round=z.astype(int),
            digest=z.astype(np.uint64),
        )

    @classmethod
    def open(cls, store: str | Path | None = None, workers: int = 2) -> TemplateIndex:
        """The index of an existing template store (default: the embedded one), brought up to date with the
        store first when it changed; the store is closed after."""
        ts = TemplateStore.open(store, create=False)
        try:
            return cls.from_store(ts, workers=workers)
        finally:
            ts.close()

    @classmethod
    def from_store(cls, store: TemplateStore, workers: int = 2, cache: bool | Path = True) -> TemplateIndex:
        """The index of a store: read from its index folder (``cache=True``: :func:`index_dir`; a Path: that
        folder), updated or built there first when needed (:func:`sync_index`); ``cache=False`` builds it in
        memory. Raises StoreError when the store is empty.

        Templates that imports now refuse but an older store may hold (partial occupancies, more sites than
        ``max_template_atoms``, a cell no crystal has) are left out, with one log line."""
        if not cache:
            store.require_nonempty()
            return build_in_memory(store, workers)
        idx = sync_index(store, workers, root=cache if isinstance(cache, Path) else None)[0]
        assert idx is not None
        return idx

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cells"] = {}
        return state

    # ---- access ---------------------------------------------------------------------------------------
    def structure(self, i: int) -> Structure:
        """The pymatgen Structure of template ``i``."""
        return Structure.from_dict(self.structures[i])

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Lattice matrix, fractional coordinates, role index per site, and minimum interatomic distance."""
        if i not in self._cells:
            matrix, frac, site_roles = cell_arrays(self.structures[i], self.roles[i])
            dmin = self.min_dist[i] if self.min_dist is not None else min_periodic_distance(matrix, frac)
            self._cells[i] = (matrix, frac, site_roles, float(dmin))
        return self._cells[i]

    def role_symmetries(self, i: int) -> list[tuple[int, ...]]:
        """Permutations of tied roles that a symmetry of the template maps onto itself (identity included);
        see :func:`role_symmetry_perms`. Precomputed when the index is built, else computed once here."""
        if self.role_syms is not None:
            return self.role_syms[i]
        key = ("sym", i)
        if key not in self._cells:
            matrix, frac, site_roles, _ = self.cell(i)
            self._cells[key] = role_symmetry_perms(matrix, frac, site_roles, self.roles[i])
        return self._cells[key]

    def rows_of_formula(self, r: Roles) -> np.ndarray:
        """The rows of the templates of the reduced formula of ``r`` (looked up within its anonymous formula)."""
        members = self.by_anon.get(r.anonymous_formula)
        if members is None:
            return np.zeros(0, dtype=np.int64)
        return members[self.formulas[members] == r.reduced_formula]

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per index and ``key`` (derived data of the whole pool, e.g. a model's statistics)."""
        if key not in self._cells:
            self._cells[key] = compute()
        return self._cells[key]

    def subset(self, mask: np.ndarray) -> TemplateIndex:
        """A new index over the templates where ``mask`` is True (cluster ids kept)."""
        sel = np.flatnonzero(mask)
        return TemplateIndex(
            ids=self.ids[sel],
            formulas=self.formulas[sel],
            anon=self.anon[sel],
            roles=_take(self.roles, sel),
            nprim=self.nprim[sel],
            prototype=self.prototype[sel],
            e_above_hull=self.e_above_hull[sel],
            spacegroup=self.spacegroup[sel],
            structures=_take(self.structures, sel),
            cluster=self.cluster[sel],
            stats=self.stats[sel],
            role_props=self.role_props[sel],
            role_fracs=self.role_fracs[sel],
            signature=self.signature + f"|subset{hashlib.sha1(sel.tobytes()).hexdigest()[:8]}",
            min_dist=None if self.min_dist is None else self.min_dist[sel],
            role_syms=None if self.role_syms is None else _take(self.role_syms, sel),
            source=None if self.source is None else self.source[sel],
            round=None if self.round is None else self.round[sel],
            digest=None if self.digest is None else self.digest[sel],
        )

    def content_token(self, mask: np.ndarray | None = None) -> str:
        """Text that changes when any template where ``mask`` is True (default: all) is added, removed or
        changed: their count and the sum of their document digests."""
        sel = np.ones(len(self), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if self.digest is None:
            raise ValueError("this index has no document digests")
        total = int(np.sum(self.digest[sel].astype(np.uint64), dtype=np.uint64)) if sel.any() else 0
        return f"{int(sel.sum())}|{total:016x}"


def _take(seq: Sequence, sel: np.ndarray) -> Sequence:
    take = getattr(seq, "take", None)
    return take(sel) if take is not None else [seq[i] for i in sel]


def build_in_memory(store: TemplateStore, workers: int) -> TemplateIndex:
    """The index of a store built in memory (nothing written to disk); templates that cannot be indexed are
    left out, with one log line."""
    limit = max_template_atoms()
    good, bad = split_usable(list(store.rows()), limit)
    warn_left_out(len(bad), store, limit)
    good.sort(key=lambda r: r.id)
    idx = TemplateIndex.from_docs([r.doc() for r in good], workers=workers)
    idx.digest = np.array([r.digest for r in good], dtype=np.uint64)
    idx.signature = f"{base_signature(store)}|{store.position()}"
    return idx


def load_generation(gen: Generation, signature: str) -> TemplateIndex:
    """The TemplateIndex of an opened (and checked) generation: columns memory-mapped where the rows need no
    reordering, else gathered in id order."""
    order = np.asarray(gen.state["order"])
    n = len(order)
    if n == 0:
        return TemplateIndex.empty(signature)
    direct = len(gen.segments) == 1 and n == gen.n_phys and bool((order == np.arange(n)).all())

    def col(key: str) -> np.ndarray:
        return gen.segments[0].cols[key] if direct else gen.column(key, order)

    fields = {k: col(k) for k in (*TEXT_FIELDS, *NUMERIC_FIELDS)}
    fields["cluster"] = np.asarray(gen.state["cluster"])[order]
    fields["prototype"] = fields["prototype"].astype(object)
    seg = gen.segment_of(order).astype(np.int32)
    structures = LazyStructures(
        [s.path / "structures.npy" for s in gen.segments],
        seg,
        col("str_start"),
        col("str_end"),
        blobs=[s.structures for s in gen.segments],
    )
    role_el = col("role_el")
    return TemplateIndex(
        **fields,
        roles=LazyRoles(role_el, col("role_amt"), role_counts(role_el)),
        structures=structures,
        signature=signature,
        role_syms=LazyRoleSyms([s.perms for s in gen.segments], seg, col("perm_start"), col("perm_end")),
        source=col("source"),
        round=col("round"),
        digest=col("digest"),
    )


def open_index(root: Path) -> TemplateIndex | None:
    """The index in the folder ``root`` as its manifest stands now, without looking at the store (None when
    there is none). Files that vanish while it is read (an update replaced the manifest) are read again
    from the new manifest."""
    for attempt in range(REREADS):
        m = Manifest.read(root)
        if m is None:
            return None
        try:
            return load_generation(Generation(root, m), f"{m.signature}|{m.position}")
        except FileNotFoundError:
            if attempt == REREADS - 1:
                raise
    return None


def _open_current(root: Path, store: TemplateStore, base: str) -> Generation | None:
    """The generation in ``root`` (opened and checked) if its manifest is of this version and at the store's
    position, else None. A file the manifest names that vanished (an update replaced the manifest meanwhile)
    is read again from the new manifest; a damaged index is left to the update, which rebuilds it."""
    for _ in range(REREADS):
        try:
            m = Manifest.read(root)
        except (OSError, ValueError):
            return None
        if m is None or m.signature != base or m.position != store.position():
            return None
        try:
            return Generation(root, m)
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
    return None


def sync_index(
    store: TemplateStore, workers: int = 2, rebuild: bool = False, root: Path | None = None, load: bool = True
) -> tuple[TemplateIndex | None, IndexReport]:
    """Bring a store's on-disk index up to date (incrementally; from scratch with ``rebuild`` or when the
    index is missing, of another version, or damaged: one log line) and open it (``load=False``: only the
    report). Raises StoreError when the store is empty. An index folder that cannot be written: the index
    is built in memory, one log line."""
    t0 = time.perf_counter()
    store.require_nonempty()
    root = index_dir(store) if root is None else root
    base = base_signature(store)
    gen = None if rebuild else _open_current(root, store, base)
    if gen is not None:
        report = make_report("up to date", gen, t0)
    else:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with update_lock(root):
                gen, report = IndexUpdater(root, store, workers, base).run(rebuild, t0)
                idx = load_generation(gen, f"{base}|{gen.manifest.position}") if load else None
            return idx, report
        except OSError as exc:
            logger.warning("template index %s cannot be written (%s): the index is built in memory", root, exc)
            idx = build_in_memory(store, workers)
            report = IndexReport("built", len(idx), len(np.unique(idx.cluster)), seconds=time.perf_counter() - t0)
            return idx, report
    return (load_generation(gen, f"{base}|{gen.manifest.position}") if load else None), report
