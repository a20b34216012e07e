"""The command line shared by the one-protocol studies (``python -m benchmarks.ablation``, ``.volumes``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from benchmarks.csp_tables import write_reports
from benchmarks.logs import configure_logging


def study_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the options every study takes: protocol, query limit, seed, workers, output files."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--protocol", default="mp20bt", choices=["mp20bt", "mpts52"])
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--markdown")
    return p


def run_study(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any]], markdown: Callable[[dict], str]
) -> int:
    """Run the study on the parsed ``args``, write ``--json``/``--markdown`` and print the Markdown."""
    configure_logging()
    result = run(args)
    md = markdown(result)
    write_reports(result, args.json, args.markdown, markdown=md)
    print(md)
    return 0
