"""Shared fixtures: small hand-built structures, the benchmark data folder, an isolated CSPML_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

DEFAULT_DATA_DIR = Path("/work/shared/data")


@pytest.fixture(autouse=True)
def cspml_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own CSPML_HOME, so nothing touches ~/.cspml-flows."""
    home = tmp_path_factory.mktemp("cspml_home")
    monkeypatch.setenv("CSPML_HOME", str(home))
    monkeypatch.delenv("CSPML_CONFIG", raising=False)
    return home


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only benchmark data folder (``CSPML_DATA_DIR`` if set); skips when it is absent."""
    path = Path(os.environ.get("CSPML_DATA_DIR") or DEFAULT_DATA_DIR)
    if not (path / "mp_20_biternary").is_dir():
        pytest.skip(f"benchmark data not found at {path}")
    return path


FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]


def _fcc_pair(a: str, b: str, lattice_a: float, shift: float) -> Structure:
    """Two interpenetrating fcc lattices, written out (``Structure.from_spacegroup`` costs ~1 s a call)."""
    coords = FCC + [[(x + shift) % 1 for x in site] for site in FCC]
    return Structure(Lattice.cubic(lattice_a), [a] * 4 + [b] * 4, coords)


def _rocksalt(a: str, b: str, lattice_a: float) -> Structure:
    return _fcc_pair(a, b, lattice_a, 0.5)


def _perovskite(a: str, b: str, x: str, lattice_a: float) -> Structure:
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(lattice_a), [a, b, x, x, x], coords)


@pytest.fixture
def nacl() -> Structure:
    """Rocksalt NaCl, conventional cell (8 sites)."""
    return _rocksalt("Na", "Cl", 5.69)


@pytest.fixture
def kbr() -> Structure:
    """Rocksalt KBr, conventional cell (8 sites)."""
    return _rocksalt("K", "Br", 6.60)


@pytest.fixture
def srtio3() -> Structure:
    """Cubic perovskite SrTiO3 (5 sites)."""
    return _perovskite("Sr", "Ti", "O", 3.905)


@pytest.fixture
def bazro3() -> Structure:
    """Cubic perovskite BaZrO3 (5 sites)."""
    return _perovskite("Ba", "Zr", "O", 4.19)


@pytest.fixture
def cscl() -> Structure:
    """CsCl (B2), 2 sites."""
    return Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture
def zincblende() -> Structure:
    """Zincblende ZnS, conventional cell (8 sites)."""
    return _fcc_pair("Zn", "S", 5.41, 0.25)


@pytest.fixture
def structures(nacl, kbr, srtio3, bazro3, cscl, zincblende) -> dict[str, Structure]:
    """All hand-built structures by a short id."""
    return {"nacl": nacl, "kbr": kbr, "srtio3": srtio3, "bazro3": bazro3, "cscl": cscl, "zns": zincblende}
