"""The generations of a template index folder: the manifest that names them, their state, the update lock.

- ``gen-<g>-<token>/``: the state of generation ``g``: ``cluster.npy`` (the cluster label of every row of the
  segments laid end to end; -1 marks a removed row, a tombstone), ``order.npy`` (the live rows in
  material-id order) and the prototype-fit cache (``pair_part``, ``pair_a``, ``pair_b``, ``pair_fit``);
- ``manifest.json``: format, signature, the store position the index reflects, generation, segments, state
  folder, ids of documents left out. Written last and atomically (temporary file, fsync, ``os.replace``),
  after every file it names is whole: a reader sees the previous index or the new one, and a kill
  mid-update leaves the previous one. Files no manifest names are removed by the next update.
- ``update.lock``: held (``flock``) by the one process updating the index.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cspml_flows.core.safeio import exclusive_lock, fsync_path
from cspml_flows.templates.lazy import load_array
from cspml_flows.templates.segments import Segment, Table, new_token

MANIFEST_FORMAT = "cspml-index/1"
MANIFEST = "manifest.json"
LOCK = "update.lock"
STATE_ARRAYS: dict[str, str] = {
    "cluster": "i",
    "order": "i",
    "pair_part": "u",
    "pair_a": "u",
    "pair_b": "u",
    "pair_fit": "b",
}
PAIR_ARRAYS = ("pair_part", "pair_a", "pair_b", "pair_fit")  # the fit cache: partition, pair, result


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
        """The manifest as written to ``manifest.json``."""
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
        if len({len(self.state[k]) for k in PAIR_ARRAYS}) != 1:
            raise ValueError("the fit cache arrays differ in length")

    def pairs(self) -> tuple[np.ndarray, ...]:
        """The fit cache of this generation (partition, first and second representative, result), in memory."""
        return tuple(np.array(self.state[k]) for k in PAIR_ARRAYS)
