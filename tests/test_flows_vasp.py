"""The VASP path without VASP: flow wiring with atomate2's DoubleRelaxMaker, input generation with
POTCAR.spec (no POTCAR files), task-document conversion and MP2020-corrected hulls."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobflow import Flow
from jobflow.core.reference import OnMissing
from pymatgen.core import Lattice, Structure
from pymatgen.entries.computed_entries import ComputedEntry

from cspml_flows.flows.calculators import CalculatorSettings, relax_maker
from cspml_flows.flows.jobs import record_from_task_doc, relax_flow
from cspml_flows.stability import hull_analysis

FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
VASP = CalculatorSettings(name="vasp", vasp_incar={"EDIFFG": -0.05, "ENCUT": 600})


def srtio3() -> Structure:
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"], coords)


def test_vasp_key_ignores_ase_settings():
    assert VASP.calc_id == CalculatorSettings(name="vasp", vasp_incar=VASP.vasp_incar, fmax=0.5).calc_id
    assert VASP.calc_id != CalculatorSettings(name="vasp").calc_id


def test_vasp_flow_wiring(tmp_path: Path):
    items = [
        {"structure": srtio3().as_dict(), "kind": "candidate", "source_id": "t1"},
        {"structure": Structure(Lattice.cubic(4.21), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()},
    ]
    flow = relax_flow(items, VASP, str(tmp_path / "results"), "relax")
    subflows = [j for j in flow.jobs if isinstance(j, Flow)]
    assert len(subflows) == 2 and all(f.name == "double relax" for f in subflows)
    assert [j.name for j in subflows[0].jobs] == ["relax 1", "relax 2"]
    records = [j for j in flow.jobs if not isinstance(j, Flow) and j.name == "vasp_record"]
    assert len(records) == 2
    assert all(r.config.on_missing_references == OnMissing.NONE for r in records)  # a failed VASP run is recorded
    # each record waits on the second relaxation of its structure
    assert records[0].input_references[0].uuid == subflows[0].jobs[1].uuid
    assert flow.jobs[-1].name == "relax: gather"


def test_vasp_inputs_written_with_potcar_spec(tmp_path: Path):
    from atomate2.vasp.files import write_vasp_input_set

    relax1 = relax_maker(VASP).relax_maker1
    write_vasp_input_set(srtio3(), relax1.input_set_generator, directory=tmp_path, potcar_spec=True)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"INCAR", "KPOINTS", "POSCAR", "POTCAR.spec"} <= files and "POTCAR" not in files
    spec = (tmp_path / "POTCAR.spec").read_text().split()
    assert [s.split("_")[0] for s in spec] == ["Sr", "Ti", "O"]
    incar = (tmp_path / "INCAR").read_text()
    assert "ISIF = 3" in incar and "EDIFFG = -0.05" in incar and "ENCUT = 600" in incar


def _mp_entry(formula: str, energy: float, run_type: str = "GGA") -> dict:
    potcars = {"Mg": "PAW_PBE Mg_pv 06Sep2000", "O": "PAW_PBE O 08Apr2002"}
    from pymatgen.core import Composition

    comp = Composition(formula)
    params = {
        "run_type": run_type,
        "is_hubbard": False,
        "hubbards": {},
        "potcar_spec": [{"titel": potcars[el.symbol], "hash": None} for el in comp.elements],
    }
    return ComputedEntry(comp, energy, parameters=params).as_dict()


def _task_doc(formula: str, structure: Structure, energy: float, run_type: str = "GGA") -> dict:
    return {
        "state": "successful",
        "output": {"energy": energy, "structure": structure.as_dict()},
        "entry": _mp_entry(formula, energy, run_type),
    }


def test_task_doc_records_and_mp2020_hull():
    mgo = Structure(
        Lattice.cubic(4.21),
        ["Mg"] * 4 + ["O"] * 4,
        [*FCC, [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]],
    )
    mg = Structure(Lattice.cubic(4.5), ["Mg"] * 4, [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    o2 = Structure(Lattice.cubic(8.0), ["O", "O"], [[0, 0, 0], [0.15, 0, 0]])
    cand = record_from_task_doc(_task_doc("Mg4O4", mgo, -47.6), {"structure": mgo.as_dict()}, VASP)
    refs = [
        record_from_task_doc(_task_doc("Mg4", mg, -6.0), {"structure": mg.as_dict(), "kind": "reference"}, VASP),
        record_from_task_doc(_task_doc("O2", o2, -9.86), {"structure": o2.as_dict(), "kind": "reference"}, VASP),
    ]
    assert cand.status == "successful" and cand.energy_per_atom == pytest.approx(-47.6 / 8)
    failed = record_from_task_doc(None, {"structure": mgo.as_dict()}, VASP)
    assert failed.status == "failed" and "VASP relaxation job failed" in failed.reason
    scan = record_from_task_doc(_task_doc("Mg4O4", mgo, -60.0, run_type="r2SCAN"), {"structure": mgo.as_dict()}, VASP)
    scan = scan.model_copy(update={"key": "scan"})  # keys are unique per (structure, calculator) in real runs
    # a second, higher-energy MgO polymorph: on the hull with the raw energies it would be 0.05 eV/atom above
    other = record_from_task_doc(_task_doc("Mg4O4", mgo, -47.2), {"structure": mgo.as_dict()}, VASP)
    other = other.model_copy(update={"key": "other"})
    records, systems = hull_analysis([cand, other, failed, scan], refs, vasp=True)
    r_cand, r_other, r_failed, r_scan = records
    assert r_cand.e_above_hull == pytest.approx(0.0, abs=1e-9)
    assert r_other.e_above_hull == pytest.approx(0.4 / 8)
    # MP2020 oxide correction (-0.687 eV per O atom) lowers the corrected energy per atom by 0.687/2
    assert r_cand.corrected_energy_per_atom == pytest.approx(-47.6 / 8 - 0.687 / 2, abs=0.01)
    assert r_cand.formation_energy_per_atom < -2.5
    assert "relaxation failed" in r_failed.reason
    assert "MP2020" in r_scan.reason
    assert set(systems["Mg-O"]) == {r.key for r in refs}
    # without MP2020 (raw ComputedEntries), the formation energy is less negative by the oxide correction
    raw, _ = hull_analysis([cand], refs, vasp=False)
    assert raw[0].formation_energy_per_atom > r_cand.formation_energy_per_atom + 0.3
