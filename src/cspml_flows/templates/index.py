"""An array-based view of a template store for fast retrieval, kept on disk and updated by the store's changes.

The index of a store lives under ``$CSPML_HOME/index/<digest of the store identity>/`` as immutable columnar
segments, a state per generation and a manifest (layout: :mod:`cspml_flows.templates.segments`). Opening it
(:meth:`TemplateIndex.open`) memory-maps the columns; structures stay in their byte blob until a prediction
asks for one. When the store has moved on since the manifest's position (:meth:`TemplateStore.position`),
the open brings the index up to date first (:func:`sync_index`), under the index's update lock:

- the documents written since (:meth:`TemplateStore.changed_since`; a store that cannot tell is compared
  document by document through stored digests) are read; new and replaced templates go into a new segment,
  removed and replaced ones are marked dead (tombstones);
- only the prototype partitions (anonymous formula, primitive-cell size) those templates belong to are
  clustered again, with the fit results of representative pairs kept from earlier builds, so that only
  pairs never fitted are fitted: an updated index has the clusters a rebuild would give;
- small segments are merged (and dead rows dropped) when there are many, without rewriting the large ones
  on every update;
- a new manifest is written last, atomically: readers see the old index or the new one, and a kill leaves
  the old one, which the next open brings up to date.

Rows are in material-id order and cluster ids number the clusters by their first row, in an updated index
as in a rebuilt one, so that predictions do not depend on how the index came about. ``cspml index
--rebuild`` (:func:`sync_index` with ``rebuild=True``) builds it from scratch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.composition import MAX_ELEMENTS, Roles, roles
from cspml_flows.core.config import home_dir, max_template_atoms
from cspml_flows.core.descriptors import (
    DESCRIPTOR_VERSION,
    MAX_ROLES,
    ROLE_PROPERTIES,
    magpie_stats,
    role_fractions,
    role_properties,
)
from cspml_flows.core.errors import StoreError
from cspml_flows.core.prototype import cluster_prototypes, merge_groups, partition_pairs, run_fits
from cspml_flows.core.safeio import fsync_path
from cspml_flows.core.structure_checks import geometry_problem, min_periodic_distance
from cspml_flows.templates.geometry import (
    cell_arrays,
    role_symmetry_perms,
    stored_geometry,
    structure_digest,
    structure_json,
    template_geometry,
)
from cspml_flows.templates.segments import (
    COLUMNS,
    STATS_WIDTH,
    Generation,
    LazyRoles,
    LazyRoleSyms,
    LazyStructures,
    Manifest,
    Rows,
    Segment,
    Table,
    check_index_arrays,
    new_token,
    remove_unreferenced,
    role_counts,
    update_lock,
    write_segment,
    write_state,
)
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_rows import StoredRow, digest64, doc_digest, position_count

__all__ = [
    "INDEX_VERSION",
    "STATS_WIDTH",
    "IndexReport",
    "TemplateIndex",
    "cell_arrays",
    "check_index_arrays",
    "index_dir",
    "min_periodic_distance",
    "open_index",
    "role_symmetry_perms",
    "sync_index",
    "template_geometry",
    "usable_template",
]

log = logging.getLogger(__name__)
INDEX_VERSION = 4  # 4: segmented on-disk index; geometry read from the documents
CHUNK = 10_000  # documents turned into index rows at a time
MAX_SEGMENTS = 8  # more segments than this: the smallest are merged
DEAD_FRACTION = 0.3  # a segment with more dead rows than this is rewritten without them
PAUSE_ENV = "CSPML_INDEX_TEST_PAUSE"  # tests: "<stage>:<seconds>", an update sleeps there (see _pause)
_TEXT = ("ids", "formulas", "anon", "prototype")
_NUMERIC = ("nprim", "e_above_hull", "spacegroup", "cluster", "stats", "role_props", "role_fracs", "min_dist")
_FIELDS = [
    "material_id",
    "structure",
    "formula",
    "anonymous_formula",
    "nsites_primitive",
    "prototype",
    "e_above_hull",
    "spacegroup_number",
    "round",
    "source",
    "min_dist",
    "role_syms",
]


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
    _cells: dict[int, tuple] = field(default_factory=dict, repr=False)

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
            roles=[Roles(*r) for r in _roles_of(c)],
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
            return _build_in_memory(store, workers)
        idx = sync_index(store, workers, root=cache if isinstance(cache, Path) else None)[0]
        assert idx is not None
        return idx

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cells"] = {}
        return state

    # ---- access ---------------------------------------------------------------------------------------
    def structure(self, i: int) -> Structure:
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


# ---------------------------------------------------------------- documents -> index rows


def usable_template(d: dict, max_atoms: int, checked: bool = False) -> bool:
    """Whether a structure dict is ordered (one species of occupancy 1 per site), has at most ``max_atoms``
    sites and a sane cell and geometry (see :func:`cspml_flows.templates.schema.check_template_structure`).
    ``checked``: the structure passed that check when it was imported (its document's geometry is of this
    structure), so only the count and the occupancies are looked at."""
    sites = d.get("sites") or []
    if not 0 < len(sites) <= max_atoms:
        return False
    try:
        if not all(len(s["species"]) == 1 and abs(float(s["species"][0].get("occu", 1.0)) - 1.0) < 1e-6 for s in sites):
            return False
        if checked:
            return True
        frac = np.asarray([s["abc"] for s in sites], dtype=float)
        return geometry_problem(np.asarray(d["lattice"]["matrix"], dtype=float), frac) is None
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def partition_hash(anon: str, nprim: int) -> int:
    """The 64-bit key of a prototype partition (anonymous formula, primitive-cell size)."""
    return digest64(f"{anon}|{int(nprim)}".encode())


def id_hash(mid: str) -> int:
    return digest64(mid.encode())


def _roles_of(cols: dict[str, np.ndarray]) -> list[tuple[tuple[str, ...], tuple[float, ...]]]:
    counts = role_counts(cols["role_el"])
    return [
        (tuple(str(e) for e in el[:k]), tuple(float(a) for a in am[:k]))
        for el, am, k in zip(cols["role_el"], cols["role_amt"], counts, strict=True)
    ]


def doc_rows(docs: list[dict], digests: list[int], workers: int = 1, keep_dicts: bool = False) -> Rows:
    """Index rows of template documents (all usable; see :func:`usable_template`): the :data:`COLUMNS` of
    :mod:`cspml_flows.templates.segments`, the structures as JSON bytes (``keep_dicts``: the dicts) and the
    role permutations. The geometry stored in a document is used; documents without it (older stores) get
    it computed, in ``workers`` processes."""

    n = len(docs)
    role_cache: dict[str, tuple[Roles, str, str]] = {}
    rl: list[Roles] = []
    anon, reduced = [], []
    for d in docs:
        f = d["formula"]
        if f not in role_cache:
            r = roles(f)
            role_cache[f] = (r, r.anonymous_formula, r.reduced_formula)
        r, a, red = role_cache[f]
        rl.append(r)
        anon.append(a)
        reduced.append(red)
    structures = [d["structure"] for d in docs]
    blobs = [structure_json(s) for s in structures]
    geometry = [stored_geometry(d, r, b) for d, r, b in zip(docs, rl, blobs, strict=True)]
    missing = [i for i, g in enumerate(geometry) if g is None]
    if missing:
        dmin, syms = template_geometry([structures[i] for i in missing], [rl[i] for i in missing], workers=workers)
        for k, i in enumerate(missing):
            geometry[i] = (float(dmin[k]), syms[k])
    nprim = np.array([int(d.get("nsites_primitive") or len(d["structure"]["sites"])) for d in docs], dtype=np.int64)
    role_el = np.full((n, MAX_ELEMENTS), "", dtype="U3")
    role_amt = np.full((n, MAX_ELEMENTS), np.nan)
    for i, r in enumerate(rl):
        role_el[i, : len(r.elements)] = r.elements
        role_amt[i, : len(r.amounts)] = r.amounts
    stats_of: dict[str, int] = {}
    for red in reduced:
        stats_of.setdefault(red, len(stats_of))
    stats = magpie_stats(list(stats_of))[[stats_of[red] for red in reduced]] if n else np.zeros((0, STATS_WIDTH))
    cols = {
        "ids": np.array([str(d["material_id"]) for d in docs], dtype=str),
        "formulas": np.array([d["formula"] for d in docs], dtype=str),
        "anon": np.array(anon, dtype=str),
        "prototype": np.array([d.get("prototype") or "" for d in docs], dtype=str),
        "source": np.array([str(d.get("source") or "unknown") for d in docs], dtype=str),
        "nprim": nprim,
        "e_above_hull": np.array([np.nan if d.get("e_above_hull") is None else d["e_above_hull"] for d in docs], float),
        "spacegroup": np.array([d.get("spacegroup_number") or 0 for d in docs], dtype=np.int64),
        "round": np.array([int(d.get("round") or 0) for d in docs], dtype=np.int64),
        "stats": stats,
        "role_props": role_properties(rl) if n else np.zeros((0, MAX_ROLES, len(ROLE_PROPERTIES))),
        "role_fracs": role_fractions(rl) if n else np.zeros((0, MAX_ROLES)),
        "min_dist": np.array([g[0] for g in geometry], dtype=float),
        "role_el": role_el,
        "role_amt": role_amt,
        "digest": np.array(digests, dtype=np.uint64),
        "part": np.array([partition_hash(a, p) for a, p in zip(anon, nprim, strict=True)], dtype=np.uint64),
    }
    if n:
        for key in ("ids", "formulas", "anon", "prototype", "source"):
            if cols[key].dtype.kind != "U":
                cols[key] = cols[key].astype(str)
    data = structures if keep_dicts else blobs
    return Rows(cols, data, [list(g[1]) for g in geometry])


def _split_usable(rows: list, limit: int) -> tuple[list, list[str]]:
    """Stored rows whose structure can be a template (:func:`usable_template`, elements those of the formula),
    and the ids of those that cannot."""
    good, bad = [], []
    elements: dict[str, set[str] | None] = {}
    for r in rows:
        d = r.doc()
        f, s = d.get("formula"), d.get("structure")
        if isinstance(f, str) and f not in elements:
            try:
                elements[f] = set(roles(f).elements)
            except Exception:
                elements[f] = None
        checked = isinstance(s, dict) and d.get("geometry_of") == structure_digest(s)
        ok = (
            isinstance(s, dict)
            and isinstance(f, str)
            and elements[f] is not None
            and usable_template(s, limit, checked)
        )
        try:
            ok = ok and {site["species"][0]["element"] for site in s["sites"]} == elements[f]
        except (KeyError, TypeError, IndexError):
            ok = False
        (good if ok else bad).append(r if ok else r.id)
    return good, bad


def _warn_left_out(n: int, store: TemplateStore, limit: int) -> None:
    if n > 0:
        log.warning(
            "%d templates of %s left out: partial occupancies, more than %d sites (max_template_atoms) or a cell "
            "no crystal has",
            n,
            store.name,
            limit,
        )


def write_row_segments(root: Path, rows: Iterable[StoredRow], workers: int, limit: int) -> tuple[list[str], list[str]]:
    """Index rows of the stored documents ``rows`` (the first copy of an id), written as segments under
    ``root`` :data:`CHUNK` documents at a time; the segments' names and the ids that cannot be templates."""
    names: list[str] = []
    skipped: list[str] = []
    batch: list[StoredRow] = []

    def flush() -> None:
        good, bad = _split_usable(batch, limit)
        skipped.extend(bad)
        if good:
            rows = doc_rows([r.doc() for r in good], [r.digest for r in good], workers)
            names.append(write_segment(root, rows))
        batch.clear()

    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            continue  # a second copy of an id (left by an older writer): the first is indexed
        seen.add(row.id)
        batch.append(row)
        if len(batch) >= CHUNK:
            flush()
    flush()
    return names, skipped


_FORKED_STORE: TemplateStore | None = None  # the store forked workers of _parallel_row_segments read


def _range_segments(args: tuple[Path, list[str], int]) -> tuple[list[str], list[str]]:
    root, ids, limit = args
    assert _FORKED_STORE is not None
    return write_row_segments(root, _FORKED_STORE.rows(ids), 1, limit)


def _parallel_row_segments(store: TemplateStore, root: Path, workers: int, limit: int) -> tuple[list[str], list[str]]:
    """:func:`write_row_segments` of an embedded store over ranges of :data:`CHUNK` sorted ids in ``workers``
    forked processes, each reading its own documents from sqlite."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    global _FORKED_STORE
    ids = sorted(store.ids())
    tasks = [(root, ids[s : s + CHUNK], limit) for s in range(0, len(ids), CHUNK)]
    names: list[str] = []
    skipped: list[str] = []
    _FORKED_STORE = store
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for n, sk in pool.map(_range_segments, tasks):
                names += n
                skipped += sk
    finally:
        _FORKED_STORE = None
    return names, skipped


def _build_in_memory(store: TemplateStore, workers: int) -> TemplateIndex:
    limit = max_template_atoms()
    good, bad = _split_usable(list(store.rows()), limit)
    _warn_left_out(len(bad), store, limit)
    good.sort(key=lambda r: r.id)
    idx = TemplateIndex.from_docs([r.doc() for r in good], workers=workers)
    idx.digest = np.array([r.digest for r in good], dtype=np.uint64)
    idx.signature = f"{_base_signature(store)}|{store.position()}"
    return idx


# ---------------------------------------------------------------- checks of what is read


def _load(gen: Generation, signature: str) -> TemplateIndex:
    """The TemplateIndex of an opened (and checked) generation: columns memory-mapped where the rows need no
    reordering, else gathered in id order."""
    order = np.asarray(gen.state["order"])
    n = len(order)
    if n == 0:
        return TemplateIndex.empty(signature)
    direct = len(gen.segments) == 1 and n == gen.n_phys and bool((order == np.arange(n)).all())

    def col(key: str) -> np.ndarray:
        return gen.segments[0].cols[key] if direct else gen.column(key, order)

    fields = {k: col(k) for k in (*_TEXT, *(k for k in _NUMERIC if k != "cluster"))}
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


# ---------------------------------------------------------------- the index folder of a store


def index_dir(store: TemplateStore) -> Path:
    """The index folder of a store: one per store location (:attr:`TemplateStore.identity`)."""
    digest = hashlib.sha1(store.identity.encode()).hexdigest()[:16]
    return home_dir() / "index" / digest


def _base_signature(store: TemplateStore) -> str:
    return f"{INDEX_VERSION}|{DESCRIPTOR_VERSION}|{store.identity}|{max_template_atoms()}"


@dataclass
class IndexReport:
    """What :func:`sync_index` did."""

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
        what = {
            "up to date": "up to date",
            "updated": f"updated: {self.added} added, {self.removed} removed, {self.fits} new prototype fits",
        }.get(self.action, f"{self.action}: {self.fits} prototype fits")
        left = f", {self.left_out} left out" if self.left_out else ""
        return (
            f"index {what}; {self.templates} templates{left}, {self.clusters} prototype clusters, "
            f"{self.segments} segment(s) ({self.seconds:.1f} s)"
        )


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
    base = _base_signature(store)
    if not rebuild:
        found = _open_current(root, store, base)
        if found is not None:
            return (_load(*found) if load else None), _report("up to date", found[0], t0)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with update_lock(root):
            return _Updater(root, store, workers, base).run(rebuild, t0, load)
    except OSError as exc:
        log.warning("template index %s cannot be written (%s): the index is built in memory", root, exc)
        idx = _build_in_memory(store, workers)
        report = IndexReport("built", len(idx), len(np.unique(idx.cluster)), seconds=time.perf_counter() - t0)
        return idx, report


def _report(action: str, gen: Generation, t0: float, fits: int = 0, **kw: int) -> IndexReport:
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


def open_index(root: Path) -> TemplateIndex | None:
    """The index in the folder ``root`` as its manifest stands now, without looking at the store (None when
    there is none). Files that vanish while it is read (an update replaced the manifest) are read again
    from the new manifest."""
    for attempt in range(5):
        m = Manifest.read(root)
        if m is None:
            return None
        try:
            return _load(Generation(root, m), f"{m.signature}|{m.position}")
        except FileNotFoundError:
            if attempt == 4:
                raise
    return None


def _open_current(root: Path, store: TemplateStore, base: str) -> tuple[Generation, str] | None:
    """The generation in ``root`` (opened and checked) if its manifest is of this version and at the store's
    position, with the index signature, else None. A file the manifest names that vanished (an update
    replaced the manifest meanwhile) is read again from the new manifest; a damaged index is left to the
    update, which rebuilds it."""
    for _ in range(5):
        try:
            m = Manifest.read(root)
        except (OSError, ValueError):
            return None
        if m is None or m.signature != base or m.position != store.position():
            return None
        try:
            return Generation(root, m), f"{base}|{m.position}"
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
    return None


class _Updater:
    """One update of an index folder (the caller holds its update lock)."""

    def __init__(self, root: Path, store: TemplateStore, workers: int, base: str):
        self.root, self.store, self.workers, self.base = root, store, workers, base
        self.limit = max_template_atoms()
        self.fits = 0

    def run(self, rebuild: bool, t0: float, load: bool = True) -> tuple[TemplateIndex | None, IndexReport]:
        gen = None
        action = "rebuilt" if rebuild else "built"
        if not rebuild:
            try:
                m = Manifest.read(self.root)
                if m is not None and m.signature == self.base:
                    gen = Generation(self.root, m)
                elif m is not None:
                    log.info("template index %s is of another version or store: rebuilding it", self.root)
            except (OSError, ValueError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("template index %s is unreadable (%s): rebuilding it", self.root, reason)
                action = "rebuilt"
        kw: dict[str, int] = {}
        if gen is not None:
            remove_unreferenced(self.root, gen.manifest)
            if gen.manifest.position == self.store.position():
                return self._finish(gen, "up to date", t0, load, left_out=len(gen.manifest.skipped))
            manifest, added, removed, left = self._update(gen)
            action, kw = "updated", {"added": added, "removed": removed, "left_out": left}
        else:
            remove_unreferenced(self.root, None)
            manifest, left = self._build()
            kw = {"left_out": left}
            digest = hashlib.sha1(self.store.identity.encode()).hexdigest()[:16]
            for old in (home_dir() / "cache").glob(f"index-{digest}.*"):  # caches of earlier versions: never read
                old.unlink(missing_ok=True)
        return self._finish(Generation(self.root, manifest), action, t0, load, **kw)

    def _finish(
        self, gen: Generation, action: str, t0: float, load: bool, **kw: int
    ) -> tuple[TemplateIndex | None, IndexReport]:
        idx = _load(gen, f"{self.base}|{gen.manifest.position}") if load else None
        return idx, _report(action, gen, t0, fits=self.fits, **kw)

    # ---- full build ------------------------------------------------------------------------------------
    def _build(self) -> tuple[Manifest, int]:
        position = self.store.position()
        if self.workers > 1 and self.store.sqlite_file() is not None:
            names, skipped = _parallel_row_segments(self.store, self.root, self.workers, self.limit)
        else:
            names, skipped = write_row_segments(self.root, self.store.rows(), self.workers, self.limit)
        _warn_left_out(len(skipped), self.store, self.limit)
        return self.assemble(names, skipped, position), len(skipped)

    def assemble(self, names: list[str], skipped: list[str], position: str) -> Manifest:
        """The index of the segments ``names`` (under the root) as of the store's ``position``: merged into
        one segment, clustered and committed as generation 1."""
        segs = [Segment(self.root, name) for name in names]
        if len(segs) > 1:
            merged = self._merge(segs, [np.ones(s.n, dtype=bool) for s in segs])
            segs = [merged]
        table = Table(segs)
        cluster = np.zeros(table.n_phys, dtype=np.int64)
        empty = np.zeros(0, dtype=np.uint64)
        pairs = (empty, empty, empty, np.zeros(0, dtype=bool))
        cluster, pairs = self._recluster(table, cluster, None, pairs)
        return self._commit(table, cluster, pairs, position, sorted(set(skipped)), 1)

    # ---- incremental update --------------------------------------------------------------------------
    def _update(self, gen: Generation) -> tuple[Manifest, int, int, int]:
        m = gen.manifest
        now, changed = self.store.changed_since(m.position)
        table = Table(list(gen.segments))
        cluster = np.array(gen.state["cluster"], dtype=np.int64)
        order = np.asarray(gen.state["order"])
        pairs = tuple(np.array(gen.state[k]) for k in ("pair_part", "pair_a", "pair_b", "pair_fit"))
        acc = _Changes(set(m.skipped))
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
            order = _live_order(table, cluster)
            table, cluster = self._apply(table, cluster, order, extra, present, acc)
        _warn_left_out(acc.left, self.store, self.limit)
        if acc.stale:
            stale = np.array(sorted(acc.stale), dtype=np.uint64)
            keep = ~(np.isin(pairs[1], stale) | np.isin(pairs[2], stale))
            pairs = tuple(p[keep] for p in pairs)
        touched = np.array(sorted(acc.touched), dtype=np.uint64)
        cluster, pairs = self._recluster(table, cluster, touched, pairs)
        table, cluster = self._compact(table, cluster)
        manifest = self._commit(table, cluster, pairs, now, sorted(acc.skipped), m.generation + 1)
        return manifest, acc.added, acc.removed, acc.left

    def _apply(
        self, table: Table, cluster: np.ndarray, order: np.ndarray, changed: set[str], present: dict, acc: _Changes
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
        good, bad = _split_usable(todo, self.limit)
        acc.skipped.update(bad)
        acc.left += len(bad)
        if not good:
            return table, cluster
        rows = doc_rows([r.doc() for r in good], [r.digest for r in good], self.workers)
        seg = Segment(self.root, write_segment(self.root, rows))
        _pause("segment")
        acc.touched.update(int(x) for x in np.unique(seg.cols["part"]))
        acc.added += seg.n
        return Table([*table.segments, seg]), np.concatenate([cluster, np.zeros(seg.n, dtype=np.int64)])

    def _diff(self, table: Table, order: np.ndarray, skipped: set[str]) -> tuple[set[str], dict]:
        """Every stored document compared with the index by its digest: the ids that differ (new, changed or
        gone) and the stored rows of those that exist."""
        live_ids = table.column("ids", order)
        digests = table.column("digest", order)
        changed: set[str] = set()
        present: dict = {}
        seen = np.zeros(len(live_ids), dtype=bool)
        stored_skipped: set[str] = set()
        batch: list = []

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

    # ---- clustering ----------------------------------------------------------------------------------
    def _recluster(
        self, table: Table, cluster: np.ndarray, touched: np.ndarray | None, pairs: tuple[np.ndarray, ...]
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Cluster the live rows of the partitions ``touched`` (None: all) again: groups of equal prototype
        label, merged over the representative pairs of :func:`partition_pairs`; fit results come from
        ``pairs`` (the cache: partition, first and second representative, result) where known, the rest
        are fitted. Returns the cluster array with new labels there and the cache with those partitions'
        pairs replaced by the ones evaluated now."""

        live = np.flatnonzero(cluster >= 0)
        part_all = table.column("part", live)
        rows = live if touched is None else live[np.isin(part_all, touched)]
        c_part, c_a, c_b, c_fit = pairs
        if touched is not None and len(c_part):
            keep = ~np.isin(c_part, touched)
            kept = (c_part[keep], c_a[keep], c_b[keep], c_fit[keep])
        else:
            kept = (c_part[:0], c_a[:0], c_b[:0], c_fit[:0]) if touched is None else pairs
        if not len(rows):
            return cluster, kept
        part = table.column("part", rows)
        ids = table.column("ids", rows)
        labels = table.column("prototype", rows)
        by = np.lexsort((ids, part))
        rows, part, ids, labels = rows[by], part[by], ids[by], labels[by]
        starts = np.concatenate([[0], np.flatnonzero(part[1:] != part[:-1]) + 1, [len(rows)]])
        plans = []  # (partition rows, group of each row, representative rows, pairs, fits or None)
        tasks, task_of = [], []
        for s, e in itertools.pairwise(starts):
            group_of: dict[str, int] = {}
            gid = np.empty(e - s, dtype=np.int64)
            reps: list[int] = []
            for k in range(s, e):
                key = str(labels[k]) or f"__none_{ids[k]}"
                g = group_of.get(key)
                if g is None:
                    g = group_of[key] = len(reps)
                    reps.append(k)
                gid[k - s] = g
            pp = partition_pairs([str(labels[k]) or None for k in reps])
            fits: list[bool | None] = [None] * len(pp)
            if pp and touched is not None and len(c_part):
                lo, hi = np.searchsorted(c_part, part[s], "left"), np.searchsorted(c_part, part[s], "right")
                known = {
                    (int(x), int(y)): bool(f) for x, y, f in zip(c_a[lo:hi], c_b[lo:hi], c_fit[lo:hi], strict=True)
                }
                hashes = [id_hash(str(ids[k])) for k in reps]
                fits = [known.get((hashes[i], hashes[j])) for i, j in pp]
            missing = [q for q, f in enumerate(fits) if f is None]
            if missing:
                need = sorted({x for q in missing for x in pp[q]})
                local = {g: t for t, g in enumerate(need)}
                structs = [table.structure_ref(int(rows[reps[g]])) for g in need]
                tasks.append((structs, [(local[pp[q][0]], local[pp[q][1]]) for q in missing]))
                task_of.append((len(plans), missing))
            plans.append((s, e, gid, reps, pp, fits))
        results = run_fits(tasks, self.workers) if tasks else []
        for (p, missing), res in zip(task_of, results, strict=True):
            for q, ok in zip(missing, res, strict=True):
                plans[p][5][q] = ok
            self.fits += len(res)
        new = np.array(cluster, dtype=np.int64)
        next_label = int(cluster.max()) + 1 if len(cluster) else 0
        n_part, n_a, n_b, n_fit = [], [], [], []
        for s, e, gid, reps, pp, fits in plans:
            roots = merge_groups(len(reps), pp, [bool(f) for f in fits])
            new[rows[s:e]] = next_label + np.asarray(roots, dtype=np.int64)[gid]
            next_label += len(reps)
            if pp:
                hashes = [id_hash(str(ids[k])) for k in reps]
                n_part.append(np.full(len(pp), part[s], dtype=np.uint64))
                n_a.append(np.array([hashes[i] for i, _ in pp], dtype=np.uint64))
                n_b.append(np.array([hashes[j] for _, j in pp], dtype=np.uint64))
                n_fit.append(np.array([bool(f) for f in fits], dtype=bool))
        out = [np.concatenate([k, *n]) for k, n in zip(kept, (n_part, n_a, n_b, n_fit), strict=True)]
        srt = np.argsort(out[0], kind="stable")
        return new, tuple(o[srt] for o in out)

    # ---- segments ------------------------------------------------------------------------------------
    def _compact(self, table: Table, cluster: np.ndarray) -> tuple[Table, np.ndarray]:
        """Merge the smallest segments while there are more than MAX_SEGMENTS, and rewrite a segment whose
        dead rows exceed DEAD_FRACTION; returns the new table and cluster array (same labels)."""
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
                merged = self._merge([segs[k] for k in g], [alive[k] for k in g])
                labels = np.concatenate([cluster[table.bounds[k] : table.bounds[k + 1]][alive[k]] for k in g])
                ids = np.concatenate([segs[k].cols["ids"][alive[k]] for k in g])
                new_segs.append(merged)
                new_cluster.append(labels[np.argsort(ids, kind="stable")])
            else:
                k = g[0]
                new_segs.append(segs[k])
                new_cluster.append(cluster[table.bounds[k] : table.bounds[k + 1]])
        return Table(new_segs), np.concatenate(new_cluster) if new_cluster else np.zeros(0, dtype=np.int64)

    def _merge(self, segs: list[Segment], masks: list[np.ndarray]) -> Segment:
        """One new segment with the rows of ``segs`` where ``masks`` are True, in id order, written column by
        column into memory-mapped files (memory stays small whatever the segments' size)."""
        from numpy.lib.format import open_memmap

        src = [(s, np.flatnonzero(m)) for s, m in zip(segs, masks, strict=True)]
        ids = np.concatenate([s.cols["ids"][r] for s, r in src])
        which = np.concatenate([np.full(len(r), k, dtype=np.int64) for k, (_, r) in enumerate(src)])
        local = np.concatenate([r for _, r in src])
        srt = np.argsort(ids, kind="stable")
        which, local = which[srt], local[srt]
        n = len(srt)
        name = f"seg-{new_token()}"
        tmp = self.root / f".tmp-{name}"
        tmp.mkdir()

        def gather(key: str) -> np.ndarray:
            shape = COLUMNS[key][1]
            dtype = np.result_type(*[s.cols[key].dtype for s in segs])
            out = np.empty((n, *shape), dtype=dtype)
            for k, (s, _) in enumerate(src):
                m = which == k
                out[m] = s.cols[key][local[m]]
            return out

        for key in COLUMNS:
            if key in ("str_start", "str_end", "perm_start", "perm_end"):
                continue
            arr = gather(key)
            mm = open_memmap(tmp / f"{key}.npy", mode="w+", dtype=arr.dtype, shape=arr.shape)
            mm[...] = arr
            mm.flush()
            del mm, arr
        starts, ends = gather("str_start"), gather("str_end")
        lengths = ends - starts
        new_end = np.cumsum(lengths)
        blob = open_memmap(tmp / "structures.npy", mode="w+", dtype=np.uint8, shape=(int(new_end[-1]),))
        pos = 0
        for i in range(n):
            s = segs[int(which[i])]
            blob[pos : pos + int(lengths[i])] = s.structures[int(starts[i]) : int(ends[i])]
            pos += int(lengths[i])
        blob.flush()
        del blob
        ps, pe = gather("perm_start"), gather("perm_end")
        plen = pe - ps
        p_end = np.cumsum(plen)
        table = open_memmap(tmp / "perms.npy", mode="w+", dtype=np.int8, shape=(int(p_end[-1]), MAX_ELEMENTS))
        pos = 0
        for i in range(n):
            s = segs[int(which[i])]
            table[pos : pos + int(plen[i])] = s.perms[int(ps[i]) : int(pe[i])]
            pos += int(plen[i])
        table.flush()
        del table
        for key, arr in (
            ("str_start", new_end - lengths),
            ("str_end", new_end),
            ("perm_start", p_end - plen),
            ("perm_end", p_end),
        ):
            np.save(tmp / f"{key}.npy", arr.astype(np.int64), allow_pickle=False)
        import json

        (tmp / "segment.json").write_text(json.dumps({"format": "cspml-index-segment/1", "n": int(n)}))
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        os.replace(tmp, self.root / name)
        return Segment(self.root, name)

    # ---- commit ----------------------------------------------------------------------------------------
    def _commit(
        self,
        table: Table,
        cluster: np.ndarray,
        pairs: tuple[np.ndarray, ...],
        position: str,
        skipped: list[str],
        generation: int,
    ) -> Manifest:
        """Canonical labels and row order, the state folder, then the manifest (atomically), then the files no
        manifest names are removed."""
        live = np.flatnonzero(cluster >= 0)
        ids = table.column("ids", live)
        srt = np.argsort(ids, kind="stable")
        order = live[srt]
        sorted_ids = ids[srt]
        if len(sorted_ids) > 1 and not (sorted_ids[1:] > sorted_ids[:-1]).all():
            raise StoreError(
                f"template index {self.root}: an id appears twice; rebuild it with 'cspml index --rebuild'"
            )
        tokens = cluster[order]
        labels = np.full(len(cluster), -1, dtype=np.int64)
        if len(order):
            _, first, inv = np.unique(tokens, return_index=True, return_inverse=True)
            rank = np.empty(len(first), dtype=np.int64)
            rank[np.argsort(first, kind="stable")] = np.arange(len(first))
            labels[order] = rank[inv.reshape(-1)]
        part, a, b, fit = pairs
        state = write_state(
            self.root,
            generation,
            {
                "cluster": labels,
                "order": order.astype(np.int64),
                "pair_part": part.astype(np.uint64),
                "pair_a": a.astype(np.uint64),
                "pair_b": b.astype(np.uint64),
                "pair_fit": fit.astype(bool),
            },
        )
        manifest = Manifest(self.base, position, generation, [s.name for s in table.segments], state, skipped)
        _pause("state")
        manifest.write(self.root)
        _pause("manifest")
        remove_unreferenced(self.root, manifest)
        return manifest


@dataclass
class _Changes:
    """What an update has done so far."""

    skipped: set[str]
    added: int = 0
    removed: int = 0
    left: int = 0
    stale: set[int] = field(default_factory=set)  # id hashes of rows removed or replaced (their fits are stale)
    touched: set[int] = field(default_factory=set)  # partitions to cluster again


def _pause(stage: str) -> None:
    """Sleep at ``stage`` when ``CSPML_INDEX_TEST_PAUSE`` is ``<stage>:<seconds>`` (tests kill an update or
    read the index there): "segment" (a new segment written), "state" (the state written, the manifest not
    yet), "manifest" (the manifest replaced, old files not yet removed)."""
    want, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if want == stage:
        time.sleep(float(seconds or 0))


def _live_order(table: Table, cluster: np.ndarray) -> np.ndarray:
    """Physical positions of the live rows, in id order."""
    live = np.flatnonzero(cluster >= 0)
    return live[np.argsort(table.column("ids", live), kind="stable")]
