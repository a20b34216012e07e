"""Importers that turn user data into template documents in a :class:`TemplateStore`.

Sources: a CDVAE/Materials-Project-style CSV with a ``cif`` column, a folder of CIF/POSCAR files, another
maggma Store with ``structure`` documents, and the Materials Project API (optional ``mp-api`` extra).
Imports are resumable: documents whose ``material_id`` is already in the store are skipped, and work is
written in batches so an interrupted import keeps what it finished. Writes are upserts on ``material_id``,
so two imports of the same data at once store each id once.

A file's id is its name stem plus a digest of its bytes (``POSCAR-3fa9c2d41e07``,
:func:`~cspml_flows.templates.readers.file_id`): unique and stable, so ``run1/POSCAR`` and ``run2/POSCAR`` are
both kept and re-importing the same file is skipped. Structures that cannot be templates (partial occupancies,
too many sites, a POSCAR whose atom counts do not match its coordinates) are refused with the reason
(:func:`cspml_flows.templates.schema.check_template_structure`).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pymatgen.core import Structure

from cspml_flows.core.config import max_template_atoms
from cspml_flows.core.errors import CSPMLError
from cspml_flows.core.progress import bar
from cspml_flows.core.prototype import preload_label_data
from cspml_flows.templates.readers import file_id, read_template_file, structure_files, structure_from_cif_string
from cspml_flows.templates.schema import TemplateDoc, template_doc_from_structure
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_mongo import redact_uri

# CSV column -> TemplateDoc field (the shared MP-20 and MPTS-52 files use both spellings)
_PROPERTY_COLUMNS = {
    "e_above_hull": "e_above_hull",
    "energy_above_hull": "e_above_hull",
    "formation_energy_per_atom": "formation_energy_per_atom",
    "energy_per_atom": "energy_per_atom",
}


@dataclass
class ImportReport:
    """What an import did."""

    source: str
    added: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def all_failed(self) -> bool:
        """Whether the source had structures and every one of them was refused."""
        return bool(self.failed) and not self.added and not self.skipped_existing

    def summary(self) -> str:
        """One line: added, already present, unreadable."""
        msg = f"{self.source}: {self.added} added, {self.skipped_existing} already present"
        return msg + (f", {len(self.failed)} unreadable" if self.failed else "")


def doc_from_csv_row(args: tuple[str, str, str, dict[str, Any], int]) -> dict | tuple[str, str]:
    """The template document of a CSV row (id, CIF, source, properties, site limit), or (id, why not)."""
    material_id, cif, source, props, max_atoms = args
    try:
        s = structure_from_cif_string(cif, material_id)
        doc = template_doc_from_structure(s, material_id, source=source, max_atoms=max_atoms, **props)
        return doc.model_dump(mode="json")
    except Exception as exc:  # any failure of one structure (parser, spglib) is reported with it; the import goes on
        return (material_id, str(exc))


def doc_from_file(args: tuple[str, str, str, int]) -> dict | tuple[str, str]:
    """The template document of a structure file (id, path, source, site limit), or (id, why not)."""
    material_id, path, source, max_atoms = args
    try:
        s = read_template_file(path, max_atoms)
        return template_doc_from_structure(s, material_id, source=source, max_atoms=max_atoms).model_dump(mode="json")
    except Exception as exc:  # any failure of one structure (parser, spglib) is reported with it; the import goes on
        return (material_id, str(exc))


def _run_batches(
    store: TemplateStore,
    tasks: Sequence[tuple],
    worker: Callable[[Any], dict | tuple[str, str]],
    report: ImportReport,
    workers: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> ImportReport:
    existing = store.ids()
    todo, seen = [], set()
    for t in tasks:
        if t[0] in existing:
            report.skipped_existing += 1
        elif t[0] in seen:  # store.add(assume_new=True) would write both copies
            report.failed.append((t[0], f"duplicate id {t[0]!r} in the input; only the first is imported"))
        else:
            seen.add(t[0])
            todo.append(t)
    batch_size = max(1, batch_size)
    workers = max(1, min(workers, os.cpu_count() or 1))
    pool = None
    if workers > 1 and len(todo) > 50:
        preload_label_data()  # forked workers inherit it instead of each importing it
        pool = ProcessPoolExecutor(max_workers=workers)
    try:
        with bar(len(todo), f"import {Path(report.source).name}", unit="structure") as shown:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                results = []
                mapped = pool.map(worker, chunk, chunksize=16) if pool else map(worker, chunk)
                for r in mapped:
                    results.append(r)
                    shown.update(1)
                docs = [r for r in results if isinstance(r, dict)]
                report.failed.extend(r for r in results if not isinstance(r, dict))
                report.added += store.add(docs, assume_new=True)
                if progress:
                    progress(min(start + batch_size, len(todo)), len(todo))
    finally:
        if pool:
            pool.shutdown()
    return report


def import_csv(
    store: TemplateStore,
    path: str | Path,
    source: str | None = None,
    id_column: str = "material_id",
    cif_column: str = "cif",
    exclude_ids: Iterable[str] = (),
    workers: int = 2,
    batch_size: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import a CSV (optionally gzipped) with an id column and a CIF column."""
    p = Path(path)
    if not p.is_file():
        raise CSPMLError(f"CSV file not found: {p}")
    try:
        df = pd.read_csv(p, dtype={id_column: str})  # ids stay text ('0123' or ids in a column with gaps)
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # unreadable, not CSV, a damaged gzip
        raise CSPMLError(f"cannot read CSV {p}: {exc}") from None
    for col in (id_column, cif_column):
        if col not in df.columns:
            raise CSPMLError(f"CSV {p} has no '{col}' column (columns: {', '.join(map(str, df.columns))})")
    if source is None:
        source = p.name.split(".")[0]
    excluded = {str(i) for i in exclude_ids}
    max_atoms = max_template_atoms()
    prop_cols = {c: f for c, f in _PROPERTY_COLUMNS.items() if c in df.columns}
    tasks = []
    report = ImportReport(source=str(p))
    for i, row in enumerate(df.to_dict("records")):
        if pd.isna(row[id_column]):
            report.failed.append((f"row {i}", f"no {id_column}"))
            continue
        mid = str(row[id_column])
        if mid in excluded:
            continue
        props = {f: (None if pd.isna(row[c]) else float(row[c])) for c, f in prop_cols.items()}
        tasks.append((mid, row[cif_column], str(source), props, max_atoms))
    return _run_batches(store, tasks, doc_from_csv_row, report, workers, batch_size, progress)


def import_folder(
    store: TemplateStore,
    folder: str | Path,
    source: str | None = None,
    id_prefix: str = "",
    strict: bool = True,
    workers: int = 2,
    batch_size: int = 1000,
) -> ImportReport:
    """Import every CIF/POSCAR file of a folder; the id is :func:`file_id` (name stem and content digest).

    With ``strict`` a broken or refused file stops the import before anything is written, naming the file.
    """
    files = structure_files(folder)
    source = source or f"folder:{Path(folder).name}"
    max_atoms = max_template_atoms()
    tasks = [(file_id(f, id_prefix), str(f), source, max_atoms) for f in files]
    if strict:
        for _, path, _, _ in tasks:
            read_template_file(path, max_atoms)
    report = ImportReport(source=str(folder))
    return _run_batches(store, tasks, doc_from_file, report, workers, batch_size, None)


def template_doc_from_mapping(doc: dict[str, Any], source: str, max_atoms: int | None = None) -> TemplateDoc:
    """Convert a document with a ``structure`` (dict or Structure) and MP-style property names."""
    raw = doc.get("structure")
    if raw is None:
        raise CSPMLError(f"document {doc.get('material_id', doc.get('task_id', '?'))} has no 'structure'")
    s = raw if isinstance(raw, Structure) else Structure.from_dict(raw)
    mid = doc.get("material_id") or doc.get("task_id")
    if mid is None:
        raise CSPMLError("document has neither 'material_id' nor 'task_id'")
    props = {
        "e_above_hull": doc.get("energy_above_hull", doc.get("e_above_hull")),
        "formation_energy_per_atom": doc.get("formation_energy_per_atom"),
        "energy_per_atom": doc.get("energy_per_atom", doc.get("uncorrected_energy_per_atom")),
    }
    return template_doc_from_structure(s, str(mid), source=source, max_atoms=max_atoms, **props)


def import_store(
    store: TemplateStore, other: Any, criteria: dict | None = None, source: str | None = None
) -> ImportReport:
    """Copy structures from another maggma Store (documents with ``structure`` and an id)."""
    other.connect()
    report = ImportReport(source=redact_uri(str(other.name)))
    max_atoms = max_template_atoms()
    existing = store.ids()
    batch: list[TemplateDoc] = []
    for d in other.query(criteria or {}):
        mid = str(d.get("material_id") or d.get("task_id"))
        if mid in existing:
            report.skipped_existing += 1
            continue
        existing.add(mid)  # the same id twice in the other store is imported once
        try:
            batch.append(template_doc_from_mapping(d, source or report.source, max_atoms))
        except Exception as exc:  # any failure of one document is reported with it; the import goes on
            report.failed.append((mid, str(exc)))
        if len(batch) >= 1000:
            report.added += store.add(batch)
            batch = []
    report.added += store.add(batch)
    return report


MP_FIELDS = ["material_id", "structure", "energy_above_hull", "formation_energy_per_atom", "energy_per_atom"]


def import_materials_project(
    store: TemplateStore,
    chemsys: str | list[str] | None = None,
    formula: str | list[str] | None = None,
    api_key: str | None = None,
    max_e_above_hull: float | None = 0.1,
    rester: Any = None,
) -> ImportReport:
    """Import structures from the Materials Project API (needs the ``mp`` extra and an API key).

    ``rester`` may be an existing ``mp_api.client.MPRester`` (or any object with the same
    ``materials.summary.search``), which is how tests exercise this path offline.
    """
    if rester is None:
        try:
            from mp_api.client import MPRester
        except ImportError:
            msg = "the Materials Project importer needs mp-api: pip install 'cspml-flows[mp]'"
            raise CSPMLError(msg) from None
        rester = MPRester(api_key) if api_key else MPRester()
    kwargs: dict[str, Any] = {"fields": MP_FIELDS}
    if chemsys:
        kwargs["chemsys"] = chemsys
    if formula:
        kwargs["formula"] = formula
    if max_e_above_hull is not None:
        kwargs["energy_above_hull"] = (0, max_e_above_hull)
    results = rester.materials.summary.search(**kwargs)
    report = ImportReport(source="materials-project")
    max_atoms = max_template_atoms()
    docs = []
    existing = store.ids()
    for r in results:
        d = r.model_dump() if hasattr(r, "model_dump") else dict(r)
        if str(d.get("material_id")) in existing:
            report.skipped_existing += 1
            continue
        existing.add(str(d.get("material_id")))
        try:
            docs.append(template_doc_from_mapping(d, "materials-project", max_atoms))
        except Exception as exc:  # any failure of one document is reported with it; the import goes on
            report.failed.append((str(d.get("material_id")), str(exc)))
    report.added += store.add(docs)
    return report
