"""The template store: any maggma Store holding :class:`TemplateDoc` documents.

``TemplateStore.open(uri)`` picks the backend:

- ``None`` or a folder path: embedded on-disk MontyStore (sqlite) that other processes can read (default
  ``$CSPML_HOME/store``). Opening it for writing creates its configuration and collection (the sqlite file
  with its table) at once, under a lock on ``<folder>/.cspml.lock``, each appearing whole (temporary file,
  then rename); a collection file left without its table is repaired there;
- ``mongodb://`` / ``mongodb+srv://`` URI: a MongoDB server (``MongoURIStore``); an unreachable server fails
  after ``CSPML_MONGO_TIMEOUT_MS`` / config ``mongo_timeout_ms`` (default 5000; a ``serverSelectionTimeoutMS``
  in the URI wins);
- ``*.json``: a maggma JSONStore file, written atomically (temporary file, then rename) under a file lock;
  a file that does not parse is an error naming it, never an empty store;
- ``memory://NAME``: an in-process MemoryStore (tests).

A store's :attr:`TemplateStore.identity` names its location (resolved path; redacted URI, database and
collection), and :meth:`TemplateStore.position` says how far its content has moved on:
:meth:`TemplateStore.changed_since` lists the documents written since a position, so that the template index
follows a store by its changes (:mod:`cspml_flows.templates.index`).

The embedded template store keeps a change journal: a table ``cspml_changes(seq, k, op)`` in the collection's
sqlite file that triggers on the document table fill with every insert, update and delete, in the same
transaction as the write, whoever writes (this package, maggma, jobflow). A store gets its journal when it is
created or next opened for writing; the position of a store without one is a digest of its content.
MongoDB template stores opened for writing get indexes on ``material_id`` (unique), ``source``, ``round``,
``formula`` and ``last_updated``.

Every write is an upsert on the document key (:func:`upsert`): a document's ``_id`` is its key, so two
processes writing the same key at once leave one document, not two.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from maggma.core import Store
from maggma.stores import JSONStore, MemoryStore, MongoStore, MongoURIStore, MontyStore

from cspml_flows.core.config import default_store_path, load_config
from cspml_flows.core.errors import ConfigError, CSPMLError, StoreError
from cspml_flows.core.safeio import atomic_open, current_umask, exclusive_lock
from cspml_flows.templates.schema import TemplateDoc

log = logging.getLogger(__name__)

COLLECTION = "templates"
KEY = "material_id"
DEFAULT_DATABASE = "cspml"
MONTY_CONFIG = "monty.storage.cfg"  # what montydb writes into every embedded store folder
STORE_LOCK = ".cspml.lock"  # held while an embedded store's configuration or collections are created
BUSY_TIMEOUT_MS = 30_000  # how long a write to the embedded store waits for another writer's lock
MONGO_TIMEOUT_ENV = "CSPML_MONGO_TIMEOUT_MS"
JOURNAL_TABLE = "cspml_changes"  # (seq, k, op): one row per write of a document of an embedded template store
JOURNAL_ID_TABLE = "cspml_journal"  # one row: the journal's random id (a recreated collection gets another)
JOURNAL_TRIGGERS = ("cspml_journal_insert", "cspml_journal_update", "cspml_journal_delete")
INDEXED_FIELDS = (KEY, "source", "round", "formula", "last_updated")  # MongoDB indexes of a template store
DEFAULT_MONGO_TIMEOUT_MS = 5000


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
    value = os.environ.get(MONGO_TIMEOUT_ENV)
    if not value:
        config = load_config() if config is None else config
        value = config.get("mongo_timeout_ms", DEFAULT_MONGO_TIMEOUT_MS)
    try:
        ms = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mongo_timeout_ms must be a whole number of milliseconds, got {str(value)[:40]!r}") from None
    if ms < 1:
        raise ConfigError(f"mongo_timeout_ms must be at least 1, got {ms}")
    return ms


def _uri_options(uri: str) -> set[str]:
    """The option names (lower case) of a MongoDB URI's query string."""
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return {k.lower() for k, _ in parse_qsl(query, keep_blank_values=True)}


def mongo_store(uri: str, collection: str, key: str) -> MongoURIStore:
    """The (not connected) MongoDB store of a URI, with the server selection and connection timeouts of
    :func:`mongo_timeout_ms` unless the URI sets them."""
    options = _uri_options(uri)
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


def store_identity(store: Store) -> str:
    """The location of a store, unique per store: the resolved path of a file or folder store, a MongoDB
    store's redacted URI with its database and collection."""
    if is_mongo_server(store):
        uri = redact_uri(str(store.uri or f"mongodb://{store.host}:{store.port}"))
        return f"{uri}#{store.database}/{store.collection_name}"
    return redact_uri(str(store.name))


def error_reason(exc: BaseException) -> str:
    """One line saying why a backend call failed (pymongo's topology description and timeout settings left
    out)."""
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    reason = reason.split(", Timeout:", 1)[0]
    return re.sub(r" \(configured timeouts: [^)]*\)", "", reason)


def check_reachable(store: Store, what: str = "store") -> None:
    """For a MongoDB store: ask its server once (a ping), so that an unreachable server fails here within the
    timeout, as one StoreError naming the redacted URI. Other stores: nothing to do."""
    if not is_mongo_server(store):
        return
    client = store._collection.database.client
    try:
        client.admin.command("ping")
    except Exception as exc:
        seconds = getattr(getattr(client, "options", None), "server_selection_timeout", None)  # pymongo's setting
        within = f" within {seconds:g} s" if isinstance(seconds, int | float) else ""
        name = redact_uri(str(store.uri))
        raise StoreError(
            f"cannot reach {what} {name}: no MongoDB server answered{within} ({error_reason(exc)})"
        ) from None


_INDEXED: set[str] = set()  # MongoDB template stores given their indexes by this process
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


def collection_file(path: Path, database: str, collection: str) -> Path:
    """The sqlite file montydb keeps a collection of an embedded store in."""
    return path / database / f"{collection}.collection"


def _connect_sqlite(f: Path) -> sqlite3.Connection:
    """A connection to an existing sqlite file (read-write, never creating it) that waits for other writers."""
    return sqlite3.connect(f"file:{f}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)


def _has_table(f: Path) -> bool:
    """Whether the sqlite file ``f`` holds montydb's document table (sqlite3.Error: not an sqlite file)."""
    from montydb.storage.sqlite import SQLITE_RECORD_TABLE

    with contextlib.closing(_connect_sqlite(f)) as con:
        sql = "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?"
        return con.execute(sql, (SQLITE_RECORD_TABLE,)).fetchone() is not None


def _create_table_sql(if_not_exists: bool = False) -> str:
    from montydb.storage.sqlite import CREATE_TABLE, SQLITE_RECORD_TABLE

    sql = CREATE_TABLE.format(SQLITE_RECORD_TABLE)
    return sql.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1) if if_not_exists else sql


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
    if (path / MONTY_CONFIG).is_file() and coll.is_file() and _has_table(coll) and (not journal or has_journal(coll)):
        return  # the usual case: nothing to create, no lock taken
    with store_lock(path):
        if not (path / MONTY_CONFIG).is_file():
            _write_monty_config(path, storage_kwargs)
        if not coll.exists():
            _create_collection_file(coll, journal)
        elif not _has_table(coll):
            with contextlib.closing(_connect_sqlite(coll)) as con, con:
                con.execute(_create_table_sql(if_not_exists=True))
            log.warning("store %s: collection %s had no table (creation interrupted): repaired", path, coll.name)
        if journal and not has_journal(coll):
            with contextlib.closing(_connect_sqlite(coll)) as con, con:
                install_journal(con)


def has_journal(f: Path) -> bool:
    """Whether the collection file ``f`` holds the change journal with its three triggers."""
    with contextlib.closing(_connect_sqlite(f)) as con:
        return _journal_present(con)


def _journal_present(con: sqlite3.Connection) -> bool:
    names = (JOURNAL_TABLE, JOURNAL_ID_TABLE, *JOURNAL_TRIGGERS)
    sql = f"SELECT COUNT(*) FROM sqlite_master WHERE name IN ({','.join('?' * len(names))})"
    return con.execute(sql, names).fetchone()[0] == len(names)


def install_journal(con: sqlite3.Connection) -> None:
    """Create the change journal of an embedded template collection (in the caller's transaction): the table
    ``cspml_changes(seq, k, op)``, a random journal id, and triggers that append every insert ('i'), update
    ('u') and delete ('d') of a document row to it."""
    import secrets

    exists = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (JOURNAL_TABLE,)).fetchone()
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {JOURNAL_TABLE}"
        "(seq INTEGER PRIMARY KEY AUTOINCREMENT, k BLOB NOT NULL, op TEXT NOT NULL)"
    )
    con.execute(f"CREATE TABLE IF NOT EXISTS {JOURNAL_ID_TABLE}(id TEXT NOT NULL)")
    if not exists:  # a new journal (its numbering starts again): a new id, so no index mistakes it for the old
        con.execute(f"DELETE FROM {JOURNAL_ID_TABLE}")
    con.execute(
        f"INSERT INTO {JOURNAL_ID_TABLE}(id) SELECT ? WHERE NOT EXISTS (SELECT 1 FROM {JOURNAL_ID_TABLE})",
        (secrets.token_hex(8),),
    )
    ins, upd, dele = JOURNAL_TRIGGERS
    con.execute(
        f"CREATE TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON documents "
        f"BEGIN INSERT INTO {JOURNAL_TABLE}(k, op) VALUES (NEW.k, 'i'); END"
    )
    con.execute(
        f"CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON documents BEGIN "
        f"INSERT INTO {JOURNAL_TABLE}(k, op) VALUES (NEW.k, 'u'); "
        f"INSERT INTO {JOURNAL_TABLE}(k, op) SELECT OLD.k, 'd' WHERE OLD.k IS NOT NEW.k; END"
    )
    con.execute(
        f"CREATE TRIGGER IF NOT EXISTS {dele} AFTER DELETE ON documents "
        f"BEGIN INSERT INTO {JOURNAL_TABLE}(k, op) VALUES (OLD.k, 'd'); END"
    )


def _journal_position(con: sqlite3.Connection) -> str | None:
    """``journal|<id>|<last seq>|<count>`` of a collection with its journal, else None."""
    if not _journal_present(con):
        return None
    (jid,) = con.execute(f"SELECT id FROM {JOURNAL_ID_TABLE} LIMIT 1").fetchone() or ("",)
    (seq,) = con.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {JOURNAL_TABLE}").fetchone()
    (n,) = con.execute("SELECT COUNT(*) FROM documents").fetchone()
    return f"journal|{jid}|{int(seq)}|{int(n)}"


def decode_key(k: bytes | str) -> str | None:
    """The ``_id`` text of a document key as montydb stores it: a BSON string element (pymongo's BSON) or a
    JSON string (montydb's own encoding); None for a key that is not text (an ObjectId an older writer let
    the database choose)."""
    raw = k.encode() if isinstance(k, str) else bytes(k)
    if raw[:1] == b"\x02" and len(raw) >= 6 and int.from_bytes(raw[1:5], "little") == len(raw) - 5:
        return raw[5:-1].decode()
    if raw[:1] == b'"':
        import json

        try:
            value = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return None
        return value if isinstance(value, str) else None
    return None


def encode_keys(mid: str) -> tuple[bytes, bytes]:
    """The two forms montydb may store the key ``mid`` in (:func:`decode_key`)."""
    import json

    data = mid.encode()
    return b"\x02" + (len(data) + 1).to_bytes(4, "little") + data + b"\x00", json.dumps(mid).encode()


def digest64(data: bytes) -> int:
    """A 64-bit digest of ``data`` (blake2b), as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def doc_digest(doc: dict[str, Any]) -> int:
    """:func:`digest64` of a decoded document (keys sorted, ``_id`` left out, dates as text)."""
    import orjson

    body = {k: v for k, v in doc.items() if k != "_id"}
    return digest64(orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str))


class StoredRow:
    """One stored template document: its id, a 64-bit digest of what is stored, and the document (decoded on
    first use)."""

    __slots__ = ("_doc", "_raw", "digest", "id")

    def __init__(self, mid: str, digest: int, raw: bytes | None = None, doc: dict[str, Any] | None = None):
        self.id, self.digest, self._raw, self._doc = mid, digest, raw, doc

    def doc(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = decode_value(self._raw or b"")
            self._raw = None
        self._doc.pop("_id", None)
        return self._doc


def position_count(position: str) -> int | None:
    """The document count a store position (:meth:`TemplateStore.position`) records, or None."""
    parts = position.split("|")
    try:
        return int(parts[3] if parts[0] == "journal" else parts[1])
    except (IndexError, ValueError):
        return None


def decode_value(v: bytes) -> dict[str, Any]:
    """A document row of an embedded store: BSON (pymongo's C decoder) or JSON text; a ``{"$date": ms}``
    date of the JSON form becomes ISO text."""
    raw = bytes(v)
    if len(raw) >= 5 and int.from_bytes(raw[:4], "little") == len(raw) and raw[-1:] == b"\x00":
        import bson

        return bson.decode(raw)
    import orjson

    doc = orjson.loads(raw)
    stamp = doc.get("last_updated") if isinstance(doc, dict) else None
    if isinstance(stamp, dict) and isinstance(stamp.get("$date"), int | float):
        from datetime import UTC, datetime

        doc["last_updated"] = datetime.fromtimestamp(stamp["$date"] / 1000, UTC).isoformat()
    return doc


def _write_monty_config(path: Path, storage_kwargs: dict[str, Any]) -> None:
    """montydb's storage configuration (sqlite) for the store folder ``path``, written in a temporary folder
    and renamed into place (the configuration file last: its presence marks a store)."""
    from montydb import set_storage

    for stale in path.glob(".monty-config.*"):  # left by a creator that was killed (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=".monty-config.", dir=path) as tmp:
        set_storage(tmp, storage="sqlite", **storage_kwargs)
        for name in sorted(os.listdir(tmp), key=lambda n: n == MONTY_CONFIG):
            os.replace(Path(tmp) / name, path / name)


def _create_collection_file(coll: Path, journal: bool = False) -> None:
    """A new collection file with montydb's document table (WAL journal, montydb's default) and, with
    ``journal``, the change journal, built under a temporary name and renamed onto ``coll``."""
    coll.parent.mkdir(parents=True, exist_ok=True)
    for stale in coll.parent.glob(f".{coll.name}.*.tmp*"):  # left by a creator that was killed (we hold the lock)
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{coll.name}.", suffix=".tmp", dir=coll.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with contextlib.closing(sqlite3.connect(tmp)) as con:
            con.execute("PRAGMA journal_mode=WAL")
            with con:
                con.execute(_create_table_sql())
                if journal:
                    install_journal(con)
        # closing the only connection checkpointed the journal into the file and removed it
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, coll)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


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
        found = None if hint or kwargs else self._indexed(criteria, properties, sort, skip, limit)
        if found is None:
            return super().query(criteria, properties, sort, hint, skip, limit, **kwargs)
        EmbeddedStore.indexed_queries += 1
        return iter(found)

    def _indexed(self, criteria: Any, properties: Any, sort: Any, skip: int, limit: int) -> list[dict] | None:
        """The documents of a query answered through the field table, or None when it cannot be."""
        from cspml_flows.templates import fields

        if not (self.key == KEY and self._coll is not None):
            return None
        p = fields.plan(criteria, properties, sort, skip, limit)
        f = collection_file(Path(self.database_path), self.database_name, self.collection_name)
        if p is None or not f.is_file():
            return None
        import bson
        from bson.raw_bson import RawBSONDocument

        options = self._coll.codec_options
        with contextlib.closing(_connect_sqlite(f)) as con:
            con.isolation_level = None  # transactions as fields.refresh opens them
            first = con.execute("SELECT k FROM documents LIMIT 1").fetchone()
            if first is not None and bytes(first[0])[:1] != b"\x02":
                return None  # montydb's JSON encoding: its own decoder's types
            found = _journal_position(con)
            journal = None if found is None else (found.split("|")[1], int(found.split("|")[2]))

            def changed(since: int, upto: int) -> list[bytes]:
                sql = f"SELECT DISTINCT k FROM {JOURNAL_TABLE} WHERE seq > ? AND seq <= ?"
                return [k for (k,) in con.execute(sql, (since, upto)).fetchall()]

            try:
                if not fields.refresh(con, journal, changed, RawBSONDocument):
                    return None
            except sqlite3.OperationalError:
                return None  # a store this process may not write (read-only file): montydb answers
            return fields.run(con, p, lambda v: bson.decode(bytes(v), codec_options=options))

    def connect(self, force_reset: bool = False) -> None:
        if not self._coll or force_reset:
            from montydb import MontyClient

            if not (Path(self.database_path) / MONTY_CONFIG).is_file():
                raise StoreError(f"{self.database_path} is not a store (no {MONTY_CONFIG} in it)")
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
        if self._coll is None or force_reset:
            import mongomock_ng

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
        import bson.json_util
        import orjson
        from maggma.utils import to_dt

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
        except Exception as exc:
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
        raw = text.encode(self.encoding or "utf-8")
        with atomic_open(self.paths[0], "wb") as fh:
            fh.write(raw)
        self._stamp = self._file_stamp()
        self._digest = hashlib.sha1(raw).hexdigest()


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


def _string_keyed_sqlite(store: Store) -> Path | None:
    """The sqlite file of an embedded store in which every document's ``_id`` is text (as :func:`upsert`
    writes them), else None: there a key's document is found by its ``_id`` alone."""
    if not (isinstance(store, MontyStore) and store.storage == "sqlite"):
        return None
    f = collection_file(Path(store.database_path), store.database_name, store.collection_name)
    if not f.is_file():
        return None
    with contextlib.closing(_connect_sqlite(f)) as con:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='documents'").fetchone():
            return None
        other = "SELECT 1 FROM documents WHERE substr(k, 1, 1) NOT IN (x'02', x'22') LIMIT 1"
        return None if con.execute(other).fetchone() else f


def _existing_ids(f: Path, ids: list[str]) -> set[str]:
    """Which of ``ids`` are document ``_id`` values of the embedded collection file ``f`` (by its key index)."""
    found: set[str] = set()
    with contextlib.closing(_connect_sqlite(f)) as con:
        for s in range(0, len(ids), 400):
            keys = [k for mid in ids[s : s + 400] for k in encode_keys(mid)]
            sql = f"SELECT k FROM documents WHERE k IN ({','.join('?' * len(keys))})"
            found.update(str(decode_key(k)) for (k,) in con.execute(sql, keys))
    return found


def _insert_rows(coll: Any, f: Path, docs: list[dict[str, Any]]) -> None:
    """Insert new documents into the embedded collection file ``f`` in one transaction, encoded as montydb
    encodes them (montydb's own bulk insert compares each new key with a list of every stored key); a key
    stored already fails the whole insert (sqlite3.IntegrityError)."""
    from montydb.types import bson as monty_bson

    rows = [(monty_bson.id_encode(d["_id"]), coll._storage._encode_doc(coll, d, True)) for d in docs]
    with contextlib.closing(_connect_sqlite(f)) as con, con:
        con.executemany("INSERT INTO documents(k, v) VALUES (?, ?)", rows)


def upsert(store: Store, docs: Iterable[dict[str, Any]], key: str, assume_new: bool = False) -> int:
    """Insert or replace documents by ``key`` (its value, as text, is also the document's ``_id``).

    New documents go in one bulk insert; if another writer stored some of the same keys meanwhile, the
    backend refuses the duplicate ``_id`` and the write is retried as replacements, so concurrent or
    repeated writes leave exactly one document per key. Copies of a key left by older versions are removed.
    ``assume_new`` skips the first lookup of existing keys. Returns how many distinct keys were written.

    An embedded store whose documents all have text ``_id`` values is looked up and written by ``_id`` in
    sqlite (time proportional to the documents written, not to the store); one holding other ``_id`` values
    (copies of a key written by older versions) goes through montydb's queries.
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
    by_id = _string_keyed_sqlite(store)
    for attempt in range(5):
        found: dict[str, list[Any]] = {}
        if (attempt or not assume_new) and by_id is not None:
            found = {k: [k] for k in _existing_ids(by_id, list(rows))}
        elif attempt or not assume_new:
            for d in coll.find({key: {"$in": list(rows)}}, {key: 1}):
                found.setdefault(str(d[key]), []).append(d["_id"])
        new = [{**r, "_id": k} for k, r in rows.items() if k not in found]
        try:
            if new and by_id is not None:
                _insert_rows(coll, by_id, new)
            elif new:
                coll.insert_many(new, ordered=False)
        except duplicate:
            continue  # another writer added some of these keys: look again and replace them
        if by_id is not None and found:
            # by _id through montydb's storage layer: its query engine would decode every document per key
            coll._storage.update_many(coll, [{**rows[k], "_id": k} for k in found])
            return len(rows)
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
        round, formula, last_updated), created once per process and store. A collection that holds one id
        twice (written by an older version) gets a plain index on ``material_id``; an index the server
        refuses (a user without the right to create one) is left out; each with one log line."""
        if self.identity in _INDEXED:
            return
        coll = self.store._collection
        with self._reading("index"):
            existing = {spec[0] for ix in coll.index_information().values() for spec in ix["key"]}
            for name in INDEXED_FIELDS:
                if name in existing:
                    continue
                try:
                    coll.create_index(name, unique=name == KEY)
                except _duplicate_key_errors() + _backend_errors() as exc:
                    log.warning(
                        "store %s: no %sindex on %s (%s)", self.name, "unique " * (name == KEY), name, error_reason(exc)
                    )
                    if name == KEY:
                        with contextlib.suppress(*_backend_errors()):
                            coll.create_index(name)
        _INDEXED.add(self.identity)

    def ensure_journal(self) -> bool:
        """Give an embedded store its change journal if it has none (the store must be writable); whether it
        has one now. Other backends: False."""
        f = self.sqlite_file()
        if f is None:
            return False
        with self._reading("write to"):
            if not has_journal(f):
                with store_lock(f.parent.parent), contextlib.closing(_connect_sqlite(f)) as con, con:
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
        if not self._connected:
            try:
                self.store.connect()
            except CSPMLError:
                raise
            except Exception as exc:
                raise StoreError(f"cannot open template store {self.name}: {error_reason(exc)}") from None
            check_reachable(self.store, "template store")
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

    def sqlite_file(self) -> Path | None:
        """The sqlite file of an embedded MontyStore collection, if that is the backend."""
        st = self.store
        if isinstance(st, MontyStore) and st.storage == "sqlite":
            f = Path(st.database_path) / st.database_name / f"{st.collection_name}.collection"
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
        except (sqlite3.Error, OSError, ValueError, *_backend_errors()) as exc:
            if isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc) and self.sqlite_file():
                raise self._half_created() from None
            hint = " (damaged or not a store?)" if action == "read" and not is_mongo_server(self.store) else ""
            raise StoreError(f"cannot {action} template store {self.name}: {error_reason(exc)}{hint}") from None

    def count(self) -> int:
        """Number of documents (montydb decodes every document to count; sqlite is asked directly)."""
        f = self.sqlite_file()
        if f is not None:
            # read-write without create: closing it removes the -wal/-shm files a read-only one leaves
            with self._reading(), contextlib.closing(_connect_sqlite(f)) as con:
                return int(con.execute("SELECT COUNT(*) FROM documents").fetchone()[0])
        with self._reading():
            return self.store.count()

    def ids(self) -> set[str]:
        """Every document's ``material_id`` (an embedded store whose ``_id`` values are all text: read from
        its key index)."""
        with self._reading():
            f = _string_keyed_sqlite(self.store)
            if f is not None:
                with contextlib.closing(_connect_sqlite(f)) as con:
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
        with self._reading():
            for d in self.store.query(criteria or {}, properties=properties):
                d.pop("_id", None)
                TemplateStore.documents_read += 1
                yield d

    def get(self, material_id: str) -> TemplateDoc | None:
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

    def position(self) -> str:
        """How far the store's content has moved on, cheaply: text that changes whenever a document is
        written, with the document count in it (:func:`position_count`).

        An embedded store with its journal: ``journal|<journal id>|<last change>|<count>`` (two lookups); one
        without: ``sqlite|<count>|<digest of every row>``. A JSON file: ``json|<count>|<digest of the file>``.
        A MongoDB or memory store: ``stamp|<count>|<newest last_updated>``."""
        f = self.sqlite_file()
        if f is not None:
            with self._reading(), contextlib.closing(_connect_sqlite(f)) as con:
                found = _journal_position(con)
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
        kind = position.split("|", 1)[0]
        if f is not None:
            with self._reading(), contextlib.closing(_connect_sqlite(f)) as con:
                con.execute("BEGIN")  # one snapshot for the position and the changes
                try:
                    now = _journal_position(con)
                    if now is None or kind != "journal":
                        return now or self.fingerprint(), None
                    old, new = position.split("|"), now.split("|")
                    if old[1] != new[1] or int(old[2]) > int(new[2]):
                        return now, None
                    sql = f"SELECT DISTINCT k FROM {JOURNAL_TABLE} WHERE seq > ? AND seq <= ?"
                    keys = [decode_key(k) for (k,) in con.execute(sql, (int(old[2]), int(new[2])))]
                    if any(k is None for k in keys):
                        return now, None  # a document under a key that is not its id: compare them all
                    ids = {str(k) for k in keys}
                finally:
                    con.rollback()
            return now, ids
        now = self.position()
        if kind != "stamp" or not now.startswith("stamp|"):
            return now, None if now != position else set()
        newest = position.split("|", 2)[2]
        if not newest:
            return now, None
        with self._reading():
            ids = {str(d[KEY]) for d in self.store.query({"last_updated": {"$gt": newest}}, properties=[KEY])}
        return now, ids

    def rows(self, ids: Iterable[str] | None = None) -> Iterator[StoredRow]:
        """The stored documents (all, or those of ``ids`` that exist), each with a digest of what is stored;
        unordered. The embedded store is read straight from sqlite and decoded with pymongo's C BSON decoder
        (or as JSON text), only when :meth:`StoredRow.doc` is called."""
        f = self.sqlite_file()
        wanted = None if ids is None else sorted({str(i) for i in ids})
        if f is not None:
            with self._reading(), contextlib.closing(_connect_sqlite(f)) as con:
                con.text_factory = bytes
                if wanted is None:
                    batches: Iterable[list] = [[]]
                else:
                    batches = (wanted[s : s + 400] for s in range(0, len(wanted), 400))
                for batch in batches:
                    if wanted is None:
                        cur = con.execute("SELECT k, v FROM documents")
                    else:
                        keys = [k for mid in batch for k in encode_keys(mid)]
                        cur = con.execute(f"SELECT k, v FROM documents WHERE k IN ({','.join('?' * len(keys))})", keys)
                    for k, v in cur:
                        TemplateStore.documents_read += 1
                        mid = decode_key(k)
                        if mid is None:  # a key an older writer let the database choose: the id is inside
                            row = StoredRow("", digest64(v), raw=v)
                            row.id = str(row.doc().get(KEY))
                            yield row
                        else:
                            yield StoredRow(mid, digest64(v), raw=v)
            return
        if wanted is None:
            chunks: Iterable[dict] = [{}]
        else:
            chunks = ({KEY: {"$in": wanted[s : s + 1000]}} for s in range(0, len(wanted), 1000))
        with self._reading():
            for crit in chunks:
                for d in self.store.query(crit):
                    d.pop("_id", None)
                    TemplateStore.documents_read += 1
                    yield StoredRow(str(d.get(KEY)), doc_digest(d), doc=d)

    def fingerprint(self) -> str:
        """A digest of the store's content, which changes whenever any document changes.

        An embedded store with its journal: its :meth:`position`. One without: every stored document (key and
        encoded document), read from sqlite in one statement. A JSON file: the file's bytes. A MongoDB or
        memory store: every (``material_id``, ``last_updated``) pair, which every write through :meth:`add`
        of a :class:`TemplateDoc` renews."""
        st = self.store
        h = hashlib.sha1()
        f = self.sqlite_file()
        if f is not None:
            with self._reading(), contextlib.closing(_connect_sqlite(f)) as con:
                found = _journal_position(con)
            if found:
                return found
            with self._reading(), contextlib.closing(_connect_sqlite(f)) as con:
                con.text_factory = bytes
                n = 0
                for k, v in con.execute("SELECT k, v FROM documents ORDER BY k"):
                    for part in (k, v):
                        data = part.encode() if isinstance(part, str) else bytes(part)
                        h.update(len(data).to_bytes(8, "little") + data)
                    n += 1
            return f"sqlite|{n}|{h.hexdigest()}"
        if isinstance(st, AtomicJSONStore):
            with self._reading():
                return f"json|{st.content_digest()}"
        with self._reading():
            rows = st.query(properties=[KEY, "last_updated"])
            pairs = sorted((str(d.get(KEY)), str(d.get("last_updated"))) for d in rows)
        for pair in pairs:
            h.update(repr(pair).encode())
        return f"docs|{len(pairs)}|{h.hexdigest()}"
