"""cspml-flows: template-based crystal structure prediction with a learned composition similarity."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib prints C-level chatter on odd cells

__version__ = "0.1.0"

# pymatgen/monty/matminer emit deprecation chatter on every CIF read; keep user output readable.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*gcd.*")
warnings.filterwarnings("ignore", message=".*fractional coordinates rounded.*")
warnings.filterwarnings("ignore", message=".*Issues encountered while parsing CIF.*")
warnings.filterwarnings("ignore", module="pymatgen.io.cif")
