"""``cspml benchmark --model hetero``: the protocol's composition -> structure match rates of the hetero model
beside the core CSPML model on the same queries, plus the hetero retrieval, polymorph, inverse-design and
user-template evaluations. Caches (parsed queries, models) go under ``$CSPML_HOME/hetero``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from cspml_flows.config import home_dir
from cspml_flows.errors import ConfigError, ModelError
from cspml_flows.hetero.model import HeteroModel, index_geometry
from cspml_flows.learning.model import training_hash
from cspml_flows.templates.index import TemplateIndex


def run_hetero_benchmark(cfg, log_fn=print) -> dict[str, Any]:
    from cspml_flows.benchmark.protocols import SETTINGS, load_queries, pool_store
    from cspml_flows.benchmark.runner import TOP, benchmark_model, formula_from_cif, query_structures
    from cspml_flows.benchmark.scoring import rms_table, summarize
    from cspml_flows.hetero.evaluate import held_out_split, leave_prototype_out, polymorph_structures, train_without
    from cspml_flows.hetero.rank import HeteroPredictor
    from cspml_flows.predict.predictor import CSPPredictor

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
    # the core benchmark's model (same training pool, same cache)
    core, core_report = benchmark_model(index, full_q.material_ids, all_formulas, cfg, log_fn)
    hpath = home_dir() / "hetero" / f"hetero-{cfg.protocol}-{cfg.setting}-{training_hash(train_index)}.json.gz"
    hetero = None
    if hpath.is_file() and not cfg.retrain:
        try:
            hetero = HeteroModel.load(hpath)
            hetero.core = core
        except ModelError:
            hetero = None
    if hetero is None:
        hetero, _ = HeteroModel.train(train_index, core=core, geom=geom_all[mask], seed=cfg.seed, log=log_fn)
        hetero.save(hpath)
    train_seconds = time.perf_counter() - t
    exclude = [{mid} for mid in q.material_ids]
    bank = hetero.bank(index, geom_all)
    results: dict[str, Any] = {}
    for name, run in (
        ("cspml", lambda: CSPPredictor(index, core).predict(comps, top=TOP, exclude_ids=exclude, strict=strict)),
        ("hetero", lambda: HeteroPredictor(index, hetero, bank).predict(comps, TOP, exclude, strict, False)),
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
        "hetero_train_seconds": report.get("train_seconds"),
        "train_seconds": train_seconds,
        "core_training": core_report,
    }
    if cfg.hetero_extra:
        # polymorphs and leave-prototype-out on the training pool, with one model that never saw the
        # held-out formulas or prototypes (its core model: 6,000 anchors, 100 boosting rounds, for time)
        t = time.perf_counter()
        g = geom_all[mask]
        val, held = held_out_split(train_index, cfg.seed)
        xmodel = train_without(
            train_index, g, val, held, cfg.seed, log_fn, core_kwargs={"max_anchors": 6000, "max_iter": 100}
        )
        out["polymorphs"] = polymorph_structures(
            xmodel, xmodel.bank(train_index, g), val, workers=cfg.workers, seed=cfg.seed
        )
        out["leave_prototype_out"] = leave_prototype_out(
            train_index, g, xmodel, held, seed=cfg.seed, workers=cfg.workers, log=log_fn
        )
        out["extra_seconds"] = time.perf_counter() - t
    out["total_seconds"] = time.perf_counter() - t_all
    return out


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
    variants = result.get("retrieval_held_out_formulas") or {}
    if variants:
        lines += [
            "",
            "Composition -> structure retrieval (held-out formulas, prototype clusters, strict):",
            "",
            "| ranking | recall@1 | recall@5 | recall@10 | MRR | ground state first | metastable recall@5 | n |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in variants.items():
            lines.append(
                f"| {name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} "
                f"| {m.get('poly_ground_state_first', float('nan')):.3f} "
                f"| {m.get('poly_metastable_recall@5', float('nan')):.3f} | {m['n']} |"
            )
    poly = result.get("polymorphs")
    if poly and "hetero" in poly:
        lines += [
            "",
            f"Polymorphs end to end ({poly['n_formulas']} held-out formulas with >= 2 prototypes, K={poly['k']}):",
            "",
            "| method | ground state first | metastable recall@K |",
            "|---|---:|---:|",
        ]
        for name in ("hetero", "cspml"):
            m = poly[name]
            recall = m[f"metastable_recall@{poly['k']}"]
            lines.append(f"| {name} | {m['ground_state_first']:.3f} | {recall:.3f} |")
    lpo = result.get("leave_prototype_out")
    if lpo:
        lines += [
            "",
            f"Structure -> composition, leave-prototype-out ({lpo['n_prototypes']} prototypes held out):",
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
