"""The template store: any maggma Store holding :class:`TemplateDoc` documents.

``TemplateStore.open(uri)`` picks the backend (:func:`~cspml_flows.templates.store_uri.make_store`): the
embedded on-disk store of a folder (default ``$CSPML_HOME/store``; :mod:`cspml_flows.templates.store_embedded`),
a MongoDB server (:mod:`cspml_flows.templates.store_mongo`), a JSON file
(:mod:`cspml_flows.templates.store_json`) or an in-process ``memory://NAME`` store (tests).

A store's :attr:`TemplateStore.identity` names its location (resolved path; redacted URI, database and
collection), and :meth:`TemplateStore.position` says how far its content has moved on:
:meth:`TemplateStore.changed_since` lists the documents written since a position (read from the change
journal of an embedded store, :mod:`cspml_flows.templates.store_sqlite`), so that the template index follows
a store by its changes (:mod:`cspml_flows.templates.index`).

Every write is an upsert on the document key (:func:`~cspml_flows.templates.store_write.upsert`).
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from maggma.core import Store
from maggma.stores import MemoryStore, MontyStore

from cspml_flows.core.errors import CSPMLError, StoreError
from cspml_flows.templates.schema import KEY, TemplateDoc
from cspml_flows.templates.store_embedded import store_lock
from cspml_flows.templates.store_errors import backend_errors, error_reason
from cspml_flows.templates.store_json import AtomicJSONStore
from cspml_flows.templates.store_mongo import check_reachable, ensure_mongo_indexes, is_mongo_server, redact_uri
from cspml_flows.templates.store_rows import StoredRow, digest64, doc_digest
from cspml_flows.templates.store_sqlite import (
    KEY_BATCH,
    collection_file,
    connect_sqlite,
    decode_key,
    has_journal,
    install_journal,
    journal_keys,
    journal_position,
    keys_in,
    string_keyed_sqlite,
)
from cspml_flows.templates.store_uri import store_from_uri, store_identity
from cspml_flows.templates.store_write import upsert

QUERY_BATCH = 1000  # ids per ``$in`` query of a store that is not embedded


class TemplateStore:
    """Read and write template documents in a maggma Store."""

    documents_read = 0  # documents read by every TemplateStore of this process (:meth:`rows`, :meth:`docs`)

    def __init__(self, store: Store):
        self.store = store
        self._connected = False

    @classmethod
    def open(cls, uri: str | Path | None = None, create: bool = True) -> TemplateStore:
        """The template store of a URI (see the module docstring); ``create=True`` opens it for writing: a
        missing embedded store is created, an embedded store gets its change journal, a MongoDB store its
        indexes (:meth:`ensure_indexes`)."""
        ts = cls(store_from_uri(uri, create=create))
        ts.connect()
        if create and is_mongo_server(ts.store):
            ts.ensure_indexes()
        return ts

    def ensure_indexes(self) -> None:
        """MongoDB: indexes on ``material_id`` (unique) and on the fields rounds and builders query (source,
        round, formula, last_updated), created once per process and store
        (:func:`~cspml_flows.templates.store_mongo.ensure_mongo_indexes`)."""
        with self._reading("index"):
            ensure_mongo_indexes(self.store, self.name, self.identity)

    def ensure_journal(self) -> bool:
        """Give an embedded store its change journal if it has none (the store must be writable); whether it
        has one now. Other backends: False."""
        f = self.sqlite_file()
        if f is None:
            return False
        with self._reading("write to"):
            if not has_journal(f):
                with store_lock(f.parent.parent), contextlib.closing(connect_sqlite(f)) as con, con:
                    install_journal(con)
            return True

    @property
    def name(self) -> str:
        """The store's name for messages (a MongoDB URI without its password; a resolved path)."""
        return redact_uri(str(self.store.name))

    @property
    def identity(self) -> str:
        """The store's location, unique per store (see :func:`store_identity`)."""
        return store_identity(self.store)

    def connect(self) -> None:
        """Connect the backend (StoreError naming the store when it cannot be opened or reached)."""
        if not self._connected:
            try:
                self.store.connect()
            except CSPMLError:
                raise
            except (sqlite3.Error, OSError, ValueError, TypeError, *backend_errors()) as exc:
                raise StoreError(f"cannot open template store {self.name}: {error_reason(exc)}") from None
            check_reachable(self.store, "template store")
            self._connected = True

    def close(self) -> None:
        """Close the backend (a ``memory://`` store lives on for the process)."""
        if self._connected:
            if not isinstance(self.store, MemoryStore):  # memory:// stores live for the process
                self.store.close()
            self._connected = False

    def __enter__(self) -> TemplateStore:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sqlite_file(self) -> Path | None:
        """The sqlite file of an embedded MontyStore collection, if that is the backend."""
        st = self.store
        if isinstance(st, MontyStore) and st.storage == "sqlite":
            f = collection_file(Path(st.database_path), st.database_name, st.collection_name)
            return f if f.is_file() else None
        return None

    def _half_created(self) -> StoreError:
        """The error for an embedded store whose collection file has no table (its creation was killed)."""
        return StoreError(
            f"template store {self.store.database_path} was left half-created (its collection has no table): "
            f"opening it for writing repairs it, e.g. 'cspml import folder --store {self.store.database_path}'"
        )

    @contextlib.contextmanager
    def _reading(self, action: str = "read") -> Iterator[None]:
        """Backend failures (a damaged sqlite file, an unreachable server, a full disk) as one StoreError
        naming the store."""
        try:
            yield
        except CSPMLError:
            raise
        except (sqlite3.Error, OSError, ValueError, *backend_errors()) as exc:
            if isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc) and self.sqlite_file():
                raise self._half_created() from None
            hint = " (damaged or not a store?)" if action == "read" and not is_mongo_server(self.store) else ""
            raise StoreError(f"cannot {action} template store {self.name}: {error_reason(exc)}{hint}") from None

    # ---- documents --------------------------------------------------------------------------------------
    def count(self) -> int:
        """Number of documents (montydb decodes every document to count; sqlite is asked directly)."""
        f = self.sqlite_file()
        if f is not None:
            # read-write without create: closing it removes the -wal/-shm files a read-only one leaves
            with self._reading(), contextlib.closing(connect_sqlite(f)) as con:
                return int(con.execute("SELECT COUNT(*) FROM documents").fetchone()[0])
        with self._reading():
            return self.store.count()

    def ids(self) -> set[str]:
        """Every document's ``material_id`` (an embedded store whose ``_id`` values are all text: read from
        its key index)."""
        with self._reading():
            f = string_keyed_sqlite(self.store)
            if f is not None:
                with contextlib.closing(connect_sqlite(f)) as con:
                    return {str(decode_key(k)) for (k,) in con.execute("SELECT k FROM documents")}
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
            return upsert(st, rows, KEY, assume_new=assume_new)

    def docs(self, criteria: dict | None = None, properties: list[str] | None = None) -> Iterator[dict]:
        """The documents matching ``criteria`` (all by default), without their ``_id``."""
        with self._reading():
            for d in self.store.query(criteria or {}, properties=properties):
                d.pop("_id", None)
                TemplateStore.documents_read += 1
                yield d

    def get(self, material_id: str) -> TemplateDoc | None:
        """The template document of an id, or None."""
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

    def rows(self, ids: Iterable[str] | None = None) -> Iterator[StoredRow]:
        """The stored documents (all, or those of ``ids`` that exist), each with a digest of what is stored;
        unordered. The embedded store is read straight from sqlite and decoded with pymongo's C BSON decoder
        (or as JSON text), only when :meth:`StoredRow.doc` is called."""
        f = self.sqlite_file()
        wanted = None if ids is None else sorted({str(i) for i in ids})
        if f is not None:
            yield from self._sqlite_rows(f, wanted)
            return
        if wanted is None:
            chunks: Iterable[dict] = [{}]
        else:
            chunks = ({KEY: {"$in": wanted[s : s + QUERY_BATCH]}} for s in range(0, len(wanted), QUERY_BATCH))
        with self._reading():
            for crit in chunks:
                for d in self.store.query(crit):
                    d.pop("_id", None)
                    TemplateStore.documents_read += 1
                    yield StoredRow(str(d.get(KEY)), doc_digest(d), doc=d)

    def _sqlite_rows(self, f: Path, wanted: list[str] | None) -> Iterator[StoredRow]:
        """:meth:`rows` of an embedded store, read from its collection file ``f``."""
        with self._reading(), contextlib.closing(connect_sqlite(f)) as con:
            con.text_factory = bytes
            if wanted is None:
                cursors: Iterable[Any] = [con.execute("SELECT k, v FROM documents")]
            else:
                batches = (keys_in(wanted[s : s + KEY_BATCH]) for s in range(0, len(wanted), KEY_BATCH))
                cursors = (con.execute(f"SELECT k, v FROM documents WHERE k IN ({m})", keys) for m, keys in batches)
            for cur in cursors:
                for k, v in cur:
                    TemplateStore.documents_read += 1
                    mid = decode_key(k)
                    if mid is None:  # a key an older writer let the database choose: the id is inside
                        row = StoredRow("", digest64(v), raw=v)
                        row.id = str(row.doc().get(KEY))
                        yield row
                    else:
                        yield StoredRow(mid, digest64(v), raw=v)

    # ---- how far the content has moved on -----------------------------------------------------------------
    def position(self) -> str:
        """How far the store's content has moved on, cheaply: text that changes whenever a document is
        written, with the document count in it (:func:`position_count`).

        An embedded store with its journal: ``journal|<journal id>|<last change>|<count>`` (two lookups); one
        without: ``sqlite|<count>|<digest of every row>``. A JSON file: ``json|<count>|<digest of the file>``.
        A MongoDB or memory store: ``stamp|<count>|<newest last_updated>``."""
        f = self.sqlite_file()
        if f is not None:
            with self._reading(), contextlib.closing(connect_sqlite(f)) as con:
                found = journal_position(con)
            return found or self.fingerprint()
        st = self.store
        if isinstance(st, AtomicJSONStore):
            with self._reading():
                digest = st.content_digest()  # reloads the file first if another process replaced it
                return f"json|{st.count()}|{digest}"
        with self._reading():
            n = st.count()
            newest = st.query_one({}, properties=["last_updated"], sort={"last_updated": -1}) or {}
        stamp = newest.get("last_updated")
        return f"stamp|{n}|{stamp.isoformat() if hasattr(stamp, 'isoformat') else stamp or ''}"

    def changed_since(self, position: str) -> tuple[str, set[str] | None]:
        """The store's position now and the ids of the documents written (added, replaced or removed) since
        ``position``; None instead of ids when the store cannot tell (no journal, another journal, a JSON
        file that changed): then every document must be compared.

        A ``stamp`` position (MongoDB, memory) finds the documents whose ``last_updated`` is newer; removals
        (and documents written with an older date) show only in the count, which the caller compares."""
        f = self.sqlite_file()
        if f is not None:
            return self._journal_changes(f, position)
        now = self.position()
        if not position.startswith("stamp|") or not now.startswith("stamp|"):
            return now, None if now != position else set()
        newest = position.split("|", 2)[2]
        if not newest:
            return now, None
        with self._reading():
            ids = {str(d[KEY]) for d in self.store.query({"last_updated": {"$gt": newest}}, properties=[KEY])}
        return now, ids

    def _journal_changes(self, f: Path, position: str) -> tuple[str, set[str] | None]:
        """:meth:`changed_since` of an embedded store, read from the change journal of its collection file."""
        with self._reading(), contextlib.closing(connect_sqlite(f)) as con:
            con.execute("BEGIN")  # one snapshot for the position and the changes
            try:
                now = journal_position(con)
                if now is None or not position.startswith("journal|"):
                    return now or self.fingerprint(), None
                old, new = position.split("|"), now.split("|")
                if old[1] != new[1] or int(old[2]) > int(new[2]):
                    return now, None
                keys = [decode_key(k) for k in journal_keys(con, int(old[2]), int(new[2]))]
            finally:
                con.rollback()
        if any(k is None for k in keys):
            return now, None  # a document under a key that is not its id: compare them all
        return now, {str(k) for k in keys}

    def fingerprint(self) -> str:
        """A digest of the store's content, which changes whenever any document changes.

        An embedded store with its journal: its :meth:`position`. One without: every stored document (key and
        encoded document), read from sqlite in one statement. A JSON file: the file's bytes. A MongoDB or
        memory store: every (``material_id``, ``last_updated``) pair, which every write through :meth:`add`
        of a :class:`TemplateDoc` renews."""
        st = self.store
        f = self.sqlite_file()
        if f is not None:
            return self._sqlite_fingerprint(f)
        if isinstance(st, AtomicJSONStore):
            with self._reading():
                return f"json|{st.content_digest()}"
        with self._reading():
            rows = st.query(properties=[KEY, "last_updated"])
            pairs = sorted((str(d.get(KEY)), str(d.get("last_updated"))) for d in rows)
        h = hashlib.sha1()
        for pair in pairs:
            h.update(repr(pair).encode())
        return f"docs|{len(pairs)}|{h.hexdigest()}"

    def _sqlite_fingerprint(self, f: Path) -> str:
        """:meth:`fingerprint` of an embedded store, read from its collection file ``f``."""
        with self._reading(), contextlib.closing(connect_sqlite(f)) as con:
            found = journal_position(con)
        if found:
            return found
        h = hashlib.sha1()
        n = 0
        with self._reading(), contextlib.closing(connect_sqlite(f)) as con:
            con.text_factory = bytes
            for k, v in con.execute("SELECT k, v FROM documents ORDER BY k"):
                for part in (k, v):
                    data = part.encode() if isinstance(part, str) else bytes(part)
                    h.update(len(data).to_bytes(8, "little") + data)
                n += 1
        return f"sqlite|{n}|{h.hexdigest()}"
