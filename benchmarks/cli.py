"""Command line of the benchmarks: ``python -m benchmarks csp | relax-flow`` from the repository root."""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.config import BenchmarkConfig
from benchmarks.csp_tables import markdown_table, write_reports
from benchmarks.hetero import run_hetero_benchmark
from benchmarks.hetero_tables import markdown
from benchmarks.logs import configure_logging
from benchmarks.relax_flow import RelaxBenchmarkConfig, run_relax_benchmark
from benchmarks.runner import run_benchmark
from cspml_flows.cli.options import Parser, check_out, non_negative, one_line, pair_sampling_options, positive
from cspml_flows.core import progress
from cspml_flows.core.composition import MAX_ASSIGNMENTS
from cspml_flows.core.errors import CSPMLError


def cmd_benchmark(args: argparse.Namespace) -> int:
    """``python -m benchmarks csp``: match rates of one protocol and setting, printed as Markdown."""
    if args.max_assignments is not None and args.max_assignments < 1:
        raise CSPMLError("--max-assignments must be at least 1")
    check_out(args.json, "file", "--json file")
    check_out(args.markdown, "file", "--markdown file")

    cfg = BenchmarkConfig(
        protocol=args.protocol,
        setting=args.setting,
        limit=args.limit,
        workers=args.workers,
        seed=args.seed,
        baselines=tuple(args.baselines),
        retrain=args.retrain,
        hetero_extra=not getattr(args, "no_extra", False),
        speed=not getattr(args, "no_speed", False),
        ranker_queries=args.ranker_queries,
        subset=args.slice,
        max_assignments=args.max_assignments or MAX_ASSIGNMENTS,
        max_anchors=args.max_anchors,
        max_group=args.max_group,
    )
    if getattr(args, "model", "cspml") == "hetero":
        return benchmark_hetero(cfg, args.json, args.markdown)
    result = run_benchmark(cfg)
    write_reports(result, args.json, args.markdown)
    print(markdown_table([result]))
    return 0


def benchmark_hetero(cfg: BenchmarkConfig, json_path: str | None, md_path: str | None) -> int:
    """``python -m benchmarks csp --model hetero``: the hetero model beside CSPML, printed as Markdown."""
    result = run_hetero_benchmark(cfg)
    md = markdown(result)
    write_reports(result, json_path, md_path, md)
    print(md)
    return 0


def cmd_relax_flow(args: argparse.Namespace) -> int:
    """``python -m benchmarks relax-flow``: relaxations through the flow against a plain ASE loop."""
    check_out(args.out)
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
    result = run_relax_benchmark(cfg)
    print(result["markdown"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks`` parser."""
    p = Parser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("csp", help="CSP match rates of a protocol (CSPML or the hetero model, with baselines)")
    s.add_argument("--protocol", required=True, choices=["mp20bt", "mpts52"])
    s.add_argument("--setting", default="standard", choices=["standard", "strict"])
    s.add_argument("--limit", type=positive, help="fixed-seed sample of N queries")
    s.add_argument("--workers", type=positive, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--baselines", nargs="*", default=["random", "nearest", "pymatgen_substitution"])
    s.add_argument("--retrain", action="store_true", help="ignore a cached benchmark model")
    pair_sampling_options(s)
    s.add_argument("--model", default="cspml", choices=["cspml", "hetero"], help="hetero: compare with CSPML")
    s.add_argument("--no-extra", action="store_true", help="hetero: skip polymorph/leave-prototype-out evaluations")
    s.add_argument("--no-speed", action="store_true", help="skip the top-5 throughput measurement")
    s.add_argument(
        "--ranker-queries",
        type=non_negative,
        default=2000,
        help="pool formulas the ranker learns from (0: pair model only)",
    )
    s.add_argument(
        "--slice",
        default="all",
        choices=["all", "tie-heavy"],
        help="tie-heavy: queries with >= 3 elements tied in amount",
    )
    s.add_argument(
        "--max-assignments",
        type=int,
        help="element-to-site assignments per composition (default 120, fewest swaps first)",
    )
    s.add_argument("--json")
    s.add_argument("--markdown")
    s.set_defaults(func=cmd_benchmark)

    c = sub.add_parser("relax-flow", help="relax top-k candidates of benchmark queries: flow vs plain ASE loop")
    c.add_argument("--protocol", default="mp20bt", choices=["mp20bt", "mpts52"])
    c.add_argument("--queries", type=positive, default=100)
    c.add_argument("--top", type=positive, default=5)
    c.add_argument("--calculator", default="chgnet", choices=["chgnet", "sevennet", "emt"])
    c.add_argument("--steps", type=positive, default=300)
    c.add_argument("--fmax", type=float, default=0.05)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=positive, default=2)
    c.add_argument("--out", default="out/bench/relax")
    c.add_argument("--chunk", type=positive, default=5, help="queries per alternation of the two methods")
    c.add_argument("--pool", help="an existing pool store folder (default: import under $CSPML_HOME)")
    c.set_defaults(func=cmd_relax_flow)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark command: progress on stderr, the tables on stdout; errors of the library print as
    one line (exit code 2), as ``cspml``'s do."""
    os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib's C-level chatter on odd cells, for this process
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # bad arguments (one line, code 2) or --help (code 0)
        return exc.code if isinstance(exc.code, int) else 2
    configure_logging()
    shown = progress.enabled()
    progress.enable()  # progress bars on stderr, as the command line shows them
    try:
        return args.func(args)
    except CSPMLError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        progress.enable(shown)


if __name__ == "__main__":
    sys.exit(main())
