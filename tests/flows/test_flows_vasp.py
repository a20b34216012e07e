"""The VASP path without VASP: flow wiring with atomate2's MP GGA double relaxation, input generation with
POTCAR.spec (no POTCAR files), task-document conversion, MP2020-corrected hulls, and a whole campaign run
through atomate2's run_vasp and custodian with the stand-in VASP (``cspml_flows.testing.fake_vasp``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobflow import Flow
from jobflow.core.reference import OnMissing
from monty.serialization import loadfn
from pymatgen.core import Lattice, Structure
from pymatgen.entries.computed_entries import ComputedEntry

from cspml_flows.flows.calculators import CalculatorSettings, relax_maker
from cspml_flows.flows.relax import as_relaxation, relax_flow
from cspml_flows.flows.stability import hull_analysis
from cspml_flows.flows.vasp import record_from_task_doc

# the stand-in runs on synthetic POTCARs (pymatgen knows none of their hashes) and metallic test cells
pytestmark = [
    pytest.mark.filterwarnings("ignore:POTCAR data with symbol:UserWarning"),
    pytest.mark.filterwarnings("ignore:No POTCAR file with matching TITEL fields:UserWarning"),
    pytest.mark.filterwarnings("ignore:Relaxation of likely metal with ISMEAR:UserWarning"),
    # atomate2's task document applies MP2020 to the intermetallic test cells, which have no oxidation states
    pytest.mark.filterwarnings("ignore:Failed to guess oxidation states:UserWarning"),
]


FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
VASP = CalculatorSettings(name="vasp", vasp_incar={"EDIFFG": -0.05, "ENCUT": 600})
VR = as_relaxation(VASP)


def srtio3() -> Structure:
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"], coords)


def test_vasp_key_ignores_ase_settings_and_the_launch():
    assert VASP.calc_id == CalculatorSettings(name="vasp", vasp_incar=VASP.vasp_incar, fmax=0.5).calc_id
    assert VASP.calc_id != CalculatorSettings(name="vasp").calc_id
    # how VASP is launched (command, custodian polling) does not change a result
    launched = CalculatorSettings(name="vasp", vasp_incar=VASP.vasp_incar, vasp_run={"vasp_cmd": "srun vasp_std"})
    assert launched.calc_id == VASP.calc_id
    assert relax_maker(launched).relax_maker2.run_vasp_kwargs == {"vasp_cmd": "srun vasp_std"}
    spec = CalculatorSettings(name="vasp", vasp_potcar_spec=True)
    assert relax_maker(spec).relax_maker1.write_input_set_kwargs == {"potcar_spec": True}
    assert relax_maker(VASP).relax_maker1.write_input_set_kwargs == {}


def test_vasp_flow_wiring(tmp_path: Path):
    items = [
        {"structure": srtio3().as_dict(), "kind": "candidate", "source_id": "t1"},
        {"structure": Structure(Lattice.cubic(4.21), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()},
    ]
    flow = relax_flow(items, VASP, str(tmp_path / "results"), "relax")
    subflows = [j for j in flow.jobs if isinstance(j, Flow)]
    assert len(subflows) == 2 and all(f.name == "MP GGA double relax" for f in subflows)
    assert [j.name for j in subflows[0].jobs] == ["MP GGA relax 1", "MP GGA relax 2"]
    records = [j for j in flow.jobs if not isinstance(j, Flow) and j.name == "relax: record"]
    assert len(records) == 2
    assert all(r.config.on_missing_references == OnMissing.NONE for r in records)  # a failed VASP run is recorded
    # each record waits on both relaxations of its structure (the final document and the first one's
    # custodian corrections); the order of a job's input references is not fixed
    for rec, sub in zip(records, subflows, strict=True):
        assert {r.uuid for r in rec.input_references} == {j.uuid for j in sub.jobs}
    assert flow.jobs[-1].name == "relax: gather"


def test_vasp_inputs_written_with_potcar_spec(tmp_path: Path):
    from atomate2.vasp.files import write_vasp_input_set

    relax1 = relax_maker(VASP).relax_maker1
    write_vasp_input_set(srtio3(), relax1.input_set_generator, directory=tmp_path, potcar_spec=True)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"INCAR", "KPOINTS", "POSCAR", "POTCAR.spec"} <= files and "POTCAR" not in files
    spec = (tmp_path / "POTCAR.spec").read_text().split()
    assert spec == ["Sr_sv", "Ti_pv", "O"]  # MP's POTCAR choices
    incar = (tmp_path / "INCAR").read_text()
    assert "ISIF = 3" in incar and "EDIFFG = -0.05" in incar and "ENCUT = 600" in incar
    assert "GGA" not in incar  # PBE from the POTCARs: run type GGA, which MP2020 accepts (GGA = PS would not)


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
    cand = record_from_task_doc(_task_doc("Mg4O4", mgo, -47.6), {"structure": mgo.as_dict()}, VR)
    refs = [
        record_from_task_doc(_task_doc("Mg4", mg, -6.0), {"structure": mg.as_dict(), "kind": "reference"}, VR),
        record_from_task_doc(_task_doc("O2", o2, -9.86), {"structure": o2.as_dict(), "kind": "reference"}, VR),
    ]
    assert cand.status == "successful" and cand.energy_per_atom == pytest.approx(-47.6 / 8)
    failed = record_from_task_doc(None, {"structure": mgo.as_dict()}, VR)
    assert failed.status == "failed" and "VASP relaxation job failed" in failed.reason
    scan = record_from_task_doc(_task_doc("Mg4O4", mgo, -60.0, run_type="r2SCAN"), {"structure": mgo.as_dict()}, VR)
    scan = scan.model_copy(update={"key": "scan"})  # keys are unique per (structure, calculator) in real runs
    # a second, higher-energy MgO polymorph: on the hull with the raw energies it would be 0.05 eV/atom above
    other = record_from_task_doc(_task_doc("Mg4O4", mgo, -47.2), {"structure": mgo.as_dict()}, VR)
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


def test_task_doc_state_decides():
    """No ``state`` or a failed state is a failed record (with the real formula); corrections are kept."""
    mg = Structure(Lattice.cubic(4.5), ["Mg"] * 4, FCC)
    item = {"structure": mg.as_dict()}
    doc = _task_doc("Mg4", mg, -6.0)
    doc["custodian"] = [{"corrections": [{"handler": {"@class": "VaspErrorHandler"}, "errors": ["pricel"]}]}]
    ok = record_from_task_doc(doc, item, VR)
    assert ok.status == "successful" and ok.corrections[0]["handler"] == "VaspErrorHandler"
    # relax 2 failed after relax 1 was corrected: the failed record keeps relax 1's correction
    assert record_from_task_doc(None, item, VR, [doc]).corrections == ok.corrections
    for state, reason in ((None, "without a state"), ("failed", "task state failed")):
        rec = record_from_task_doc({**doc, "state": state}, item, VR)
        assert rec.status == "failed" and reason in rec.reason and rec.formula == "Mg"
        assert rec.energy == -6.0 and rec.corrections == ok.corrections


def _templates(path: Path) -> str:
    """A tiny template store: fcc Cu and Au (the elemental references), B2 NiAl and L1_2 Ni3Al."""
    from cspml_flows.templates.schema import template_doc_from_structure
    from cspml_flows.templates.store import TemplateStore

    def fcc(el: str, a: float) -> Structure:
        return Structure(Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]]), [el], [[0, 0, 0]])

    structures = {
        "fcc-Cu": fcc("Cu", 3.61),
        "fcc-Au": fcc("Au", 4.08),
        "B2-NiAl": Structure(Lattice.cubic(2.88), ["Ni", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "L12-Ni3Al": Structure(Lattice.cubic(3.57), ["Al", "Ni", "Ni", "Ni"], FCC),
    }
    ts = TemplateStore.open(path)
    ts.add(
        [
            template_doc_from_structure(s, k, source="test", e_above_hull=0.0).model_dump(mode="json")
            for k, s in structures.items()
        ]
    )
    ts.close()
    return str(path)


def test_campaign_through_custodian_with_standin_vasp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A VASP campaign without VASP: atomate2's MP GGA double relaxation runs the stand-in through run_vasp
    and custodian (default handlers), with synthetic POTCARs found through PMG_VASP_PSP_DIR. CuAu hits an
    error custodian corrects (the correction is in its record); CuAu3 hits one it cannot (a failed record
    with the real formula); the rest are placed on an MP2020-corrected hull and the report is written."""
    import sys

    from pymatgen.core import SETTINGS
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    from cspml_flows.campaign import parse_campaign, run_campaign
    from cspml_flows.flows.stores import RESULTS_COLLECTION, job_store, open_store
    from cspml_flows.testing.fake_vasp import FAULT_ENV
    from cspml_flows.testing.potcar import write_psp_dir

    monkeypatch.setitem(SETTINGS, "PMG_VASP_PSP_DIR", str(write_psp_dir(tmp_path / "psp", ["Cu", "Au"])))
    monkeypatch.setenv(FAULT_ENV, "correctable:CuAu,fatal:CuAu3")
    run = {
        "vasp_cmd": f"{sys.executable} -m cspml_flows.testing.fake_vasp",
        "custodian_kwargs": {"polling_time_step": 0.1, "monitor_freq": 50},
    }
    cfg = parse_campaign(
        {
            "name": "standin",
            "compositions": ["CuAu", "Cu3Au", "CuAu3"],
            "top_k": 1,
            "calculator": {"name": "vasp", "vasp_incar": {"EDIFFG": -0.05}, "vasp_run": run},
            "hull_threshold": 5.0,
            "model": None,
            "stores": {"templates": _templates(tmp_path / "templates")},
            "workdir": str(tmp_path / "work"),
        }
    )
    result = run_campaign(cfg).model_dump()
    rows = {r["formula"]: r for r in result["rounds"][0]["candidates"]}
    assert set(rows) == {"CuAu", "Cu3Au", "CuAu3"}
    assert rows["CuAu3"]["status"] == "failed" and "VASP relaxation job failed" in rows["CuAu3"]["reason"]
    for f in ("CuAu", "Cu3Au"):
        assert rows[f]["status"] == "successful" and rows[f]["e_above_hull"] is not None, str(rows[f])
        assert rows[f]["hull_note"] is None  # not rejected by MP2020
    rs = open_store(cfg.results_store(), RESULTS_COLLECTION)
    recs = {d["formula"]: d for d in rs.query({})}
    rs.close()
    assert set(recs) == {"Cu", "Au", "CuAu", "Cu3Au", "CuAu3"}
    assert all(recs[f]["status"] == "successful" for f in ("Cu", "Au", "CuAu", "Cu3Au"))
    fixes = [(c["job"], c["handler"], c["errors"]) for c in recs["CuAu"]["corrections"]]
    assert fixes == [(f"MP GGA relax {i}", "VaspErrorHandler", ["pricel"]) for i in (1, 2)]
    assert recs["Cu3Au"]["corrections"] == [] and recs["CuAu3"]["energy"] is None
    entry = recs["CuAu"]["entry"]
    assert entry["parameters"]["run_type"] == "GGA"
    assert [p["titel"] for p in entry["parameters"]["potcar_spec"]] == [
        "PAW_PBE Cu_pv SYNTHETIC",
        "PAW_PBE Au SYNTHETIC",
    ]
    from pymatgen.entries.computed_entries import ComputedEntry

    assert MaterialsProject2020Compatibility(check_potcar=False).process_entry(ComputedEntry.from_dict(entry))
    # the real task documents are in the job store; custodian gave up on CuAu3 after two PRICEL errors
    js = job_store(cfg.jobs_store())
    js.connect()
    docs = list(js.query({"name": {"$regex": "^MP GGA relax"}}, load=False))
    js.close()
    labels = sorted(d["output"]["task_label"] for d in docs)
    assert labels == ["MP GGA relax 1"] * 4 + ["MP GGA relax 2"] * 4
    assert all(d["output"]["state"] == "successful" for d in docs)
    logs = [loadfn(p) for p in (cfg.workdir_path() / "jobs").glob("job_*/custodian.json")]
    assert [[c["errors"] for c in log[0]["corrections"]] for log in logs] == [[["pricel"], ["pricel"]]]
    report = Path(result["report"]).read_text()
    assert "CuAu3" in report and "VASP relaxation job failed" in report
    assert rows["CuAu"]["corrections"] == ["VaspErrorHandler: pricel"] * 2  # the summary and report show the retries
    assert "custodian corrected VaspErrorHandler: pricel" in report
