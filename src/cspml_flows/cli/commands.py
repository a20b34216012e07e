"""Handlers of ``cspml import | train | predict | index | demo``: parse nothing, call the API, print."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from cspml_flows.api import TrainResult, import_structures, predict, prediction_summary, train_model
from cspml_flows.cli.hetero import predictions, train_hetero
from cspml_flows.cli.options import check_out
from cspml_flows.core.composition import parse_composition
from cspml_flows.core.config import default_model_path, home_dir, model_path
from cspml_flows.core.errors import CSPMLError
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.predict.predictor import CSPPredictor, freeze_gc
from cspml_flows.templates.index import TemplateIndex, sync_index
from cspml_flows.templates.store import TemplateStore

logger = logging.getLogger(__name__)

DEMO_FILES = ("mp_20_biternary/val.csv.gz", "mpts_52/val.csv.gz")
DEMO_COMPOSITIONS = ("SrTiO3", "Li3PS4", "KBr", "GaN", "CsPbI3", "MgAl2O4")


def cmd_import(args: argparse.Namespace) -> int:
    """``cspml import``: structures into the template store."""
    paths = list(args.paths) or (list(DEMO_FILES) if args.source == "shared" else [])
    reports, count, name = import_structures(
        args.source, paths, args.store, args.workers, args.skip_invalid, args.collection
    )
    _print_imports(reports, count, name)
    refused = [r for r in reports if r.all_failed]
    if refused:
        names = ", ".join(r.source for r in refused)
        print(f"error: every structure of {names} was refused (reasons above)", file=sys.stderr)
        return 2
    return 0


def _print_imports(reports: list, count: int, name: str) -> None:
    """Each import's summary and its first unreadable entries, then the store's size."""
    for r in reports:
        print(r.summary())
        for mid, why in r.failed[:10]:
            print(f"  unreadable: {mid}: {why}")
    print(f"store {name}: {count} templates")


def cmd_train(args: argparse.Namespace) -> int:
    """``cspml train``: the similarity model (``--hetero``: the hetero model) on the template store."""
    check_out(args.model, "file", "model file")
    if getattr(args, "hetero", False):
        return train_hetero(args)

    result = train_model(
        args.store,
        args.model,
        args.workers,
        args.seed,
        args.max_iter,
        args.check_labels,
        None,
        args.ranker_queries,
        max_anchors=args.max_anchors,
        max_group=args.max_group,
    )
    _print_training(result)
    return 0


def _print_training(result: TrainResult) -> None:
    """Held-out accuracy of the model and of the ranker, and where the model went."""
    r = result.report
    agreement = "" if r.label_agreement is None else f"; label agreement with fit_anonymous {r.label_agreement:.3f}"
    print(
        f"{result.n_templates} templates, {result.n_clusters} prototype clusters; held-out pairs: accuracy "
        f"{r.pair_accuracy:.3f}, ROC-AUC {r.roc_auc:.3f} (unlearned distance: {r.baseline_accuracy:.3f}, "
        f"{r.baseline_roc_auc:.3f}){agreement}"
    )
    rk = result.ranker
    if rk and "skipped" in rk:
        print(f"no ranker: {rk['skipped']}")
    elif rk:
        print(
            f"ranker on {rk['n_queries']} held-out formulas of the store: top-1 {rk['held_out_top1_pair']:.3f} (pair "
            f"order) -> {rk['held_out_top1_ranker']:.3f}, top-5 {rk['held_out_top5_pair']:.3f} -> "
            f"{rk['held_out_top5_ranker']:.3f} on the 20 % kept back ({rk['train_seconds']:.0f} s)"
        )
    print(f"trained in {r.train_seconds:.0f} s -> {result.path}")


def cmd_predict(args: argparse.Namespace) -> int:
    """``cspml predict``: structures for compositions (``--polymorphs``, ``--templates``: the hetero paths)."""
    comps = [parse_composition(c) for c in args.compositions]  # bad formulas fail before any loading
    check_out(args.out)
    if args.polymorphs or args.templates:
        preds = predictions(args, comps)  # hetero polymorph ranking and/or user-defined templates
    else:
        preds = predict(
            args.compositions, args.top, args.store, args.model, args.workers, args.exclude_same_formula, freeze=True
        )
    _print_predictions(prediction_summary(preds, args.out), args.out)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Bring the template index of a store up to date (only what changed since) or, with ``--rebuild``,
    build it from scratch; an embedded store without a change journal gets one first."""
    with TemplateStore.open(args.store, create=False) as ts:
        try:
            ts.ensure_journal()
        except CSPMLError as exc:  # a store this user cannot write: the index compares documents instead
            logger.info("no change journal: %s", exc)
        _, report = sync_index(ts, workers=args.workers, rebuild=args.rebuild, load=False)
        print(f"store {ts.name}: {report.summary()}")
    return 0


def _print_predictions(summary: list[dict], out: str | Path | None) -> None:
    """The ranked candidates of every composition, as a table per composition."""
    for p in summary:
        flag = "" if p["smact_valid"] else "  [not charge-balanced by SMACT: flagged]"
        print(f"\n{p['formula']} ({p['anonymous_formula']}){flag}")
        if p["message"]:
            print(f"  {p['message']}")
        print(f"  {'rank':>4} {'score':>6}  {'space group':<14} {'template':<14} {'template formula':<18} prototype")
        for c in p["candidates"]:
            group = f"{c['spacegroup_symbol']} ({c['spacegroup']})"
            print(
                f"  {c['rank']:>4} {c['score']:>6.3f}  {group:<14} {c['template_id']:<14} "
                f"{c['template_formula']:<18} {c['prototype'] or '-'}"
            )
    if out:
        print(f"\nCIFs and predictions.json written to {out}")


def cmd_demo(args: argparse.Namespace) -> int:
    """Import real structures into the embedded default store, index them, predict a few compositions.

    The model is the one ``cspml train`` made under the home folder, else (or with ``--train``, a new one
    trained on the demo store) the model shipped in the package. Each stage prints its wall time.
    """
    check_out(args.out)
    home = home_dir()
    print(f"home {home}: store, models and caches (every cspml call in this folder uses it)")
    times: dict[str, float] = {}

    t = time.perf_counter()
    print(f"1/4 import {', '.join(DEMO_FILES)} (resumable; what is already there is skipped)")
    _print_imports(*import_structures("shared", list(DEMO_FILES), workers=args.workers))
    times["import"] = time.perf_counter() - t

    t = time.perf_counter()
    print("2/4 index the templates (symmetry clusters; cached until the store changes)")
    index = TemplateIndex.open(None, workers=args.workers)
    times["index"] = time.perf_counter() - t
    print(f"  {len(index)} templates, {len(set(index.cluster.tolist()))} prototype clusters")

    t = time.perf_counter()
    trained = default_model_path()
    if args.train:
        print("3/4 train the similarity model on the demo store")
        result = train_model(workers=args.workers, check_labels=0, index=index, ranker_queries=args.ranker_queries)
        _print_training(result)
        path = result.path
    else:
        path = model_path()
        how = "trained model" if path == trained else "model shipped in the package ('--train' trains one here)"
        print(f"3/4 use the {how}: {path}")
    model = SimilarityModel.load(path)
    times["model"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"4/4 predict {', '.join(DEMO_COMPOSITIONS)}")
    freeze_gc()  # this process owns the index: its objects leave the collector's generations
    preds = CSPPredictor(index, model, workers=args.workers).predict(list(DEMO_COMPOSITIONS), top=args.top)
    summary = prediction_summary(preds, args.out)
    times["predict"] = time.perf_counter() - t
    _print_predictions(summary, args.out)
    print(
        "\nstage times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        + f"; total {sum(times.values()):.1f} s"
    )
    return 0
