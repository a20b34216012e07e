"""Plain readers of VASP input files (INCAR, POSCAR, KPOINTS, POTCAR, POTCAR.spec) and a POSCAR writer
for the stand-in VASP. They are independent of pymatgen's, which parses the outputs afterwards, and keep
the stand-in's start-up short (importing ``pymatgen.io.vasp`` alone takes about a second)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class InputError(RuntimeError):
    """The job directory's inputs cannot be run (missing or malformed file, unsupported element...)."""


@dataclass
class Cell:
    """A periodic structure: lattice rows (A), fractional coordinates, one element symbol per site."""

    lattice: np.ndarray
    frac: np.ndarray
    symbols: list[str]

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def cart(self) -> np.ndarray:
        """Cartesian coordinates (Angstrom)."""
        return self.frac @ self.lattice

    @property
    def volume(self) -> float:
        """Cell volume (cubic Angstrom)."""
        return float(abs(np.linalg.det(self.lattice)))

    @property
    def species(self) -> list[str]:
        """Element symbols of the consecutive blocks of equal symbols (the POSCAR species line)."""
        return [s for i, s in enumerate(self.symbols) if i == 0 or self.symbols[i - 1] != s]

    @property
    def counts(self) -> list[int]:
        """Atom counts of the consecutive blocks of equal symbols (the POSCAR counts line)."""
        out: list[int] = []
        for i, s in enumerate(self.symbols):
            if i and self.symbols[i - 1] == s:
                out[-1] += 1
            else:
                out.append(1)
        return out


def _value(text: str) -> Any:
    """An INCAR value: bool, int, float, a list (``4*0.6 1.0`` expanded), else the string."""
    tokens = text.split()
    if len(tokens) > 1 or "*" in text:
        values: list[Any] = []
        for tok in tokens:
            n, star, v = tok.partition("*")
            values += [_value(v)] * int(n) if star else [_value(tok)]
        return values
    low = text.lower().strip(".")
    if low in ("true", "t"):
        return True
    if low in ("false", "f"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_incar(path: Path) -> dict[str, Any]:
    """INCAR tags as a dict (upper-case keys; ``#``/``!`` comments and ``;``-separated tags allowed)."""
    incar: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        for stmt in re.split(r"[#!]", line, maxsplit=1)[0].split(";"):
            key, eq, val = stmt.partition("=")
            if eq and key.strip():
                incar[key.strip().upper()] = _value(val.strip())
    return incar


def read_poscar(path: Path) -> Cell:
    """A VASP 5 POSCAR/CONTCAR (species line required; direct or Cartesian, selective dynamics allowed)."""
    lines = [ln.split() for ln in path.read_text().splitlines()]
    try:
        scale = float(lines[1][0])
        lattice = np.array([[float(x) for x in lines[i][:3]] for i in (2, 3, 4)])
        if scale < 0:  # a negative scale is the cell volume
            scale = (-scale / abs(np.linalg.det(lattice))) ** (1 / 3)
        lattice = lattice * scale
        species, counts = lines[5], [int(x) for x in lines[6]]
        row = 7
        if lines[row][0][0] in "sS":
            row += 1
        cartesian = lines[row][0][0] in "cCkK"
        n = sum(counts)
        coords = np.array([[float(x) for x in lines[row + 1 + i][:3]] for i in range(n)])
    except (IndexError, ValueError) as exc:
        raise InputError(f"cannot read POSCAR {path}: {exc} (a VASP 5 POSCAR with a species line is needed)") from exc
    frac = np.linalg.solve(lattice.T, (coords * scale).T).T if cartesian else coords
    symbols = [s for s, c in zip(species, counts, strict=True) for _ in range(c)]
    return Cell(lattice, frac, symbols)


def write_poscar(cell: Cell, path: Path, comment: str = "stand-in VASP CONTCAR") -> None:
    """A VASP 5 POSCAR with direct coordinates."""
    rows = [comment, "   1.00000000000000", *(" ".join(f"{x:22.16f}" for x in r) for r in cell.lattice)]
    rows += ["   " + "   ".join(cell.species), "   " + "   ".join(str(c) for c in cell.counts), "Direct"]
    rows += [" ".join(f"{x:20.16f}" for x in r) for r in cell.frac]
    path.write_text("\n".join(rows) + "\n")


def read_kpoints(path: Path) -> tuple[str, list[int], list[float]] | None:
    """(style, divisions, shift) of an automatic Gamma or Monkhorst-Pack KPOINTS file; None for any other."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    if len(lines) < 4 or lines[1].split()[:1] != ["0"] or lines[2][:1].lower() not in ("g", "m"):
        return None
    style = "Gamma" if lines[2][0].lower() == "g" else "Monkhorst-Pack"
    shift = [float(x) for x in lines[4].split()[:3]] if len(lines) > 4 and lines[4] else [0.0, 0.0, 0.0]
    return style, [int(x) for x in lines[3].split()[:3]], shift


def read_potcar_headers(path: Path) -> tuple[list[str], list[float]]:
    """TITEL and ZVAL of each data set in a POTCAR."""
    text = path.read_text()
    titels = [t.strip() for t in re.findall(r"TITEL\s*=\s*(.+)", text)]
    zvals = [float(z) for z in re.findall(r"ZVAL\s*=\s*([-\d.]+)", text)]
    if not titels or len(titels) != len(zvals):
        raise InputError(f"cannot read TITEL and ZVAL of every data set in {path}")
    return titels, zvals
