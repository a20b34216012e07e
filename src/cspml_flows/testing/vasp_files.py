"""Writers of the VASP output files the stand-in executable produces: vasprun.xml, OUTCAR, OSZICAR and
CONTCAR, in the layout that pymatgen's ``Vasprun``/``Outcar``/``Oszicar`` parse and that custodian's
handlers and emmet's ``TaskDoc.from_directory`` read. Only what those readers use is written: a made-up
spectrum at the Gamma point with its total DOS, no projections, charge density or wavefunctions (WAVECAR
and CHGCAR are empty files, as VASP leaves them with LWAVE/LCHARG off)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from ase.data import atomic_masses, atomic_numbers

from cspml_flows.testing.vasp_inputs import Cell, write_poscar

VERSION = "6.4.2"
PROGRAM_NOTE = "cspml-flows stand-in (not VASP): energies from"


@dataclass
class IonicStep:
    """One ionic step: the structure, its total energy (eV), forces (eV/A) and stress (kB, VASP sign)."""

    structure: Cell
    energy: float
    forces: np.ndarray
    stress: np.ndarray
    scf: list[float] = field(default_factory=list)  # electronic-step energies, the last equal to ``energy``


@dataclass
class Run:
    """Everything the writers need about one stand-in VASP run."""

    incar: dict[str, Any]
    kpoints: tuple[str, list[int], list[float]] | None  # (style, divisions, shift) of an automatic KPOINTS
    titels: list[str]  # one TITEL per species, in POSCAR order
    zvals: list[float]
    steps: list[IonicStep]
    calculator: str
    elapsed: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def nelect(self) -> float:
        """Valence electrons of the cell (POTCAR ZVALs times atom counts)."""
        counts = self.steps[0].structure.counts
        return float(sum(n * z for n, z in zip(counts, self.zvals, strict=True)))

    @property
    def nbands(self) -> int:
        """VASP's default number of bands for this cell."""
        return max(8, int(self.nelect / 2 + len(self.steps[0].structure) / 2) + 4)


def _bands(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """A made-up spectrum at the Gamma point: bands 0.5 eV apart, a 0.5 eV gap centred on the Fermi level
    (0 eV). With one k-point pymatgen could not call it a metal anyway; the gap keeps custodian's
    metal-smearing handlers quiet."""
    n_occ = math.ceil(run.nelect / 2)
    energies = 0.5 * (np.arange(run.nbands) - n_occ) + 0.25
    return energies, (energies < 0).astype(float)


def _spin_sets(run: Run, rows: list[str], inner: str | None) -> list[str]:
    out = []
    for spin in range(1, 3 if run.params.get("ISPIN", 1) == 2 else 2):
        out += [f'     <set comment="spin {spin}">', *([f'      <set comment="{inner}">'] if inner else []), *rows]
        out += ["      </set>", "     </set>"] if inner else ["     </set>"]
    return out


def _eigen_dos_xml(run: Run) -> str:
    """Eigenvalues and a total DOS (Gaussian-broadened bands, Fermi level 0 eV), so band-structure readers
    (input sets reading a previous run, custodian's smearing handlers, emmet) have data."""
    energies, occ = _bands(run)
    rows = [f"       <r>{e:12.4f}{o:10.4f} </r>" for e, o in zip(energies, occ, strict=True)]
    dims = [f'    <dimension dim="{i}">{d}</dimension>' for i, d in enumerate(("band", "kpoint", "spin"), 1)]
    fields = ["    <field>eigene</field>", "    <field>occ</field>"]
    eig = ["  <eigenvalues>", "   <array>", *dims, *fields, "    <set>", *_spin_sets(run, rows, "kpoint 1")]
    eig += ["    </set>", "   </array>", "  </eigenvalues>"]
    grid = np.linspace(-10.0, 10.0, 81)
    dos = np.exp(-(((grid[:, None] - energies[None, :]) / 0.3) ** 2)).sum(axis=1) / (0.3 * np.sqrt(np.pi))
    integrated = np.cumsum(dos) * (grid[1] - grid[0])
    rows = [f"       <r>{e:10.4f}{d:12.4f}{i:12.4f} </r>" for e, d, i in zip(grid, dos, integrated, strict=True)]
    dims = ['     <dimension dim="1">gridpoints</dimension>', '     <dimension dim="2">spin</dimension>']
    fields = ["     <field>energy</field>", "     <field>total</field>", "     <field>integrated</field>"]
    tdos = ["  <dos>", '   <i name="efermi">      0.00000000 </i>', "   <total>", "    <array>", *dims, *fields]
    tdos += ["    <set>", *_spin_sets(run, rows, None), "    </set>", "    </array>", "   </total>", "  </dos>"]
    return "\n".join(eig + tdos)


def _v(values: Any, fmt: str = "{:16.8f}") -> str:
    return " ".join(fmt.format(float(x)) for x in np.ravel(values))


def _varray(name: str, rows: Any) -> str:
    body = "\n".join(f"    <v>{_v(r)} </v>" for r in rows)
    return f'   <varray name="{name}" >\n{body}\n   </varray>'


def _structure_xml(s: Cell, name: str | None = None) -> str:
    attr = f' name="{name}"' if name else ""
    rec = np.linalg.inv(s.lattice).T  # VASP's rec_basis carries no 2*pi
    return "\n".join(
        [
            f"  <structure{attr} >",
            "   <crystal>",
            _varray("basis", s.lattice),
            f'    <i name="volume">{s.volume:16.8f} </i>',
            _varray("rec_basis", rec),
            "   </crystal>",
            _varray("positions", s.frac),
            "  </structure>",
        ]
    )


def _param(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f'  <i type="logical" name="{name}"> {"T" if value else "F"}  </i>'
    if isinstance(value, int):
        return f'  <i type="int" name="{name}">{value:6d}</i>'
    if isinstance(value, float):
        return f'  <i name="{name}">{value:16.8f}</i>'
    if isinstance(value, list | tuple):
        kind = ' type="int"' if all(isinstance(x, int) and not isinstance(x, bool) for x in value) else ""
        return f'  <v{kind} name="{name}">{" ".join(str(x) for x in value)}</v>'
    return f'  <i type="string" name="{name}">{escape(str(value))}</i>'


def _energy_xml(e: float, indent: str) -> str:
    names = ("e_fr_energy", "e_wo_entrp", "e_0_energy")
    return "\n".join(
        [f"{indent}<energy>", *(f'{indent} <i name="{n}">{e:18.8f} </i>' for n in names), f"{indent}</energy>"]
    )


def _kpoints_xml(kpoints: tuple[str, list[int], list[float]] | None) -> str:
    style, divisions, shift = kpoints or ("Gamma", [1, 1, 1], [0.0, 0.0, 0.0])
    return "\n".join(
        [
            " <kpoints>",
            f'  <generation param="{style}">',
            f'   <v type="int" name="divisions">{_v(divisions, "{:8.0f}")} </v>',
            f'   <v name="usershift">{_v(shift)} </v>',
            "  </generation>",
            _varray("kpointlist", [[0.0, 0.0, 0.0]]),  # the Gamma point only: no band structure is written
            '   <varray name="weights" >\n    <v>      1.00000000 </v>\n   </varray>',
            " </kpoints>",
        ]
    )


def _atominfo_xml(run: Run) -> str:
    s = run.steps[0].structure
    types = {sym: i + 1 for i, sym in enumerate(s.species)}
    atoms = "\n".join(f"    <rc><c>{sym:2s}</c><c>{types[sym]:4d}</c></rc>" for sym in s.symbols)
    atomtypes = "\n".join(
        f"    <rc><c>{n:4d}</c><c>{sym:2s}</c><c>{_mass(sym):16.8f}</c><c>{z:16.8f}</c><c>  {escape(t)}</c></rc>"
        for n, sym, z, t in zip(s.counts, s.species, run.zvals, run.titels, strict=True)
    )
    return "\n".join(
        [
            " <atominfo>",
            f"  <atoms>{len(s):8d} </atoms>",
            f"  <types>{len(types):8d} </types>",
            '  <array name="atoms" >\n   <dimension dim="1">ion</dimension>',
            '   <field type="string">element</field>\n   <field type="int">atomtype</field>',
            f"   <set>\n{atoms}\n   </set>\n  </array>",
            '  <array name="atomtypes" >\n   <dimension dim="1">type</dimension>',
            '   <field type="int">atomspertype</field>\n   <field type="string">element</field>',
            '   <field>mass</field>\n   <field>valence</field>\n   <field type="string">pseudopotential</field>',
            f"   <set>\n{atomtypes}\n   </set>\n  </array>",
            " </atominfo>",
        ]
    )


def _mass(symbol: str) -> float:
    return float(atomic_masses[atomic_numbers[symbol]])


def write_vasprun(run: Run, path: Path) -> None:
    """vasprun.xml: generator, incar, kpoints, parameters, atominfo, initial structure, one ``calculation``
    block per ionic step (electronic steps, structure, forces, stress, energy) and the final structure."""
    calcs = []
    for st in run.steps:
        scf = "\n".join(f"  <scstep>\n{_energy_xml(e, '   ')}\n  </scstep>" for e in st.scf or [st.energy])
        calcs.append(
            "\n".join(
                [
                    " <calculation>",
                    scf,
                    _structure_xml(st.structure),
                    _varray("forces", st.forces),
                    _varray("stress", st.stress),
                    _energy_xml(st.energy, "  "),
                    _eigen_dos_xml(run) if st is run.steps[-1] else "",
                    " </calculation>",
                ]
            )
        )
    incar = "\n".join(_param(k, v) for k, v in run.incar.items() if not isinstance(v, dict))
    parts = [
        '<?xml version="1.0" encoding="ISO-8859-1"?>',
        "<modeling>",
        " <generator>",
        '  <i name="program" type="string">vasp </i>',
        f'  <i name="version" type="string">{VERSION} </i>',
        f'  <i name="subversion" type="string">{escape(PROGRAM_NOTE)} {run.calculator} </i>',
        '  <i name="platform" type="string">LinuxGNU </i>',
        " </generator>",
        f" <incar>\n{incar}\n </incar>",
        _kpoints_xml(run.kpoints),
        " <parameters>",
        *(_param(k, v) for k, v in run.params.items()),
        " </parameters>",
        _atominfo_xml(run),
        _structure_xml(run.steps[0].structure, "initialpos"),
        *calcs,
        _structure_xml(run.steps[-1].structure, "finalpos"),
        "</modeling>",
        "",
    ]
    path.write_text("\n".join(parts))


def write_oszicar(run: Run, path: Path) -> None:
    """OSZICAR: a ``DAV:`` line per electronic step and an ``F= E0= d E = mag=`` line per ionic step."""
    lines = ["       N       E                     dE             d eps       ncg     rms          rms(c)"]
    prev = 0.0
    spin = run.params.get("ISPIN", 1) == 2
    for i, st in enumerate(run.steps, start=1):
        last = 0.0
        for j, e in enumerate(st.scf or [st.energy], start=1):
            lines.append(
                f"DAV: {j:3d}    {e: .12E}   {e - last: .5E}   {0.0: .5E}   {8 * len(st.structure):5d}   0.100E-02"
            )
            last = e
        mag = f"  mag=     {0.0:.4f}" if spin else ""
        lines.append(f"{i:4d} F= {st.energy: .8E} E0= {st.energy: .8E}  d E ={st.energy - prev: .6E}{mag}")
        prev = st.energy
    path.write_text("\n".join(lines) + "\n")


def write_outcar(run: Run, path: Path) -> None:
    """OUTCAR: the header lines readers look for (cores, POTCAR, ISPIN/IBRION, NBANDS, NELECT), per ionic
    step the positions and forces, drift and energies, and the closing timing block."""
    nbands = run.nbands
    p = run.params
    lines = [
        f" vasp.{VERSION} ({PROGRAM_NOTE} {run.calculator})",
        " running on    1 total cores",
        *(f" POTCAR:    {t}" for t in run.titels),
        f"   NELM   = {p.get('NELM', 60):6d}",
        f"   ISPIN  = {p.get('ISPIN', 1):6d}",
        f"   IBRION = {p.get('IBRION', -1):6d}",
        f"   NSW    = {p.get('NSW', 0):6d}",
        f"   ISIF   = {p.get('ISIF', 2):6d}",
        "   k-points           NKPTS =      1   k-points in BZ     NKDIM =      1"
        f"   number of bands    NBANDS= {nbands:6d}",
        f"   NELECT = {run.nelect:12.4f}    total number of electrons",
        "   dimension x,y,z NGX =    24 NGY =   24 NGZ =   24",
        "   total plane-waves  NPLWV =  13824",
        "",
    ]
    for i, st in enumerate(run.steps, start=1):
        drift = np.sum(st.forces, axis=0)
        lines += [
            f"--------------------------------------- Iteration {i:6d}(   1)  ---------------------------------------",
            f" number of electron {run.nelect:15.7f} magnetization {0.0:15.7f}",
            "  in kB " + _v(st.stress.ravel()[[0, 4, 8, 1, 5, 2]], "{:12.5f}"),
            " POSITION                                       TOTAL-FORCE (eV/Angst)",
            " -----------------------------------------------------------------------------------",
            *(
                f" {_v(c, '{:12.5f}')}    {_v(f, '{:14.6f}')}"
                for c, f in zip(st.structure.cart, st.forces, strict=True)
            ),
            " -----------------------------------------------------------------------------------",
            f"    total drift:                         {_v(drift, '{:14.6f}')}",
            "",
            "  FREE ENERGIE OF THE ION-ELECTRON SYSTEM (eV)",
            "  ---------------------------------------------------",
            f"  free  energy   TOTEN  = {st.energy:18.8f} eV",
            "",
            f"  energy  without entropy= {st.energy:18.8f}  energy(sigma->0) = {st.energy:18.8f}",
            "",
        ]
    lines += [
        " E-fermi :   0.0000     XC(G=0):  0.0000     alpha+bet : 0.0000",
        "",
        " General timing and accounting informations for this job:",
        " ========================================================",
        "",
        f"                  Total CPU time used (sec): {run.elapsed:12.3f}",
        f"                            User time (sec): {run.elapsed:12.3f}",
        f"                          System time (sec): {0.0:12.3f}",
        f"                         Elapsed time (sec): {run.elapsed:12.3f}",
        "",
        f"                   Maximum memory used (kb): {100000.0:12.1f}",
        f"                   Average memory used (kb): {100000.0:12.1f}",
        "",
    ]
    path.write_text("\n".join(lines))


def write_outputs(run: Run, directory: Path) -> None:
    """All output files of a finished run, as VASP leaves them."""
    write_vasprun(run, directory / "vasprun.xml")
    write_oszicar(run, directory / "OSZICAR")
    write_outcar(run, directory / "OUTCAR")
    write_poscar(run.steps[-1].structure, directory / "CONTCAR")
    for name in ("WAVECAR", "CHGCAR", "CHG"):
        (directory / name).write_bytes(b"")
