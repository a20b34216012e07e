"""MongoDB stores: URIs (database, redacted password), the server timeout, reachability and indexes.

A ``mongodb://`` / ``mongodb+srv://`` URI opens a ``MongoURIStore``; an unreachable server fails after
``CSPML_MONGO_TIMEOUT_MS`` / config ``mongo_timeout_ms`` (default 5000; a ``serverSelectionTimeoutMS`` in
the URI wins). MongoDB template stores opened for writing get indexes on ``material_id`` (unique),
``source``, ``round``, ``formula`` and ``last_updated`` (:func:`ensure_mongo_indexes`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Any
from urllib.parse import parse_qsl

from maggma.core import Store
from maggma.stores import MemoryStore, MongoStore, MongoURIStore, MontyStore

from cspml_flows.core.config import int_setting
from cspml_flows.core.errors import StoreError
from cspml_flows.templates.schema import KEY
from cspml_flows.templates.store_errors import backend_errors, duplicate_key_errors, error_reason

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "cspml"
MONGO_TIMEOUT_ENV = "CSPML_MONGO_TIMEOUT_MS"
DEFAULT_MONGO_TIMEOUT_MS = 5000
INDEXED_FIELDS = (KEY, "source", "round", "formula", "last_updated")  # MongoDB indexes of a template store

_INDEXED: set[str] = set()  # MongoDB template stores given their indexes by this process


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


def mongo_timeout_ms(config: dict[str, Any] | None = None) -> int:
    """How long a MongoDB store waits for its server: ``CSPML_MONGO_TIMEOUT_MS``, config ``mongo_timeout_ms``,
    else 5000 ms."""
    return int_setting(
        MONGO_TIMEOUT_ENV, "mongo_timeout_ms", DEFAULT_MONGO_TIMEOUT_MS, config, "whole number of milliseconds"
    )


def uri_options(uri: str) -> set[str]:
    """The option names (lower case) of a MongoDB URI's query string."""
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return {k.lower() for k, _ in parse_qsl(query, keep_blank_values=True)}


def mongo_store(uri: str, collection: str, key: str) -> MongoURIStore:
    """The (not connected) MongoDB store of a URI, with the server selection and connection timeouts of
    :func:`mongo_timeout_ms` unless the URI sets them."""
    options = uri_options(uri)
    ms = mongo_timeout_ms()
    client_kwargs = {
        name: ms for name in ("serverSelectionTimeoutMS", "connectTimeoutMS") if name.lower() not in options
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # maggma's note that MongoURIStore is now MongoStore
        return MongoURIStore(
            uri=uri,
            collection_name=collection,
            database=mongo_database_name(uri),
            key=key,
            mongoclient_kwargs=client_kwargs,
        )


def is_mongo_server(store: Store) -> bool:
    """Whether a store lives on a MongoDB server (maggma's MontyStore and MemoryStore are MongoStores too)."""
    return isinstance(store, MongoStore) and not isinstance(store, MontyStore | MemoryStore)


def check_reachable(store: Store, what: str = "store") -> None:
    """For a MongoDB store: ask its server once (a ping), so that an unreachable server fails here within the
    timeout, as one StoreError naming the redacted URI. Other stores: nothing to do."""
    if not is_mongo_server(store):
        return
    client = store._collection.database.client
    try:
        client.admin.command("ping")
    except (*backend_errors(), OSError) as exc:
        seconds = getattr(getattr(client, "options", None), "server_selection_timeout", None)  # pymongo's setting
        within = f" within {seconds:g} s" if isinstance(seconds, int | float) else ""
        name = redact_uri(str(store.uri))
        raise StoreError(
            f"cannot reach {what} {name}: no MongoDB server answered{within} ({error_reason(exc)})"
        ) from None


def ensure_mongo_indexes(store: Store, name: str, identity: str) -> None:
    """Indexes of a MongoDB template store on ``material_id`` (unique) and :data:`INDEXED_FIELDS`, created once
    per process and store (``identity``). A collection that holds one id twice (written by an older version)
    gets a plain index on ``material_id``; an index the server refuses (a user without the right to create
    one) is left out; each with one log line naming the store (``name``)."""
    if identity in _INDEXED:
        return
    coll = store._collection
    existing = {spec[0] for ix in coll.index_information().values() for spec in ix["key"]}
    for field in INDEXED_FIELDS:
        if field in existing:
            continue
        try:
            coll.create_index(field, unique=field == KEY)
        except duplicate_key_errors() + backend_errors() as exc:
            logger.warning(
                "store %s: no %sindex on %s (%s)", name, "unique " * (field == KEY), field, error_reason(exc)
            )
            if field == KEY:
                with contextlib.suppress(*backend_errors()):
                    coll.create_index(field)
    _INDEXED.add(identity)
