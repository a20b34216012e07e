"""Command-line handlers of ``cspml campaign run | promote | report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cspml_flows.campaign import finished_rounds, load_campaign, promote, run_campaign, with_rounds
from cspml_flows.campaign.report import write_report
from cspml_flows.campaign.runner import campaign_builder
from cspml_flows.campaign.workdir import check_workdir
from cspml_flows.cli.options import check_out


def cmd_campaign_run(args: argparse.Namespace) -> int:
    """``cspml campaign run``: run (or resume) a campaign; ``--json``: its round summaries as JSON."""
    cfg = load_campaign(args.config)
    if args.rounds is not None:
        cfg = with_rounds(cfg, args.rounds)  # validated like the file's value
    check_out(args.json, "file", "--json file")
    result = run_campaign(cfg, report=not args.no_report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.model_dump(mode="json"), indent=2, default=str))
    return 0


def cmd_campaign_promote(args: argparse.Namespace) -> int:
    """``cspml campaign promote``: the promotion Builder alone (``--builder-json``: written for ``mrun``)."""
    cfg = load_campaign(args.config)
    check_out(args.builder_json, "file", "--builder-json file")
    if args.builder_json:
        builder = campaign_builder(cfg, incremental=not args.all)
        Path(args.builder_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.builder_json).write_text(builder.to_json())
        print(f"builder written to {args.builder_json}: run it with 'mrun {args.builder_json}'")
        return 0
    out = promote(cfg, incremental=not args.all)
    for mid in out.promoted:
        print(mid)
    return 0


def cmd_campaign_report(args: argparse.Namespace) -> int:
    """``cspml campaign report``: rewrite the Markdown report of a campaign's finished rounds."""
    cfg = load_campaign(args.config)
    check_workdir(cfg)  # the report of another campaign's workdir is not overwritten
    print(write_report(cfg, finished_rounds(cfg)))
    return 0
