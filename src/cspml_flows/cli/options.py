"""What every command line of the project shares: the parser with one-line errors and defaults in its help,
option types, the pair sampling options, the output check."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cspml_flows.core.config import check_output_path, excerpt

MAX_MESSAGE = 1000  # characters of an error line


def one_line(message: object) -> str:
    """An error message on one line, at most ``MAX_MESSAGE`` characters (a value quoted whole is cut)."""
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default appended, unless its help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit code 2) like every other bad input, and defaults
    in the help of every option."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``error: PROG: MESSAGE`` on one line and exit with code 2."""
        print(f"error: {self.prog}: {one_line(message)}", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {excerpt(text)}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive = int_at_least(1)
non_negative = int_at_least(0)


def pair_sampling_options(s: argparse.ArgumentParser) -> None:
    """The pair sampling bounds of the similarity model's training (``cspml train`` and the benchmarks)."""
    help_anchors = "training templates whose pairs are sampled, at most (a seeded draw)"
    s.add_argument("--max-anchors", type=positive, default=20000, help=help_anchors)
    help_group = "templates of an anonymous formula searched for an anchor's partners, at most"
    s.add_argument("--max-group", type=positive, default=5000, help=help_group)


def check_out(out: str | Path | None, kind: str = "folder", label: str | None = None) -> None:
    """Refuse, before any work is done, an output ``kind`` ('folder' or 'file') that cannot be written (see
    :func:`cspml_flows.core.config.check_output_path`): one line, nothing created. ``None``: nothing to check."""
    if out:
        check_output_path(out, kind, label)
