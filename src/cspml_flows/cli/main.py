"""Command line: ``cspml import | index | train | predict | inverse | demo | campaign``. Thin: parse, call the
API, print."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from cspml_flows.core import progress
from cspml_flows.core.errors import CSPMLError

DEMO_FILES = ("mp_20_biternary/val.csv.gz", "mpts_52/val.csv.gz")
DEMO_COMPOSITIONS = ("SrTiO3", "Li3PS4", "KBr", "GaN", "CsPbI3", "MgAl2O4")


def cmd_import(args: argparse.Namespace) -> int:
    from cspml_flows.api import import_structures

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
    for r in reports:
        print(r.summary())
        for mid, why in r.failed[:10]:
            print(f"  unreadable: {mid}: {why}")
    print(f"store {name}: {count} templates")


def cmd_train(args: argparse.Namespace) -> int:
    check_out(args.model, "file", "model file")
    if getattr(args, "hetero", False):
        from cspml_flows.cli.hetero import train_hetero

        return train_hetero(args)
    from cspml_flows.api import train_model

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


def _print_training(result) -> None:
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
    from cspml_flows.api import predict, prediction_summary
    from cspml_flows.core.composition import parse_composition

    comps = [parse_composition(c) for c in args.compositions]  # bad formulas fail before any loading
    check_out(args.out)
    if getattr(args, "polymorphs", None) or getattr(args, "templates", None):
        from cspml_flows.cli.hetero import predictions

        preds = predictions(args, comps)  # hetero polymorph ranking and/or user-defined templates
    else:
        preds = predict(args.compositions, args.top, args.store, args.model, args.workers, args.exclude_same_formula)
    _print_predictions(prediction_summary(preds, args.out), args.out)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Bring the template index of a store up to date (only what changed since) or, with ``--rebuild``,
    build it from scratch; an embedded store without a change journal gets one first."""
    from cspml_flows.templates.index import sync_index
    from cspml_flows.templates.store import TemplateStore

    with TemplateStore.open(args.store, create=False) as ts:
        try:
            ts.ensure_journal()
        except CSPMLError as exc:  # a store this user cannot write: the index compares documents instead
            logging.getLogger(__name__).info("no change journal: %s", exc)
        _, report = sync_index(ts, workers=args.workers, rebuild=args.rebuild, load=False)
        print(f"store {ts.name}: {report.summary()}")
    return 0


def check_out(out: str | Path | None, kind: str = "folder", label: str | None = None) -> None:
    """Refuse, before any work is done, an output ``kind`` ('folder' or 'file') that cannot be written (see
    :func:`cspml_flows.core.config.check_output_path`): one line, nothing created. ``None``: nothing to check."""
    from cspml_flows.core.config import check_output_path

    if out:
        check_output_path(out, kind, label)


def _print_predictions(summary: list[dict], out: str | Path | None) -> None:
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
    from cspml_flows.api import import_structures, prediction_summary, train_model
    from cspml_flows.core.config import default_model_path, home_dir, model_path
    from cspml_flows.learning.model import SimilarityModel
    from cspml_flows.predict.predictor import CSPPredictor
    from cspml_flows.templates.index import TemplateIndex

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


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit code 2) like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {one_line(message)}", file=sys.stderr)
        raise SystemExit(2)


MAX_MESSAGE = 1000  # characters of an error line


def one_line(message: object) -> str:
    """An error message on one line, at most ``MAX_MESSAGE`` characters (a value quoted whole is cut)."""
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def _int_at_least(low: int):
    def parse(text: str) -> int:
        from cspml_flows.core.config import excerpt

        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {excerpt(text)}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive = _int_at_least(1)
non_negative = _int_at_least(0)


def pair_sampling_options(s: argparse.ArgumentParser) -> None:
    """The pair sampling bounds of the similarity model's training (``cspml train`` and the benchmarks)."""
    help_anchors = "training templates whose pairs are sampled, at most (a seeded draw; default 20000)"
    s.add_argument("--max-anchors", type=positive, default=20000, help=help_anchors)
    help_group = "templates of an anonymous formula searched for an anchor's partners, at most (default 5000)"
    s.add_argument("--max-group", type=positive, default=5000, help=help_group)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cspml", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("import", help="import structures into the template store")
    s.add_argument("source", choices=["csv", "folder", "shared", "store", "mp"])
    s.add_argument("paths", nargs="*", help="CSV files, folders, store URIs, shared-data files or MP chemsys")
    s.add_argument("--store", help="template store: folder (embedded), mongodb:// URI or .json file")
    s.add_argument("--collection", default="templates", help="collection of a source store")
    s.add_argument("--workers", type=positive, default=2)
    s.add_argument("--skip-invalid", action="store_true", help="skip unreadable files instead of stopping")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("train", help="train the similarity model on the template store")
    s.add_argument("--store")
    s.add_argument("--model", help="output model file (default $CSPML_HOME/models/cspml.json.gz)")
    s.add_argument("--workers", type=positive, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-iter", type=positive, default=150, help="boosting rounds (early stopping may use fewer)")
    s.add_argument(
        "--check-labels",
        type=non_negative,
        default=200,
        help="held-out pairs whose cluster label is checked by fit_anonymous",
    )
    s.add_argument(
        "--ranker-queries",
        type=non_negative,
        default=2000,
        help="held-out store formulas the ranker learns from (0: none)",
    )
    pair_sampling_options(s)
    s.add_argument("--hetero", action="store_true", help="train the heterogeneous composition<->structure model")
    s.add_argument("--core-model", help="with --hetero: core model to fuse (default $CSPML_HOME/models/cspml.json.gz)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("predict", help="predict structures for compositions")
    s.add_argument("compositions", nargs="+")
    s.add_argument("--top", type=positive, default=5)
    s.add_argument("--out", help="folder for CIF files and predictions.json")
    s.add_argument("--store")
    s.add_argument("--model")
    s.add_argument("--workers", type=positive, default=2)
    s.add_argument(
        "--exclude-same-formula",
        action="store_true",
        help="ignore templates of the query's own formula (predict as if unseen)",
    )
    s.add_argument("--polymorphs", type=positive, metavar="K", help="K distinct structures ranked by the hetero model")
    s.add_argument("--templates", metavar="DIR", help="folder of CIF/POSCAR files added as templates (no retraining)")
    s.add_argument("--hetero-model", help="hetero model file (default $CSPML_HOME/models/hetero.json.gz)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("index", help="bring the template index up to date with its store (or rebuild it)")
    s.add_argument("--store", help="template store: folder (embedded), mongodb:// URI or .json file")
    s.add_argument("--rebuild", action="store_true", help="build the index from scratch")
    s.add_argument("--workers", type=positive, default=2)
    s.set_defaults(func=cmd_index)

    from cspml_flows.cli.hetero import add_hetero_parsers

    add_hetero_parsers(sub)  # inverse
    from cspml_flows.cli.campaign import add_campaign_parsers

    s = sub.add_parser("demo", help="end to end on the embedded default store")
    s.add_argument("--out", default="out/demo")
    s.add_argument("--top", type=positive, default=3)
    s.add_argument("--workers", type=positive, default=2)
    s.add_argument("--train", action="store_true", help="train a model on the demo store instead of the shipped one")
    s.add_argument(
        "--ranker-queries", type=non_negative, default=2000, help="with --train: formulas the ranker learns from"
    )
    s.set_defaults(func=cmd_demo)
    add_campaign_parsers(sub)
    return p


def main_guard(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; library errors print as one line (exit code 2)."""
    os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib's C-level chatter on odd cells, for this process
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # bad arguments (one line, code 2) or --help (code 0)
        return exc.code if isinstance(exc.code, int) else 2
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    shown = progress.enabled()
    progress.enable(not quiet)
    try:
        return args.func(args)
    except CSPMLError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept in the store", file=sys.stderr)
        return 130
    finally:
        progress.enable(shown)  # main() called from Python (tests, notebooks) leaves the setting as it was


def main(argv: list[str] | None = None) -> int:
    """The ``cspml`` command."""
    return main_guard(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
