"""Stored template documents as rows: a 64-bit digest of what is stored, the document decoded on first use."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import bson
import orjson


def digest64(data: bytes) -> int:
    """A 64-bit digest of ``data`` (blake2b), as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def doc_digest(doc: dict[str, Any]) -> int:
    """:func:`digest64` of a decoded document (keys sorted, ``_id`` left out, dates as text)."""
    body = {k: v for k, v in doc.items() if k != "_id"}
    return digest64(orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str))


def decode_value(v: bytes) -> dict[str, Any]:
    """A document row of an embedded store: BSON (pymongo's C decoder) or JSON text; a ``{"$date": ms}``
    date of the JSON form becomes ISO text."""
    raw = bytes(v)
    if len(raw) >= 5 and int.from_bytes(raw[:4], "little") == len(raw) and raw[-1:] == b"\x00":
        return bson.decode(raw)
    doc = orjson.loads(raw)
    stamp = doc.get("last_updated") if isinstance(doc, dict) else None
    if isinstance(stamp, dict) and isinstance(stamp.get("$date"), int | float):
        doc["last_updated"] = datetime.fromtimestamp(stamp["$date"] / 1000, UTC).isoformat()
    return doc


class StoredRow:
    """One stored template document: its id, a 64-bit digest of what is stored, and the document (decoded on
    first use)."""

    __slots__ = ("_doc", "_raw", "digest", "id")

    def __init__(self, mid: str, digest: int, raw: bytes | None = None, doc: dict[str, Any] | None = None):
        self.id, self.digest, self._raw, self._doc = mid, digest, raw, doc

    def doc(self) -> dict[str, Any]:
        """The document, without its ``_id``."""
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
