"""Command line: ``cspml import | train | predict | benchmark | demo | campaign``. Thin: parse, call the API, print."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cspml_flows.errors import CSPMLError

DEMO_FILES = ("mp_20_biternary/val.csv.gz", "mpts_52/val.csv.gz")
DEMO_COMPOSITIONS = ("SrTiO3", "Li3PS4", "KBr", "GaN", "CsPbI3", "MgAl2O4")


def _progress(label: str):
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        end = "\n" if done >= total else ""
        print(f"\r  {label}: {done}/{total} ({rate:.0f}/s)", end=end, file=sys.stderr, flush=True)

    return show


def cmd_import(args: argparse.Namespace) -> int:
    from cspml_flows.config import data_dir
    from cspml_flows.templates import importers
    from cspml_flows.templates.store import TemplateStore

    store = TemplateStore.open(args.store)
    try:
        if args.source == "csv":
            reports = [
                importers.import_csv(store, p, workers=args.workers, progress=_progress(Path(p).name))
                for p in args.paths
            ]
        elif args.source == "folder":
            reports = [
                importers.import_folder(store, p, workers=args.workers, strict=not args.skip_invalid)
                for p in args.paths
            ]
        elif args.source == "shared":
            root = data_dir()
            files = args.paths or list(DEMO_FILES)
            reports = [
                importers.import_csv(store, root / f, source=f, workers=args.workers, progress=_progress(f))
                for f in files
            ]
        elif args.source == "store":
            from cspml_flows.templates.store import store_from_uri

            reports = [
                importers.import_store(store, store_from_uri(p, collection=args.collection, create=False))
                for p in args.paths
            ]
        elif args.source == "mp":
            reports = [importers.import_materials_project(store, chemsys=args.paths or None)]
        else:  # argparse restricts choices
            raise CSPMLError(f"unknown source {args.source}")
        for r in reports:
            print(r.summary())
            for mid, why in r.failed[:10]:
                print(f"  unreadable: {mid}: {why}")
        print(f"store {store.name}: {store.count()} templates")
    finally:
        store.close()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cspml_flows.config import default_model_path
    from cspml_flows.learning.model import SimilarityModel
    from cspml_flows.templates.index import TemplateIndex
    from cspml_flows.templates.store import TemplateStore

    if getattr(args, "hetero", False):
        from cspml_flows.hetero.cli import train_hetero

        return train_hetero(args)
    store = TemplateStore.open(args.store, create=False)
    try:
        t = time.perf_counter()
        index = TemplateIndex.from_store(store, workers=args.workers)
        print(
            f"{len(index)} templates, {len(set(index.cluster.tolist()))} prototype clusters "
            f"({time.perf_counter() - t:.0f} s)"
        )
    finally:
        store.close()
    model, report = SimilarityModel.train(index, seed=args.seed, max_iter=args.max_iter, check_labels=args.check_labels)
    path = model.save(args.model or default_model_path())
    print(
        f"held-out pairs: accuracy {report.pair_accuracy:.3f}, ROC-AUC {report.roc_auc:.3f} "
        f"(unlearned distance: {report.baseline_accuracy:.3f}, {report.baseline_roc_auc:.3f}); "
        f"label agreement with fit_anonymous {report.label_agreement}"
    )
    print(f"trained in {report.train_seconds:.0f} s -> {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cspml_flows.composition import parse_composition
    from cspml_flows.predict.dedup import symmetrize, to_cif
    from cspml_flows.predict.predictor import CSPPredictor

    comps = [parse_composition(c) for c in args.compositions]  # bad formulas fail before any loading
    if getattr(args, "polymorphs", None) or getattr(args, "templates", None):
        from cspml_flows.hetero.cli import predictions

        preds = predictions(args, comps)  # hetero polymorph ranking and/or user-defined templates
    else:
        predictor = CSPPredictor.from_paths(args.store, args.model, workers=args.workers)
        preds = predictor.predict(comps, top=args.top, strict=args.exclude_same_formula)
    out = Path(args.out) if args.out else None
    summary = []
    for p in preds:
        flag = "" if p.smact_valid else "  [not charge-balanced by SMACT: flagged]"
        print(f"\n{p.formula} ({p.anonymous_formula}){flag}")
        if p.message:
            print(f"  {p.message}")
        print(f"  {'rank':>4} {'score':>6}  {'space group':<14} {'template':<14} {'template formula':<18} prototype")
        entry = {"formula": p.formula, "smact_valid": p.smact_valid, "message": p.message, "candidates": []}
        for c in p.candidates:
            sym, number, symbol = symmetrize(c.structure)
            row = c.summary() | {"spacegroup": number, "spacegroup_symbol": symbol}
            if out:
                out.mkdir(parents=True, exist_ok=True)
                f = out / f"{p.formula}_{c.rank:02d}_{symbol.replace('/', '_')}.cif"
                f.write_text(to_cif(sym))
                row["cif"] = str(f)
            entry["candidates"].append(row)
            print(
                f"  {c.rank:>4} {c.score:>6.3f}  {symbol + ' (' + str(number) + ')':<14} {c.template_id:<14} "
                f"{c.template_formula:<18} {c.prototype or '-'}"
            )
        summary.append(entry)
    if out:
        (out / "predictions.json").write_text(json.dumps(summary, indent=2))
        print(f"\nCIFs and predictions.json written to {out}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from cspml_flows.benchmark.runner import BenchmarkConfig, markdown_table, run_benchmark, write_reports

    cfg = BenchmarkConfig(
        protocol=args.protocol,
        setting=args.setting,
        limit=args.limit,
        workers=args.workers,
        seed=args.seed,
        baselines=tuple(args.baselines),
        retrain=args.retrain,
        hetero_extra=not getattr(args, "no_extra", False),
    )
    if getattr(args, "model", "cspml") == "hetero":
        from cspml_flows.hetero.cli import benchmark_hetero

        return benchmark_hetero(cfg, args.json, args.markdown)
    result = run_benchmark(cfg, log_fn=lambda m: print(m, file=sys.stderr, flush=True))
    write_reports(result, args.json, args.markdown)
    print(markdown_table([result]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Import real structures into the embedded default store, train, predict a few compositions."""
    from cspml_flows.config import default_model_path, default_store_path

    print(f"1/3 importing {', '.join(DEMO_FILES)} into {default_store_path()} (resumable)")
    cmd_import(
        argparse.Namespace(
            source="shared",
            paths=list(DEMO_FILES),
            store=None,
            workers=args.workers,
            skip_invalid=False,
            collection="templates",
        )
    )
    model = default_model_path()
    if not model.is_file():
        print("2/3 training the similarity model")
        cmd_train(argparse.Namespace(store=None, model=None, workers=args.workers, seed=0))
    else:
        print(f"2/3 using the trained model {model}")
    print(f"3/3 predicting {', '.join(DEMO_COMPOSITIONS)}")
    return cmd_predict(
        argparse.Namespace(
            compositions=list(DEMO_COMPOSITIONS),
            top=args.top,
            out=args.out,
            store=None,
            model=None,
            workers=args.workers,
            exclude_same_formula=False,
        )
    )


def cmd_campaign_run(args: argparse.Namespace) -> int:
    from cspml_flows.campaign import load_campaign, run_campaign

    cfg = load_campaign(args.config)
    if args.rounds:
        cfg = cfg.model_copy(update={"rounds": args.rounds})
    result = run_campaign(cfg, log=lambda m: print(m, flush=True), report=not args.no_report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def cmd_campaign_report(args: argparse.Namespace) -> int:
    from cspml_flows.campaign import finished_rounds, load_campaign
    from cspml_flows.report import write_report

    cfg = load_campaign(args.config)
    print(write_report(cfg, finished_rounds(cfg)))
    return 0


def cmd_campaign_benchmark(args: argparse.Namespace) -> int:
    from cspml_flows.flows.benchmark import RelaxBenchmarkConfig, run_relax_benchmark

    cfg = RelaxBenchmarkConfig(
        protocol=args.protocol,
        queries=args.queries,
        top=args.top,
        calculator=args.calculator,
        steps=args.steps,
        fmax=args.fmax,
        seed=args.seed,
        workers=args.workers,
        out=args.out,
        chunk=args.chunk,
        pool=args.pool,
    )
    result = run_relax_benchmark(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(result["markdown"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cspml", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("import", help="import structures into the template store")
    s.add_argument("source", choices=["csv", "folder", "shared", "store", "mp"])
    s.add_argument("paths", nargs="*", help="CSV files, folders, store URIs, shared-data files or MP chemsys")
    s.add_argument("--store", help="template store: folder (embedded), mongodb:// URI or .json file")
    s.add_argument("--collection", default="templates", help="collection of a source store")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--skip-invalid", action="store_true", help="skip unreadable files instead of stopping")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("train", help="train the similarity model on the template store")
    s.add_argument("--store")
    s.add_argument("--model", help="output model file (default $CSPML_HOME/models/cspml.joblib)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-iter", type=int, default=150, help="boosting rounds (early stopping may use fewer)")
    s.add_argument(
        "--check-labels", type=int, default=200, help="held-out pairs whose cluster label is checked by fit_anonymous"
    )
    s.add_argument("--hetero", action="store_true", help="train the heterogeneous composition<->structure model")
    s.add_argument("--core-model", help="with --hetero: core model to fuse (default $CSPML_HOME/models/cspml.joblib)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("predict", help="predict structures for compositions")
    s.add_argument("compositions", nargs="+")
    s.add_argument("--top", type=int, default=5)
    s.add_argument("--out", help="folder for CIF files and predictions.json")
    s.add_argument("--store")
    s.add_argument("--model")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument(
        "--exclude-same-formula",
        action="store_true",
        help="ignore templates of the query's own formula (predict as if unseen)",
    )
    s.add_argument("--polymorphs", type=int, metavar="K", help="K distinct structures ranked by the hetero model")
    s.add_argument("--templates", metavar="DIR", help="folder of CIF/POSCAR files added as templates (no retraining)")
    s.add_argument("--hetero-model", help="hetero model file (default $CSPML_HOME/models/hetero.joblib)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("benchmark", help="run a benchmark protocol")
    s.add_argument("--protocol", required=True, choices=["mp20bt", "mpts52"])
    s.add_argument("--setting", default="standard", choices=["standard", "strict"])
    s.add_argument("--limit", type=int, help="fixed-seed sample of N queries")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--baselines", nargs="*", default=["random", "nearest", "pymatgen_substitution"])
    s.add_argument("--retrain", action="store_true", help="ignore a cached benchmark model")
    s.add_argument("--model", default="cspml", choices=["cspml", "hetero"], help="hetero: compare with CSPML")
    s.add_argument("--no-extra", action="store_true", help="hetero: skip polymorph/leave-prototype-out evaluations")
    s.add_argument("--json")
    s.add_argument("--markdown")
    s.set_defaults(func=cmd_benchmark)

    from cspml_flows.hetero.cli import add_hetero_parsers

    add_hetero_parsers(sub)  # inverse, hetero-campaign

    s = sub.add_parser("demo", help="end to end on the embedded default store")
    s.add_argument("--out", default="out/demo")
    s.add_argument("--top", type=int, default=3)
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("campaign", help="validation campaigns: predict, relax, hull, promote over rounds")
    csub = s.add_subparsers(dest="campaign_command", required=True)
    c = csub.add_parser("run", help="run (or resume) a campaign locally with jobflow run_locally")
    c.add_argument("config", help="campaign YAML, e.g. configs/campaign_emt.yaml")
    c.add_argument("--rounds", type=int, help="override the number of rounds")
    c.add_argument("--no-report", action="store_true")
    c.add_argument("--json", help="write the round summaries to this JSON file")
    c.set_defaults(func=cmd_campaign_run)
    c = csub.add_parser("report", help="rewrite the Markdown report of a campaign's finished rounds")
    c.add_argument("config")
    c.set_defaults(func=cmd_campaign_report)
    c = csub.add_parser("benchmark", help="relax top-k candidates of benchmark queries: flow vs plain ASE loop")
    c.add_argument("--protocol", default="mp20bt", choices=["mp20bt", "mpts52"])
    c.add_argument("--queries", type=int, default=100)
    c.add_argument("--top", type=int, default=5)
    c.add_argument("--calculator", default="chgnet", choices=["chgnet", "emt"])
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--fmax", type=float, default=0.05)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--out", default="out/bench/relax")
    c.add_argument("--chunk", type=int, default=5, help="queries per alternation of the two methods")
    c.add_argument("--pool", help="an existing pool store folder (default: import under $CSPML_HOME)")
    c.set_defaults(func=cmd_campaign_benchmark)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except CSPMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept in the store", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
