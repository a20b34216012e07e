"""The one write of documents to any store: an upsert on the document key.

A document's ``_id`` is its key, so two processes writing the same key at once leave one document, not two.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from maggma.core import Store

from cspml_flows.core.errors import StoreError
from cspml_flows.templates.store_errors import duplicate_key_errors
from cspml_flows.templates.store_mongo import redact_uri
from cspml_flows.templates.store_sqlite import existing_ids, insert_rows, string_keyed_sqlite

ATTEMPTS = 5  # inserts retried as replacements when other writers keep adding the same keys


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
    rows = _rows_by_key(docs, key)
    if not rows:
        return 0
    coll = store._collection
    duplicate = duplicate_key_errors()
    by_id = string_keyed_sqlite(store)
    for attempt in range(ATTEMPTS):
        found = _stored_ids(coll, by_id, rows, key) if attempt or not assume_new else {}
        new = [{**r, "_id": k} for k, r in rows.items() if k not in found]
        try:
            if new and by_id is not None:
                insert_rows(coll, by_id, new)
            elif new:
                coll.insert_many(new, ordered=False)
        except duplicate:
            continue  # another writer added some of these keys: look again and replace them
        _replace(coll, by_id, rows, found)
        return len(rows)
    raise StoreError(f"store {redact_uri(str(store.name))}: writes of the same keys keep colliding; try again")


def _rows_by_key(docs: Iterable[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """The documents without their ``_id``, by their key as text (a key given twice: the last one wins)."""
    rows: dict[str, dict[str, Any]] = {}
    for d in docs:
        row = {k: v for k, v in dict(d).items() if k != "_id"}  # an id from another store must not clash
        if row.get(key) is None:
            raise StoreError(f"document without '{key}' (fields: {', '.join(map(str, row))})")
        row[key] = str(row[key])
        rows[row[key]] = row
    return rows


def _stored_ids(coll: Any, by_id: Path | None, rows: dict[str, dict], key: str) -> dict[str, list[Any]]:
    """The ``_id`` values stored under each key of ``rows`` that the store holds."""
    if by_id is not None:
        return {k: [k] for k in existing_ids(by_id, list(rows))}
    found: dict[str, list[Any]] = {}
    for d in coll.find({key: {"$in": list(rows)}}, {key: 1}):
        found.setdefault(str(d[key]), []).append(d["_id"])
    return found


def _replace(coll: Any, by_id: Path | None, rows: dict[str, dict], found: dict[str, list[Any]]) -> None:
    """Replace the stored documents of the keys in ``found`` with ``rows``; other copies of a key are removed."""
    if by_id is not None and found:
        # by _id through montydb's storage layer: its query engine would decode every document per key
        coll._storage.update_many(coll, [{**rows[k], "_id": k} for k in found])
        return
    for k, ids in found.items():
        keep = k if k in ids else ids[0]
        coll.replace_one({"_id": keep}, rows[k])
        extra = [i for i in ids if i != keep]
        if extra:
            coll.delete_many({"_id": {"$in": extra}})
