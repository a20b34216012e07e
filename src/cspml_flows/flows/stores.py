"""Stores of the validation flows: the results (relaxation cache) store and the jobflow JobStore.

URIs (one factory for every store: :func:`cspml_flows.templates.store_uri.make_store`): a folder path (embedded
on-disk MontyStore, sqlite, readable by other processes; its collection is created when the store is opened,
under the store's lock), ``mongodb://`` / ``mongodb+srv://`` (a MongoDB server, which must answer within the
MongoDB timeout), or ``memory://NAME`` (mongomock-backed maggma MemoryStore shared by every opener in this
process; tests only).

Writes to these stores go through :func:`cspml_flows.templates.store_write.upsert`: one document per key, whatever
runs twice or at the same time.
"""

from __future__ import annotations

from pathlib import Path

from jobflow import JobStore
from maggma.core import Store
from maggma.stores import MemoryStore, MontyStore

from cspml_flows.core.errors import CSPMLError, StoreError
from cspml_flows.templates.store_errors import error_reason
from cspml_flows.templates.store_mongo import check_reachable, redact_uri
from cspml_flows.templates.store_sqlite import BUSY_TIMEOUT_MS
from cspml_flows.templates.store_uri import make_store
from cspml_flows.templates.store_write import upsert

RESULTS_COLLECTION = "relaxations"
STATE_COLLECTION = "campaign_state"


def open_store(uri: str | Path, collection: str, key: str = "key", create: bool = True) -> Store:
    """:func:`make_store`, connected (a MongoDB server is asked once); a store that cannot be opened raises
    StoreError naming it in one line."""
    store = make_store(uri, collection, key=key, create=create)
    try:
        if isinstance(store, MemoryStore):
            if store._coll is None:  # shared in-process store: connect once, never reset
                store.connect()
        else:
            store.connect()
    except CSPMLError:
        raise
    except Exception as exc:  # any driver error: one line naming the store, the cause kept in the message
        raise StoreError(f"cannot open store {redact_uri(str(uri))} ({collection}): {error_reason(exc)}") from None
    check_reachable(store, f"store ({collection})")
    return store


def write_docs(store: Store, docs: list[dict], key: str = "key") -> int:
    """Upsert ``docs`` by ``key`` (see :func:`cspml_flows.templates.store_write.upsert`)."""
    return upsert(store, docs, key)


def close_store(store: Store) -> None:
    """Close a store opened by :func:`open_store` (the shared in-process memory stores stay open)."""
    if not isinstance(store, MemoryStore):
        store.close()


def job_store(uri: str | Path) -> JobStore:
    """jobflow JobStore on maggma: job outputs in ``outputs``, large atomate2 objects in ``data``."""
    docs = _job_store_part(uri, "outputs", "uuid")
    data = _job_store_part(uri, "outputs_data", "blob_uuid")
    return JobStore(docs, additional_stores={"data": data})


def _job_store_part(uri: str | Path, collection: str, key: str) -> Store:
    """jobflow's stores stay plain maggma stores (their class is serialised into job documents); an embedded
    one's collection is created here (:func:`make_store`), and its writers wait for each other."""
    store = make_store(uri, collection, key=key)
    if isinstance(store, MontyStore):
        client_kwargs = {"busy_timeout": BUSY_TIMEOUT_MS}
        return MontyStore(
            collection, database_path=store.database_path, storage="sqlite", key=key, client_kwargs=client_kwargs
        )
    return store
