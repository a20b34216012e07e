"""The collection file of an embedded store (montydb on sqlite): its document table, keys and change journal.

The embedded template store keeps a change journal: a table ``cspml_changes(seq, k, op)`` in the collection's
sqlite file that triggers on the document table fill with every insert, update and delete, in the same
transaction as the write, whoever writes (this package, maggma, jobflow). A store gets its journal when it is
created or next opened for writing (:func:`install_journal`); the position of a store without one is a
digest of its content.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from maggma.core import Store
from maggma.stores import MontyStore
from montydb.storage.sqlite import CREATE_TABLE, SQLITE_RECORD_TABLE
from montydb.types import bson as monty_bson

from cspml_flows.core.safeio import current_umask

BUSY_TIMEOUT_MS = 30_000  # how long a write to the embedded store waits for another writer's lock
JOURNAL_TABLE = "cspml_changes"  # (seq, k, op): one row per write of a document of an embedded template store
JOURNAL_ID_TABLE = "cspml_journal"  # one row: the journal's random id (a recreated collection gets another)
JOURNAL_TRIGGERS = ("cspml_journal_insert", "cspml_journal_update", "cspml_journal_delete")
KEY_BATCH = 400  # keys per ``IN (...)`` lookup (two encodings each, under sqlite's variable limit)


def collection_file(path: Path, database: str, collection: str) -> Path:
    """The sqlite file montydb keeps a collection of an embedded store in."""
    return path / database / f"{collection}.collection"


def connect_sqlite(f: Path) -> sqlite3.Connection:
    """A connection to an existing sqlite file (read-write, never creating it) that waits for other writers."""
    return sqlite3.connect(f"file:{f}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)


def has_table(f: Path) -> bool:
    """Whether the sqlite file ``f`` holds montydb's document table (sqlite3.Error: not an sqlite file)."""
    with contextlib.closing(connect_sqlite(f)) as con:
        sql = "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?"
        return con.execute(sql, (SQLITE_RECORD_TABLE,)).fetchone() is not None


def create_table_sql(if_not_exists: bool = False) -> str:
    """montydb's statement that creates its document table."""
    sql = CREATE_TABLE.format(SQLITE_RECORD_TABLE)
    return sql.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1) if if_not_exists else sql


def create_collection_file(coll: Path, journal: bool = False) -> None:
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
                con.execute(create_table_sql())
                if journal:
                    install_journal(con)
        # closing the only connection checkpointed the journal into the file and removed it
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, coll)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


# ---------------------------------------------------------------- the change journal


def has_journal(f: Path) -> bool:
    """Whether the collection file ``f`` holds the change journal with its three triggers."""
    with contextlib.closing(connect_sqlite(f)) as con:
        return journal_present(con)


def journal_present(con: sqlite3.Connection) -> bool:
    """Whether the collection of the connection holds the change journal with its three triggers."""
    names = (JOURNAL_TABLE, JOURNAL_ID_TABLE, *JOURNAL_TRIGGERS)
    sql = f"SELECT COUNT(*) FROM sqlite_master WHERE name IN ({','.join('?' * len(names))})"
    return con.execute(sql, names).fetchone()[0] == len(names)


def install_journal(con: sqlite3.Connection) -> None:
    """Create the change journal of an embedded template collection (in the caller's transaction): the table
    ``cspml_changes(seq, k, op)``, a random journal id, and triggers that append every insert ('i'), update
    ('u') and delete ('d') of a document row to it."""
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


def journal_position(con: sqlite3.Connection) -> str | None:
    """``journal|<id>|<last seq>|<count>`` of a collection with its journal, else None."""
    if not journal_present(con):
        return None
    (jid,) = con.execute(f"SELECT id FROM {JOURNAL_ID_TABLE} LIMIT 1").fetchone() or ("",)
    (seq,) = con.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {JOURNAL_TABLE}").fetchone()
    (n,) = con.execute("SELECT COUNT(*) FROM documents").fetchone()
    return f"journal|{jid}|{int(seq)}|{int(n)}"


def journal_keys(con: sqlite3.Connection, since: int, upto: int) -> list[bytes]:
    """The stored keys the journal records as written after change ``since`` up to change ``upto``."""
    sql = f"SELECT DISTINCT k FROM {JOURNAL_TABLE} WHERE seq > ? AND seq <= ?"
    return [k for (k,) in con.execute(sql, (since, upto)).fetchall()]


# ---------------------------------------------------------------- document keys


def decode_key(k: bytes | str) -> str | None:
    """The ``_id`` text of a document key as montydb stores it: a BSON string element (pymongo's BSON) or a
    JSON string (montydb's own encoding); None for a key that is not text (an ObjectId an older writer let
    the database choose)."""
    raw = k.encode() if isinstance(k, str) else bytes(k)
    if raw[:1] == b"\x02" and len(raw) >= 6 and int.from_bytes(raw[1:5], "little") == len(raw) - 5:
        return raw[5:-1].decode()
    if raw[:1] == b'"':
        try:
            value = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return None
        return value if isinstance(value, str) else None
    return None


def encode_keys(mid: str) -> tuple[bytes, bytes]:
    """The two forms montydb may store the key ``mid`` in (:func:`decode_key`)."""
    data = mid.encode()
    return b"\x02" + (len(data) + 1).to_bytes(4, "little") + data + b"\x00", json.dumps(mid).encode()


def keys_in(ids: list[str]) -> tuple[str, list[bytes]]:
    """The ``IN (...)`` placeholders and arguments that find the documents of ``ids`` by their stored key."""
    keys = [k for mid in ids for k in encode_keys(mid)]
    return ",".join("?" * len(keys)), keys


def string_keyed_sqlite(store: Store) -> Path | None:
    """The sqlite file of an embedded store in which every document's ``_id`` is text (as
    :func:`~cspml_flows.templates.store_write.upsert` writes them), else None: there a key's document is found
    by its ``_id`` alone."""
    if not (isinstance(store, MontyStore) and store.storage == "sqlite"):
        return None
    f = collection_file(Path(store.database_path), store.database_name, store.collection_name)
    if not f.is_file():
        return None
    with contextlib.closing(connect_sqlite(f)) as con:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='documents'").fetchone():
            return None
        other = "SELECT 1 FROM documents WHERE substr(k, 1, 1) NOT IN (x'02', x'22') LIMIT 1"
        return None if con.execute(other).fetchone() else f


def existing_ids(f: Path, ids: list[str]) -> set[str]:
    """Which of ``ids`` are document ``_id`` values of the embedded collection file ``f`` (by its key index)."""
    found: set[str] = set()
    with contextlib.closing(connect_sqlite(f)) as con:
        for s in range(0, len(ids), KEY_BATCH):
            marks, keys = keys_in(ids[s : s + KEY_BATCH])
            found.update(
                str(decode_key(k)) for (k,) in con.execute(f"SELECT k FROM documents WHERE k IN ({marks})", keys)
            )
    return found


def insert_rows(coll: Any, f: Path, docs: list[dict[str, Any]]) -> None:
    """Insert new documents into the embedded collection file ``f`` in one transaction, encoded as montydb
    encodes them (montydb's own bulk insert compares each new key with a list of every stored key); a key
    stored already fails the whole insert (sqlite3.IntegrityError)."""
    rows = [(monty_bson.id_encode(d["_id"]), coll._storage._encode_doc(coll, d, True)) for d in docs]
    with contextlib.closing(connect_sqlite(f)) as con, con:
        con.executemany("INSERT INTO documents(k, v) VALUES (?, ?)", rows)
