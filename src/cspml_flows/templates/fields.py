"""Emulated field indexes of an embedded template store (montydb on sqlite has none: every query decodes every
document).

A table ``cspml_fields2(k, material_id, formula, source, round, last_updated, chemsys, plain)`` in the
collection's sqlite file holds the fields campaign rounds, builders and hull references query, one row per
document, with sqlite indexes; ``cspml_fields2_pos`` records the journal position
(:mod:`cspml_flows.templates.store`) it reflects. Before a query the table is brought up to date from the
journal: only the documents written since are decoded (all of them once, when the table is new or the
journal was replaced). A query whose criteria, projection and
sort this module can express (:func:`plan`) is answered by sqlite through the table; others go to montydb.

``plain`` is 0 for a document whose fields have types other than text (``round``: a whole number) or null:
while one exists, queries go to montydb, whose comparison rules across types are MongoDB's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

FIELDS_TABLE = "cspml_fields2"
POS_TABLE = "cspml_fields2_pos"
OLD_TABLES = ("cspml_fields", "cspml_fields_pos")  # an earlier layout, dropped when the table is made
COLUMNS = ("material_id", "formula", "source", "round", "last_updated", "chemsys")
_TEXT = {"material_id", "formula", "source", "last_updated", "chemsys"}
_OPS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


@dataclass
class Plan:
    """A query as SQL over the field table joined to the documents."""

    where: str
    args: list[Any]
    order: str
    skip: int
    limit: int
    keep: set[str] | None  # top-level fields a projection keeps (None: the whole document)


def _value_ok(column: str, value: Any) -> bool:
    if column in _TEXT:
        return isinstance(value, str)
    return isinstance(value, int | float) and not isinstance(value, bool)


def plan(criteria: dict | None, properties: Any, sort: Any, skip: int, limit: int) -> Plan | None:
    """The SQL form of a maggma query on the indexed fields (equality, ``$in``, ``$ne``, ``$gt``/``$gte``/
    ``$lt``/``$lte``, each field at most once; a sort on one indexed field; an inclusion projection of
    top-level fields), or None when the query needs montydb."""
    clauses, args = [], []
    for field, cond in (criteria or {}).items():
        if field not in COLUMNS:
            return None
        ops = cond if isinstance(cond, dict) and cond and all(str(k).startswith("$") for k in cond) else {"$eq": cond}
        for op, value in ops.items():
            found = _clause(field, op, value)
            if found is None:
                return None
            clauses.append(found[0])
            args.extend(found[1])
    order = _order(sort)
    keep = _keep(properties)
    if order is None or keep is False:
        return None
    if not isinstance(skip, int) or not isinstance(limit, int) or skip < 0 or limit < 0:
        return None
    return Plan(" AND ".join(clauses) or "1", args, order, skip, limit, keep)


def _clause(field: str, op: str, value: Any) -> tuple[str, list[Any]] | None:
    """The SQL condition and arguments of one operator on an indexed field, or None when SQL cannot say it."""
    col = f"f.{field}"
    if op == "$in":
        return _in_clause(field, value)
    if value is None and op in ("$eq", "$ne"):
        return f"{col} IS {'NOT ' if op == '$ne' else ''}NULL", []
    if not _value_ok(field, value):
        return None
    sql = {"$eq": f"{col} = ?", "$ne": f"({col} IS NULL OR {col} != ?)"}.get(op)
    if sql is None and op in _OPS:
        sql = f"{col} {_OPS[op]} ?"
    return None if sql is None else (sql, [value])


def _in_clause(field: str, value: Any) -> tuple[str, list[Any]] | None:
    """The SQL condition and arguments of ``$in`` (null among the values: the field is null or missing)."""
    if not isinstance(value, list | tuple | set):
        return None
    col = f"f.{field}"
    values = [v for v in value if v is not None]
    if not all(_value_ok(field, v) for v in values):
        return None
    parts = [f"{col} IN ({','.join('?' * len(values))})"] if values else []
    parts += [f"{col} IS NULL"] if len(values) < len(value) else []
    return (f"({' OR '.join(parts)})" if parts else "0"), values


def _order(sort: Any) -> str | None:
    """The ORDER BY of a sort on one indexed field (storage order after it), or None when SQL cannot say it."""
    if not sort:
        return "d.rowid"
    items = list(sort.items()) if isinstance(sort, dict) else None
    if not items or len(items) != 1 or items[0][0] not in COLUMNS:
        return None
    direction = getattr(items[0][1], "value", items[0][1])
    if direction not in (1, -1):
        return None
    return f"f.{items[0][0]} {'ASC' if direction == 1 else 'DESC'}, d.rowid"


def _keep(properties: Any) -> set[str] | bool | None:
    """The top-level fields an inclusion projection keeps (None: the whole document), or False for a
    projection SQL cannot apply (nested fields, operators, exclusions)."""
    if not properties:
        return None
    spec = {p: 1 for p in properties} if isinstance(properties, list | tuple) else properties
    if not isinstance(spec, dict) or any("." in str(k) or k.startswith("$") for k in spec):
        return False
    if any(not v for k, v in spec.items() if k != "_id"):
        return False  # an exclusion projection
    keep = {k for k, v in spec.items() if v}
    if spec.get("_id", 1):
        keep.add("_id")
    return keep


def _fields(doc: dict) -> tuple[Any, ...]:
    """The indexed fields of a decoded document and whether all have their plain types."""
    values = []
    plain = 1
    for name in COLUMNS:
        v = doc.get(name)
        if isinstance(v, datetime) or (v is not None and not _value_ok(name, v)):
            plain = 0
            v = None if isinstance(v, dict | list) else str(v)
        values.append(v)
    return (*values, plain)


def refresh(
    con: sqlite3.Connection,
    journal: tuple[str, int] | None,
    changed: Callable[[int, int], list[bytes]],
    decode: Callable[[bytes], dict],
) -> bool:
    """Bring the field table up to date with the journal position ``journal`` (id, last change); returns
    whether it can answer queries. ``changed(since, upto)``: the keys written in between; ``decode``: the
    top-level fields of a stored document. Runs in one write transaction (the caller's connection, left
    without one)."""
    if journal is None:
        return False
    con.execute("BEGIN IMMEDIATE")
    try:
        for old in OLD_TABLES:
            con.execute(f"DROP TABLE IF EXISTS {old}")
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {FIELDS_TABLE}(k BLOB PRIMARY KEY, material_id TEXT, formula TEXT, "
            "source TEXT, round, last_updated TEXT, chemsys TEXT, plain INTEGER NOT NULL)"
        )
        for name in COLUMNS[1:]:
            con.execute(f"CREATE INDEX IF NOT EXISTS {FIELDS_TABLE}_{name} ON {FIELDS_TABLE}({name})")
        con.execute(f"CREATE TABLE IF NOT EXISTS {POS_TABLE}(jid TEXT NOT NULL, seq INTEGER NOT NULL)")
        row = con.execute(f"SELECT jid, seq FROM {POS_TABLE}").fetchone()
        jid, seq = journal
        insert = f"INSERT OR REPLACE INTO {FIELDS_TABLE} VALUES ({', '.join('?' * (len(COLUMNS) + 2))})"
        if row is None or row[0] != jid or row[1] > seq:
            con.execute(f"DELETE FROM {FIELDS_TABLE}")
            for k, v in con.cursor().execute("SELECT k, v FROM documents"):
                con.execute(insert, (k, *_fields(decode(v))))
        elif row[1] < seq:
            for k in changed(row[1], seq):
                found = con.execute("SELECT v FROM documents WHERE k = ?", (k,)).fetchone()
                if found is None:
                    con.execute(f"DELETE FROM {FIELDS_TABLE} WHERE k = ?", (k,))
                else:
                    con.execute(insert, (k, *_fields(decode(found[0]))))
        con.execute(f"DELETE FROM {POS_TABLE}")
        con.execute(f"INSERT INTO {POS_TABLE} VALUES (?, ?)", (jid, seq))
        con.execute("COMMIT")
    except BaseException:  # an interrupted refresh leaves the table as it was; the error goes on
        con.execute("ROLLBACK")
        raise
    return con.execute(f"SELECT 1 FROM {FIELDS_TABLE} WHERE plain = 0 LIMIT 1").fetchone() is None


def run(con: sqlite3.Connection, p: Plan, decode: Callable[[bytes], dict]) -> list[dict]:
    """The documents of a plan, decoded, in montydb's order (the sort, then storage order): the matching keys
    from the field table first (it drives the join: CROSS JOIN), then each document by its key."""
    sql = (
        f"SELECT d.k FROM {FIELDS_TABLE} f CROSS JOIN documents d ON d.k = f.k WHERE {p.where} ORDER BY {p.order}"
        f" LIMIT {p.limit if p.limit else -1} OFFSET {p.skip}"
    )
    out = []
    for (k,) in con.execute(sql, p.args).fetchall():
        found = con.execute("SELECT v FROM documents WHERE k = ?", (k,)).fetchone()
        if found is None:
            continue  # removed since
        doc = decode(found[0])
        out.append(doc if p.keep is None else {name: x for name, x in doc.items() if name in p.keep})
    return out
