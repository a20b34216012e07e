"""Command-line handlers of ``cspml campaign run | promote | report``, called from :mod:`cspml_flows.cli.main`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_campaign_run(args: argparse.Namespace) -> int:
    from cspml_flows.campaign import load_campaign, run_campaign, with_rounds
    from cspml_flows.cli.main import check_out

    cfg = load_campaign(args.config)
    if args.rounds is not None:
        cfg = with_rounds(cfg, args.rounds)  # validated like the file's value
    check_out(args.json, "file", "--json file")
    result = run_campaign(cfg, log=lambda m: print(m, flush=True), report=not args.no_report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def cmd_campaign_promote(args: argparse.Namespace) -> int:
    from cspml_flows.campaign import load_campaign, promote
    from cspml_flows.campaign.runner import campaign_builder
    from cspml_flows.cli.main import check_out

    cfg = load_campaign(args.config)
    check_out(args.builder_json, "file", "--builder-json file")
    if args.builder_json:
        builder = campaign_builder(cfg, incremental=not args.all)
        Path(args.builder_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.builder_json).write_text(builder.to_json())
        print(f"builder written to {args.builder_json}: run it with 'mrun {args.builder_json}'")
        return 0
    out = promote(cfg, log=lambda m: print(m, flush=True), incremental=not args.all)
    for mid in out.promoted:
        print(mid)
    return 0


def cmd_campaign_report(args: argparse.Namespace) -> int:
    from cspml_flows.campaign import finished_rounds, load_campaign
    from cspml_flows.campaign.report import write_report
    from cspml_flows.campaign.runner import check_workdir

    cfg = load_campaign(args.config)
    check_workdir(cfg)  # the report of another campaign's workdir is not overwritten
    print(write_report(cfg, finished_rounds(cfg)))
    return 0


def add_campaign_parsers(sub) -> None:
    """Subcommands ``campaign run | promote | report``."""
    from cspml_flows.cli.main import positive

    s = sub.add_parser("campaign", help="validation campaigns: predict, relax, hull, promote over rounds")
    csub = s.add_subparsers(dest="campaign_command", required=True)
    c = csub.add_parser("run", help="run (or resume) a campaign locally with jobflow run_locally")
    c.add_argument("config", help="campaign YAML, e.g. configs/campaign_emt.yaml")
    c.add_argument("--rounds", type=positive, help="override the number of rounds")
    c.add_argument("--no-report", action="store_true")
    c.add_argument("--json", help="write the round summaries to this JSON file")
    c.set_defaults(func=cmd_campaign_run)
    c = csub.add_parser("promote", help="run the template-promotion Builder alone (incremental)")
    c.add_argument("config")
    c.add_argument("--builder-json", help="write the maggma Builder as JSON for 'mrun' instead of running it")
    c.add_argument("--all", action="store_true", help="consider every record, not only those updated since")
    c.set_defaults(func=cmd_campaign_promote)
    c = csub.add_parser("report", help="rewrite the Markdown report of a campaign's finished rounds")
    c.add_argument("config")
    c.set_defaults(func=cmd_campaign_report)
