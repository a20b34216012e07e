"""The parser of the cspml command: every command, option and help text, and the handler each command runs,
named as "module:function" (the command's module is imported only when it runs)."""

from __future__ import annotations

import argparse

from cspml_flows.cli.options import Parser, non_negative, pair_sampling_options, positive

STORE_HELP = "template store: folder (embedded), mongodb:// URI or .json file (default: $CSPML_HOME/store)"
MODEL_HELP = "similarity model file (default: $CSPML_HOME/models/cspml.json.gz, else the shipped model)"
HETERO_HELP = "hetero model file (default: $CSPML_HOME/models/hetero.json.gz)"
WORKERS_HELP = "worker processes"

#: The function each command runs, as "module:function".
COMMANDS = {
    "import": "cspml_flows.cli.commands:cmd_import",
    "train": "cspml_flows.cli.commands:cmd_train",
    "predict": "cspml_flows.cli.commands:cmd_predict",
    "index": "cspml_flows.cli.commands:cmd_index",
    "demo": "cspml_flows.cli.commands:cmd_demo",
    "inverse": "cspml_flows.cli.hetero:inverse",
    "campaign run": "cspml_flows.cli.campaign:cmd_campaign_run",
    "campaign promote": "cspml_flows.cli.campaign:cmd_campaign_promote",
    "campaign report": "cspml_flows.cli.campaign:cmd_campaign_report",
}


def add_import(sub: argparse._SubParsersAction) -> None:
    """``cspml import``."""
    s = sub.add_parser("import", help="import structures into the template store")
    s.add_argument("source", choices=["csv", "folder", "shared", "store", "mp"], help="kind of source")
    paths_help = "CSV files, folders, store URIs, shared-data files or MP chemsys (shared: the demo files)"
    s.add_argument("paths", nargs="*", help=paths_help)
    s.add_argument("--store", help=STORE_HELP)
    s.add_argument("--collection", default="templates", help="collection of a source store")
    s.add_argument("--workers", type=positive, default=2, help=WORKERS_HELP)
    s.add_argument("--skip-invalid", action="store_true", help="skip unreadable files instead of stopping")
    s.set_defaults(func=COMMANDS["import"])


def add_train(sub: argparse._SubParsersAction) -> None:
    """``cspml train``."""
    s = sub.add_parser("train", help="train the similarity model on the template store")
    s.add_argument("--store", help=STORE_HELP)
    s.add_argument("--model", help="output model file (default: $CSPML_HOME/models/cspml.json.gz)")
    s.add_argument("--workers", type=positive, default=2, help=WORKERS_HELP)
    s.add_argument("--seed", type=int, default=0, help="random seed of the pair sampling and the split")
    s.add_argument("--max-iter", type=positive, default=150, help="boosting rounds (early stopping may use fewer)")
    labels_help = "held-out pairs whose cluster label is checked by fit_anonymous"
    s.add_argument("--check-labels", type=non_negative, default=200, help=labels_help)
    ranker_help = "held-out store formulas the ranker learns from (0: none)"
    s.add_argument("--ranker-queries", type=non_negative, default=2000, help=ranker_help)
    pair_sampling_options(s)
    s.add_argument("--hetero", action="store_true", help="train the heterogeneous composition<->structure model")
    core_help = "with --hetero: core model to fuse (default: $CSPML_HOME/models/cspml.json.gz)"
    s.add_argument("--core-model", help=core_help)
    s.set_defaults(func=COMMANDS["train"])


def add_predict(sub: argparse._SubParsersAction) -> None:
    """``cspml predict``."""
    s = sub.add_parser("predict", help="predict structures for compositions")
    s.add_argument("compositions", nargs="+", help="formulas, e.g. SrTiO3 Li3PS4")
    s.add_argument("--top", type=positive, default=5, help="structures per composition")
    s.add_argument("--out", help="folder for CIF files and predictions.json (default: none written)")
    s.add_argument("--store", help=STORE_HELP)
    s.add_argument("--model", help=MODEL_HELP)
    s.add_argument("--workers", type=positive, default=2, help=WORKERS_HELP)
    same_help = "ignore templates of the query's own formula (predict as if unseen)"
    s.add_argument("--exclude-same-formula", action="store_true", help=same_help)
    poly_help = "K distinct structures ranked by the hetero model (default: the similarity model's ranking)"
    s.add_argument("--polymorphs", type=positive, metavar="K", help=poly_help)
    templates_help = "folder of CIF/POSCAR files added as templates, no retraining (default: none)"
    s.add_argument("--templates", metavar="DIR", help=templates_help)
    s.add_argument("--hetero-model", help=HETERO_HELP)
    s.set_defaults(func=COMMANDS["predict"])


def add_index(sub: argparse._SubParsersAction) -> None:
    """``cspml index``."""
    s = sub.add_parser("index", help="bring the template index up to date with its store (or rebuild it)")
    s.add_argument("--store", help=STORE_HELP)
    s.add_argument("--rebuild", action="store_true", help="build the index from scratch")
    s.add_argument("--workers", type=positive, default=2, help=WORKERS_HELP)
    s.set_defaults(func=COMMANDS["index"])


def add_inverse(sub: argparse._SubParsersAction) -> None:
    """``cspml inverse`` (metastable and inverse campaigns run with ``cspml campaign run``)."""
    s = sub.add_parser("inverse", help="rank compositions that crystallise in a given structure (hetero model)")
    s.add_argument("structure", help="CIF or POSCAR file of the structure (prototype)")
    s.add_argument("--elements", nargs="*", help="elements to substitute onto the structure's sites (default: none)")
    s.add_argument("--top", type=positive, default=20, help="compositions kept")
    s.add_argument("--model", help=HETERO_HELP)
    pool_help = "template store whose prototypes the normalised score competes with (default: $CSPML_HOME/store)"
    s.add_argument("--store", help=pool_help)
    s.add_argument("--workers", type=positive, default=2, help=WORKERS_HELP)
    s.add_argument("--out", help="folder for CIF files and inverse.json (default: none written)")
    s.set_defaults(func=COMMANDS["inverse"])


def add_demo(sub: argparse._SubParsersAction) -> None:
    """``cspml demo``."""
    s = sub.add_parser("demo", help="end to end on the embedded default store")
    s.add_argument("--out", default="out/demo", help="folder for CIF files and predictions.json")
    s.add_argument("--top", type=positive, default=3, help="structures per composition")
    s.add_argument("--workers", type=positive, default=2, help=WORKERS_HELP)
    s.add_argument("--train", action="store_true", help="train a model on the demo store instead of the shipped one")
    ranker_help = "with --train: formulas the ranker learns from"
    s.add_argument("--ranker-queries", type=non_negative, default=2000, help=ranker_help)
    s.set_defaults(func=COMMANDS["demo"])


def add_campaign(sub: argparse._SubParsersAction) -> None:
    """``cspml campaign run | promote | report``."""
    s = sub.add_parser("campaign", help="validation campaigns: predict, relax, hull, promote over rounds")
    csub = s.add_subparsers(dest="campaign_command", required=True)
    c = csub.add_parser("run", help="run (or resume) a campaign locally with jobflow run_locally")
    c.add_argument("config", help="campaign YAML, e.g. configs/campaign_emt.yaml")
    c.add_argument("--rounds", type=positive, help="override the number of rounds (default: the file's)")
    c.add_argument("--no-report", action="store_true", help="write no Markdown report")
    c.add_argument("--json", help="write the round summaries to this JSON file (default: none)")
    c.set_defaults(func=COMMANDS["campaign run"])
    c = csub.add_parser("promote", help="run the template-promotion Builder alone (incremental)")
    c.add_argument("config", help="campaign YAML")
    json_help = "write the maggma Builder as JSON for 'mrun' instead of running it (default: run it)"
    c.add_argument("--builder-json", help=json_help)
    c.add_argument("--all", action="store_true", help="consider every record, not only those updated since")
    c.set_defaults(func=COMMANDS["campaign promote"])
    c = csub.add_parser("report", help="rewrite the Markdown report of a campaign's finished rounds")
    c.add_argument("config", help="campaign YAML")
    c.set_defaults(func=COMMANDS["campaign report"])


def build_parser(description: str | None = None) -> Parser:
    """The cspml parser: ``-v``/``-q`` and one subcommand per command."""
    p = Parser(prog="cspml", description=description)
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, and no progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_import, add_train, add_predict, add_index, add_inverse, add_demo, add_campaign):
        add(sub)
    return p
