"""The exceptions of the store backends (pymongo, montydb, mongomock, sqlite) and one-line reasons for them."""

from __future__ import annotations

import contextlib
import importlib
import re
import sqlite3


def error_reason(exc: BaseException) -> str:
    """One line saying why a backend call failed (pymongo's topology description and timeout settings left
    out)."""
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    reason = reason.split(", Timeout:", 1)[0]
    return re.sub(r" \(configured timeouts: [^)]*\)", "", reason)


def duplicate_key_errors() -> tuple[type[BaseException], ...]:
    """Exceptions the backends raise when an insert meets an existing ``_id``."""
    found: list[type[BaseException]] = [sqlite3.IntegrityError]
    for module in ("pymongo.errors", "mongomock", "mongomock_ng", "montydb.errors"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in ("DuplicateKeyError", "BulkWriteError") if hasattr(mod, n)]
    return tuple(found)


def backend_errors() -> tuple[type[BaseException], ...]:
    """The base exception classes of the database clients (pymongo, montydb, bson)."""
    found: list[type[BaseException]] = []
    for module, name in (("pymongo.errors", "PyMongoError"), ("montydb.errors", "MontyError"), ("bson", "InvalidBSON")):
        with contextlib.suppress(ImportError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)
