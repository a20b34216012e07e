"""Logging of the benchmark commands: progress messages (the library's included) on stderr."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int = logging.INFO) -> None:
    """Send log records of ``level`` and above to stderr, one message per line.

    A root logger that already has handlers (a test runner's, an application's) keeps them; only the
    level is set.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
