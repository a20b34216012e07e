"""The embedded on-disk store: a folder that montydb keeps on sqlite, readable by other processes.

Opening it for writing creates its configuration and collection (the sqlite file with its table) at once,
under a lock on ``<folder>/.cspml.lock``, each appearing whole (temporary file, then rename); a collection
file left without its table is repaired there. A template store's collection gets its change journal
(:mod:`cspml_flows.templates.store_sqlite`), and its queries on the indexed fields are answered through the
field table (:mod:`cspml_flows.templates.fields`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument
from maggma.stores import MontyStore
from montydb import MontyClient, set_storage

from cspml_flows.core.errors import StoreError
from cspml_flows.core.safeio import exclusive_lock
from cspml_flows.templates import fields
from cspml_flows.templates.schema import KEY
from cspml_flows.templates.store_errors import error_reason
from cspml_flows.templates.store_sqlite import (
    BUSY_TIMEOUT_MS,
    collection_file,
    connect_sqlite,
    create_collection_file,
    create_table_sql,
    has_journal,
    has_table,
    install_journal,
    journal_keys,
    journal_position,
)

logger = logging.getLogger(__name__)

MONTY_CONFIG = "monty.storage.cfg"  # what montydb writes into every embedded store folder
STORE_LOCK = ".cspml.lock"  # held while an embedded store's configuration or collections are created


def embedded_store(path: Path, collection: str, key: str, create: bool, what: str) -> MontyStore:
    """The embedded on-disk store (montydb on sqlite) of a folder. ``create=True`` (opening it for writing)
    makes the folder, its configuration and the collection now (:func:`prepare_embedded`); ``create=False``
    refuses a missing folder or one that is not a store, without writing anything into it."""
    path = path.resolve()
    if not path.exists():
        if not create:
            raise StoreError(f"{what} not found: {path} (import structures with 'cspml import')")
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise StoreError(f"{what} {path} is a file, not a store folder")
    elif not create and not (path / MONTY_CONFIG).is_file():
        raise StoreError(f"{path} is not a {what} (no {MONTY_CONFIG} in it)")
    store = EmbeddedStore(
        collection, database_path=str(path), storage="sqlite", key=key, client_kwargs={"busy_timeout": BUSY_TIMEOUT_MS}
    )
    store.writable = create
    if create:
        try:
            prepare_embedded(path, store.database_name, collection, store.storage_kwargs, journal=key == KEY)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {what} {path} for writing: {error_reason(exc)}") from None
    return store


@contextlib.contextmanager
def store_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``<folder>/.cspml.lock`` (``fcntl.flock``; released when the block ends, or when
    the process dies)."""
    with exclusive_lock(folder / STORE_LOCK):
        yield


def prepare_embedded(
    path: Path, database: str, collection: str, storage_kwargs: dict[str, Any], journal: bool = False
) -> None:
    """Make an embedded store ready for writing: montydb's configuration and the collection's sqlite file
    with its table, created under :func:`store_lock`, each put in place whole by a rename (a reader sees no
    collection or a complete one; two processes never both create it). A collection file without its table
    (a store whose creation was killed half-way) is repaired in place. ``storage_kwargs``: the montydb
    settings (``montydb.set_storage``) of a new store, maggma's MontyStore defaults (pymongo's BSON).
    ``journal``: the collection gets its change journal (:func:`install_journal`) if it has none yet."""
    coll = collection_file(path, database, collection)
    if (path / MONTY_CONFIG).is_file() and coll.is_file() and has_table(coll) and (not journal or has_journal(coll)):
        return  # the usual case: nothing to create, no lock taken
    with store_lock(path):
        if not (path / MONTY_CONFIG).is_file():
            write_monty_config(path, storage_kwargs)
        if not coll.exists():
            create_collection_file(coll, journal)
        elif not has_table(coll):
            with contextlib.closing(connect_sqlite(coll)) as con, con:
                con.execute(create_table_sql(if_not_exists=True))
            logger.warning("store %s: collection %s had no table (creation interrupted): repaired", path, coll.name)
        if journal and not has_journal(coll):
            with contextlib.closing(connect_sqlite(coll)) as con, con:
                install_journal(con)


def write_monty_config(path: Path, storage_kwargs: dict[str, Any]) -> None:
    """Write montydb's storage configuration (sqlite) for the store folder ``path`` in a temporary folder and
    rename it into place (the configuration file last: its presence marks a store)."""
    for stale in path.glob(".monty-config.*"):  # left by a creator that was killed (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=".monty-config.", dir=path) as tmp:
        set_storage(tmp, storage="sqlite", **storage_kwargs)
        for name in sorted(os.listdir(tmp), key=lambda n: n == MONTY_CONFIG):
            os.replace(Path(tmp) / name, path / name)


class EmbeddedStore(MontyStore):
    """maggma's MontyStore (sqlite) that never writes montydb's storage configuration when it connects
    (:func:`embedded_store` creates it): opening an existing store to read it (``cspml predict``) leaves its
    folder as it was.

    A template store answers queries on ``material_id``, ``formula``, ``source``, ``round``,
    ``last_updated`` and ``chemsys`` through emulated indexes (:mod:`cspml_flows.templates.fields`, kept up to
    date from the change journal) instead of montydb's scan of every document; other queries go to montydb,
    and so do all queries of a store file this process cannot write."""

    writable = False  # opened for writing (set by embedded_store)
    indexed_queries = 0  # queries of this process answered through the emulated indexes

    def query(  # type: ignore[override]
        self,
        criteria: dict | None = None,
        properties: dict | list | None = None,
        sort: dict | None = None,
        hint: dict | None = None,
        skip: int = 0,
        limit: int = 0,
        **kwargs: Any,
    ) -> Iterator[dict]:
        """maggma's query, answered through the field table where it can be."""
        found = None if hint or kwargs else self._indexed(criteria, properties, sort, skip, limit)
        if found is None:
            return super().query(criteria, properties, sort, hint, skip, limit, **kwargs)
        EmbeddedStore.indexed_queries += 1
        return iter(found)

    def _indexed(self, criteria: Any, properties: Any, sort: Any, skip: int, limit: int) -> list[dict] | None:
        """The documents of a query answered through the field table, or None when it cannot be."""
        if not (self.key == KEY and self._coll is not None):
            return None
        p = fields.plan(criteria, properties, sort, skip, limit)
        f = collection_file(Path(self.database_path), self.database_name, self.collection_name)
        if p is None or not f.is_file():
            return None
        options = self._coll.codec_options
        with contextlib.closing(connect_sqlite(f)) as con:
            con.isolation_level = None  # transactions as fields.refresh opens them
            first = con.execute("SELECT k FROM documents LIMIT 1").fetchone()
            if first is not None and bytes(first[0])[:1] != b"\x02":
                return None  # montydb's JSON encoding: its own decoder's types
            found = journal_position(con)
            journal = None if found is None else (found.split("|")[1], int(found.split("|")[2]))
            try:
                if not fields.refresh(con, journal, lambda a, b: journal_keys(con, a, b), RawBSONDocument):
                    return None
            except sqlite3.OperationalError:
                return None  # a store this process may not write (read-only file): montydb answers
            return fields.run(con, p, lambda v: bson.decode(bytes(v), codec_options=options))

    def connect(self, force_reset: bool = False) -> None:
        """Open the collection of an existing store folder (StoreError when the folder is not a store)."""
        if not self._coll or force_reset:
            if not (Path(self.database_path) / MONTY_CONFIG).is_file():
                raise StoreError(f"{self.database_path} is not a store (no {MONTY_CONFIG} in it)")
            client = MontyClient(self.database_path, **self.client_kwargs)
            self._coll = client[self.database_name][self.collection_name]
