"""cspml-flows: template-based crystal structure prediction with a learned composition similarity."""

from __future__ import annotations

import os

os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib prints C-level chatter on odd cells

__version__ = "0.1.0"

from cspml_flows.quiet import cache_electronegativities

cache_electronegativities()
