"""Relaxation benchmark (flow vs plain ASE loop) on hand-made EMT metals: timings, energies, match rates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from benchmarks.relax_flow import RelaxBenchmarkConfig, compare_relaxations, plain_ase_relax
from pymatgen.core import Lattice, Structure

from cspml_flows.flows import CalculatorSettings
from cspml_flows.flows.calculators import relax_maker


def fcc(el: str, a: float) -> Structure:
    return Structure(Lattice.cubic(a), [el] * 4, [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])


def bcc(el: str, a: float) -> Structure:
    return Structure(Lattice.cubic(a), [el] * 2, [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_flow_and_plain_loop_agree_and_are_scored(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    settings = CalculatorSettings(name="emt", steps=200, fmax=0.05, batch_size=100)
    cfg = RelaxBenchmarkConfig(calculator="emt", top=2, chunk=1, out=str(tmp_path / "bench"))
    # query 1: ground truth fcc Cu, top-1 is bcc Cu (wrong), top-2 a strained fcc Cu (right after relaxing too)
    # query 2: ground truth fcc Al, top-1 fcc Al with a 6 % too large cell
    candidates = [[bcc("Cu", 2.87), fcc("Cu", 3.75)], [fcc("Al", 4.30)]]
    truths = [fcc("Cu", 3.61), fcc("Al", 4.05)]
    with caplog.at_level(logging.INFO, logger="benchmarks.relax_flow"):
        result = compare_relaxations(candidates, truths, settings, cfg)
    logs = [r.getMessage() for r in caplog.records if r.name == "benchmarks.relax_flow"]

    assert result["n_queries"] == 2 and result["n_structures"] == 3
    assert len(logs) == 2 and logs[-1].startswith("2/2 queries")
    assert result["plain_seconds"] > 0 and result["flow_seconds"] > 0
    assert result["plain_candidates_per_min"] == pytest.approx(60 * 3 / result["plain_seconds"])
    # same optimizer, same calculator, same criteria: the same energies
    assert result["max_energy_difference_eV_per_atom"] < 1e-3
    assert result["unrelaxed_top1"] == pytest.approx(0.5)
    assert result["relaxed_top1"] == pytest.approx(0.5)
    assert result["unrelaxed_top2"] == pytest.approx(1.0) and result["relaxed_top2"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "bench" / "relax_benchmark.json").read_text())
    assert written["n_structures"] == 3 and written["config"]["calculator"] == "emt"
    table = (tmp_path / "bench" / "relax_benchmark.md").read_text()
    assert "| 2 | 3 | emt |" in table and "top-2 relaxed" in table


def test_plain_relax_reaches_the_emt_lattice_constant_and_reports_failure():
    calc = relax_maker(CalculatorSettings(name="emt")).calculator
    relaxed, energy = plain_ase_relax(calc, fcc("Cu", 3.80), steps=300, fmax=0.01)
    assert relaxed is not None and energy is not None
    assert relaxed.lattice.a == pytest.approx(3.59, abs=0.03)  # EMT's Cu lattice constant, not the start
    assert plain_ase_relax(calc, fcc("Na", 4.2), steps=10, fmax=0.05) == (None, None)  # EMT has no Na


def test_mismatched_inputs_are_refused(tmp_path: Path):
    cfg = RelaxBenchmarkConfig(calculator="emt", out=str(tmp_path))
    with pytest.raises(ValueError, match="1 candidate lists for 2 ground truths"):
        compare_relaxations([[fcc("Cu", 3.6)]], [fcc("Cu", 3.6), fcc("Al", 4.0)], CalculatorSettings(name="emt"), cfg)
