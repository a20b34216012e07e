"""The one URI -> maggma Store factory, for templates, results, state and job stores, and store identities.

- ``None`` (template stores) or a folder path: the embedded on-disk store
  (:mod:`cspml_flows.templates.store_embedded`; default ``$CSPML_HOME/store``);
- ``mongodb://`` / ``mongodb+srv://`` URI: a MongoDB server (:mod:`cspml_flows.templates.store_mongo`);
- ``*.json``: a JSON file (:mod:`cspml_flows.templates.store_json`);
- ``memory://NAME``: an in-process MemoryStore (tests).
"""

from __future__ import annotations

from pathlib import Path

from maggma.core import Store
from maggma.stores import MemoryStore

from cspml_flows.core.config import default_store_path
from cspml_flows.core.errors import StoreError
from cspml_flows.templates.schema import KEY
from cspml_flows.templates.store_embedded import embedded_store
from cspml_flows.templates.store_json import AtomicJSONStore
from cspml_flows.templates.store_mongo import is_mongo_server, mongo_store, redact_uri

COLLECTION = "templates"

_MEMORY: dict[str, MemoryStore] = {}  # memory://NAME stores of this process, one per (name, collection)


def make_store(uri: str | Path, collection: str, key: str = "key", create: bool = True, what: str = "store") -> Store:
    """The one URI -> maggma Store factory (not connected), for templates, results, state and job stores.

    ``mongodb://`` / ``mongodb+srv://``: a MongoDB collection; ``memory://NAME``: a mongomock-backed
    MemoryStore shared by every opener in this process (tests); ``*.json``: a JSON file; anything else: a
    folder holding the embedded on-disk store. ``create=False`` refuses a missing file or folder, naming
    ``what``."""
    text = str(uri)
    if text.startswith(("mongodb://", "mongodb+srv://")):
        return mongo_store(text, collection, key)
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


def store_identity(store: Store) -> str:
    """The location of a store, unique per store: the resolved path of a file or folder store, a MongoDB
    store's redacted URI with its database and collection."""
    if is_mongo_server(store):
        uri = redact_uri(str(store.uri or f"mongodb://{store.host}:{store.port}"))
        return f"{uri}#{store.database}/{store.collection_name}"
    return redact_uri(str(store.name))
