"""Files written atomically and read without running code.

Writes go to a temporary file in the target's folder, are flushed to disk, then renamed over the target
(``os.replace``): a kill or a crash leaves either the old file or the new one, never a half-written file.
Reads use formats that cannot execute code: JSON (optionally gzipped) and numpy ``.npz`` with
``allow_pickle=False``; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

NPZ_META = "__meta__"  # the JSON metadata member of an .npz written by save_npz


def current_umask() -> int:
    """The process's file mode creation mask (read from ``/proc``; else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(target: Path) -> int:
    """The permission bits a rewrite of ``target`` gets: the file's own, or for a new file the mode ``open``
    would give it (``0o666`` less the umask)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` when the block ends without error (removed
    otherwise). Readers never see a partly written file. The file keeps its permission bits (a new file gets
    ``0o666`` less the umask, as ``open`` would give it)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with tmp_path.open("rb+") as fh:  # the data is on disk before the rename makes it visible
            os.fchmod(fh.fileno(), _target_mode(target))
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``open`` for writing (``w``/``wb``) that replaces ``path`` atomically when the block ends."""
    with atomic_path(path) as tmp, tmp.open(mode, encoding=None if "b" in mode else encoding) as fh:
        yield fh


def fsync_path(path: str | Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on the file ``path`` (created if missing), released when the block ends or
    the process dies."""
    import fcntl

    with Path(path).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def json_default(obj: Any) -> Any:
    """``json.dump`` fallback for numpy scalars and arrays."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json_gz(path: str | Path, obj: Any) -> Path:
    """Write gzipped JSON atomically."""
    with atomic_path(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as fh:
        json.dump(obj, fh, default=json_default)
    return Path(path)


def read_json_gz(path: str | Path) -> Any:
    """Parsed gzipped JSON; ``ValueError``/``OSError`` when the file is not gzipped JSON."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def save_npz(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write arrays (no object arrays) and JSON metadata to an uncompressed ``.npz``, atomically."""
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **{NPZ_META: blob}, **arrays)
    return Path(path)


def load_npz(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata of a :func:`save_npz` file, read with ``allow_pickle=False`` (an object array,
    which would need unpickling, raises ``ValueError`` instead)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays.pop(NPZ_META).tobytes().decode()) if NPZ_META in arrays else {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return arrays, meta
