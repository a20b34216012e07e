"""The operations behind the command line, as plain functions: import, train, predict, write results.

``cspml import | train | predict | demo`` call these and only print what they return, so a script or a
notebook gets exactly what the CLI does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cspml_flows.core.composition import parse_composition
from cspml_flows.core.config import check_output_path, data_dir, default_model_path, excerpt, home_dir
from cspml_flows.core.errors import CSPMLError, ModelError
from cspml_flows.learning.model import SimilarityModel, TrainingReport
from cspml_flows.predict.dedup import symmetrize, to_cif
from cspml_flows.predict.predictor import CSPPredictor, Prediction
from cspml_flows.templates import importers
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_uri import store_from_uri
from cspml_flows.training.ranker import fit_ranker

SOURCES = ("csv", "folder", "shared", "store", "mp")


def import_structures(
    source: str,
    paths: Sequence[str | Path] = (),
    store: str | Path | None = None,
    workers: int = 2,
    skip_invalid: bool = False,
    collection: str = "templates",
) -> tuple[list, int, str]:
    """Import structures into a template store (default: the embedded one).

    ``source``: ``csv`` (files with ``material_id`` + ``cif`` columns), ``folder`` (CIF/POSCAR files),
    ``shared`` (files of the benchmark data folder, relative to it), ``store`` (maggma store URIs) or ``mp``
    (Materials Project chemical systems). Returns the import reports, the store's document count and name.
    """
    if source not in SOURCES:
        raise CSPMLError(f"unknown import source {excerpt(source)}; choose one of {', '.join(SOURCES)}")
    ts = TemplateStore.open(store)
    try:
        if source == "csv":
            reports = [importers.import_csv(ts, p, workers=workers) for p in paths]
        elif source == "folder":
            reports = [importers.import_folder(ts, p, workers=workers, strict=not skip_invalid) for p in paths]
        elif source == "shared":
            root = data_dir()
            reports = [importers.import_csv(ts, root / f, source=str(f), workers=workers) for f in paths]
        elif source == "store":
            reports = [
                importers.import_store(ts, store_from_uri(p, collection=collection, create=False)) for p in paths
            ]
        else:
            reports = [importers.import_materials_project(ts, chemsys=[str(p) for p in paths] or None)]
        return reports, ts.count(), ts.name
    finally:
        ts.close()


@dataclass
class TrainResult:
    """What :func:`train_model` did."""

    path: Path
    report: TrainingReport
    n_templates: int
    n_clusters: int
    index_seconds: float
    ranker: dict[str, Any] | None = None  # the ranker's held-out report, or why there is none


def train_model(  # noqa: PLR0913 - the public training entry's keyword options
    store: str | Path | None = None,
    model: str | Path | None = None,
    workers: int = 2,
    seed: int = 0,
    max_iter: int = 150,
    check_labels: int = 200,
    index: TemplateIndex | None = None,
    ranker_queries: int = 2000,
    max_anchors: int = 20000,
    max_group: int = 5000,
) -> TrainResult:
    """Train the similarity model on a store (or an already built ``index``), then its second-stage ranker
    on ``ranker_queries`` held-out formulas of the same store (0: none; labels cached under the home), and
    save both to ``model`` (default ``$CSPML_HOME/models/cspml.json.gz``). ``max_anchors`` and ``max_group``
    bound the pair sampling on large pools (:meth:`SimilarityModel.train`)."""
    t = time.perf_counter()
    if index is None:
        index = TemplateIndex.open(store, workers=workers)
    index_seconds = time.perf_counter() - t
    sim, report = SimilarityModel.train(
        index, seed=seed, max_iter=max_iter, check_labels=check_labels, max_anchors=max_anchors, max_group=max_group
    )
    ranker_report: dict[str, Any] | None = None
    if ranker_queries:
        try:
            sim.ranker, ranker_report = fit_ranker(
                index, sim.std, n_queries=ranker_queries, seed=seed, workers=workers, cache_dir=home_dir() / "outcomes"
            )
        except ModelError as exc:
            ranker_report = {"skipped": str(exc)}
    path = sim.save(model or default_model_path())
    return TrainResult(path, report, len(index), len(set(index.cluster.tolist())), index_seconds, ranker_report)


def predict(
    compositions: Sequence[str],
    top: int = 5,
    store: str | Path | None = None,
    model: str | Path | None = None,
    workers: int = 2,
    strict: bool = False,
    freeze: bool = False,
) -> list[Prediction]:
    """Ranked structures for each composition with the store's templates and the model.

    See :func:`cspml_flows.core.config.model_path` for the default model. ``freeze``: for a caller that owns
    its process, :func:`~cspml_flows.predict.predictor.freeze_gc` once the store and model are loaded.
    """
    comps = [parse_composition(c) for c in compositions]  # bad formulas fail before any loading
    predictor = CSPPredictor.from_paths(store, model, workers=workers, freeze=freeze)
    return predictor.predict(comps, top=top, strict=strict)


def prediction_summary(predictions: Sequence[Prediction], out: str | Path | None = None) -> list[dict[str, Any]]:
    """One JSON-ready entry per prediction (candidates with space group); with ``out``, also a symmetrised
    CIF per candidate and ``predictions.json`` in that folder. The folder is checked before anything is
    written, so an unusable ``out`` fails before the work is lost to a half-written folder (callers that compute
    the predictions check it first too, with :func:`cspml_flows.core.config.check_output_path`)."""
    folder = Path(out) if out else None
    if folder is not None:
        check_output_path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CSPMLError(f"cannot create output folder {folder}: {exc.strerror}") from None
    summary = []
    for p in predictions:
        entry: dict[str, Any] = {**p.model_dump(exclude={"candidates"}), "candidates": []}
        for c in p.candidates:
            sym, number, symbol = symmetrize(c.structure)
            row = c.summary() | {"spacegroup": number, "spacegroup_symbol": symbol}
            if folder is not None:
                f = folder / f"{p.formula}_{c.rank:02d}_{symbol.replace('/', '_')}.cif"
                f.write_text(to_cif(sym))
                row["cif"] = str(f)
            entry["candidates"].append(row)
        summary.append(entry)
    if folder is not None:
        (folder / "predictions.json").write_text(json.dumps(summary, indent=2))
    return summary
