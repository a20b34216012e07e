"""The template index on disk: immutable columnar segments, a state per generation, and a manifest.

One folder per store (``$CSPML_HOME/index/<digest of the store identity>/``):

- ``seg-<token>/``: a segment, never changed once written: one ``.npy`` file per column (:data:`COLUMNS`;
  rows in material-id order), the structures as one byte blob of JSON documents (``structures.npy``, each
  row's ``str_start``/``str_end`` in it) and the role symmetries as a table of role permutations
  (``perms.npy``, each row's ``perm_start``/``perm_end`` in it), and ``segment.json`` (format, row count);
- ``gen-<g>-<token>/``: the state of generation ``g``: ``cluster.npy`` (the cluster label of every row of the
  segments laid end to end; -1 marks a removed row, a tombstone), ``order.npy`` (the live rows in
  material-id order) and the prototype-fit cache (``pair_part``, ``pair_a``, ``pair_b``, ``pair_fit``);
- ``manifest.json``: format, signature, the store position the index reflects, generation, segments, state
  folder, ids of documents left out. Written last and atomically (temporary file, fsync, ``os.replace``),
  after every file it names is whole: a reader sees the previous index or the new one, and a kill
  mid-update leaves the previous one. Files no manifest names are removed by the next update.
- ``update.lock``: held (``flock``) by the one process updating the index.

Every array is read with ``allow_pickle=False`` (an object array raises: nothing is unpickled) and
memory-mapped (``mmap_mode='r'``), then checked against the layout of :data:`COLUMNS` and the state's
invariants; a structure is decoded only when a prediction asks for it (:class:`LazyStructures`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cspml_flows.core.composition import MAX_ELEMENTS, Roles
from cspml_flows.core.descriptors import MAGPIE_PROPERTIES, MAGPIE_STATS, MAX_ROLES, ROLE_PROPERTIES
from cspml_flows.core.errors import StoreError
from cspml_flows.core.safeio import exclusive_lock, fsync_path

SEGMENT_FORMAT = "cspml-index-segment/1"
MANIFEST_FORMAT = "cspml-index/1"
MANIFEST = "manifest.json"
LOCK = "update.lock"
STATS_WIDTH = len(MAGPIE_PROPERTIES) * len(MAGPIE_STATS)

# column -> (dtype kinds, shape of one row)
COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "ids": ("U", ()),
    "formulas": ("U", ()),
    "anon": ("U", ()),
    "prototype": ("U", ()),
    "source": ("U", ()),
    "nprim": ("iu", ()),
    "e_above_hull": ("f", ()),
    "spacegroup": ("iu", ()),
    "round": ("iu", ()),
    "stats": ("f", (STATS_WIDTH,)),
    "role_props": ("f", (MAX_ROLES, len(ROLE_PROPERTIES))),
    "role_fracs": ("f", (MAX_ROLES,)),
    "min_dist": ("f", ()),
    "role_el": ("U", (MAX_ELEMENTS,)),
    "role_amt": ("f", (MAX_ELEMENTS,)),
    "perm_start": ("i", ()),
    "perm_end": ("i", ()),
    "str_start": ("i", ()),
    "str_end": ("i", ()),
    "digest": ("u", ()),
    "part": ("u", ()),
}
TEXT_COLUMNS = ("ids", "formulas", "anon", "prototype")
STATE_ARRAYS: dict[str, str] = {
    "cluster": "i",
    "order": "i",
    "pair_part": "u",
    "pair_a": "u",
    "pair_b": "u",
    "pair_fit": "b",
}


def new_token() -> str:
    return secrets.token_hex(6)


def load_array(path: Path, mmap: bool = True) -> np.ndarray:
    """A ``.npy`` array, memory-mapped, never unpickled (an object array raises ValueError)."""
    arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise ValueError(f"{path.name} is not a plain array")
    return arr


# ---------------------------------------------------------------- rows of a segment in memory


@dataclass
class Rows:
    """Rows of the index not yet on disk: the :data:`COLUMNS` arrays (without the blob positions), the
    structures as JSON bytes and the role permutations per row."""

    cols: dict[str, np.ndarray]
    structures: list[bytes]
    perms: list[list[tuple[int, ...]]]

    def __len__(self) -> int:
        return len(self.structures)

    def take(self, sel: np.ndarray) -> Rows:
        return Rows(
            {k: v[sel] for k, v in self.cols.items()},
            [self.structures[i] for i in sel],
            [self.perms[i] for i in sel],
        )


def write_segment(root: Path, rows: Rows) -> str:
    """Write ``rows`` (sorted by id here) as a new segment folder under ``root``; returns its name. Written
    in a temporary folder, each file synced, then renamed into place whole."""
    order = np.argsort(rows.cols["ids"], kind="stable")
    rows = rows.take(order)
    n = len(rows)
    lengths = np.fromiter((len(s) for s in rows.structures), dtype=np.int64, count=n)
    ends = np.cumsum(lengths)
    blob = np.frombuffer(b"".join(rows.structures), dtype=np.uint8)
    n_perms = np.fromiter((len(p) for p in rows.perms), dtype=np.int64, count=n)
    pend = np.cumsum(n_perms)
    table = np.full((int(pend[-1]) if n else 0, MAX_ELEMENTS), -1, dtype=np.int8)
    k = 0
    for perms in rows.perms:
        for p in perms:
            table[k, : len(p)] = p
            k += 1
    cols = dict(rows.cols)
    cols |= {"str_start": ends - lengths, "str_end": ends, "perm_start": pend - n_perms, "perm_end": pend}
    return _write_folder(root, "seg", cols | {"structures": blob, "perms": table}, {"n": n})


def _write_folder(root: Path, prefix: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    name = f"{prefix}-{new_token()}" if prefix == "seg" else prefix
    tmp = root / f".tmp-{name}"
    tmp.mkdir(parents=True)
    for key, arr in arrays.items():
        with (tmp / f"{key}.npy").open("wb") as fh:
            np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
    if prefix == "seg":
        (tmp / "segment.json").write_text(json.dumps({"format": SEGMENT_FORMAT, **meta}))
        fsync_path(tmp / "segment.json")
    fsync_path(tmp)
    os.replace(tmp, root / name)
    return name


def write_state(root: Path, generation: int, arrays: dict[str, np.ndarray]) -> str:
    """Write a generation's state folder (:data:`STATE_ARRAYS`); returns its name."""
    return _write_folder(root, f"gen-{generation}-{new_token()}", arrays, {})


# ---------------------------------------------------------------- segments on disk


class Segment:
    """A segment folder, memory-mapped and checked against :data:`COLUMNS`."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.path = root / name
        meta = json.loads((self.path / "segment.json").read_text())
        n = meta.get("n") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != SEGMENT_FORMAT:
            raise ValueError(f"segment {name} is not of format {SEGMENT_FORMAT}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"segment {name} has no row count")
        self.n = n
        self.cols: dict[str, np.ndarray] = {}
        for key, (kinds, shape) in COLUMNS.items():
            arr = load_array(self.path / f"{key}.npy")
            if arr.dtype.kind not in kinds:
                raise ValueError(f"'{key}' of segment {name} has dtype {arr.dtype}")
            if arr.shape != (n, *shape):
                raise ValueError(f"'{key}' of segment {name} has shape {arr.shape}, not {(n, *shape)}")
            self.cols[key] = arr
        self.structures = load_array(self.path / "structures.npy")
        self.perms = load_array(self.path / "perms.npy")
        if self.structures.dtype != np.uint8 or self.structures.ndim != 1:
            raise ValueError(f"'structures' of segment {name} is not a byte blob")
        if self.perms.dtype.kind != "i" or self.perms.ndim != 2 or self.perms.shape[1] != MAX_ELEMENTS:
            raise ValueError(f"'perms' of segment {name} is not a permutation table")
        self._check()

    def _check(self) -> None:
        """Blob positions inside their blobs, each row's permutations valid for its roles."""
        c = self.cols
        s, e = c["str_start"], c["str_end"]
        if not (s.min() >= 0 and (e > s).all() and e.max() <= len(self.structures)):
            raise ValueError(f"structure positions of segment {self.name} fall outside its blob")
        ps, pe = c["perm_start"], c["perm_end"]
        if not (ps.min() >= 0 and (pe > ps).all() and pe.max() <= len(self.perms)):
            raise ValueError(f"permutation positions of segment {self.name} fall outside its table")
        table = np.asarray(self.perms)
        k = (table >= 0).sum(axis=1)
        ranked = np.sort(np.where(table >= 0, table, MAX_ELEMENTS), axis=1)
        valid = ranked == np.where(np.arange(MAX_ELEMENTS)[None, :] < k[:, None], np.arange(MAX_ELEMENTS), MAX_ELEMENTS)
        valid = valid.all(axis=1) & (k > 0)
        lens = pe - ps
        rows = np.repeat(ps - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(int(lens.sum()))
        owner_roles = np.repeat(role_counts(c["role_el"]), lens)
        if not (valid[rows].all() and (k[rows] == owner_roles).all()):
            raise ValueError(f"role permutations of segment {self.name} are not permutations of the roles")
        if self.n > 1 and not (c["ids"][1:] > c["ids"][:-1]).all():
            raise ValueError(f"ids of segment {self.name} are not in order or repeat")
        counts = check_roles(c["role_el"], c["role_amt"])
        check_index_arrays({**c, "cluster": np.zeros(self.n, dtype=np.int64)}, counts)


def check_index_arrays(arrays: dict[str, np.ndarray], n_roles: list[int] | np.ndarray) -> None:
    """Raise ValueError unless ``arrays`` have the layout of an index over templates with ``n_roles`` roles
    each: text arrays of length n; integer counts, space groups and cluster ids in range; ``stats``
    (n, STATS_WIDTH), ``role_props`` (n, MAX_ROLES, len(ROLE_PROPERTIES)) and ``role_fracs`` (n, MAX_ROLES)
    floats with values exactly on each template's roles (NaN padding after them); ``e_above_hull`` floats
    (NaN: unknown) and the optional ``min_dist`` finite and positive."""
    n = len(n_roles)
    shapes = {
        "nprim": ((n,), "iu"),
        "spacegroup": ((n,), "iu"),
        "cluster": ((n,), "iu"),
        "e_above_hull": ((n,), "f"),
        "stats": ((n, STATS_WIDTH), "f"),
        "role_props": ((n, MAX_ROLES, len(ROLE_PROPERTIES)), "f"),
        "role_fracs": ((n, MAX_ROLES), "f"),
        "min_dist": ((n,), "f"),
    } | {k: ((n,), "U") for k in TEXT_COLUMNS}
    for name, (shape, kinds) in shapes.items():
        if name not in arrays:
            if name == "min_dist":
                continue
            raise ValueError(f"no '{name}' array")
        a = arrays[name]
        if a.dtype.kind not in kinds:
            raise ValueError(f"'{name}' has dtype {a.dtype}, not {'text' if kinds == 'U' else 'numbers'}")
        if a.shape != shape:
            raise ValueError(f"'{name}' has shape {a.shape}, not {shape}")
    ids = arrays["ids"]
    if n > 1 and not (ids[1:] > ids[:-1]).all() and len(set(ids.tolist())) != n:
        raise ValueError("'ids' repeats an id")
    if n == 0:
        return
    if arrays["nprim"].min() < 1 or arrays["spacegroup"].min() < 0 or arrays["spacegroup"].max() > 230:
        raise ValueError("'nprim' or 'spacegroup' out of range")
    if arrays["cluster"].min() < 0 or arrays["cluster"].max() >= n:
        raise ValueError("'cluster' out of range")
    if np.isinf(arrays["e_above_hull"]).any():
        raise ValueError("'e_above_hull' is infinite")
    if np.isinf(arrays["stats"]).any():
        raise ValueError("'stats' holds infinite values")  # an element property that is missing is NaN
    if "min_dist" in arrays and not (np.isfinite(arrays["min_dist"]).all() and (arrays["min_dist"] > 0).all()):
        raise ValueError("'min_dist' is not finite and positive")
    on_role = np.arange(MAX_ROLES)[None, :] < np.minimum(np.asarray(n_roles), MAX_ROLES)[:, None]
    fracs, props = arrays["role_fracs"], arrays["role_props"]
    if not (np.isfinite(fracs[on_role]).all() and (fracs[on_role] > 0).all() and np.isnan(fracs[~on_role]).all()):
        raise ValueError("'role_fracs' does not match the templates' roles")
    if np.isinf(props).any() or not np.isnan(props[~on_role]).all():
        raise ValueError("'role_props' does not match the templates' roles")


def check_roles(role_el: np.ndarray, role_amt: np.ndarray) -> np.ndarray:
    """Role counts of ``role_el``/``role_amt`` (elements then empty text; positive finite amounts on the roles,
    NaN after); ValueError otherwise."""
    counts = role_counts(role_el)
    on = np.arange(MAX_ELEMENTS)[None, :] < counts[:, None]
    if not (counts > 0).all() or not ((role_el != "") == on).all():
        raise ValueError("'role_el' does not hold the roles' elements")
    amt = np.asarray(role_amt)
    if not (np.isfinite(amt[on]).all() and (amt[on] > 0).all() and np.isnan(amt[~on]).all()):
        raise ValueError("'role_amt' does not hold positive amounts on the roles")
    return counts


def role_counts(role_el: np.ndarray) -> np.ndarray:
    """Roles per row of a ``role_el`` array (elements first, empty text after)."""
    return (np.asarray(role_el) != "").sum(axis=1)


@dataclass
class Manifest:
    """What ``manifest.json`` says: the index's generation and the files that make it up."""

    signature: str
    position: str
    generation: int
    segments: list[str]
    state: str
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, **self.__dict__}

    @classmethod
    def read(cls, root: Path) -> Manifest | None:
        """The manifest of an index folder; None when there is none. ValueError when it is not one."""
        path = root / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{MANIFEST} does not parse ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{MANIFEST} is not of format {MANIFEST_FORMAT}")
        try:
            m = cls(
                str(raw["signature"]),
                str(raw["position"]),
                int(raw["generation"]),
                [str(s) for s in raw["segments"]],
                str(raw["state"]),
                [str(s) for s in raw.get("skipped", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{MANIFEST} lacks a field ({exc})") from None
        names = [*m.segments, m.state]
        if any("/" in s or s.startswith(".") or not s for s in names):
            raise ValueError(f"{MANIFEST} names a file outside the index folder")
        return m

    def write(self, root: Path) -> None:
        """Replace ``manifest.json`` atomically."""
        tmp = root / f".tmp-{MANIFEST}-{new_token()}"
        with tmp.open("w") as fh:
            json.dump(self.to_json(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / MANIFEST)
        fsync_path(root)


def remove_unreferenced(root: Path, keep: Manifest | None) -> None:
    """Remove segment and state folders no manifest names, and temporary files a killed update left (the
    caller holds the update lock)."""
    wanted = set() if keep is None else {*keep.segments, keep.state}
    for p in root.iterdir():
        if p.name.startswith(".tmp-") or (p.name.startswith(("seg-", "gen-")) and p.name not in wanted):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def update_lock(root: Path) -> Iterator[None]:
    """The exclusive update lock of an index folder (released when the block ends or the process dies)."""
    with exclusive_lock(root / LOCK):
        yield


class Table:
    """Segments laid end to end: a row's physical position is its segment's first row plus its row there."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.bounds = np.concatenate([[0], np.cumsum([s.n for s in segments])]).astype(np.int64)

    @property
    def n_phys(self) -> int:
        return int(self.bounds[-1])

    def segment_of(self, phys: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bounds, phys, side="right") - 1

    def column(self, key: str, phys: np.ndarray | None = None) -> np.ndarray:
        """Column ``key`` at physical rows ``phys`` (default: every row), in that order."""
        kinds, shape = COLUMNS[key]
        if not self.segments:
            return np.zeros((0, *shape), dtype="U1" if kinds == "U" else np.int64 if "i" in kinds else float)
        if phys is None:
            if len(self.segments) == 1:
                return self.segments[0].cols[key]
            return np.concatenate([s.cols[key] for s in self.segments])
        phys = np.asarray(phys, dtype=np.int64)
        if len(self.segments) == 1:
            return self.segments[0].cols[key][phys]
        dtype = np.result_type(*[s.cols[key].dtype for s in self.segments])
        out = np.empty((len(phys), *shape), dtype=dtype)
        seg = self.segment_of(phys)
        for k, s in enumerate(self.segments):
            m = seg == k
            if m.any():
                out[m] = s.cols[key][phys[m] - self.bounds[k]]
        return out

    def _local(self, phys: int) -> tuple[Segment, int]:
        k = int(np.searchsorted(self.bounds, phys, side="right") - 1)
        return self.segments[k], int(phys - self.bounds[k])

    def structure_bytes(self, phys: int) -> bytes:
        s, i = self._local(phys)
        return bytes(s.structures[int(s.cols["str_start"][i]) : int(s.cols["str_end"][i])])

    def structure_ref(self, phys: int) -> StructureRef:
        s, i = self._local(phys)
        return StructureRef(str(s.path / "structures.npy"), int(s.cols["str_start"][i]), int(s.cols["str_end"][i]))

    def perms_of(self, phys: int) -> list[tuple[int, ...]]:
        s, i = self._local(phys)
        rows = s.perms[int(s.cols["perm_start"][i]) : int(s.cols["perm_end"][i])]
        return [tuple(int(x) for x in r if x >= 0) for r in rows]


class Generation(Table):
    """An index generation opened from its manifest: segments, state arrays, live rows in id order."""

    def __init__(self, root: Path, manifest: Manifest):
        """Open (memory-map) and check every file of a manifest; ValueError/OSError when one is missing or
        does not fit."""
        super().__init__([Segment(root, name) for name in manifest.segments])
        self.root, self.manifest = root, manifest
        self.state: dict[str, np.ndarray] = {}
        for key, kind in STATE_ARRAYS.items():
            arr = load_array(root / manifest.state / f"{key}.npy")
            if arr.dtype.kind != kind or arr.ndim != 1:
                raise ValueError(f"state array '{key}' has dtype {arr.dtype} and {arr.ndim} dimensions")
            self.state[key] = arr
        self._check()

    def _check(self) -> None:
        total = self.n_phys
        cluster, order = self.state["cluster"], self.state["order"]
        if len(cluster) != total:
            raise ValueError(f"'cluster' has {len(cluster)} rows, the segments {total}")
        n = len(order)
        if n and (order.min() < 0 or order.max() >= total):
            raise ValueError("'order' points outside the segments")
        live = np.asarray(cluster) >= 0
        listed = np.zeros(total, dtype=bool)
        listed[order] = True
        if int(live.sum()) != n or not (listed == live).all():
            raise ValueError("'order' does not list the live rows once each")
        ids = self.column("ids", order)
        if n > 1 and not (ids[1:] > ids[:-1]).all():
            raise ValueError("'order' does not put the ids in order, or an id appears twice")
        if n and cluster.max() >= n:
            raise ValueError("'cluster' out of range")
        pairs = [self.state[k] for k in ("pair_part", "pair_a", "pair_b", "pair_fit")]
        if len({len(p) for p in pairs}) != 1:
            raise ValueError("the fit cache arrays differ in length")


class StructureRef:
    """Where a structure lies in a segment's blob: small to send to a worker process, which reads and decodes
    it there (:meth:`load`)."""

    __slots__ = ("end", "path", "start")

    def __init__(self, path: str, start: int, end: int):
        self.path, self.start, self.end = path, start, end

    def __getstate__(self) -> tuple[str, int, int]:
        return self.path, self.start, self.end

    def __setstate__(self, state: tuple[str, int, int]) -> None:
        self.path, self.start, self.end = state

    def load(self) -> dict:
        blob = _BLOBS.get(self.path)
        if blob is None:
            if len(_BLOBS) >= 8:
                _BLOBS.pop(next(iter(_BLOBS)))
            blob = _BLOBS[self.path] = load_array(Path(self.path))
        return decode_structure(bytes(blob[self.start : self.end]))


_BLOBS: dict[str, np.ndarray] = {}  # structure blobs this process has mapped (a few, newest last)


# ---------------------------------------------------------------- lazy sequences over live rows


def decode_structure(data: bytes) -> dict:
    """A structure dict from its stored JSON; ValueError when it is not one."""
    import orjson

    d = orjson.loads(data)
    if not (isinstance(d, dict) and isinstance(d.get("sites"), list) and isinstance(d.get("lattice"), dict)):
        raise ValueError("not a structure")
    return d


class _LazySequence(Sequence):
    """A read-only sequence whose items are built on access; slices and ``take`` give new sequences."""

    def __len__(self) -> int:
        return len(self._rows)

    def _item(self, i: int) -> Any:
        raise NotImplementedError

    def take(self, sel: np.ndarray) -> _LazySequence:
        raise NotImplementedError

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(i)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self._item(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {len(self)}>"


class Concatenated(_LazySequence):
    """Two sequences end to end, read through (nothing copied or decoded until asked for)."""

    def __init__(self, first: Sequence, second: Sequence):
        self._a, self._b = first, second
        self._rows = range(len(first) + len(second))

    def _item(self, i: int) -> Any:
        n = len(self._a)
        return self._a[i] if i < n else self._b[i - n]

    def take(self, sel: np.ndarray) -> Sequence:
        sel = np.asarray(sel, dtype=np.int64)
        if len(sel) > 1 and not (sel[1:] > sel[:-1]).all():
            return [self._item(int(i)) for i in sel]
        n = len(self._a)
        pick = [getattr(part, "take", None) for part in (self._a, self._b)]
        lo, hi = sel[sel < n], sel[sel >= n] - n
        a = pick[0](lo) if pick[0] else [self._a[int(i)] for i in lo]
        b = pick[1](hi) if pick[1] else [self._b[int(i)] for i in hi]
        return Concatenated(a, b)


class LazyStructures(_LazySequence):
    """Structure dicts of index rows, decoded from the segments' blobs when asked for (never cached)."""

    def __init__(
        self, paths: list[Path], seg: np.ndarray, start: np.ndarray, end: np.ndarray, blobs: list | None = None
    ):
        self._paths = paths
        self._blobs = blobs if blobs is not None else [load_array(p) for p in paths]
        self._rows, self._start, self._end = seg, start, end

    def _item(self, i: int) -> dict:
        blob = self._blobs[int(self._rows[i])]
        data = bytes(blob[int(self._start[i]) : int(self._end[i])])
        try:
            return decode_structure(data)
        except ValueError:
            raise StoreError(
                f"template index {self._paths[int(self._rows[i])].parent.parent} is damaged (a structure does not "
                "decode): rebuild it with 'cspml index --rebuild'"
            ) from None

    def take(self, sel: np.ndarray) -> LazyStructures:
        out = LazyStructures.__new__(LazyStructures)
        out._paths, out._blobs = self._paths, self._blobs
        out._rows, out._start, out._end = self._rows[sel], self._start[sel], self._end[sel]
        return out

    def __getstate__(self) -> dict:
        return {"paths": self._paths, "rows": self._rows, "start": self._start, "end": self._end}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state["rows"], state["start"], state["end"])


class LazyRoles(_LazySequence):
    """:class:`Roles` of index rows, built from the element and amount arrays on access."""

    def __init__(self, elements: np.ndarray, amounts: np.ndarray, counts: np.ndarray):
        self._rows, self._el, self._amt = counts, elements, amounts

    def _item(self, i: int) -> Roles:
        k = int(self._rows[i])
        return Roles(tuple(str(e) for e in self._el[i, :k]), tuple(float(a) for a in self._amt[i, :k]))

    def take(self, sel: np.ndarray) -> LazyRoles:
        return LazyRoles(self._el[sel], self._amt[sel], self._rows[sel])


class LazyRoleSyms(_LazySequence):
    """Role permutations of index rows (see ``role_symmetry_perms``), read from the segments' tables."""

    def __init__(self, tables: list[np.ndarray], seg: np.ndarray, start: np.ndarray, end: np.ndarray):
        self._tables, self._rows, self._start, self._end = tables, seg, start, end

    def _item(self, i: int) -> list[tuple[int, ...]]:
        rows = self._tables[int(self._rows[i])][int(self._start[i]) : int(self._end[i])]
        return [tuple(int(x) for x in r if x >= 0) for r in rows]

    def take(self, sel: np.ndarray) -> LazyRoleSyms:
        return LazyRoleSyms(self._tables, self._rows[sel], self._start[sel], self._end[sel])

    def __getstate__(self) -> dict:
        return {
            "tables": [np.asarray(t) for t in self._tables],
            "rows": self._rows,
            "start": self._start,
            "end": self._end,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tables"], state["rows"], state["start"], state["end"])
