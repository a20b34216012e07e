"""CHGNet (weights inside the chgnet wheel) through atomate2's ForceFieldRelaxMaker in the flow (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobflow import JobStore, run_locally
from maggma.stores import MemoryStore
from pymatgen.core import Lattice, Structure

from cspml_flows.core.schemas import RelaxOutput
from cspml_flows.flows.calculators import CalculatorSettings
from cspml_flows.flows.relax import relax_flow

pytestmark = pytest.mark.slow


def test_chgnet_relaxation_in_a_flow(tmp_path: Path):
    settings = CalculatorSettings(name="chgnet", steps=200, fmax=0.05)
    rocksalt = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    nacl = Structure(Lattice.cubic(5.4), ["Na"] * 4 + ["Cl"] * 4, rocksalt + [[x + 0.5, y, z] for x, y, z in rocksalt])
    si = Structure(Lattice.cubic(5.6), ["Si"] * 2, [[0, 0, 0], [0.25, 0.25, 0.25]])
    items = [{"structure": s.as_dict(), "kind": "reference"} for s in (nacl, si)]
    flow = relax_flow(items, settings, str(tmp_path / "results"), "chgnet")
    store = JobStore(MemoryStore())
    run_locally(flow, store=store, create_folders=False, log=False)
    out = RelaxOutput.coerce(flow.output.resolve(store))
    assert [r.status for r in out.records] == ["successful", "successful"], [r.reason for r in out.records]
    assert all(r.calculator.startswith("chgnet/") for r in out.records)
    a = out.records[0].structure.lattice.a
    assert 5.5 < a < 5.85  # NaCl, from 5.4 A (experiment 5.64, PBE ~5.70)
    assert -3.9 < out.records[0].energy_per_atom < -3.3  # MP-compatible (PBE) scale of CHGNet
    assert -5.6 < out.records[1].energy_per_atom < -5.2  # Si diamond-like cell
    again = relax_flow(items, settings, str(tmp_path / "results"), "chgnet")
    assert len(again.jobs) == 1  # cached: only the gather job
