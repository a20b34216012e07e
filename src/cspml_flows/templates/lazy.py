"""Index rows read lazily from memory-mapped arrays: structures decoded, roles and role permutations built
only when asked for.

Every array is read with ``allow_pickle=False`` (an object array raises: nothing is unpickled) and
memory-mapped (``mmap_mode='r'``) by :func:`load_array`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cspml_flows.core.composition import Roles
from cspml_flows.core.errors import StoreError

MAPPED_BLOBS = 8  # structure blobs a process keeps mapped for StructureRef.load


def load_array(path: Path, mmap: bool = True) -> np.ndarray:
    """A ``.npy`` array, memory-mapped, never unpickled (an object array raises ValueError)."""
    arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise ValueError(f"{path.name} is not a plain array")
    return arr


def decode_structure(data: bytes) -> dict:
    """A structure dict from its stored JSON; ValueError when it is not one."""
    d = orjson.loads(data)
    if not (isinstance(d, dict) and isinstance(d.get("sites"), list) and isinstance(d.get("lattice"), dict)):
        raise ValueError("not a structure")
    return d


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
        """The structure dict, decoded from its blob (mapped once per process, the newest few kept)."""
        blob = _BLOBS.get(self.path)
        if blob is None:
            if len(_BLOBS) >= MAPPED_BLOBS:
                _BLOBS.pop(next(iter(_BLOBS)))
            blob = _BLOBS[self.path] = load_array(Path(self.path))
        return decode_structure(bytes(blob[self.start : self.end]))


_BLOBS: dict[str, np.ndarray] = {}  # structure blobs this process has mapped (a few, newest last)


class LazySequence(Sequence):
    """A read-only sequence whose items are built on access; slices and ``take`` give new sequences."""

    _rows: Sequence

    def __len__(self) -> int:
        return len(self._rows)

    def _item(self, i: int) -> Any:
        raise NotImplementedError

    def take(self, sel: np.ndarray) -> Sequence:
        """The items at positions ``sel``, as a new sequence."""
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


class Concatenated(LazySequence):
    """Two sequences end to end, read through (nothing copied or decoded until asked for)."""

    def __init__(self, first: Sequence, second: Sequence):
        self._a, self._b = first, second
        self._rows = range(len(first) + len(second))

    def _item(self, i: int) -> Any:
        n = len(self._a)
        return self._a[i] if i < n else self._b[i - n]

    def take(self, sel: np.ndarray) -> Sequence:
        """The items at positions ``sel``: a Concatenated of both parts' items when ``sel`` increases, else a
        list."""
        sel = np.asarray(sel, dtype=np.int64)
        if len(sel) > 1 and not (sel[1:] > sel[:-1]).all():
            return [self._item(int(i)) for i in sel]
        n = len(self._a)
        pick = [getattr(part, "take", None) for part in (self._a, self._b)]
        lo, hi = sel[sel < n], sel[sel >= n] - n
        a = pick[0](lo) if pick[0] else [self._a[int(i)] for i in lo]
        b = pick[1](hi) if pick[1] else [self._b[int(i)] for i in hi]
        return Concatenated(a, b)


class LazyStructures(LazySequence):
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
        """The structures of rows ``sel``, still undecoded."""
        out = LazyStructures.__new__(LazyStructures)
        out._paths, out._blobs = self._paths, self._blobs
        out._rows, out._start, out._end = self._rows[sel], self._start[sel], self._end[sel]
        return out

    def __getstate__(self) -> dict:
        return {"paths": self._paths, "rows": self._rows, "start": self._start, "end": self._end}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state["rows"], state["start"], state["end"])


class LazyRoles(LazySequence):
    """:class:`Roles` of index rows, built from the element and amount arrays on access."""

    def __init__(self, elements: np.ndarray, amounts: np.ndarray, counts: np.ndarray):
        self._rows, self._el, self._amt = counts, elements, amounts

    def _item(self, i: int) -> Roles:
        k = int(self._rows[i])
        return Roles(tuple(str(e) for e in self._el[i, :k]), tuple(float(a) for a in self._amt[i, :k]))

    def take(self, sel: np.ndarray) -> LazyRoles:
        """The roles of rows ``sel``."""
        return LazyRoles(self._el[sel], self._amt[sel], self._rows[sel])


class LazyRoleSyms(LazySequence):
    """Role permutations of index rows (see ``role_symmetry_perms``), read from the segments' tables."""

    def __init__(self, tables: list[np.ndarray], seg: np.ndarray, start: np.ndarray, end: np.ndarray):
        self._tables, self._rows, self._start, self._end = tables, seg, start, end

    def _item(self, i: int) -> list[tuple[int, ...]]:
        rows = self._tables[int(self._rows[i])][int(self._start[i]) : int(self._end[i])]
        return [tuple(int(x) for x in r if x >= 0) for r in rows]

    def take(self, sel: np.ndarray) -> LazyRoleSyms:
        """The role permutations of rows ``sel``."""
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
