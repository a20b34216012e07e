"""The query sets of the energy experiment (:mod:`benchmarks.energy`): the engine's top candidates of a
protocol sample, and of held-out pool formulas from the ranker's outcome cache, each scored against the
known structure."""

from __future__ import annotations

import gzip
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Composition

from benchmarks.energy_blend import QuerySet
from benchmarks.energy_config import EnergyConfig
from benchmarks.protocols import load_queries, query_structures
from benchmarks.scoring import rms_table
from cspml_flows.core.composition import MAX_ASSIGNMENTS, roles
from cspml_flows.core.config import home_dir
from cspml_flows.core.errors import ConfigError
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.learning.ranker import CANDIDATES, CandidateRanker, candidate_features
from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.outcomes import Outcomes, outcome_key

logger = logging.getLogger(__name__)


def default_model(index: TemplateIndex, protocol: str) -> Path:
    """The cached benchmark model with a ranker of this pool (``python -m benchmarks csp`` trains it)."""
    folder = home_dir() / "benchmark"
    path = folder / f"model-v3-{protocol}-standard-{training_hash(index)}-ranker2000.json.gz"
    if not path.is_file():
        found = sorted(folder.glob(f"model-v3-{protocol}-standard-*-ranker*.json.gz"))
        if len(found) != 1:
            raise ConfigError(
                f"no benchmark model with a ranker at {path}: run `python -m benchmarks csp --protocol {protocol}` "
                "first"
            )
        path = found[0]
    return path


def outcome_files(
    index: TemplateIndex, folder: Path, n_queries: int = 2000, folds: int = 2, seed: int = 0
) -> list[Path]:
    """The outcome cache files the CSP benchmark trains its ranker on for this index (the keys of
    :func:`cspml_flows.training.outcomes.fold_outcomes`, default arguments)."""
    h = training_hash(index)
    keys = [outcome_key(h, seed, folds, f, CANDIDATES, n_queries, [], MAX_ASSIGNMENTS) for f in range(folds)]
    return [folder / f"outcomes-{k}.json.gz" for k in keys]


def load_outcomes(paths: Sequence[Path]) -> Outcomes:
    """Outcomes of these cache files, concatenated; each held-out index row must occur once."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing or not paths:
        raise ConfigError(
            f"no ranker outcome cache {', '.join(missing) or '(none given)'}: run `python -m benchmarks csp` with a "
            "ranker for this pool first, or name the files with --outcomes"
        )
    out = Outcomes()
    for p in paths:
        with gzip.open(p, "rt", encoding="utf-8") as fh:
            out.extend(Outcomes.from_json(json.load(fh)))
    if len(set(out.rows)) != len(out.rows):
        raise ConfigError("the outcome files repeat held-out rows: they come from different ranker trainings")
    return out


def match_flags(rms: list[float | None], n: int) -> np.ndarray:
    """Whether each of the first ``n`` candidates matched (an RMS that is neither None nor NaN)."""
    return np.array([r is not None and not (isinstance(r, float) and math.isnan(r)) for r in rms[:n]], dtype=bool)


def scored_set(name: str, preds, gts) -> QuerySet:
    """The predictions' candidates, ranker scores and match flags (protocol matcher and gate) as a QuerySet."""
    structs = [[c.structure for c in p.candidates] for p in preds]
    rms = rms_table(gts, structs, workers=1)
    qs = QuerySet(name)
    for p, st, r in zip(preds, structs, rms, strict=True):
        qs.formulas.append(p.formula)
        qs.structures.append(st)
        qs.scores.append(np.array([c.score for c in p.candidates], dtype=float))
        qs.hits.append(match_flags(r, len(st)))
    return qs


def protocol_set(cfg: EnergyConfig, index: TemplateIndex, model: SimilarityModel) -> QuerySet:
    """The engine's top candidates for the protocol sample (standard setting, own id excluded), scored."""
    q = load_queries(cfg.protocol, limit=cfg.queries, seed=cfg.seed)
    gts = query_structures(cfg.protocol, q.material_ids, q.cifs, 1)
    predictor = CSPPredictor(index, model, workers=1)
    t = time.perf_counter()
    preds = predictor.predict([g.composition for g in gts], top=cfg.top, exclude_ids=[{m} for m in q.material_ids])
    logger.info("protocol: %d queries predicted in %.1f s", len(preds), time.perf_counter() - t)
    return scored_set("protocol", preds, gts)


def refit_ranker(
    index: TemplateIndex, model: SimilarityModel, out: Outcomes, held: np.ndarray, seed: int
) -> tuple[list[list], int]:
    """The held-out formulas' candidates ordered by a ranker refitted without them (same rounds as the
    model's ranker); returns the reordered candidate lists and the rounds."""
    rows = np.array(out.rows, dtype=int)
    queries = [index.roles[i] for i in rows]
    x = candidate_features(index, queries, out.candidates, model.std, index.stats[rows])
    y = np.concatenate(out.labels)
    groups = np.array([len(c) for c in out.candidates])
    held_rows = np.repeat(held, groups)
    rounds = int((model.ranker.meta.get("report") or {}).get("rounds") or model.ranker.booster.num_trees())
    t = time.perf_counter()
    ranker = CandidateRanker.train(x[~held_rows], y[~held_rows], groups[~held], max_iter=rounds, seed=seed)
    logger.info(
        "pool: ranker refitted without the %d chosen formulas (%d rounds, %.0f s)",
        held.sum(),
        rounds,
        time.perf_counter() - t,
    )
    s_all = ranker.scores(x[held_rows], threads=1)
    reranked, k = [], 0
    for i in np.flatnonzero(held):
        part = s_all[k : k + groups[i]]
        k += groups[i]
        cands = out.candidates[i]
        reranked.append([replace(cands[j], score=float(part[j])) for j in np.argsort(-part, kind="stable")])
    return reranked, rounds


def pool_set(cfg: EnergyConfig, index: TemplateIndex, model: SimilarityModel) -> tuple[QuerySet, dict[str, Any]]:
    """Held-out pool formulas from the ranker's outcome cache: a ranker refitted without them (same rounds
    as the shipped one) orders their candidates; the top ones are built as ``predict`` builds them and
    scored against the held-out structure exactly as protocol queries are."""
    if cfg.outcomes:
        files = [Path(p) for p in cfg.outcomes]
    else:
        files = outcome_files(index, home_dir() / "benchmark" / "outcomes")
    out = load_outcomes(files)
    n_all = len(out.rows)
    pick = np.sort(np.random.default_rng(cfg.seed).choice(n_all, size=min(cfg.pool_queries, n_all), replace=False))
    held = np.zeros(n_all, dtype=bool)
    held[pick] = True
    reranked, rounds = refit_ranker(index, model, out, held, cfg.seed)
    rows = np.array(out.rows, dtype=int)
    sel = [int(i) for i in np.flatnonzero(held)]
    # the query's composition exactly as its roles (the candidates' assignments index these roles)
    comps = [Composition(dict(zip(r.elements, r.amounts, strict=True))) for r in (index.roles[rows[i]] for i in sel)]
    if any(roles(c) != index.roles[rows[i]] for c, i in zip(comps, sel, strict=True)):
        raise RuntimeError("pool query roles do not round-trip: the outcome cache belongs to another index")
    preds = CSPPredictor(index, model, workers=1).realize(comps, reranked, cfg.top, dedup=True)
    gts = [index.structure(int(rows[i])) for i in sel]
    qs = scored_set("pool", preds, gts)
    info = {
        "outcome_files": [p.name for p in files],
        "outcome_queries": n_all,
        "chosen": len(sel),
        "ranker_rounds": rounds,
    }
    return qs, info
