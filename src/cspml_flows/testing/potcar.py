"""Synthetic POTCAR files for tests, laid out as pymatgen expects under ``PMG_VASP_PSP_DIR``.

Each file carries only the header pymatgen's ``PotcarSingle`` and VASP-like readers use (``TITEL``,
``VRHFIN``, ``LEXCH``, ``ZVAL``, ``POMASS``, ``ENMAX``) and states in plain words that it is not a
pseudopotential. pymatgen does not know their hashes, so it warns (``UnknownPotcarWarning``) and goes on,
as it does for any POTCAR outside its database. Never put real POTCARs in tests.
"""

from __future__ import annotations

from pathlib import Path

from atomate2.vasp.sets.base import _BASE_VASP_SET
from pymatgen.core import Element
from pymatgen.io.vasp.inputs import PotcarSingle
from pymatgen.io.vasp.sets import MPRelaxSet

SYNTHETIC_MARK = "cspml-flows synthetic POTCAR for tests: header only, not a pseudopotential"
# the functional sub-folders of pymatgen's MPRelaxSet (PBE) and atomate2's base input set (PBE_54)
FUNCTIONALS = ("PBE", "PBE_54")


def valence(symbol: str) -> float:
    """A plausible ZVAL for a POTCAR symbol (``Cu``, ``Cu_pv``, ``Sr_sv``...): outer s/d (or s/p) electrons,
    plus 6 for a ``_pv`` and 8 for a ``_sv`` semicore shell. Used for NELECT only."""
    el = Element(symbol.split("_")[0])
    group = el.group
    zval = group - 10 if group >= 13 else group
    if "_pv" in symbol:
        zval += 6
    elif "_sv" in symbol:
        zval += 8
    return float(zval)


def potcar_text(symbol: str, functional: str = "PBE") -> str:
    """The text of one synthetic POTCAR for ``symbol`` (a POTCAR symbol such as ``Cu_pv``)."""
    el = Element(symbol.split("_")[0])
    label = "PAW" if functional == "LDA" else "PAW_PBE"
    lexch = "CA" if functional == "LDA" else "PE"
    titel = f"{label} {symbol} SYNTHETIC"
    zval = valence(symbol)
    return "\n".join(
        [
            f"  {titel}",
            f"   {zval:.10f}",
            f" {SYNTHETIC_MARK}",
            " parameters from PSCTR are:",
            f"   VRHFIN ={el.symbol}: synthetic",
            f"   LEXCH  = {lexch}",
            f"   TITEL  = {titel}",
            f"   POMASS = {float(el.atomic_mass):8.3f}; ZVAL   = {zval:8.3f}    mass and valenz",
            "   ENMAX  =  300.000; ENMIN  =  225.000 eV",
            " END of PSCTR-controll parameters",
            f" {SYNTHETIC_MARK}",
            "   0.00000000000E+00  0.00000000000E+00  0.00000000000E+00  0.00000000000E+00",
            " End of Dataset",
            "",
        ]
    )


def symbols_for(elements: list[str]) -> list[str]:
    """POTCAR symbols the input sets in use may ask for: the bare element, pymatgen's MPRelaxSet choice
    and atomate2's base-set choice."""
    mp = MPRelaxSet.CONFIG["POTCAR"]
    out: list[str] = []
    for el in elements:
        for sym in (el, mp.get(el, el), _BASE_VASP_SET["POTCAR"].get(el, el)):
            if sym not in out:
                out.append(sym)
    return out


def write_psp_dir(root: str | Path, elements: list[str], functionals: tuple[str, ...] = FUNCTIONALS) -> Path:
    """Write synthetic POTCARs for ``elements`` under ``root`` (the value for ``PMG_VASP_PSP_DIR``):
    ``root/<functional folder>/POTCAR.<symbol>``, as pymatgen's ``PotcarSingle.from_symbol_and_functional``
    looks them up. Returns ``root``."""
    root = Path(root)
    for functional in functionals:
        folder = root / PotcarSingle.functional_dir[functional]
        folder.mkdir(parents=True, exist_ok=True)
        for sym in symbols_for(elements):
            (folder / f"POTCAR.{sym}").write_text(potcar_text(sym, "LDA" if functional.startswith("LDA") else "PBE"))
    return root
