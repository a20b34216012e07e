"""Structure files and texts read for templates: CIF and POSCAR files, CIF texts, folders of them.

The text is checked before pymatgen parses it (:func:`~cspml_flows.core.structure_checks.check_cif_text`, a
POSCAR's atom counts and element line), the parsed lattice next; every failure is a
:class:`StructureReadError` naming the file. A file's import id is its name stem plus a digest of its bytes
(:func:`file_id`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.errors import CSPMLError, StructureReadError
from cspml_flows.core.quiet import library_warnings
from cspml_flows.core.structure_checks import check_cif_text, check_poscar_species, lattice_problem
from cspml_flows.templates.schema import check_template_structure

STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar")


def is_poscar_name(name: str) -> bool:
    """Whether pymatgen reads a file of this name as a POSCAR."""
    upper = name.upper()
    return "POSCAR" in upper or "CONTCAR" in upper or upper.endswith(".VASP")


def check_poscar_counts(text: str, name: str) -> None:
    """Refuse a POSCAR whose atom counts do not add up to its coordinate lines (pymatgen silently drops the
    extra coordinates when the counts are short)."""
    lines = text.splitlines()
    try:
        i = 5
        if not lines[i].split()[0].isdigit():
            i += 1  # VASP 5: element symbols, then counts
        counts = []
        for tok in lines[i].split():
            if not tok.isdigit():
                break
            counts.append(int(tok))
        i += 1
        if lines[i].strip()[:1] in ("s", "S"):
            i += 1  # selective dynamics
        i += 1  # Direct / Cartesian
    except IndexError:
        return  # too short to be a POSCAR: the reader names the problem
    n_coords = 0
    for line in lines[i:]:
        parts = line.split()
        try:
            [float(x) for x in parts[:3]]
        except ValueError:
            break
        if len(parts) < 3:
            break
        n_coords += 1
    if counts and n_coords != sum(counts):
        raise StructureReadError(
            f"POSCAR {name} declares {sum(counts)} atoms (counts {' '.join(map(str, counts))}) but lists "
            f"{n_coords} coordinate lines"
        )


def _parsed(s: Structure, name: str) -> Structure:
    """A freshly parsed structure with sites and a sane lattice (checked before anything else sees it)."""
    if len(s) == 0:
        raise StructureReadError(f"{name} has no sites")
    problem = lattice_problem(s.lattice.matrix)
    if problem:
        raise StructureReadError(f"{name}: {problem}")
    return s


def read_structure(path: str | Path) -> Structure:
    """Read a CIF or POSCAR file; raise :class:`StructureReadError` naming the file.

    The text is checked first (:func:`check_cif_text`, the POSCAR's atom counts and element line), the
    parsed lattice next; the whole structure is checked as a template by :func:`read_template_file`."""
    p = Path(path)
    if not p.is_file():
        raise StructureReadError(f"structure file not found: {p}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError):
        text = ""  # compressed or binary: left to the reader
    if text and p.suffix.lower() == ".cif":  # pymatgen reads any *.cif as a CIF
        check_cif_text(text, f"structure file {p}")
    elif text and is_poscar_name(p.name):
        check_poscar_counts(text, str(p))
        check_poscar_species(text, f"structure file {p}")
    try:
        with library_warnings(), np.errstate(all="ignore"):  # degenerate or astronomical cells: checked below
            s = Structure.from_file(str(p))
    except Exception as exc:  # pymatgen's readers raise many types: one error naming the file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StructureReadError(f"cannot read structure file {p}: {reason}") from None
    return _parsed(s, f"structure file {p}")


def structure_from_cif_string(cif: str, name: str = "<cif>") -> Structure:
    """Parse a CIF text (checked first by :func:`check_cif_text`); raise :class:`StructureReadError` naming
    ``name``."""
    if not isinstance(cif, str):
        raise StructureReadError(f"CIF of {name} is not text ({type(cif).__name__})")
    check_cif_text(cif, f"CIF of {name}")
    try:
        with library_warnings(), np.errstate(all="ignore"):  # degenerate or astronomical cells: checked below
            s = Structure.from_str(cif, fmt="cif")
    except Exception as exc:  # pymatgen's CIF parser raises many types: one error naming the CIF
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StructureReadError(f"cannot parse CIF of {name}: {reason}") from None
    return _parsed(s, f"CIF of {name}")


def read_template_file(path: str | Path, max_atoms: int | None = None) -> Structure:
    """:func:`read_structure`, then :func:`check_template_structure` naming the file."""
    s = read_structure(path)
    check_template_structure(s, f"structure file {path}", max_atoms)
    return s


def file_id(path: Path, prefix: str = "") -> str:
    """The import id of a structure file: ``prefix + name stem + '-' + 12 hex digits of its bytes' sha256``."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{prefix}{path.stem if path.suffix else path.name}-{digest}"


def structure_files(folder: str | Path) -> list[Path]:
    """CIF/POSCAR files in a folder: ``*.cif``, ``*.vasp``, ``*.poscar``, ``POSCAR*``, ``CONTCAR*``."""
    d = Path(folder)
    if not d.is_dir():
        raise CSPMLError(f"structure folder not found: {d}")
    files = sorted(
        f
        for f in d.iterdir()
        if f.is_file() and (f.suffix.lower() in STRUCTURE_SUFFIXES or f.name.upper().startswith(("POSCAR", "CONTCAR")))
    )
    if not files:
        raise CSPMLError(f"no CIF/POSCAR files in {d}")
    return files
