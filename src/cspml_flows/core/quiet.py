"""Library warnings that say nothing to a user of this tool, silenced only around the calls that raise them.

pymatgen warns on every CIF it reads ("fractional coordinates rounded"), on elements without a Pauling
electronegativity, and its prototype helpers raise a deprecation notice on each call. These are filtered
where they arise instead of process-wide, so warnings from the user's own code stay visible.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from pymatgen.core import Element


@contextmanager
def library_warnings(*categories: type[Warning]) -> Iterator[None]:
    """Ignore warnings of ``categories`` (default: user, deprecation and future warnings) inside the block."""
    with warnings.catch_warnings():
        for cat in categories or (UserWarning, DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", cat)
        yield


def cache_electronegativities() -> None:
    """Read every element's Pauling electronegativity once with pymatgen's 'No Pauling electronegativity for
    Ar' warning silenced. ``Element.X`` is a cached property, so pymatgen's own formula sorting (which reads
    it for every reduced formula with a noble gas) stays quiet afterwards; no filter is installed."""
    with library_warnings(UserWarning):
        for el in Element:
            _ = el.X
