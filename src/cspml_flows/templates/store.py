"""The template store: any maggma Store holding :class:`TemplateDoc` documents.

``TemplateStore.open(uri)`` picks the backend:

- ``None`` or a folder path: embedded on-disk MontyStore (sqlite) that other processes can read (default
  ``$CSPML_HOME/store``);
- ``mongodb://`` / ``mongodb+srv://`` URI: a MongoDB server (``MongoURIStore``);
- ``*.json``: a maggma JSONStore file;
- ``memory://NAME``: an in-process MemoryStore (tests).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from maggma.core import Store
from maggma.stores import JSONStore, MemoryStore, MongoURIStore, MontyStore

from cspml_flows.config import default_store_path
from cspml_flows.errors import StoreError
from cspml_flows.templates.schema import TemplateDoc

COLLECTION = "templates"
KEY = "material_id"
DEFAULT_DATABASE = "cspml"


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


def store_from_uri(uri: str | Path | None, collection: str = COLLECTION, create: bool = True) -> Store:
    """Build (not connect) a maggma Store for a URI or path."""
    if uri is None:
        uri = default_store_path()
    text = str(uri)
    if text.startswith(("mongodb://", "mongodb+srv://")):
        database = mongo_database_name(text)
        return MongoURIStore(uri=text, collection_name=collection, database=database, key=KEY)
    if text.startswith("memory://"):
        return MemoryStore(collection_name=text[len("memory://") :] or collection, key=KEY)
    path = Path(text).expanduser()
    if path.suffix == ".json":
        if not path.exists() and not create:
            raise StoreError(f"template store file not found: {path}")
        return JSONStore(str(path), read_only=False, key=KEY)
    if not path.exists():
        if not create:
            raise StoreError(f"template store not found: {path} (import structures with 'cspml import')")
        path.mkdir(parents=True, exist_ok=True)
    return MontyStore(collection, database_path=str(path), storage="sqlite", key=KEY)


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

    def count(self) -> int:
        """Number of documents (montydb decodes every document to count; sqlite is asked directly)."""
        f = self._sqlite_file()
        if f is not None:
            try:
                with contextlib.closing(sqlite3.connect(f"file:{f}?mode=ro", uri=True)) as con:
                    return int(con.execute("SELECT COUNT(*) FROM documents").fetchone()[0])
            except sqlite3.Error:
                pass  # another montydb layout: ask the store
        return self.store.count()

    def ids(self) -> set[str]:
        return {str(i) for i in self.store.distinct(KEY)}

    def add(self, docs: Iterable[TemplateDoc | dict[str, Any]], assume_new: bool = False) -> int:
        """Insert new documents in one bulk write and update existing ones; returns how many were written.

        ``assume_new`` skips the lookup of existing keys when the caller already filtered them out.
        """
        by_key: dict[str, dict[str, Any]] = {}
        for d in docs:
            row = d.model_dump(mode="json") if isinstance(d, TemplateDoc) else dict(d)
            row.pop("_id", None)  # an id from another store must not clash with ours
            if row.get(KEY) is None:
                raise StoreError(f"template document without '{KEY}' (fields: {', '.join(map(str, row))})")
            row[KEY] = str(row[KEY])
            by_key[row[KEY]] = row  # a key given twice in one call: the last document wins
        rows = list(by_key.values())
        if not rows:
            return 0
        keys = list(by_key)
        existing = (
            set() if assume_new else {str(d[KEY]) for d in self.store.query({KEY: {"$in": keys}}, properties=[KEY])}
        )
        new = [r for r in rows if r[KEY] not in existing]
        old = [r for r in rows if r[KEY] in existing]
        if new:
            # maggma's update() upserts one document at a time, which is quadratic on embedded stores
            self.store._collection.insert_many(new)
        if old:
            self.store.update(old, key=KEY)  # a writable JSONStore rewrites its file here
        elif new and isinstance(self.store, JSONStore) and not self.store.read_only:
            self.store.update_json_file()  # the direct insert bypassed JSONStore's own file write
        return len(rows)

    def docs(self, criteria: dict | None = None, properties: list[str] | None = None) -> Iterator[dict]:
        for d in self.store.query(criteria or {}, properties=properties):
            d.pop("_id", None)
            yield d

    def get(self, material_id: str) -> TemplateDoc | None:
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
        newest = self.store.query_one(properties=["last_updated"], sort={"last_updated": -1}) or {}
        return f"{self.count()}|{newest.get('last_updated')}"
