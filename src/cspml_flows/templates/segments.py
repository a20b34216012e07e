"""The template index on disk: immutable columnar segments.

One folder per store (``$CSPML_HOME/index/<digest of the store identity>/``) holds:

- ``seg-<token>/``: a segment, never changed once written: one ``.npy`` file per column (:data:`COLUMNS`;
  rows in material-id order), the structures as one byte blob of JSON documents (``structures.npy``, each
  row's ``str_start``/``str_end`` in it) and the role symmetries as a table of role permutations
  (``perms.npy``, each row's ``perm_start``/``perm_end`` in it), and ``segment.json`` (format, row count);
- ``gen-<g>-<token>/``: the state of generation ``g`` and ``manifest.json`` (:mod:`cspml_flows.templates.manifest`);
- ``update.lock``: held (``flock``) by the one process updating the index.

Every array is read through :func:`~cspml_flows.templates.lazy.load_array` (memory-mapped, never unpickled),
then checked against the layout of :data:`COLUMNS` (:mod:`cspml_flows.templates.index_checks`); a structure
is decoded only when a prediction asks for it (:class:`~cspml_flows.templates.lazy.LazyStructures`).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from cspml_flows.core.composition import MAX_ELEMENTS
from cspml_flows.core.descriptors import MAX_ROLES, ROLE_PROPERTIES
from cspml_flows.core.safeio import fsync_path
from cspml_flows.templates.index_checks import (
    STATS_WIDTH,
    check_index_arrays,
    check_permutations,
    check_roles,
    role_counts,
)
from cspml_flows.templates.lazy import StructureRef, load_array

SEGMENT_FORMAT = "cspml-index-segment/1"

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
POSITIONS = ("str_start", "str_end", "perm_start", "perm_end")  # columns that point into a segment's blobs


def new_token() -> str:
    """A random token for a new file or folder name."""
    return secrets.token_hex(6)


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
        """The rows at positions ``sel``."""
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
    """Write a generation's state folder (:data:`~cspml_flows.templates.manifest.STATE_ARRAYS`); returns its
    name."""
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
        if not check_permutations(self.perms, ps, pe, role_counts(c["role_el"])):
            raise ValueError(f"role permutations of segment {self.name} are not permutations of the roles")
        if self.n > 1 and not (c["ids"][1:] > c["ids"][:-1]).all():
            raise ValueError(f"ids of segment {self.name} are not in order or repeat")
        counts = check_roles(c["role_el"], c["role_amt"])
        check_index_arrays({**c, "cluster": np.zeros(self.n, dtype=np.int64)}, counts)


class Table:
    """Segments laid end to end: a row's physical position is its segment's first row plus its row there."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.bounds = np.concatenate([[0], np.cumsum([s.n for s in segments])]).astype(np.int64)

    @property
    def n_phys(self) -> int:
        """Rows of all segments, dead ones included."""
        return int(self.bounds[-1])

    def segment_of(self, phys: np.ndarray) -> np.ndarray:
        """The segment of each physical row."""
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
        """The stored JSON of a row's structure."""
        s, i = self._local(phys)
        return bytes(s.structures[int(s.cols["str_start"][i]) : int(s.cols["str_end"][i])])

    def structure_ref(self, phys: int) -> StructureRef:
        """Where a row's structure lies (to be read by a worker process)."""
        s, i = self._local(phys)
        return StructureRef(str(s.path / "structures.npy"), int(s.cols["str_start"][i]), int(s.cols["str_end"][i]))

    def perms_of(self, phys: int) -> list[tuple[int, ...]]:
        """A row's role permutations."""
        s, i = self._local(phys)
        rows = s.perms[int(s.cols["perm_start"][i]) : int(s.cols["perm_end"][i])]
        return [tuple(int(x) for x in r if x >= 0) for r in rows]


# ---------------------------------------------------------------- merging segments


def merge_segments(root: Path, segs: list[Segment], masks: list[np.ndarray]) -> Segment:
    """One new segment under ``root`` with the rows of ``segs`` where ``masks`` are True, in id order, written
    column by column into memory-mapped files (memory stays small whatever the segments' size)."""
    src = [(s, np.flatnonzero(m)) for s, m in zip(segs, masks, strict=True)]
    ids = np.concatenate([s.cols["ids"][r] for s, r in src])
    which = np.concatenate([np.full(len(r), k, dtype=np.int64) for k, (_, r) in enumerate(src)])
    local = np.concatenate([r for _, r in src])
    srt = np.argsort(ids, kind="stable")
    which, local = which[srt], local[srt]
    name = f"seg-{new_token()}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    for key in COLUMNS:
        if key not in POSITIONS:
            arr = _gather(segs, which, local, key)
            mm = open_memmap(tmp / f"{key}.npy", mode="w+", dtype=arr.dtype, shape=arr.shape)
            mm[...] = arr
            mm.flush()
            del mm, arr
    pos = {}
    for blob, (first, last), dtype, width in (
        ("structures", ("str_start", "str_end"), np.uint8, ()),
        ("perms", ("perm_start", "perm_end"), np.int8, (MAX_ELEMENTS,)),
    ):
        starts, ends = _gather(segs, which, local, first), _gather(segs, which, local, last)
        parts = [getattr(s, blob) for s in segs]
        pos[first], pos[last] = _write_ranges(tmp / f"{blob}.npy", parts, which, starts, ends, dtype, width)
    for key, arr in pos.items():
        np.save(tmp / f"{key}.npy", arr.astype(np.int64), allow_pickle=False)
    (tmp / "segment.json").write_text(json.dumps({"format": SEGMENT_FORMAT, "n": len(srt)}))
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    os.replace(tmp, root / name)
    return Segment(root, name)


def _gather(segs: list[Segment], which: np.ndarray, local: np.ndarray, key: str) -> np.ndarray:
    """Column ``key`` of the rows ``local[i]`` of segments ``which[i]``, in that order."""
    shape = COLUMNS[key][1]
    dtype = np.result_type(*[s.cols[key].dtype for s in segs])
    out = np.empty((len(which), *shape), dtype=dtype)
    for k, s in enumerate(segs):
        m = which == k
        out[m] = s.cols[key][local[m]]
    return out


def _write_ranges(
    path: Path,
    parts: list[np.ndarray],
    which: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    dtype: type,
    width: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``starts[i]:ends[i]`` of ``parts[which[i]]`` laid end to end in a new memory-mapped ``.npy`` file;
    returns where each range starts and ends there."""
    lengths = ends - starts
    new_end = np.cumsum(lengths)
    out = open_memmap(path, mode="w+", dtype=dtype, shape=(int(new_end[-1]), *width))
    pos = 0
    for i in range(len(lengths)):
        out[pos : pos + int(lengths[i])] = parts[int(which[i])][int(starts[i]) : int(ends[i])]
        pos += int(lengths[i])
    out.flush()
    del out
    return new_end - lengths, new_end
