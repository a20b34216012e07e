"""One sanity check for every structure before symmetry analysis, storage or prediction sees it.

spglib (a C extension) crashes the whole process on a lattice with non-finite entries, and pymatgen
accepts cells no crystal has (zero volume, a 10^6 Å axis, two atoms on one spot). :func:`check_structure`
refuses such a structure with one line naming the problem, using numpy alone:

- the lattice: finite entries, axis lengths and angles in sane ranges, right-handed with positive volume;
- the sites: finite fractional coordinates, volume per atom in a sane range, no two atoms (or an atom and its
  own periodic image) closer than ``MIN_DISTANCE``;
- the species: real elements, no isotope symbols (``D``, ``T``).

:func:`check_cif_text` reads what pymatgen's CIF parser silently mends: a file that is not a CIF,
non-positive cell lengths, element symbols that are not canonical (``na`` for ``Na``).
"""

from __future__ import annotations

import re

import numpy as np
from pymatgen.core import DummySpecies, Element, Lattice, Structure

from cspml_flows.core.errors import StructureReadError

MIN_LENGTH = 0.5  # Å, a lattice vector is also the distance of an atom to its own image
MAX_LENGTH = 1000.0  # Å
MIN_ANGLE = 2.0  # degrees; real primitive rhombohedral cells go below 10
MAX_ANGLE = 178.0
MIN_VOLUME_PER_ATOM = 1.0  # Å^3; the densest solids have about 5
MAX_VOLUME_PER_ATOM = 10_000.0  # Å^3
MIN_DISTANCE = 0.5  # Å, the distance rule of the standard CSP evaluation
ISOTOPES = ("D", "T")  # pymatgen reads them as hydrogen


def lattice_problem(matrix: np.ndarray) -> str | None:
    """Why a 3x3 lattice matrix (rows are the axes) cannot be a crystal's cell, or None."""
    m = np.asarray(matrix, dtype=float)
    if m.shape != (3, 3):
        return f"lattice is not a 3x3 matrix (shape {m.shape})"
    if not np.isfinite(m).all():
        return "lattice has non-finite entries (a zero or impossible cell angle?)"
    with np.errstate(over="ignore"):  # an axis beyond 1e154 A: an infinite length, refused below
        lengths = np.linalg.norm(m, axis=1)
    if lengths.min() < MIN_LENGTH or lengths.max() > MAX_LENGTH:
        shown = ", ".join(f"{x:.4g}" for x in lengths)
        return f"lattice lengths ({shown}) Å are outside {MIN_LENGTH:g}-{MAX_LENGTH:g} Å"
    for i, j, name in ((1, 2, "alpha"), (0, 2, "beta"), (0, 1, "gamma")):
        cos = float(np.dot(m[i], m[j]) / (lengths[i] * lengths[j]))
        angle = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
        if not MIN_ANGLE <= angle <= MAX_ANGLE:
            return f"lattice angle {name} = {angle:.4g} degrees is outside {MIN_ANGLE:g}-{MAX_ANGLE:g}"
    det = float(np.linalg.det(m))
    if det <= 0:
        return f"lattice is left-handed (determinant {det:.4g}; a negative cell length?)"
    return None


def min_periodic_distance(matrix: np.ndarray, frac: np.ndarray) -> float:
    """Shortest distance between two atoms of a periodic cell, an atom's own images included.

    The cell is LLL-reduced first, so the 27 neighbouring images hold the shortest vectors even for skewed
    cells; two atoms on one spot give 0."""
    frac = np.asarray(frac, dtype=float).reshape(-1, 3)
    lattice = Lattice(matrix)
    reduced = lattice.get_lll_reduced_lattice()
    f = np.mod(lattice.get_cartesian_coords(frac) @ np.linalg.inv(reduced.matrix), 1.0)
    shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float)
    n = len(f)
    block = max(1, 1_000_000 // (27 * n))  # rows per step: memory stays bounded for large cells
    closest = np.inf
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        diff = f[rows, None, None, :] - f[None, :, None, :] + shifts[None, None, :, :]
        dist = np.linalg.norm(diff @ reduced.matrix, axis=-1)
        dist[np.arange(len(rows)), rows, 13] = np.inf  # shift (0, 0, 0) of an atom to itself
        closest = min(closest, float(dist.min()))
    return closest


def geometry_problem(matrix: np.ndarray, frac: np.ndarray) -> str | None:
    """Why a cell and its fractional coordinates cannot be a crystal, or None (see the module docstring)."""
    problem = lattice_problem(matrix)
    if problem:
        return problem
    frac = np.asarray(frac, dtype=float).reshape(-1, 3)
    if len(frac) == 0:
        return "no sites"
    if not np.isfinite(frac).all():
        return "non-finite atomic coordinates"
    per_atom = float(np.linalg.det(np.asarray(matrix, dtype=float))) / len(frac)
    if not MIN_VOLUME_PER_ATOM <= per_atom <= MAX_VOLUME_PER_ATOM:
        return f"volume per atom {per_atom:.4g} Å^3 is outside {MIN_VOLUME_PER_ATOM:g}-{MAX_VOLUME_PER_ATOM:g} Å^3"
    closest = min_periodic_distance(matrix, frac)
    if closest < MIN_DISTANCE:
        return f"two atoms are {closest:.3g} Å apart (at least {MIN_DISTANCE:g} Å)"
    return None


def species_problem(structure: Structure) -> str | None:
    """Why a structure's species are not real elements (dummy species, isotope symbols), or None."""
    for i, site in enumerate(structure):
        for sp in site.species:
            if isinstance(sp, DummySpecies) or not isinstance(getattr(sp, "element", sp), Element):
                return f"site {i} is not a real element ({sp})"
    return None


def check_structure(structure: Structure, name: str) -> None:
    """Raise :class:`StructureReadError` naming ``name`` and the problem if ``structure`` fails a check of
    the module docstring. Runs before anything hands the structure to spglib."""
    problem = geometry_problem(structure.lattice.matrix, structure.frac_coords) if len(structure) else "no sites"
    problem = problem or species_problem(structure)
    if problem:
        raise StructureReadError(f"{name}: {problem}")


_CIF_VALUE = r"[ \t]+'?([^\s']+)'?"
_CELL = re.compile(r"^[ \t]*_cell_(length_[abc]|angle_(?:alpha|beta|gamma))" + _CIF_VALUE, re.MULTILINE)
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _cif_loop_column(text: str, column: str) -> list[str]:
    """The values of one column of the CIF loop that declares ``column`` (a simple reader: one row per line)."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.strip() != "loop_":
            continue
        names: list[str] = []
        k = start + 1
        while k < len(lines) and lines[k].strip().startswith("_"):
            names.append(lines[k].split()[0])
            k += 1
        if column not in names:
            continue
        values = []
        for row in lines[k:]:
            parts = row.split()
            if not parts or parts[0].startswith(("_", "loop_", "data_", "#")):
                break
            if len(parts) == len(names):
                values.append(parts[names.index(column)].strip("'\""))
        return values
    return []


def _symbol(token: str) -> str:
    """The element part of a CIF type symbol or label: ``Fe3+`` -> ``Fe``, ``O1`` -> ``O``."""
    m = re.match(r"[A-Za-z]+", token)
    return m.group(0) if m else token


def check_cif_text(text: str, name: str) -> None:
    """Refuse, naming ``name``, a CIF text that is no CIF (no ``data_`` block or cell), has a cell length that
    is not a positive number, a type symbol that is not a canonical element symbol (``na``, ``NA``), or an
    isotope (``D``, ``T``) as type symbol or label."""
    if not re.search(r"^[ \t]*data_", text, re.MULTILINE) or "_cell_length_a" not in text:
        raise StructureReadError(f"{name} is not a CIF (no data_ block with a cell)")
    for key, value in _CELL.findall(text):
        number = _NUMBER.match(value)
        if number is None or not np.isfinite(float(number.group(0))):
            raise StructureReadError(f"{name}: _cell_{key} is not a number ({value[:20]!r})")
        if key.startswith("length") and float(number.group(0)) <= 0:
            raise StructureReadError(f"{name}: _cell_{key} is {value[:20]}; cell lengths must be positive")
    for label in _cif_loop_column(text, "_atom_site_label"):
        if _symbol(label) in ISOTOPES:
            raise StructureReadError(f"{name}: isotope symbol {_symbol(label)!r}; write the element (H) instead")
    for token in _cif_loop_column(text, "_atom_site_type_symbol"):
        sym = _symbol(token)
        if sym in ISOTOPES:
            raise StructureReadError(f"{name}: isotope symbol {sym!r}; write the element (H) instead")
        if not Element.is_valid_symbol(sym):
            canonical = sym[:1].upper() + sym[1:].lower()
            hint = f" (write {canonical!r})" if Element.is_valid_symbol(canonical) else ""
            raise StructureReadError(f"{name}: {token!r} is not an element symbol{hint}")


def check_poscar_species(text: str, name: str) -> None:
    """Refuse, naming ``name``, a POSCAR whose element line (VASP 5) names an isotope (``D``, ``T``), which
    pymatgen reads as hydrogen."""
    lines = text.splitlines()
    if len(lines) > 5 and lines[5].split() and not lines[5].split()[0].isdigit():
        for token in lines[5].split():
            sym = re.split(r"[_/]", token)[0]
            if sym in ISOTOPES:
                raise StructureReadError(f"{name}: isotope symbol {sym!r}; write the element (H) instead")
