"""What the relaxation engines share below the workflow layer: torch threading, the SevenNet model name,
the structure fingerprint and the relaxation cache key."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from pymatgen.core import Structure

SEVENNET_MODEL = "7net-0"  # SevenNet-0 (11Jul2024), shipped in the sevenn wheel: nothing is downloaded
TORCH_THREADS_ENV = "CSPML_TORCH_THREADS"


def pin_torch_threads() -> int:
    """Limit torch to ``$CSPML_TORCH_THREADS`` threads (default 1) in this process; returns the count.

    Relaxations run one per process and share the cores; torch's default threading oversubscribes them
    and slows small structures down many times over. Called for SevenNet only, so the CHGNet path keeps its
    behaviour."""
    import torch

    n = max(1, int(os.environ.get(TORCH_THREADS_ENV, "1") or 1))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def structure_fingerprint(structure: Structure | dict) -> str:
    """A stable hash of a structure's lattice, species and wrapped fractional coordinates (4 decimals)."""
    s = Structure.from_dict(structure) if isinstance(structure, dict) else structure
    frac = np.round(np.mod(s.frac_coords, 1.0), 4) % 1.0
    rows = sorted((str(sp), *(f"{x:.4f}" for x in fc)) for sp, fc in zip(s.species, frac, strict=True))
    lattice = [f"{x:.4f}" for x in np.asarray(s.lattice.matrix).ravel()]
    return hashlib.sha1(json.dumps([lattice, rows]).encode()).hexdigest()[:20]


def relax_key(fingerprint: str, calculator: Any) -> str:
    """Cache key of one relaxation: (structure fingerprint, calculator id: text, or a RelaxationMaker or
    settings)."""
    return f"{fingerprint}:{calculator if isinstance(calculator, str) else calculator.calc_id}"
