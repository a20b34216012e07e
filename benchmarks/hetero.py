"""``python -m benchmarks csp --model hetero``: the protocol's composition -> structure match rates of the
hetero model beside the core CSPML model on the same queries, plus the hetero retrieval, polymorph,
inverse-design and user-template evaluations (Markdown: :mod:`benchmarks.hetero_tables`). Caches (parsed
queries, models) go under ``$CSPML_HOME/hetero``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Composition, Structure

from benchmarks.config import BenchmarkConfig
from benchmarks.csp_model import benchmark_model
from benchmarks.hetero_evaluate import leave_prototype_out
from benchmarks.polymorph_energy import energy_polymorphs
from benchmarks.protocols import SETTINGS, formula_from_cif, load_queries, pool_index, query_structures
from benchmarks.runner import TOP
from benchmarks.scoring import rms_table, summarize
from cspml_flows.core.config import home_dir
from cspml_flows.core.errors import ConfigError, ModelError
from cspml_flows.learning.hetero.embeddings import index_embeddings
from cspml_flows.learning.hetero.model import HeteroModel, index_geometry
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.predict.hetero_rank import HeteroPredictor
from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.hetero import train_hetero, train_without
from cspml_flows.training.hetero_metrics import held_out_split

logger = logging.getLogger(__name__)
ENERGY_FORMULAS = int(os.environ.get("CSPML_HETERO_ENERGY_FORMULAS", "80"))  # polymorph formulas relaxed
EVAL_CORE = {"max_anchors": 6000, "max_iter": 100}  # the evaluation models' core model, bounded for time


def cached_model(path: Path, train: Callable[[], HeteroModel], core: SimilarityModel | None = None) -> HeteroModel:
    """A hetero model from its benchmark cache file, else trained (``train()``) and saved there."""
    if path.is_file():
        try:
            model = HeteroModel.load(path)
            if core is not None:
                model.core = core if model.use_core else None
            return model
        except ModelError:
            logger.info("unreadable cached hetero model %s: training it again", path)
    model = train()
    model.save(path)
    return model


@dataclass
class HeteroRun:
    """The pool and queries of a hetero benchmark, with the training pool's rows and the pool's features."""

    index: TemplateIndex
    ids: list[str]
    gts: list[Structure]
    comps: list[Composition]
    strict: bool
    query_ids: list[str]  # every query of the protocol, not only the sample's
    all_formulas: list[str]
    mask: np.ndarray  # rows of the training pool (in the strict setting, no query formula)
    train_index: TemplateIndex
    geom: np.ndarray
    emb: dict[str, np.ndarray]


def load_run(cfg: BenchmarkConfig) -> tuple[HeteroRun, float]:
    """Pool without the protocol's queries, the sample's structures, geometry and embeddings of the pool;
    returns the run and the seconds the embeddings took."""
    index = pool_index(cfg.protocol, workers=cfg.workers)
    full_q = load_queries(cfg.protocol)
    q = load_queries(cfg.protocol, limit=cfg.limit, seed=cfg.seed)
    gts = query_structures(cfg.protocol, list(q.material_ids), list(q.cifs), cfg.workers)  # JSON cache
    strict = cfg.setting == "strict"
    all_formulas = [formula_from_cif(c) for c in full_q.cifs]
    mask = np.ones(len(index), dtype=bool)
    if strict:
        mask &= ~np.isin(index.formulas, list(set(all_formulas)))
    geom = index_geometry(index, cfg.workers)
    t = time.perf_counter()
    emb = {v: index_embeddings(index, v) for v in ("species", "role")}
    embed_seconds = time.perf_counter() - t
    comps = [g.composition for g in gts]
    run = HeteroRun(
        index,
        list(q.material_ids),
        gts,
        comps,
        strict,
        full_q.material_ids,
        all_formulas,
        mask,
        index.subset(mask),
        geom,
        emb,
    )
    return run, embed_seconds


def match_rates(
    cfg: BenchmarkConfig, run: HeteroRun, core: SimilarityModel, hp: HeteroPredictor
) -> dict[str, dict[str, float]]:
    """Top-k match rates of CSPML and of the hetero model on the sample, each timed."""
    exclude = [{mid} for mid in run.ids]
    results: dict[str, Any] = {}
    for name, predict in (
        (
            "cspml",
            lambda: CSPPredictor(run.index, core).predict(run.comps, top=TOP, exclude_ids=exclude, strict=run.strict),
        ),
        ("hetero", lambda: hp.predict(run.comps, TOP, exclude, run.strict, False)),
    ):
        t = time.perf_counter()
        preds = predict()
        seconds = time.perf_counter() - t
        rms = rms_table(run.gts, [[c.structure for c in p.candidates] for p in preds], workers=cfg.workers)
        results[name] = {**summarize(rms), "predict_seconds": seconds}
        logger.info("%s: top1=%.4f top5=%.4f (%.0f s)", name, results[name]["top1"], results[name]["top5"], seconds)
    return results


def held_out_evaluations(cfg: BenchmarkConfig, run: HeteroRun, folder: Path, h: str) -> dict[str, Any]:
    """On the training pool, models that never saw the held-out formulas or prototypes, one per embedding
    variant: polymorphs with relaxed energies, inverse design and user templates."""
    t = time.perf_counter()
    train_index, g = run.train_index, run.geom[run.mask]
    val, held = held_out_split(train_index, cfg.seed)
    xmodels: dict[str, HeteroModel] = {}
    for v in ("species", "role"):
        e = run.emb[v][run.mask]
        xcore = xmodels["species"].core if xmodels else None
        xmodels[v] = cached_model(
            folder / f"hetero5-x-{v}-{cfg.protocol}-{cfg.setting}-{h}-{cfg.seed}.json.gz",
            lambda e=e, v=v, xcore=xcore: train_without(
                train_index, g, val, held, cfg.seed, emb=e, variant=v, core_tr=xcore, core_kwargs=EVAL_CORE
            ),
        )
    out: dict[str, Any] = {"held_out_variants": {v: m.meta.get("report", {}) for v, m in xmodels.items()}}
    xs = xmodels["species"]
    out["energy_polymorphs"] = energy_polymorphs(
        xs,
        xs.bank(train_index, g, emb=run.emb["species"][run.mask]),
        val,
        limit=ENERGY_FORMULAS,
        cache_path=folder / "energies-chgnet.json",
        workers=cfg.workers,
        seed=cfg.seed,
    )
    out["leave_prototype_out"] = {
        v: leave_prototype_out(
            train_index,
            g,
            m,
            held,
            cfg.seed,
            user_limit=60 if v == "species" else 0,
            workers=cfg.workers,
            emb=run.emb[v][run.mask],
        )
        for v, m in xmodels.items()
    }
    out["extra_seconds"] = time.perf_counter() - t
    return out


def run_hetero_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Train (or load) the core and hetero models, compare their match rates, and (``cfg.hetero_extra``)
    run the held-out evaluations; returns the JSON-ready result."""
    if cfg.setting not in SETTINGS:
        raise ConfigError(f"unknown setting {cfg.setting!r}; choose one of {', '.join(SETTINGS)}")
    t_all = time.perf_counter()
    run, embed_seconds = load_run(cfg)
    t = time.perf_counter()
    core, core_report = benchmark_model(run.index, run.query_ids, run.all_formulas, cfg)
    folder = home_dir() / "hetero"
    h = training_hash(run.train_index)
    hetero = cached_model(
        folder / f"hetero5-{cfg.protocol}-{cfg.setting}-{h}.json.gz",
        lambda: train_hetero(
            run.train_index,
            core=core,
            geom=run.geom[run.mask],
            emb=run.emb["species"][run.mask],
            seed=cfg.seed,
        )[0],
        core,
    )
    train_seconds = time.perf_counter() - t
    hp = HeteroPredictor(run.index, hetero, hetero.bank(run.index, run.geom, emb=run.emb["species"]))
    report = hetero.meta.get("report", {})
    out: dict[str, Any] = {
        "protocol": cfg.protocol,
        "setting": cfg.setting,
        "model": "hetero",
        "n_queries": len(run.comps),
        "limit": cfg.limit,
        "seed": cfg.seed,
        "n_templates": len(run.index),
        "match_rates": match_rates(cfg, run, core, hp),
        "retrieval_held_out_formulas": report.get("variants"),
        "fusion": report.get("chosen"),
        "hetero_uses_fusion": hp.fused,
        "inverse_weights": report.get("inverse"),
        "hetero_train_seconds": report.get("train_seconds"),
        "train_seconds": train_seconds,
        "embed_seconds": embed_seconds,
        "core_training": core_report,
    }
    if cfg.hetero_extra:
        out |= held_out_evaluations(cfg, run, folder, h)
    out["total_seconds"] = time.perf_counter() - t_all
    return out
