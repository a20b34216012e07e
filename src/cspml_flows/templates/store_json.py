"""A store in one JSON file (``*.json``), written atomically (temporary file, then rename) under a file lock;
a file that does not parse is an error naming it, never an empty store."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import bson.json_util
import mongomock_ng
import orjson
from bson.errors import BSONError
from maggma.stores import JSONStore, MemoryStore
from maggma.utils import to_dt

from cspml_flows.core.errors import StoreError
from cspml_flows.core.safeio import atomic_open

# what reading a user's file can raise: unreadable, not UTF-8, not JSON (orjson, bson.json_util), a date
# that does not parse, an entry that is not a document, nesting deeper than the parser goes
PARSE_ERRORS = (OSError, ValueError, TypeError, KeyError, OverflowError, RecursionError, BSONError)


class AtomicJSONStore(JSONStore):
    """maggma's JSONStore, made safe for user data.

    - A file that does not parse (or holds anything but documents with the key) raises StoreError naming it;
      maggma logs and skips it, and the next write would replace it with the new documents only.
    - Each write holds an exclusive lock on ``<file>.lock``, first reloads the file if another process
      replaced it since it was read, then writes the whole store to a temporary file and renames it over
      the file: a kill or a crash leaves the old or the new file, and concurrent writers do not lose each
      other's documents.
    """

    _stamp: tuple[int, int, int] | None = None
    _digest: str = ""  # sha1 of the file content the documents in memory were read from (or written as)

    @property
    def name(self) -> str:
        """The file's resolved path: unique per store (maggma names every JSONStore ``mem://memory_db``)."""
        return str(Path(self.paths[0]).expanduser().resolve())

    def content_digest(self) -> str:
        """A digest of the documents in memory (the file's bytes they were read from or written as), after
        reloading the file if another process replaced it."""
        if self._file_stamp() != self._stamp:
            self._load()
        return self._digest

    def connect(self, force_reset: bool = False) -> None:
        """Read the file into an in-memory collection (a missing file of a writable store is created empty)."""
        if self._coll is None or force_reset:
            self._coll = mongomock_ng.MongoClient().db[self.collection_name]
            path = Path(self.paths[0])
            if not self.read_only and not path.exists():
                with self.transaction():
                    pass  # writes an empty store file
            else:
                self._load()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.paths[0])
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read_json_file(self, path) -> list:
        """The file's documents, as maggma reads them except that a dict-valued ``last_updated`` is decoded
        only as monty's datetime form, without importing anything a file names."""
        return self._parse(Path(path).read_text(encoding=self.encoding or "utf-8"))

    def _parse(self, data: str) -> list:
        """:meth:`read_json_file` of the file's text."""
        objects = bson.json_util.loads(data) if "$oid" in data else orjson.loads(data)
        objects = objects if isinstance(objects, list) else [objects]
        for obj in objects:
            stamp = obj.get(self.last_updated_field) if isinstance(obj, dict) else None
            if isinstance(stamp, dict):
                if stamp.get("@module") != "datetime" or not isinstance(stamp.get("string"), str):
                    raise ValueError(f"'{self.last_updated_field}' is neither a date nor a monty datetime")
                stamp = stamp["string"]
            if stamp:
                obj[self.last_updated_field] = to_dt(stamp)
        return objects

    def _load(self) -> None:
        """Replace the in-memory documents with the file's; StoreError when the file is unreadable."""
        path = Path(self.paths[0])
        stamp = self._file_stamp()
        try:
            raw = path.read_bytes() if stamp is not None else b""
            objects = self._parse(raw.decode(self.encoding or "utf-8")) if stamp is not None else []
            rows: dict[str, dict] = {}
            for obj in objects:
                if not isinstance(obj, dict) or obj.get(self.key) is None:
                    raise ValueError(f"an entry without '{self.key}'")
                obj.pop("_id", None)
                rows[str(obj[self.key])] = {**obj, "_id": str(obj[self.key])}
        except PARSE_ERRORS as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(
                f"template store file {path} cannot be read ({reason}); it was left as it is: restore or move it"
            ) from None
        self._coll.delete_many({})
        if rows:
            self._coll.insert_many(list(rows.values()))
        self._stamp = stamp
        self._digest = hashlib.sha1(raw).hexdigest()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the file lock, reload the file if another process changed it, run the block, write the file
        atomically."""
        if self.read_only:
            yield
            return
        lock_path = Path(f"{self.paths[0]}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._file_stamp() != self._stamp:
                    self._load()
                yield
                self.update_json_file()
            except BaseException:
                self._stamp = None  # the file was not written: the next access reloads it; the error goes on
                raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, docs: list[dict] | dict, key: list | str | None = None) -> None:
        """Insert or replace documents, then write the file (:meth:`transaction`)."""
        with self.transaction():
            MemoryStore.update(self, docs, key=key)

    def remove_docs(self, criteria: dict) -> None:
        """Remove the documents matching ``criteria``, then write the file (:meth:`transaction`)."""
        with self.transaction():
            MemoryStore.remove_docs(self, criteria)

    def update_json_file(self) -> None:
        """Write every document to the file atomically (temporary file, then rename)."""
        data = [{k: v for k, v in d.items() if k != "_id"} for d in self.query()]
        text = orjson.dumps(data, option=self.serialization_option, default=self.serialization_default).decode()
        raw = text.encode(self.encoding or "utf-8")
        with atomic_open(self.paths[0], "wb") as fh:
            fh.write(raw)
        self._stamp = self._file_stamp()
        self._digest = hashlib.sha1(raw).hexdigest()
