"""cspml: template-based crystal structure prediction. Commands: import, index, train, predict, inverse, demo,
campaign. Each command's module is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cspml_flows.cli.options import one_line
from cspml_flows.cli.parsers import build_parser
from cspml_flows.core import progress
from cspml_flows.core.errors import CSPMLError

#: Loggers whose INFO messages are the commands' progress (others: warnings only, unless -v).
OWN_LOGGERS = ("cspml_flows",)

Handler = Callable[[argparse.Namespace], int]


def command_function(target: str | Handler) -> Handler:
    """The function a command runs: ``target`` itself, or the function named ``"module:function"``, imported
    now (so a command never imports the modules of the others)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class _OwnInfo(logging.Filter):
    """Records below WARNING pass from the project's own loggers only (``-v``: from every logger)."""

    def __init__(self, everyone: bool) -> None:
        super().__init__()
        self.everyone = everyone

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING and (self.everyone or record.name.startswith(OWN_LOGGERS))


@contextmanager
def cli_logging(verbose: bool, quiet: bool) -> Iterator[None]:
    """Log handlers of one command: progress (INFO; ``-v``: DEBUG too) on stdout, warnings and errors on
    stderr, ``-q``: warnings only. The root logger is as it was afterwards (``main`` called from Python)."""
    root = logging.getLogger()
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_OwnInfo(everyone=verbose))
    out.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    level = root.level
    for h in (out, err):
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        yield
    finally:
        for h in (out, err):
            root.removeHandler(h)
        root.setLevel(level)


def main_guard(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; library errors print as one line (exit code 2)."""
    os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib's C-level chatter on odd cells, for this process
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # bad arguments (one line, code 2) or --help (code 0)
        return exc.code if isinstance(exc.code, int) else 2
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    shown = progress.enabled()
    progress.enable(not quiet)
    try:
        with cli_logging(verbose, quiet):
            return command_function(args.func)(args)
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
    return main_guard(build_parser(__doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
