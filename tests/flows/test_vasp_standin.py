"""The VASP path without VASP: the stand-in executable (``cspml_flows.testing.fake_vasp``) run by atomate2's
``run_vasp`` under custodian with its default handlers, under ``jobflow.run_locally``; real task documents
parsed by emmet's ``TaskDoc.from_directory``; an error custodian corrects and one it cannot; POTCARs from a
synthetic ``PMG_VASP_PSP_DIR`` and from ``POTCAR.spec``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from jobflow import Flow, run_locally
from monty.io import zopen
from monty.serialization import loadfn
from pymatgen.core import Lattice, Structure
from pymatgen.io.vasp import Oszicar, Outcar, Vasprun

from cspml_flows.testing.fake_vasp import EMT_SHIFT, FAULT_ENV
from cspml_flows.testing.potcar import SYNTHETIC_MARK, write_psp_dir

# the stand-in runs on synthetic POTCARs (pymatgen knows none of their hashes) and metallic test cells
pytestmark = [
    pytest.mark.filterwarnings("ignore:POTCAR data with symbol:UserWarning"),
    pytest.mark.filterwarnings("ignore:No POTCAR file with matching TITEL fields:UserWarning"),
    pytest.mark.filterwarnings("ignore:Relaxation of likely metal with ISMEAR:UserWarning"),
    # atomate2's task document applies MP2020 to the intermetallic test cells, which have no oxidation states
    pytest.mark.filterwarnings("ignore:Failed to guess oxidation states:UserWarning"),
]


FAKE_VASP = f"{sys.executable} -m cspml_flows.testing.fake_vasp"
FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
# custodian polls the running process every polling_time_step seconds (default 10 s)
RUN_VASP = {"vasp_cmd": FAKE_VASP, "custodian_kwargs": {"polling_time_step": 0.1, "monitor_freq": 50}}


def cuau() -> Structure:
    """L1_0-like CuAu in a 4-atom cubic cell, a little strained so the relaxation has work to do."""
    coords = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(3.9), ["Cu", "Cu", "Au", "Au"], coords)


def relax_maker(potcar_spec: bool = True):
    """atomate2's MP GGA relaxation (MPRelaxSet inputs) running the stand-in through custodian."""
    from atomate2.vasp.jobs.mp import MPGGARelaxMaker
    from pymatgen.io.vasp.sets import MPRelaxSet

    return MPGGARelaxMaker(
        input_set_generator=MPRelaxSet(force_gamma=True, user_incar_settings={"EDIFFG": -0.05}),
        write_input_set_kwargs={"potcar_spec": potcar_spec},
        run_vasp_kwargs=RUN_VASP,
    )


def _run(flow, tmp_path: Path) -> dict:
    return run_locally(flow, create_folders=True, root_dir=tmp_path, log=False)


def _job_dir(tmp_path: Path) -> Path:
    dirs = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("job_")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_standin_outputs_parse(tmp_path: Path):
    """A direct run: pymatgen's parsers read every file and the energies are EMT's (shifted per element)."""
    from ase.calculators.emt import EMT
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.vasp.inputs import Incar, Kpoints, Poscar

    s = cuau()
    Incar({"NSW": 20, "IBRION": 2, "ISIF": 3, "EDIFFG": -0.05, "ISPIN": 1}).write_file(tmp_path / "INCAR")
    Poscar(s).write_file(tmp_path / "POSCAR")
    Kpoints.gamma_automatic((4, 4, 4)).write_file(tmp_path / "KPOINTS")
    (tmp_path / "POTCAR.spec").write_text("Cu\nAu\n")
    out = subprocess.run(FAKE_VASP.split(), cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "reached required accuracy" in out
    v = Vasprun(tmp_path / "vasprun.xml")
    assert v.converged and 1 < v.nionic_steps < 20
    assert v.potcar_symbols == ["PAW_PBE Cu SYNTHETIC", "PAW_PBE Au SYNTHETIC"]
    assert v.run_type == "GGA" and v.kpoints.kpts[0] == (4, 4, 4)
    atoms = AseAtomsAdaptor.get_atoms(v.final_structure)
    atoms.calc = EMT()
    shift = 2 * EMT_SHIFT["Cu"] + 2 * EMT_SHIFT["Au"]
    assert v.final_energy == pytest.approx(atoms.get_potential_energy() + shift, abs=1e-5)
    assert v.final_energy < v.ionic_steps[0]["e_0_energy"]
    assert max(abs(f) for row in v.ionic_steps[-1]["forces"] for f in row) < 0.05
    assert Oszicar(tmp_path / "OSZICAR").final_energy == pytest.approx(v.final_energy)
    outcar = Outcar(tmp_path / "OUTCAR")
    assert outcar.final_energy == pytest.approx(v.final_energy) and outcar.run_stats["cores"] == 1
    contcar = Structure.from_file(tmp_path / "CONTCAR")
    assert contcar.lattice.a == pytest.approx(v.final_structure.lattice.a, abs=1e-6)


def test_relax_through_custodian_gives_task_document(tmp_path: Path):
    """atomate2 writes MPRelaxSet inputs (POTCAR.spec), run_vasp runs the stand-in under custodian with the
    default handlers and validators, and emmet parses a successful GGA task document with an MP2020 entry."""
    from atomate2.vasp.run import DEFAULT_HANDLERS
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    job = relax_maker().make(cuau())
    doc = _run(job, tmp_path)[job.uuid][1].output
    assert doc.state == "successful" and doc.output.energy < -14
    assert doc.calcs_reversed[0].output.ionic_steps[0].e_0_energy > doc.output.energy
    assert doc.entry.parameters["run_type"] == "GGA" and doc.output.bandgap == pytest.approx(0.5)
    assert [p["titel"] for p in doc.entry.parameters["potcar_spec"]] == [
        "PAW_PBE Cu_pv SYNTHETIC",
        "PAW_PBE Au SYNTHETIC",
    ]
    assert MaterialsProject2020Compatibility(check_potcar=False).process_entry(doc.entry) is not None
    assert len(doc.custodian) == 1 and doc.custodian[0].corrections == []
    assert len(DEFAULT_HANDLERS) > 5 and "VaspErrorHandler" in {type(h).__name__ for h in DEFAULT_HANDLERS}
    files = {p.name for p in _job_dir(tmp_path).iterdir()}
    assert {"vasprun.xml.gz", "OUTCAR.gz", "custodian.json.gz", "POTCAR.spec"} <= files


def test_correctable_error_is_corrected_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """PRICEL on the first run: custodian's VaspErrorHandler sets ISYM = 0 and SYMPREC = 1e-8, the rerun
    succeeds, and the task document carries the correction."""
    monkeypatch.setenv(FAULT_ENV, "correctable:CuAu")
    job = relax_maker().make(cuau())
    doc = _run(job, tmp_path)[job.uuid][1].output
    assert doc.state == "successful"
    [corr] = doc.custodian[0].corrections
    assert corr["errors"] == ["pricel"] and corr["handler"]["@class"] == "VaspErrorHandler"
    assert corr["actions"] == [{"dict": "INCAR", "action": {"_set": {"SYMPREC": 1e-8, "ISYM": 0}}}]
    assert doc.orig_inputs.incar.get("ISYM") is None and doc.input.incar["ISYM"] == 0
    assert (_job_dir(tmp_path) / "error.1.tar.gz").is_file()  # custodian's backup of the failed run


def test_uncorrectable_error_fails_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """PRICEL on every run: after its one correction the handler has none left, custodian raises, the job
    fails with no output, and custodian.json names the error."""
    monkeypatch.setenv(FAULT_ENV, "fatal")
    job = relax_maker().make(cuau())
    responses = _run(job, tmp_path)
    assert job.uuid not in responses
    log = loadfn(_job_dir(tmp_path) / "custodian.json")
    assert [c["errors"] for c in log[0]["corrections"]] == [["pricel"], ["pricel"]]
    assert log[0]["corrections"][1]["actions"] == []  # SYMPREC is already 1e-8: nothing left to try
    assert type(log[0]["handler"]).__name__ == "VaspErrorHandler"


def test_crash_fails_the_validator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The executable dies with no output: no handler matches, custodian's vasprun.xml validator fails."""
    monkeypatch.setenv(FAULT_ENV, "crash")
    job = relax_maker().make(cuau())
    assert job.uuid not in _run(job, tmp_path)
    log = loadfn(_job_dir(tmp_path) / "custodian.json")
    assert type(log[0]["validator"]).__name__ == "VasprunXMLValidator"


def test_double_relax_with_synthetic_psp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """POTCAR files as on a cluster: pymatgen finds synthetic POTCARs under PMG_VASP_PSP_DIR, the stand-in
    reads their TITELs, and the second relaxation starts from the first one's CONTCAR."""
    from atomate2.vasp.flows.mp import MPGGADoubleRelaxMaker
    from pymatgen.core import SETTINGS

    psp = write_psp_dir(tmp_path / "psp", ["Cu", "Au"])
    monkeypatch.setitem(SETTINGS, "PMG_VASP_PSP_DIR", str(psp))
    maker = MPGGADoubleRelaxMaker(relax_maker1=relax_maker(False), relax_maker2=relax_maker(False))
    flow = maker.make(cuau())
    assert isinstance(flow, Flow)
    responses = _run(flow, tmp_path / "run")
    docs = [responses[j.uuid][1].output for j in flow.jobs]
    assert [d.state for d in docs] == ["successful", "successful"]
    assert docs[1].input.structure.lattice.a == pytest.approx(docs[0].output.structure.lattice.a, abs=1e-4)
    assert docs[1].output.energy == pytest.approx(docs[0].output.energy, abs=2e-3)
    assert [p.titel for p in docs[1].input.potcar_spec] == ["PAW_PBE Cu_pv SYNTHETIC", "PAW_PBE Au SYNTHETIC"]
    potcars = list((tmp_path / "run").glob("job_*/POTCAR.gz"))
    assert len(potcars) == 2
    for path in potcars:
        with zopen(path, "rt") as fh:
            assert SYNTHETIC_MARK in fh.read()


@pytest.mark.slow
def test_standin_with_chgnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """CHGNet (weights in the chgnet wheel) for elements EMT lacks: rock-salt NaCl, a few ionic steps."""
    from pymatgen.io.vasp.inputs import Incar, Poscar

    monkeypatch.setenv("CSPML_FAKE_VASP_CALC", "chgnet")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    s = Structure(Lattice.cubic(5.8), ["Na"] * 4 + ["Cl"] * 4, [*FCC, *([(x + 0.5) % 1 for x in c] for c in FCC)])
    Incar({"NSW": 5, "IBRION": 2, "ISIF": 3, "EDIFFG": -0.05}).write_file(tmp_path / "INCAR")
    Poscar(s).write_file(tmp_path / "POSCAR")
    (tmp_path / "POTCAR.spec").write_text("Na_pv\nCl\n")
    subprocess.run(FAKE_VASP.split(), cwd=tmp_path, capture_output=True, text=True, check=True)
    v = Vasprun(tmp_path / "vasprun.xml")
    assert 1 <= v.nionic_steps <= 5 and -4.0 < v.final_energy / len(s) < -3.0  # CHGNet/MP: about -3.4 eV/atom
