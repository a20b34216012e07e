"""The template store: any maggma Store holding :class:`TemplateDoc` documents.

``TemplateStore.open(uri)`` picks the backend:

- ``None`` or a folder path: embedded on-disk MontyStore (sqlite) that other processes can read (default
  ``$CSPML_HOME/store``);
- ``mongodb://`` / ``mongodb+srv://`` URI: a MongoDB server (``MongoURIStore``);
- ``*.json``: a maggma JSONStore file, written atomically (temporary file, then rename) under a file lock;
  a file that does not parse is an error naming it, never an empty store;
- ``memory://NAME``: an in-process MemoryStore (tests).

Every write is an upsert on the document key (:func:`upsert`): a document's ``_id`` is its key, so two
processes writing the same key at once leave one document, not two.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from maggma.core import Store
from maggma.stores import JSONStore, MemoryStore, MongoURIStore, MontyStore

from cspml_flows.config import default_store_path
from cspml_flows.errors import CSPMLError, StoreError
from cspml_flows.safeio import atomic_open
from cspml_flows.templates.schema import TemplateDoc

COLLECTION = "templates"
KEY = "material_id"
DEFAULT_DATABASE = "cspml"
MONTY_CONFIG = "monty.storage.cfg"  # what montydb writes into every embedded store folder


def mongo_database_name(uri: str) -> str:
    """The database named in a MongoDB URI's path (``mongodb://host:27017/NAME?opts``), else ``cspml``.

    Parsed by hand: pymongo's parser resolves ``mongodb+srv://`` hosts through DNS.
    """
    rest = uri.split("://", 1)[-1].split("?", 1)[0]
    database = rest.split("/", 1)[1] if "/" in rest else ""
    return database.strip("/") or DEFAULT_DATABASE


def redact_uri(uri: str) -> str:
    """A URI with the password of its user information replaced by ``***``."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@]+):[^@/]*@", r"\1:***@", uri, flags=re.IGNORECASE)


_MEMORY: dict[str, MemoryStore] = {}  # memory://NAME stores of this process, one per (name, collection)


def make_store(uri: str | Path, collection: str, key: str = "key", create: bool = True, what: str = "store") -> Store:
    """The one URI -> maggma Store factory (not connected), for templates, results, state and job stores.

    ``mongodb://`` / ``mongodb+srv://``: a MongoDB collection; ``memory://NAME``: a mongomock-backed
    MemoryStore shared by every opener in this process (tests); ``*.json``: a JSON file; anything else: a
    folder holding the embedded on-disk store. ``create=False`` refuses a missing file or folder, naming
    ``what``."""
    text = str(uri)
    if text.startswith(("mongodb://", "mongodb+srv://")):
        return MongoURIStore(uri=text, collection_name=collection, database=mongo_database_name(text), key=key)
    if text.startswith("memory://"):
        name = f"{text[len('memory://') :] or 'default'}:{collection}"
        if name not in _MEMORY:
            _MEMORY[name] = MemoryStore(collection_name=name, key=key)
        return _MEMORY[name]
    path = Path(text).expanduser()
    if path.suffix == ".json":
        if not path.exists() and not create:
            raise StoreError(f"{what} file not found: {path}")
        return AtomicJSONStore(str(path), read_only=False, key=key)
    return embedded_store(path, collection, key, create, what)


def store_from_uri(uri: str | Path | None, collection: str = COLLECTION, create: bool = True) -> Store:
    """The template store (not connected) of a URI or path; None: the embedded default store."""
    return make_store(default_store_path() if uri is None else uri, collection, KEY, create, "template store")


def embedded_store(path: Path, collection: str, key: str, create: bool, what: str) -> MontyStore:
    """The embedded on-disk store (montydb on sqlite) of a folder; ``create=False`` refuses a missing folder
    or one that is not a store, without writing anything into it."""
    if not path.exists():
        if not create:
            raise StoreError(f"{what} not found: {path} (import structures with 'cspml import')")
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise StoreError(f"{what} {path} is a file, not a store folder")
    elif not create and not (path / MONTY_CONFIG).is_file():
        raise StoreError(f"{path} is not a {what} (no {MONTY_CONFIG} in it)")
    return EmbeddedStore(collection, database_path=str(path), storage="sqlite", key=key)


class EmbeddedStore(MontyStore):
    """maggma's MontyStore (sqlite) that writes montydb's storage configuration only when it creates the
    store: opening an existing store to read it (``cspml predict``) leaves its folder as it was."""

    def connect(self, force_reset: bool = False) -> None:
        if not self._coll or force_reset:
            from montydb import MontyClient, set_storage

            if not (Path(self.database_path) / MONTY_CONFIG).is_file():
                set_storage(self.database_path, storage=self.storage, **self.storage_kwargs)
            client = MontyClient(self.database_path, **self.client_kwargs)
            self._coll = client[self.database_name][self.collection_name]


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

    def connect(self, force_reset: bool = False) -> None:
        if self._coll is None or force_reset:
            import mongomock_ng

            self._coll = mongomock_ng.MongoClient().db[self.name]
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
        import bson.json_util
        import orjson
        from maggma.utils import to_dt

        data = Path(path).read_text(encoding=self.encoding or "utf-8")
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
            objects = self.read_json_file(path) if stamp is not None else []
            rows: dict[str, dict] = {}
            for obj in objects:
                if not isinstance(obj, dict) or obj.get(self.key) is None:
                    raise ValueError(f"an entry without '{self.key}'")
                obj.pop("_id", None)
                rows[str(obj[self.key])] = {**obj, "_id": str(obj[self.key])}
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(
                f"template store file {path} cannot be read ({reason}); it was left as it is: restore or move it"
            ) from None
        self._coll.delete_many({})
        if rows:
            self._coll.insert_many(list(rows.values()))
        self._stamp = stamp

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the file lock, reload the file if another process changed it, run the block, write the file
        atomically."""
        if self.read_only:
            yield
            return
        import fcntl

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
                self._stamp = None  # the file was not written: the next access reloads it
                raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, docs: list[dict] | dict, key: list | str | None = None) -> None:
        with self.transaction():
            MemoryStore.update(self, docs, key=key)

    def remove_docs(self, criteria: dict) -> None:
        with self.transaction():
            MemoryStore.remove_docs(self, criteria)

    def update_json_file(self) -> None:
        """Write every document to the file atomically (temporary file, then rename)."""
        import orjson

        data = [{k: v for k, v in d.items() if k != "_id"} for d in self.query()]
        text = orjson.dumps(data, option=self.serialization_option, default=self.serialization_default).decode()
        with atomic_open(self.paths[0], "w", encoding=self.encoding or "utf-8") as fh:
            fh.write(text)
        self._stamp = self._file_stamp()


def _duplicate_key_errors() -> tuple[type[BaseException], ...]:
    """Exceptions the backends raise when an insert meets an existing ``_id``."""
    found: list[type[BaseException]] = [sqlite3.IntegrityError]
    for module in ("pymongo.errors", "mongomock", "mongomock_ng", "montydb.errors"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in ("DuplicateKeyError", "BulkWriteError") if hasattr(mod, n)]
    return tuple(found)


def _backend_errors() -> tuple[type[BaseException], ...]:
    """The base exception classes of the database clients (pymongo, montydb, bson)."""
    found: list[type[BaseException]] = []
    for module, name in (("pymongo.errors", "PyMongoError"), ("montydb.errors", "MontyError"), ("bson", "InvalidBSON")):
        with contextlib.suppress(ImportError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


def upsert(store: Store, docs: Iterable[dict[str, Any]], key: str, assume_new: bool = False) -> int:
    """Insert or replace documents by ``key`` (its value, as text, is also the document's ``_id``).

    New documents go in one bulk insert; if another writer stored some of the same keys meanwhile, the
    backend refuses the duplicate ``_id`` and the write is retried as replacements, so concurrent or
    repeated writes leave exactly one document per key. Copies of a key left by older versions are removed.
    ``assume_new`` skips the first lookup of existing keys. Returns how many distinct keys were written.
    """
    rows: dict[str, dict[str, Any]] = {}
    for d in docs:
        row = {k: v for k, v in dict(d).items() if k != "_id"}  # an id from another store must not clash
        if row.get(key) is None:
            raise StoreError(f"document without '{key}' (fields: {', '.join(map(str, row))})")
        row[key] = str(row[key])
        rows[row[key]] = row  # a key given twice: the last document wins
    if not rows:
        return 0
    coll = store._collection
    duplicate = _duplicate_key_errors()
    for attempt in range(5):
        found: dict[str, list[Any]] = {}
        if attempt or not assume_new:
            for d in coll.find({key: {"$in": list(rows)}}, {key: 1}):
                found.setdefault(str(d[key]), []).append(d["_id"])
        new = [{**r, "_id": k} for k, r in rows.items() if k not in found]
        try:
            if new:
                coll.insert_many(new, ordered=False)
        except duplicate:
            continue  # another writer added some of these keys: look again and replace them
        for k, ids in found.items():
            keep = k if k in ids else ids[0]
            coll.replace_one({"_id": keep}, rows[k])
            extra = [i for i in ids if i != keep]
            if extra:
                coll.delete_many({"_id": {"$in": extra}})
        return len(rows)
    raise StoreError(f"store {redact_uri(str(store.name))}: writes of the same keys keep colliding; try again")


class TemplateStore:
    """Read and write template documents in a maggma Store."""

    def __init__(self, store: Store):
        self.store = store
        self._connected = False

    @classmethod
    def open(cls, uri: str | Path | None = None, create: bool = True) -> TemplateStore:
        ts = cls(store_from_uri(uri, create=create))
        ts.connect()
        return ts

    @property
    def name(self) -> str:
        """The store's name for messages (a MongoDB URI without its password)."""
        return redact_uri(str(self.store.name))

    def connect(self) -> None:
        if not self._connected:
            try:
                self.store.connect()
            except Exception as exc:
                raise StoreError(f"cannot open template store {self.name}: {exc}") from None
            self._connected = True

    def close(self) -> None:
        if self._connected:
            if not isinstance(self.store, MemoryStore):  # memory:// stores live for the process
                self.store.close()
            self._connected = False

    def __enter__(self) -> TemplateStore:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sqlite_file(self) -> Path | None:
        """The sqlite file of an embedded MontyStore collection, if that is the backend."""
        st = self.store
        if isinstance(st, MontyStore) and st.storage == "sqlite":
            f = Path(st.database_path) / st.database_name / f"{st.collection_name}.collection"
            return f if f.is_file() else None
        return None

    @contextlib.contextmanager
    def _reading(self, action: str = "read") -> Iterator[None]:
        """Backend failures (a damaged sqlite file, an unreachable server, a full disk) as one StoreError
        naming the store."""
        try:
            yield
        except CSPMLError:
            raise
        except (sqlite3.Error, OSError, ValueError, *_backend_errors()) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = " (damaged or not a store?)" if action == "read" else ""
            raise StoreError(f"cannot {action} template store {self.name}: {reason}{hint}") from None

    def count(self) -> int:
        """Number of documents (montydb decodes every document to count; sqlite is asked directly)."""
        f = self._sqlite_file()
        if f is not None:
            try:
                # read-write without create: closing it removes the -wal/-shm files a read-only one leaves
                with contextlib.closing(sqlite3.connect(f"file:{f}?mode=rw", uri=True)) as con:
                    return int(con.execute("SELECT COUNT(*) FROM documents").fetchone()[0])
            except sqlite3.Error as exc:
                if "no such table" in str(exc):
                    return 0  # another process is creating the collection right now
                # another montydb layout: ask the store
        with self._reading():
            return self.store.count()

    def _being_created(self) -> bool:
        """Whether the embedded collection's file exists without its table yet (another process creating it
        this instant): montydb would fail to read it; it is empty."""
        f = self._sqlite_file()
        if f is None:
            return False
        try:
            with contextlib.closing(sqlite3.connect(f"file:{f}?mode=rw", uri=True)) as con:
                sql = "SELECT name FROM sqlite_master WHERE type='table' AND name='documents'"
                return con.execute(sql).fetchone() is None
        except sqlite3.Error:
            return False

    def ids(self) -> set[str]:
        if self._being_created():
            return set()
        with self._reading():
            return {str(i) for i in self.store.distinct(KEY)}

    def add(self, docs: Iterable[TemplateDoc | dict[str, Any]], assume_new: bool = False) -> int:
        """Insert new documents and replace existing ones (:func:`upsert` on ``material_id``); returns how
        many were written. ``assume_new`` skips the first lookup of existing keys (an importer that already
        filtered them out); a key written meanwhile by another process is still stored once."""
        rows = [d.model_dump(mode="json") if isinstance(d, TemplateDoc) else dict(d) for d in docs]
        for row in rows:
            if row.get(KEY) is None:
                raise StoreError(f"template document without '{KEY}' (fields: {', '.join(map(str, row))})")
        if not rows:
            return 0
        st = self.store
        with (
            self._reading("write to"),
            st.transaction() if isinstance(st, AtomicJSONStore) else contextlib.nullcontext(),
        ):
            for attempt in range(5):
                try:
                    return upsert(st, rows, KEY, assume_new=assume_new)
                except (sqlite3.OperationalError, FileExistsError) as exc:  # another process creates the collection
                    if attempt == 4 or (not isinstance(exc, FileExistsError) and "no such table" not in str(exc)):
                        raise
                    time.sleep(0.05 * (attempt + 1))
            return 0

    def docs(self, criteria: dict | None = None, properties: list[str] | None = None) -> Iterator[dict]:
        if self._being_created():
            return
        with self._reading():
            for d in self.store.query(criteria or {}, properties=properties):
                d.pop("_id", None)
                yield d

    def get(self, material_id: str) -> TemplateDoc | None:
        if self._being_created():
            return None
        with self._reading():
            d = self.store.query_one({KEY: material_id})
        if d is None:
            return None
        d.pop("_id", None)
        return TemplateDoc(**d)

    def require_nonempty(self) -> int:
        """The document count; StoreError when the store is empty."""
        n = self.count()
        if n == 0:
            raise StoreError(f"template store {self.name} is empty: import structures first ('cspml import')")
        return n

    def fingerprint(self) -> str:
        """A cheap token that changes whenever the store's content changes: the sqlite file's size and
        modification time for the embedded store, else the count and the newest ``last_updated``."""
        f = self._sqlite_file()
        if f is not None:
            st = f.stat()
            return f"{self.count()}|{st.st_size}|{st.st_mtime_ns}"
        with self._reading():
            newest = self.store.query_one(properties=["last_updated"], sort={"last_updated": -1}) or {}
        return f"{self.count()}|{newest.get('last_updated')}"
