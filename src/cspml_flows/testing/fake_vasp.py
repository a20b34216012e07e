"""A stand-in VASP executable for tests: ``python -m cspml_flows.testing.fake_vasp`` in a job directory.

It reads INCAR, POSCAR, KPOINTS (optional) and POTCAR or POTCAR.spec as VASP does, relaxes the structure
with ASE EMT (default) or CHGNet following NSW, IBRION, ISIF and EDIFFG, and writes vasprun.xml, OUTCAR,
OSZICAR and CONTCAR (:mod:`cspml_flows.testing.vasp_files`) with VASP-like lines on stdout, so atomate2's
``run_vasp`` runs it under custodian and ``TaskDoc.from_directory`` parses the result. It is not VASP: the
energies are EMT's (shifted by a constant per element so totals are negative, as VASP's are; formation
energies are unchanged) or CHGNet's, and there are no electrons.

Environment:

``CSPML_FAKE_VASP_CALC``
    ``emt`` (default; Al Cu Ag Au Ni Pd Pt) or ``chgnet`` (CHGNet 0.3.0, weights in the chgnet wheel).
``CSPML_FAKE_VASP_FAULT``
    Comma-separated faults, each ``mode`` (every run) or ``mode:Formula`` (runs whose POSCAR has that
    reduced formula). ``correctable``: VASP's PRICEL error until the INCAR has ISYM = 0, which custodian's
    ``VaspErrorHandler`` sets. ``fatal``: the PRICEL error on every run; once ISYM = 0 and SYMPREC = 1e-8
    no handler has a correction left and custodian gives up. ``crash``: the process dies with no output
    files; no handler recognises it and custodian's vasprun.xml validator fails the job.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT
from ase.filters import UnitCellFilter
from ase.optimize import BFGS, FIRE
from pymatgen.core import Composition
from threadpoolctl import threadpool_limits

from cspml_flows.testing.potcar import valence
from cspml_flows.testing.vasp_files import IonicStep, Run, write_outputs
from cspml_flows.testing.vasp_inputs import (
    Cell,
    InputError,
    read_incar,
    read_kpoints,
    read_poscar,
    read_potcar_headers,
)

CALC_ENV = "CSPML_FAKE_VASP_CALC"
FAULT_ENV = "CSPML_FAKE_VASP_FAULT"
FAULTS = ("correctable", "fatal", "crash")
PRICEL = (
    " internal error in subroutine PRICEL (probably precision problem, try to change SYMPREC in INCAR ?):\n"
    " Sorry, number of cells and number of vectors did not agree."
)
# about the GGA energy per atom of each element (eV), added to EMT's near-zero cohesive energies
EMT_SHIFT = {"Al": -3.75, "Cu": -4.10, "Ag": -2.83, "Au": -3.27, "Ni": -5.78, "Pd": -5.18, "Pt": -6.05}
KB_PER_EV_A3 = 1602.1766208  # 1 eV/A^3 in kbar


def fault_for(spec: str, cell: Cell) -> str | None:
    """The fault ``spec`` (``CSPML_FAKE_VASP_FAULT``) asks for on this structure, or None."""
    formula = Composition("".join(cell.symbols)).reduced_formula
    for item in filter(None, (x.strip() for x in spec.split(","))):
        mode, _, target = item.partition(":")
        if mode not in FAULTS:
            raise InputError(f"{FAULT_ENV}: unknown fault {mode!r} (one of {', '.join(FAULTS)})")
        if not target or Composition(target).reduced_formula == formula:
            return mode
    return None


def potcar_info(directory: Path, species: list[str]) -> tuple[list[str], list[float]]:
    """TITEL and ZVAL per species from POTCAR (as VASP reads it) or, failing that, from POTCAR.spec."""
    potcar, spec = directory / "POTCAR", directory / "POTCAR.spec"
    if potcar.is_file():
        titels, zvals = read_potcar_headers(potcar)
    elif spec.is_file():
        symbols = spec.read_text().split()
        titels, zvals = [f"PAW_PBE {s} SYNTHETIC" for s in symbols], [valence(s) for s in symbols]
    else:
        raise InputError("no POTCAR and no POTCAR.spec in the job directory")
    if [t.split()[1].split("_")[0] for t in titels] != species:
        raise InputError(f"POTCAR species {titels} do not match POSCAR species {species}")
    return titels, zvals


def calculator(name: str, cell: Cell):
    """The ASE calculator ``name`` and the per-atom energy shift of each element."""
    if name == "emt":
        missing = sorted(set(cell.symbols) - set(EMT_SHIFT))
        if missing:
            raise InputError(f"EMT has no parameters for {', '.join(missing)}; set {CALC_ENV}=chgnet")
        return EMT(), EMT_SHIFT
    if name == "chgnet":
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator(use_device="cpu"), {}
    raise InputError(f"{CALC_ENV}: unknown calculator {name!r} (emt or chgnet)")


def _snapshot(atoms, shift: dict[str, float], n_scf: int) -> IonicStep:
    symbols = atoms.get_chemical_symbols()
    energy = float(atoms.get_potential_energy()) + sum(shift.get(s, 0.0) for s in symbols)
    stress = -np.asarray(atoms.get_stress(voigt=False)) * KB_PER_EV_A3  # VASP: positive = compressive
    cell = Cell(np.array(atoms.cell), atoms.get_scaled_positions(wrap=False), symbols)
    scf = [energy + 2.0 * 0.1**k for k in range(n_scf - 1)] + [energy]  # a converging SCF, ending at energy
    return IonicStep(cell, energy, np.asarray(atoms.get_forces()), stress, scf)


def relax(cell: Cell, incar: dict, calc_name: str) -> list[IonicStep]:
    """Ionic steps of a relaxation following NSW, IBRION, ISIF, EDIFFG (force criterion; an energy
    criterion EDIFFG > 0 is run as fmax 0.05 eV/A); a single point when NSW = 0 or IBRION = -1."""
    atoms = Atoms(cell.symbols, scaled_positions=cell.frac, cell=cell.lattice, pbc=True)
    atoms.calc, shift = calculator(calc_name, cell)
    nsw = int(incar.get("NSW", 0))
    ibrion = int(incar.get("IBRION", -1 if nsw in (-1, 0) else 0))
    isif = int(incar.get("ISIF", 2))
    ediffg = float(incar.get("EDIFFG", 10 * float(incar.get("EDIFF", 1e-4))))
    nelm = int(incar.get("NELM", 60))
    steps: list[IonicStep] = []

    def record() -> None:
        steps.append(_snapshot(atoms, shift, min(nelm, 8 if not steps else 4)))

    if nsw <= 0 or ibrion not in (1, 2, 3):
        record()
        return steps
    target = atoms if isif < 3 else UnitCellFilter(atoms, hydrostatic_strain=isif == 7, constant_volume=isif == 4)
    opt = (FIRE if ibrion == 3 else BFGS)(target, logfile=None)
    opt.attach(record)
    opt.run(fmax=-ediffg if ediffg < 0 else 0.05, steps=nsw - 1)
    return steps


def parameters(incar: dict, n_sites: int, nelect: float) -> dict:
    """vasprun.xml ``parameters``: VASP's defaults for the tags readers use, overridden by the INCAR.
    GGA is "--" unless set, as VASP writes it (emmet reads that as run type GGA)."""
    nsw = int(incar.get("NSW", 0))
    params = {
        "PREC": "normal",
        "ENMAX": float(incar.get("ENCUT", 400.0)),
        "EDIFF": 1e-4,
        "NELECT": nelect,
        "NELM": 60,
        "ISMEAR": 1,
        "SIGMA": 0.2,
        "ISPIN": 1,
        "MAGMOM": [1.0] * n_sites,
        "NSW": nsw,
        "IBRION": -1 if nsw in (-1, 0) else 0,
        "ISIF": 2,
        "EDIFFG": 10 * float(incar.get("EDIFF", 1e-4)),
        "POTIM": 0.5,
        "ISYM": 2,
        "SYMPREC": 1e-5,
        "LORBIT": 0,
        "GGA": "--",
        "LDAU": False,
        "LHFCALC": False,
        "AEXX": 0.0,
        "HFSCREEN": 0.0,
        "ALDAX": 1.0,
        "AGGAX": 1.0,
        "ALDAC": 1.0,
        "AGGAC": 1.0,
        "LUSE_VDW": False,
        "LASPH": False,
        "LWAVE": True,
        "LCHARG": True,
    }
    for key, value in incar.items():
        if not isinstance(value, dict):
            params[key] = value
    return params


def main() -> int:
    """Run in the current directory; returns the exit status (1 on an error VASP would stop for)."""
    t0 = time.perf_counter()
    cwd = Path.cwd()
    try:
        for name in ("INCAR", "POSCAR"):
            if not (cwd / name).is_file():
                raise InputError(f"no {name} in the job directory {cwd}")
        incar = read_incar(cwd / "INCAR")
        cell = read_poscar(cwd / "POSCAR")
        kpoints = read_kpoints(cwd / "KPOINTS") if (cwd / "KPOINTS").is_file() else None
        species = cell.species
        if len(set(species)) != len(species):
            raise InputError(f"POSCAR species blocks repeat an element: {species}")
        titels, zvals = potcar_info(cwd, species)
        fault = fault_for(os.environ.get(FAULT_ENV, ""), cell)
        calc_name = os.environ.get(CALC_ENV, "emt").strip().lower()
    except (InputError, ValueError, OSError) as exc:
        print(f" stand-in VASP: cannot run: {exc}")
        return 1
    print(f" vasp.6.4.2 stand-in (cspml-flows, {calc_name}): not VASP")
    print(" running on    1 total cores")
    print(f" POSCAR found :  {len(species)} types and {len(cell):6d} ions")
    sys.stdout.flush()
    if fault == "crash":
        print("forrtl: severe (174): SIGSEGV, segmentation fault occurred", file=sys.stderr)
        return 174
    if fault == "fatal" or (fault == "correctable" and int(incar.get("ISYM", 2)) != 0):
        print(PRICEL)
        return 1
    try:
        with threadpool_limits(1):  # 3x3 BLAS calls of the cell filter: threads only add overhead
            steps = relax(cell, incar, calc_name)
    except InputError as exc:
        print(f" stand-in VASP: cannot run: {exc}")
        return 1
    nelect = float(sum(n * z for n, z in zip(cell.counts, zvals, strict=True)))
    params = parameters(incar, len(cell), nelect)
    run = Run(incar, kpoints, titels, zvals, steps, calc_name, time.perf_counter() - t0, params)
    prev = 0.0
    for i, st in enumerate(steps, start=1):
        print(f"{i:4d} F= {st.energy: .8E} E0= {st.energy: .8E}  d E ={st.energy - prev: .6E}")
        prev = st.energy
    write_outputs(run, cwd)
    if params["NSW"] > 1 and len(steps) < params["NSW"]:
        print(" reached required accuracy - stopping structural energy minimisation")
    print(" writing wavefunctions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
