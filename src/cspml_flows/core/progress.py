"""Progress bars (tqdm) for the stages that can take more than a few seconds.

Library calls are silent by default; the command line switches bars on with :func:`enable`, so users see
each long stage with its rate and ETA, while tests and API users get no terminal output.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_enabled = False


def enable(on: bool = True) -> None:
    """Show progress bars on standard error (the CLI does this unless ``--quiet``)."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    """Whether progress bars are shown."""
    return _enabled


def bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A progress bar with rate and ETA; a no-op bar when progress is off."""
    return tqdm(
        total=total,
        desc=f"  {desc}",
        unit=unit,
        disable=not _enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.1,
        leave=True,
    )


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it") -> Iterator[T]:
    """Iterate ``items`` while advancing a bar by one per item."""
    with bar(total, desc, unit) as b:
        for item in items:
            yield item
            b.update(1)
