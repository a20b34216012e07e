"""Energies of candidate structures for the energy experiments, cached on disk.

Single points of unrelaxed structures (:func:`single_points`) and short relaxations through the flows'
own relaxation code (:func:`relaxed`), both kept in an :class:`EnergyCache` (JSON, keyed by structure
fingerprint and calculator settings) so a rerun only scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from cspml_flows.core.engines import SEVENNET_MODEL, relax_key, structure_fingerprint
from cspml_flows.flows.calculators import CalculatorSettings
from cspml_flows.flows.relax import RelaxationMaker, relax_one

logger = logging.getLogger(__name__)
SP_TAG = "single-point"


class EnergyCache:
    """Energies on disk: one JSON object ``{key: record}``; key = ``fingerprint:calculator``.

    A record holds at least ``energy_per_atom`` (None where the calculator failed) and ``seconds`` (the
    compute time when it was first made, so reruns still report the cost).

    Parameters
    ----------
    path
        The JSON file (None: in memory only). An unreadable file starts an empty cache.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, dict[str, Any]] = {}
        self._dirty = 0
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.data = {}  # unreadable: start again (it is only a cache)

    @staticmethod
    def key(structure: Structure, calculator: str) -> str:
        """Cache key of a structure under a calculator tag."""
        return f"{structure_fingerprint(structure)}:{calculator}"

    def get(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, None when there is none."""
        return self.data.get(key)

    def put(self, key: str, record: dict[str, Any], flush_every: int = 25) -> None:
        """Store a record; the file is rewritten after every ``flush_every`` new records."""
        self.data[key] = record
        self._dirty += 1
        if self._dirty >= flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the records not yet on disk (atomically: a temporary file replaced)."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, separators=(",", ":")))
        tmp.replace(self.path)
        self._dirty = 0

    def __len__(self) -> int:
        return len(self.data)


def sevennet_settings(steps: int = 20, fmax: float = 0.05) -> CalculatorSettings:
    """The flows' SevenNet-0 relaxation settings of this experiment (FIRE, cell filter)."""
    return CalculatorSettings(name="sevennet", steps=steps, fmax=fmax, relax_cell=True, optimizer="FIRE")


def single_point_tag(settings: CalculatorSettings) -> str:
    """Cache tag of single points with the calculator of ``settings``."""
    return f"{settings.name}/{SEVENNET_MODEL if settings.name == 'sevennet' else ''}/{SP_TAG}"


def single_point(structure: Structure, calculator: Callable[[], Any]) -> dict[str, Any]:
    """Energy per atom of one structure as given (None where the calculator fails or is not finite)."""
    t, cpu = time.perf_counter(), time.process_time()
    try:
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = calculator()
        e = float(atoms.get_potential_energy()) / len(atoms)
        e = e if math.isfinite(e) else None
    except Exception:  # any failure of the potential on a candidate is a missing energy, logged
        logger.warning("single point failed on %s", structure.composition.reduced_formula, exc_info=True)
        e = None
    return {
        "energy_per_atom": e,
        "seconds": time.perf_counter() - t,
        "cpu_seconds": time.process_time() - cpu,
        "nsites": len(structure),
    }


def single_points(structures: Sequence[Structure], calculator, tag: str, cache: EnergyCache) -> list[dict]:
    """Energy per atom of each structure as given (no relaxation), from the cache where it is there."""
    out = []
    for s in structures:
        key = cache.key(s, tag)
        rec = cache.get(key)
        if rec is None:
            rec = single_point(s, calculator)
            cache.put(key, rec)
        out.append(rec)
    return out


def cache_id(settings: CalculatorSettings) -> str:
    """Energy-cache id of relaxation settings (a hash of the settings, stable across Maker versions)."""
    digest = hashlib.sha1(json.dumps(settings.key_settings(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{settings.name}/{digest}"


def relaxed(structures: Sequence[Structure], maker, settings: CalculatorSettings, cache: EnergyCache) -> list[dict]:
    """Energy per atom after the flows' relaxation (:func:`cspml_flows.flows.relax.relax_one`); a relaxation
    that stops unconverged at ``settings.steps`` keeps its last energy (that is the short relaxation)."""
    relaxation = RelaxationMaker(relax_maker=maker)
    cid = cache_id(settings)
    out = []
    for s in structures:
        key = relax_key(structure_fingerprint(s), cid)
        rec = cache.get(key)
        if rec is None:
            cpu = time.process_time()
            r = relax_one(relaxation, {"structure": s})
            rec = {
                "energy_per_atom": r.energy_per_atom,
                "seconds": r.elapsed_s,
                "cpu_seconds": time.process_time() - cpu,
                "n_steps": r.n_steps,
                "converged": r.converged,
                "status": r.status,
                "nsites": len(s),
            }
            cache.put(key, rec, flush_every=5)
        out.append(rec)
    return out
