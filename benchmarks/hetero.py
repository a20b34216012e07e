"""``cspml benchmark --model hetero``: the protocol's composition -> structure match rates of the hetero model
beside the core CSPML model on the same queries, plus the hetero retrieval, polymorph, inverse-design and
user-template evaluations. Caches (parsed queries, models) go under ``$CSPML_HOME/hetero``."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from cspml_flows.core.config import home_dir
from cspml_flows.core.errors import ConfigError, ModelError
from cspml_flows.learning.hetero.model import HeteroModel, index_geometry
from cspml_flows.learning.model import training_hash
from cspml_flows.templates.index import TemplateIndex

ENERGY_FORMULAS = int(os.environ.get("CSPML_HETERO_ENERGY_FORMULAS", "80"))  # polymorph formulas relaxed


def _cached_model(path, train, core=None) -> HeteroModel:
    """A hetero model from its benchmark cache file, else trained (``train()``) and saved there."""
    if path.is_file():
        try:
            model = HeteroModel.load(path)
            if core is not None:
                model.core = core if model.use_core else None
            return model
        except ModelError:
            pass
    model = train()
    model.save(path)
    return model


def run_hetero_benchmark(cfg, log_fn=print) -> dict[str, Any]:
    from benchmarks.hetero_evaluate import held_out_split, leave_prototype_out
    from benchmarks.polymorph_energy import energy_polymorphs
    from benchmarks.protocols import SETTINGS, load_queries, pool_store
    from benchmarks.runner import TOP, benchmark_model, formula_from_cif, query_structures
    from benchmarks.scoring import rms_table, summarize
    from cspml_flows.learning.hetero.embeddings import index_embeddings
    from cspml_flows.predict.hetero_rank import HeteroPredictor
    from cspml_flows.predict.predictor import CSPPredictor
    from cspml_flows.training.hetero import train_hetero, train_without

    if cfg.setting not in SETTINGS:
        raise ConfigError(f"unknown setting {cfg.setting!r}; choose one of {', '.join(SETTINGS)}")
    t_all = time.perf_counter()
    store = pool_store(cfg.protocol, workers=cfg.workers)
    index = TemplateIndex.from_store(store, workers=cfg.workers)
    store.close()
    full_q = load_queries(cfg.protocol)
    index = index.subset(~np.isin(index.ids, full_q.material_ids))
    q = load_queries(cfg.protocol, limit=cfg.limit, seed=cfg.seed)
    gts = query_structures(cfg.protocol, list(q.material_ids), list(q.cifs), cfg.workers)  # JSON cache
    comps = [g.composition for g in gts]
    strict = cfg.setting == "strict"
    # training pool: no query id; in the strict setting no query formula either
    all_formulas = [formula_from_cif(c) for c in full_q.cifs]
    mask = np.ones(len(index), dtype=bool)
    if strict:
        mask &= ~np.isin(index.formulas, list(set(all_formulas)))
    train_index = index.subset(mask)
    geom_all = index_geometry(index, cfg.workers)
    t = time.perf_counter()
    emb_all = {v: index_embeddings(index, v) for v in ("species", "role")}
    embed_seconds = time.perf_counter() - t
    t = time.perf_counter()
    core, core_report = benchmark_model(index, full_q.material_ids, all_formulas, cfg, log_fn)
    folder = home_dir() / "hetero"
    h = training_hash(train_index)
    hetero = _cached_model(
        folder / f"hetero5-{cfg.protocol}-{cfg.setting}-{h}.json.gz",
        lambda: train_hetero(
            train_index, core=core, geom=geom_all[mask], emb=emb_all["species"][mask], seed=cfg.seed
        )[0],
        core,
    )
    train_seconds = time.perf_counter() - t
    exclude = [{mid} for mid in q.material_ids]
    bank = hetero.bank(index, geom_all, emb=emb_all["species"])
    hp = HeteroPredictor(index, hetero, bank)
    results: dict[str, Any] = {}
    for name, run in (
        ("cspml", lambda: CSPPredictor(index, core).predict(comps, top=TOP, exclude_ids=exclude, strict=strict)),
        ("hetero", lambda: hp.predict(comps, TOP, exclude, strict, False)),
    ):
        t = time.perf_counter()
        preds = run()
        seconds = time.perf_counter() - t
        rms = rms_table(gts, [[c.structure for c in p.candidates] for p in preds], workers=cfg.workers)
        results[name] = {**summarize(rms), "predict_seconds": seconds}
        log_fn(f"{name}: top1={results[name]['top1']:.4f} top5={results[name]['top5']:.4f} ({seconds:.0f} s)")
    report = hetero.meta.get("report", {})
    out: dict[str, Any] = {
        "protocol": cfg.protocol,
        "setting": cfg.setting,
        "model": "hetero",
        "n_queries": len(comps),
        "limit": cfg.limit,
        "seed": cfg.seed,
        "n_templates": len(index),
        "match_rates": results,
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
        # on the training pool, models that never saw the held-out formulas or prototypes, one per embedding
        # variant (their core model: 6,000 anchors, 100 boosting rounds, for time)
        t = time.perf_counter()
        g = geom_all[mask]
        val, held = held_out_split(train_index, cfg.seed)
        core_kw = {"max_anchors": 6000, "max_iter": 100}
        xmodels: dict[str, HeteroModel] = {}
        for v in ("species", "role"):
            e = emb_all[v][mask]
            xcore = xmodels["species"].core if xmodels else None
            xmodels[v] = _cached_model(
                folder / f"hetero5-x-{v}-{cfg.protocol}-{cfg.setting}-{h}-{cfg.seed}.json.gz",
                lambda e=e, v=v, xcore=xcore: train_without(
                    train_index, g, val, held, cfg.seed, emb=e, variant=v, core_tr=xcore, core_kwargs=core_kw
                ),
            )
        out["held_out_variants"] = {v: m.meta.get("report", {}) for v, m in xmodels.items()}
        xs = xmodels["species"]
        out["energy_polymorphs"] = energy_polymorphs(
            xs,
            xs.bank(train_index, g, emb=emb_all["species"][mask]),
            val,
            limit=ENERGY_FORMULAS,
            cache_path=folder / "energies-chgnet.json",
            workers=cfg.workers,
            seed=cfg.seed,
            log=log_fn,
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
                log=log_fn,
                emb=emb_all[v][mask],
            )
            for v, m in xmodels.items()
        }
        out["extra_seconds"] = time.perf_counter() - t
    out["total_seconds"] = time.perf_counter() - t_all
    return out


def _retrieval_rows(variants: dict, prefix: str = "") -> list[str]:
    lines = []
    for name, m in variants.items():
        lines.append(
            f"| {prefix}{name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} "
            f"| {m.get('poly_ground_state_first', float('nan')):.3f} | {m['n']} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    """Tables of a hetero benchmark result."""
    lines = [
        f"### {result['protocol']} / {result['setting']}, {result['n_queries']} queries",
        "",
        "| method | top-1 | top-5 | top-20 | RMSE top-1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in result["match_rates"].items():
        lines.append(f"| {name} | {m['top1']:.1%} | {m['top5']:.1%} | {m['top20']:.1%} | {m['rmse_top1']:.4f} |")
    lines += ["", f"Fusion chosen on held-out formulas: {result.get('fusion')}"]
    if "hetero_uses_fusion" in result:
        path = "the fused score" if result["hetero_uses_fusion"] else "the core engine's (ranker included)"
        lines += [f"Hetero candidates: {path}"]
    head = [
        "",
        "| model / ranking | recall@1 | recall@5 | recall@10 | MRR | ground state first | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    if result.get("retrieval_held_out_formulas"):
        lines += ["", "Composition -> structure retrieval, held-out formulas of the training pool:", *head]
        lines += _retrieval_rows(result["retrieval_held_out_formulas"])
    for v, rep in (result.get("held_out_variants") or {}).items():
        lines += ["", f"Evaluation model ({v} embeddings; formulas and prototypes held out), its held-out formulas:"]
        lines += [*head, *_retrieval_rows(rep.get("variants") or {}, f"{v}: ")]
        lines += ["", f"fusion {rep.get('chosen')}, inverse weights {(rep.get('inverse') or {}).get('chosen')}"]
    ep = result.get("energy_polymorphs")
    if ep and ep.get("n_formulas"):
        k = ep["k"]
        lines += [
            "",
            f"Polymorphs ranked with {ep['calculator']} relaxed energies ({ep['n_formulas']} held-out formulas "
            f"with >= 2 prototypes, {ep['candidates']} distinct candidates each relaxed; settings {ep['settings']}):",
            "",
            f"| ordering | ground state first | metastable recall@{k} | n metastable |",
            "|---|---:|---:|---:|",
        ]
        for name in ("score_only", "energy_cv"):
            m = ep[name]
            lines.append(
                f"| {name} | {m['ground_state_first']:.3f} | {m[f'metastable_recall@{k}']:.3f} | {m['n_metastable']} |"
            )
        lines += [
            "",
            f"weights chosen per fold {ep['weights_cv']}, on all formulas {ep['weight_all']}; ground state among the "
            f"candidates {ep['ground_state_among_candidates']:.3f}; {ep['n_relaxations']} relaxations, "
            f"{ep['relax_cpu_seconds_per_formula']:.1f} s per formula (one thread), {ep['failed_relaxations']} failed",
        ]
    for v, lpo in (result.get("leave_prototype_out") or {}).items():
        lines += [
            "",
            f"Structure -> composition, leave-prototype-out ({v} model, {lpo['n_prototypes']} prototypes held out, "
            f"inverse weights {lpo.get('inverse_weights')}):",
            "",
            "| ranking | recall@1 | recall@5 | recall@10 | recall@50 | MRR | n |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in lpo["structure_to_composition"].items():
            lines.append(
                f"| {name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} "
                f"| {m['recall@50']:.3f} | {m['mrr']:.3f} | {m['n']} |"
            )
        u = lpo["user_templates"]
        if u.get("n"):
            lines += [
                "",
                f"User templates ({u['n']} compositions of held-out prototypes, pool without the prototype):",
                "",
                "| setting | top-1 | top-5 |",
                "|---|---:|---:|",
            ]
            for name in ("without_user_file", "with_user_file", "cspml_with_user_file"):
                lines.append(f"| {name} | {u[name]['top1']:.1%} | {u[name]['top5']:.1%} |")
    return "\n".join(lines) + "\n"
