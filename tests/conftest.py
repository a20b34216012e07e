"""Shared fixtures: small hand-built structures, the benchmark data folder, an isolated CSPML_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure


@pytest.fixture(autouse=True)
def cspml_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own CSPML_HOME, so nothing touches ~/.cspml-flows."""
    home = tmp_path_factory.mktemp("cspml_home")
    monkeypatch.setenv("CSPML_HOME", str(home))
    monkeypatch.delenv("CSPML_CONFIG", raising=False)
    return home


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only benchmark data folder: ``CSPML_DATA_DIR`` if set, else ``../shared/data`` beside the
    checkout. Missing data is an error, not a skip: CI always has it."""
    from cspml_flows.core.config import data_dir as find_data_dir

    return find_data_dir(config={})


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


# ---------------------------------------------------------------- engine fixtures (learning, predict, CLI)
#
# A real template index (400 Materials Project structures plus hand-built prototypes) and a similarity model
# trained on it once per session. Nothing here writes to CSPML_HOME: TemplateIndex.from_docs and
# SimilarityModel.train keep everything in memory.

N_INDEX_ROWS = 400  # first rows of mp_20_biternary/val.csv.gz in the session index
TRAIN_MAX_ITER = 100  # boosting rounds for the session model (the default 300 only adds time here)


def _b2(a: str, b: str, lattice_a: float) -> Structure:
    return Structure(Lattice.cubic(lattice_a), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _zincblende(a: str, b: str, lattice_a: float) -> Structure:
    return _fcc_pair(a, b, lattice_a, 0.25)


def hand_built_structures() -> dict[str, Structure]:
    """Prototype families by short id: rocksalt, CsCl (B2), zincblende, cubic perovskite."""
    out = {
        # rocksalt (Fm-3m), experimental lattice constants
        "nacl": _rocksalt("Na", "Cl", 5.64),
        "kcl": _rocksalt("K", "Cl", 6.29),
        "nabr": _rocksalt("Na", "Br", 5.97),
        "lif": _rocksalt("Li", "F", 4.03),
        "mgo": _rocksalt("Mg", "O", 4.21),
        "kbr": _rocksalt("K", "Br", 6.60),
        # CsCl type (Pm-3m)
        "cscl": _b2("Cs", "Cl", 4.12),
        "csbr": _b2("Cs", "Br", 4.29),
        "csi": _b2("Cs", "I", 4.57),
        # zincblende (F-43m)
        "zns": _zincblende("Zn", "S", 5.41),
        "gaas": _zincblende("Ga", "As", 5.65),
        "inp": _zincblende("In", "P", 5.87),
        # cubic perovskites (Pm-3m)
        "srtio3": _perovskite("Sr", "Ti", "O", 3.905),
        "catio3": _perovskite("Ca", "Ti", "O", 3.84),
        "batio3": _perovskite("Ba", "Ti", "O", 4.00),
        "bazro3": _perovskite("Ba", "Zr", "O", 4.19),
    }
    return out


@pytest.fixture(scope="session")
def hand_structures() -> dict[str, Structure]:
    """:func:`hand_built_structures`, built once (treat as read-only; copy before modifying)."""
    return hand_built_structures()


@pytest.fixture(scope="session")
def hand_docs(hand_structures) -> list[dict]:
    """Template documents of the hand-built structures, ids ``hand-<short id>``, on the convex hull."""
    from cspml_flows.templates.schema import template_doc_from_structure

    return [
        template_doc_from_structure(s, f"hand-{key}", source="hand-built", e_above_hull=0.0).model_dump(mode="json")
        for key, s in hand_structures.items()
    ]


@pytest.fixture
def template_folder(tmp_path: Path, hand_docs: list[dict]) -> str:
    """An embedded template store with the hand-built prototypes (rocksalt, B2, zincblende, perovskite)."""
    from cspml_flows.templates.store import TemplateStore

    path = tmp_path / "templates"
    ts = TemplateStore.open(path)
    ts.add([dict(d) for d in hand_docs])
    ts.close()
    return str(path)


@pytest.fixture(scope="session")
def val_docs(data_dir: Path) -> list[dict]:
    """Template documents of the first N_INDEX_ROWS rows of mp_20_biternary/val (with e_above_hull, as
    ``import_csv`` stores them)."""
    import pandas as pd

    from cspml_flows.templates.schema import template_doc_from_structure

    df = pd.read_csv(data_dir / "mp_20_biternary" / "val.csv.gz", nrows=N_INDEX_ROWS)
    return [
        template_doc_from_structure(
            Structure.from_str(cif, fmt="cif"), str(mid), source="mp_20_biternary/val", e_above_hull=float(ehull)
        ).model_dump(mode="json")
        for mid, cif, ehull in zip(df["material_id"], df["cif"], df["e_above_hull"], strict=True)
    ]


@pytest.fixture(scope="session")
def template_index(val_docs, hand_docs):
    """TemplateIndex over the 400 real structures and the hand-built ones (read-only: use ``subset``)."""
    from cspml_flows.templates.index import TemplateIndex

    return TemplateIndex.from_docs(val_docs + hand_docs, workers=1)


@pytest.fixture(scope="session")
def trained(template_index):
    """(SimilarityModel, TrainingReport) trained once on ``template_index``."""
    from threadpoolctl import threadpool_limits

    from cspml_flows.learning.model import SimilarityModel

    # One OpenMP thread: on a small shared machine, HistGradientBoosting's thread pool is 10-50x slower
    # than a single thread when other processes compete for the cores.
    with threadpool_limits(limits=1, user_api="openmp"):
        return SimilarityModel.train(template_index, check_labels=20, max_iter=TRAIN_MAX_ITER)


@pytest.fixture(scope="session")
def trained_model(trained):
    return trained[0]


def held_out_queries(data_dir: Path, index, n: int, scan: int) -> tuple[list[str], list[Structure]]:
    """Ids and structures of the first ``n`` of the first ``scan`` rows of mp_20_biternary/test whose
    anonymous formula ``index`` holds (queries the index has templates for)."""
    import pandas as pd

    from cspml_flows.core.composition import roles

    df = pd.read_csv(data_dir / "mp_20_biternary" / "test.csv.gz", nrows=scan)
    ids, gts = [], []
    for mid, cif in zip(df["material_id"], df["cif"], strict=True):
        s = Structure.from_str(cif, fmt="cif")
        if roles(s.composition).anonymous_formula in index.by_anon:
            ids.append(str(mid))
            gts.append(s)
        if len(ids) == n:
            break
    return ids, gts


@pytest.fixture
def campaign_config(tmp_path: Path):
    """A factory of campaign config dicts (two binary compositions, EMT, one round, workdir under tmp_path):
    ``campaign_config(templates, **over)``, ``over`` replacing keys."""

    def make(templates: str, **over) -> dict:
        cfg = {
            "name": "t",
            "compositions": ["CuAu", "AgPd"],
            "top_k": 2,
            "calculator": {"name": "emt", "steps": 200, "batch_size": 4},
            "hull_threshold": 5.0,
            "model": None,
            "stores": {"templates": templates},
            "workdir": str(tmp_path / "work"),
        }
        return cfg | over

    return make
