"""The template store: any maggma Store holding :class:`TemplateDoc` documents.

``TemplateStore.open(uri)`` picks the backend:

- ``None`` or a folder path: embedded on-disk MontyStore (sqlite) that other processes can read (default
  ``$CSPML_HOME/store``);
- ``mongodb://`` / ``mongodb+srv://`` URI: a MongoDB server (``MongoURIStore``);
- ``*.json``: a maggma JSONStore file;
- ``memory://NAME``: an in-process MemoryStore (tests).
"""

from __future__ import annotations

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


def store_from_uri(uri: str | Path | None, collection: str = COLLECTION, create: bool = True) -> Store:
    """Build (not connect) a maggma Store for a URI or path."""
    if uri is None:
        uri = default_store_path()
    text = str(uri)
    if text.startswith(("mongodb://", "mongodb+srv://")):
        database = text.rsplit("/", 1)[-1].split("?")[0] or "cspml"
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
        return self.store.name

    def connect(self) -> None:
        if not self._connected:
            try:
                self.store.connect()
            except Exception as exc:
                raise StoreError(f"cannot open template store {self.store.name}: {exc}") from None
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

    def count(self) -> int:
        return self.store.count()

    def ids(self) -> set[str]:
        return {str(i) for i in self.store.distinct(KEY)}

    def add(self, docs: Iterable[TemplateDoc | dict[str, Any]]) -> int:
        """Insert new documents in one bulk write and update existing ones; returns how many were written."""
        rows = [d.model_dump(mode="json") if isinstance(d, TemplateDoc) else dict(d) for d in docs]
        if not rows:
            return 0
        keys = [r[KEY] for r in rows]
        existing = {str(d[KEY]) for d in self.store.query({KEY: {"$in": keys}}, properties=[KEY])}
        new = [r for r in rows if r[KEY] not in existing]
        old = [r for r in rows if r[KEY] in existing]
        if new:
            # maggma's update() upserts one document at a time, which is quadratic on embedded stores
            self.store._collection.insert_many(new)
        if old:
            self.store.update(old, key=KEY)
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
        n = self.count()
        if n == 0:
            raise StoreError(f"template store {self.name} is empty: import structures first ('cspml import')")
        return n
