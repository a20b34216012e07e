"""Prototype labels, template documents, the template store backends and the importers."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mongomock
import numpy as np
import pandas as pd
import pytest
from maggma.stores import MemoryStore
from pydantic import BaseModel
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

from cspml_flows.core import prototype as prototype_module
from cspml_flows.core.equivalence import MATCHER_KWARGS, structure_matcher
from cspml_flows.core.errors import CSPMLError, StoreError, StructureReadError
from cspml_flows.core.prototype import PrototypeInfo, prototype_info
from cspml_flows.templates import TemplateDoc, TemplateStore, template_doc_from_structure
from cspml_flows.templates.importers import (
    MP_FIELDS,
    ImportReport,
    import_csv,
    import_folder,
    import_materials_project,
    import_store,
    template_doc_from_mapping,
)
from cspml_flows.templates.readers import file_id, read_structure, structure_files, structure_from_cif_string
from cspml_flows.templates.store_mongo import mongo_database_name, redact_uri
from cspml_flows.templates.store_uri import store_from_uri

N_ROWS = 30  # rows of real data in the CSV fixture


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def val_rows(data_dir: Path) -> pd.DataFrame:
    """The first rows of the MP-20 (binary/ternary) validation split."""
    return pd.read_csv(data_dir / "mp_20_biternary" / "val.csv.gz", nrows=N_ROWS + 40)


@pytest.fixture
def val_csv(tmp_path: Path, val_rows: pd.DataFrame) -> Path:
    """A gzipped CSV with the first N_ROWS rows, written to tmp_path."""
    path = tmp_path / "val_slice.csv.gz"
    val_rows.head(N_ROWS).to_csv(path, index=False)
    return path


@pytest.fixture
def mem_store(request) -> TemplateStore:
    ts = TemplateStore.open(f"memory://{request.node.name}")
    yield ts
    ts.close()


@pytest.fixture
def docs(nacl, kbr, srtio3, bazro3) -> list[TemplateDoc]:
    return [
        template_doc_from_structure(nacl, "t-nacl", source="test", e_above_hull=0.0),
        template_doc_from_structure(kbr, "t-kbr", source="test", e_above_hull=0.01),
        template_doc_from_structure(srtio3, "t-srtio3", source="test", formation_energy_per_atom=-3.5),
        template_doc_from_structure(bazro3, "t-bazro3", source="test"),
    ]


# ---------------------------------------------------------------- prototype


def test_prototype_info_rocksalt(nacl, kbr):
    info = prototype_info(nacl)
    assert info == PrototypeInfo("AB_cF8_225_a_b", 225, "Fm-3m", 2)
    assert prototype_info(kbr).label == info.label  # same prototype, other elements


def test_prototype_info_rocksalt_supercell_and_primitive(nacl):
    assert prototype_info(nacl * (2, 1, 1)).nsites_primitive == 2
    assert prototype_info(nacl.get_primitive_structure()).label == "AB_cF8_225_a_b"


def test_prototype_info_perovskite(srtio3, bazro3):
    info = prototype_info(srtio3)
    assert info.spacegroup_number == 221
    assert info.spacegroup_symbol == "Pm-3m"
    assert info.nsites_primitive == 5
    assert info.label == "ABC3_cP5_221_a_b_c"
    # the label does not depend on the elements: the alphabetical AFLOW labels differ for these two
    # (A3BC_cP5_221_c_a_b for O-Sr-Ti, AB3C_cP5_221_a_c_b for Ba-O-Zr)
    assert prototype_info(bazro3) == info


def test_prototype_label_is_element_independent(srtio3):
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from cspml_flows.core.prototype import prototype_label

    labels = set()
    for a, b, x in [("Sr", "Ti", "O"), ("Cs", "Pb", "I"), ("K", "Mg", "F"), ("Ba", "Ce", "O")]:
        s = srtio3.copy()
        s.replace_species({"Sr": a, "Ti": b, "O": x})
        labels.add(prototype_label(SpacegroupAnalyzer(s, symprec=0.1)))
    assert labels == {"ABC3_cP5_221_a_b_c"}


def test_prototype_info_cscl_and_zincblende(cscl, zincblende):
    assert prototype_info(cscl) == PrototypeInfo("AB_cP2_221_a_b", 221, "Pm-3m", 2)
    zb = prototype_info(zincblende)
    assert (zb.label, zb.spacegroup_number, zb.nsites_primitive) == ("AB_cF8_216_a_c", 216, 2)


def test_prototype_info_falls_back_when_spglib_fails(nacl, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("spglib failed")

    monkeypatch.setattr(prototype_module, "_DatasetSGA", broken)
    assert prototype_info(nacl) == PrototypeInfo(None, None, None, len(nacl))


def test_structure_matcher_uses_csp_tolerances(nacl, kbr):
    sm = structure_matcher()
    assert isinstance(sm, StructureMatcher)
    assert MATCHER_KWARGS == {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}
    assert (sm.stol, sm.angle_tol, sm.ltol) == (0.5, 10, 0.3)
    assert sm.fit_anonymous(nacl, kbr)


# ---------------------------------------------------------------- template documents


def test_template_doc_from_structure_fields(srtio3):
    doc = template_doc_from_structure(srtio3, "mp-5229", source="unit", e_above_hull=0.0, energy_per_atom=-8.1)
    assert doc.material_id == "mp-5229"
    assert doc.formula == "SrTiO3"
    assert doc.anonymous_formula == "ABC3"
    assert doc.chemsys == "O-Sr-Ti"
    assert doc.elements == ["Sr", "Ti", "O"]
    assert doc.nelements == 3
    assert doc.nsites == 5
    assert doc.nsites_primitive == 5
    assert doc.volume_per_atom == pytest.approx(3.905**3 / 5)
    assert (doc.spacegroup_number, doc.spacegroup_symbol) == (221, "Pm-3m")
    assert doc.prototype == "ABC3_cP5_221_a_b_c"
    assert doc.e_above_hull == 0.0
    assert doc.energy_per_atom == -8.1
    assert doc.formation_energy_per_atom is None
    assert doc.source == "unit"
    assert doc.round == 0 and doc.parent_id is None


def test_template_doc_structure_round_trip(nacl):
    doc = template_doc_from_structure(nacl, "x")
    s = doc.get_structure()
    assert s == nacl
    assert StructureMatcher().fit(s, nacl)


def test_template_doc_nan_properties_become_none(nacl):
    doc = template_doc_from_structure(nacl, 123, e_above_hull=float("nan"), formation_energy_per_atom=np.nan)
    assert doc.material_id == "123"
    assert doc.e_above_hull is None
    assert doc.formation_energy_per_atom is None


def test_template_doc_json_round_trip(nacl):
    doc = template_doc_from_structure(nacl, "x", e_above_hull=0.02)
    dumped = json.loads(json.dumps(doc.model_dump(mode="json")))
    again = TemplateDoc(**dumped)
    assert again.model_dump(mode="json") == doc.model_dump(mode="json")
    assert again.get_structure() == nacl


def test_template_doc_oxidation_state_structure(nacl):
    s = nacl.copy()
    s.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
    doc = template_doc_from_structure(s, "ox")
    assert doc.formula == "NaCl"
    assert doc.elements == ["Na", "Cl"]
    assert doc.anonymous_formula == "AB"
    assert doc.chemsys == "Cl-Na"


# ---------------------------------------------------------------- store: memory backend


def test_memory_store_add_get_count(mem_store, docs):
    assert mem_store.count() == 0
    assert mem_store.add(docs) == 4
    assert mem_store.count() == 4
    assert mem_store.ids() == {"t-nacl", "t-kbr", "t-srtio3", "t-bazro3"}
    got = mem_store.get("t-srtio3")
    assert isinstance(got, TemplateDoc)
    assert got.formula == "SrTiO3"
    assert got.formation_energy_per_atom == -3.5
    assert got.get_structure() == docs[2].get_structure()
    assert mem_store.get("missing") is None


def test_store_add_updates_existing(mem_store, docs):
    mem_store.add(docs[:2])
    changed = docs[0].model_copy(update={"e_above_hull": 0.5, "source": "changed"})
    assert mem_store.add([changed, docs[2]]) == 2  # one update, one insert
    assert mem_store.count() == 3
    got = mem_store.get("t-nacl")
    assert got.e_above_hull == 0.5 and got.source == "changed"
    assert mem_store.get("t-kbr").e_above_hull == 0.01  # untouched


def test_store_add_accepts_dicts_and_strips_foreign_ids(mem_store, docs):
    row = docs[0].model_dump(mode="json")
    row["_id"] = "from-another-store"
    assert mem_store.add([row]) == 1
    # re-adding what docs() yields (an existing key) is an update, not a second copy
    assert mem_store.add(list(mem_store.docs())) == 1
    assert mem_store.count() == 1


def test_store_add_same_key_twice_in_one_call(mem_store, docs):
    second = docs[0].model_copy(update={"e_above_hull": 0.3})
    assert mem_store.add([docs[0], second]) == 1
    assert mem_store.count() == 1
    assert mem_store.get("t-nacl").e_above_hull == 0.3  # the last one wins


def test_store_add_empty_and_missing_key(mem_store):
    assert mem_store.add([]) == 0
    with pytest.raises(StoreError, match="material_id"):
        mem_store.add([{"formula": "NaCl"}])


def test_store_docs_criteria_and_properties(mem_store, docs):
    mem_store.add(docs)
    rows = list(mem_store.docs({"anonymous_formula": "ABC3"}, properties=["material_id", "formula"]))
    assert sorted(r["material_id"] for r in rows) == ["t-bazro3", "t-srtio3"]
    assert all("_id" not in r for r in rows)
    assert all("structure" not in r for r in rows)
    assert len(list(mem_store.docs())) == 4


def test_require_nonempty(mem_store, docs):
    with pytest.raises(StoreError, match="empty"):
        mem_store.require_nonempty()
    mem_store.add(docs[:1])
    assert mem_store.require_nonempty() == 1


def test_store_context_manager(docs):
    with TemplateStore.open("memory://ctx") as ts:
        ts.add(docs)
        assert ts.count() == 4
    assert ts._connected is False


# ---------------------------------------------------------------- store: on-disk backends


def test_folder_store_is_readable_from_another_process(tmp_path, docs):
    folder = tmp_path / "store"
    ts = TemplateStore.open(folder)
    assert folder.is_dir()
    ts.add(docs)
    ts.add([docs[0].model_copy(update={"e_above_hull": 0.25})])
    ts.close()

    script = textwrap.dedent(
        f"""
        import json
        from cspml_flows.templates import TemplateStore
        ts = TemplateStore.open({str(folder)!r}, create=False)
        print(json.dumps({{"count": ts.count(), "ids": sorted(ts.ids()),
                           "ehull": ts.get("t-nacl").e_above_hull, "formula": ts.get("t-kbr").formula}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "count": 4,
        "ids": ["t-bazro3", "t-kbr", "t-nacl", "t-srtio3"],
        "ehull": 0.25,
        "formula": "KBr",
    }
    # and this process sees it again after reopening
    assert TemplateStore.open(folder, create=False).count() == 4


def test_default_store_lives_in_cspml_home(cspml_home, docs):
    ts = TemplateStore.open()
    ts.add(docs[:1])
    ts.close()
    assert (cspml_home / "store").is_dir()
    assert TemplateStore.open(cspml_home / "store").count() == 1


def test_missing_store_without_create(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        TemplateStore.open(tmp_path / "nope", create=False)
    with pytest.raises(StoreError, match="not found"):
        TemplateStore.open(tmp_path / "nope.json", create=False)
    assert not (tmp_path / "nope").exists()


def test_json_store_persists_inserts_and_updates(tmp_path, docs):
    path = tmp_path / "templates.json"
    ts = TemplateStore.open(path)
    assert ts.add(docs[:3]) == 3
    ts.close()
    on_disk = json.loads(path.read_text())
    assert sorted(d["material_id"] for d in on_disk) == ["t-kbr", "t-nacl", "t-srtio3"]

    ts = TemplateStore.open(path, create=False)
    assert ts.count() == 3
    ts.add([docs[0].model_copy(update={"e_above_hull": 0.7}), docs[3]])
    ts.close()

    ts = TemplateStore.open(path, create=False)
    assert ts.count() == 4
    assert ts.get("t-nacl").e_above_hull == 0.7
    assert ts.get("t-bazro3").formula == "BaZrO3"


# ---------------------------------------------------------------- store: MongoDB backend (mongomock)


@pytest.fixture
def mongomock_client(monkeypatch):
    import maggma.stores.mongolike
    import mongomock

    monkeypatch.setattr(maggma.stores.mongolike, "MongoClient", mongomock.MongoClient)
    return mongomock.MongoClient


def test_mongodb_store(mongomock_client, docs):
    ts = TemplateStore.open("mongodb://localhost:27017/cspml_test")
    assert isinstance(ts.store._collection, mongomock.Collection)
    assert ts.store.database == "cspml_test"
    assert ts.store.collection_name == "templates"
    assert ts.add(docs) == 4
    assert ts.count() == 4
    assert ts.ids() == {d.material_id for d in docs}
    assert ts.get("t-bazro3").elements == ["Ba", "Zr", "O"]
    assert ts.get("t-srtio3").prototype == "ABC3_cP5_221_a_b_c"
    assert sorted(d["material_id"] for d in ts.docs({"anonymous_formula": "AB"})) == ["t-kbr", "t-nacl"]
    ts.close()


def test_mongodb_store_update(monkeypatch, docs):
    # mongomock 4.3 cannot run pymongo 4.16's ReplaceOne (it passes sort=), which maggma's update uses;
    # mongomock_ng, the fork maggma itself uses for MemoryStore, can.
    import maggma.stores.mongolike
    import mongomock_ng

    client = mongomock_ng.MongoClient()  # one server for both connections below
    monkeypatch.setattr(maggma.stores.mongolike, "MongoClient", lambda *args, **kwargs: client)
    ts = TemplateStore.open("mongodb://localhost:27017/cspml_test")
    ts.add(docs)
    assert ts.add([docs[1].model_copy(update={"e_above_hull": 0.9}), docs[0]]) == 2
    assert ts.count() == 4
    assert TemplateStore.open("mongodb://localhost:27017/cspml_test").get("t-kbr").e_above_hull == 0.9
    assert client["cspml_test"]["templates"].count_documents({}) == 4


@pytest.mark.parametrize(
    ("uri", "database"),
    [
        ("mongodb://localhost:27017/mydb", "mydb"),
        ("mongodb://localhost:27017/mydb?authSource=admin", "mydb"),
        ("mongodb://user:pw@host1:27017,host2:27017/other?replicaSet=rs0", "other"),
        ("mongodb://localhost:27017", "cspml"),
        ("mongodb://localhost:27017/", "cspml"),
        ("mongodb://localhost:27017/?retryWrites=true", "cspml"),
        ("mongodb+srv://user:pw@cluster0.example.net/prod?retryWrites=true", "prod"),
        ("mongodb+srv://cluster0.example.net", "cspml"),
    ],
)
def test_mongo_database_name(uri, database):
    assert mongo_database_name(uri) == database
    assert store_from_uri(uri).database == database


def test_mongo_store_name_hides_password(mongomock_client):
    ts = TemplateStore.open("mongodb://alice:s3cret@localhost:27017/db")
    assert "s3cret" not in ts.name
    assert ts.name == "mongodb://alice:***@localhost:27017/db"
    assert redact_uri("mongodb://localhost/db") == "mongodb://localhost/db"
    assert redact_uri("/some/path:with@chars") == "/some/path:with@chars"


def test_store_from_uri_backends(tmp_path):
    from maggma.stores import JSONStore, MongoURIStore, MontyStore

    assert isinstance(store_from_uri("memory://abc"), MemoryStore)
    assert store_from_uri("memory://abc") is store_from_uri("memory://abc")  # shared in the process
    assert store_from_uri("memory://abc").collection_name == "abc:templates"
    assert isinstance(store_from_uri(tmp_path / "t.json"), JSONStore)
    assert isinstance(store_from_uri(tmp_path / "dir"), MontyStore)
    assert isinstance(store_from_uri("mongodb://h/db"), MongoURIStore)


# ---------------------------------------------------------------- reading structures


def test_read_structure_and_errors(tmp_path, nacl):
    good = tmp_path / "NaCl.cif"
    nacl.to(filename=str(good))
    assert read_structure(good).composition.reduced_formula == "NaCl"
    with pytest.raises(StructureReadError, match="not found"):
        read_structure(tmp_path / "missing.cif")
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not a CIF\n")
    with pytest.raises(StructureReadError, match=r"bad\.cif"):
        read_structure(bad)


def test_structure_from_cif_string(nacl):
    s = structure_from_cif_string(nacl.to(fmt="cif"), "x")
    assert s.composition.reduced_formula == "NaCl"
    with pytest.raises(StructureReadError, match="mp-bad"):
        structure_from_cif_string("data_x\n_cell_length_a 3\n", "mp-bad")


# ---------------------------------------------------------------- import_csv (real data)


def test_import_csv_real_rows(mem_store, val_csv, val_rows):
    seen = []
    report = import_csv(mem_store, val_csv, workers=1, progress=lambda done, total: seen.append((done, total)))
    assert isinstance(report, ImportReport)
    assert report.failed == []
    assert (report.added, report.skipped_existing) == (N_ROWS, 0)
    assert seen[-1] == (N_ROWS, N_ROWS)
    assert mem_store.count() == N_ROWS
    rows = val_rows.head(N_ROWS)
    assert mem_store.ids() == set(rows.material_id)
    for _, row in rows.iterrows():
        doc = mem_store.get(row.material_id)
        assert Composition(doc.formula) == Composition(row.pretty_formula).reduced_composition
        assert doc.e_above_hull == pytest.approx(row.e_above_hull)
        assert doc.formation_energy_per_atom == pytest.approx(row.formation_energy_per_atom)
        assert doc.energy_per_atom is None
        assert doc.spacegroup_number == row["spacegroup.number"]
        assert doc.source == "val_slice"
        assert doc.nsites == len(Structure.from_str(row.cif, fmt="cif"))
    assert "30 added" in report.summary()


def test_import_csv_is_resumable(mem_store, val_csv):
    first = import_csv(mem_store, val_csv, workers=1)
    assert first.added == N_ROWS
    second = import_csv(mem_store, val_csv, workers=1)
    assert (second.added, second.skipped_existing, second.failed) == (0, N_ROWS, [])
    assert mem_store.count() == N_ROWS


def test_import_csv_resumes_after_partial_import(mem_store, val_csv, val_rows):
    part = val_csv.parent / "part.csv.gz"
    val_rows.head(10).to_csv(part, index=False)
    assert import_csv(mem_store, part, workers=1).added == 10
    report = import_csv(mem_store, val_csv, workers=1, batch_size=7)
    assert (report.added, report.skipped_existing) == (N_ROWS - 10, 10)
    assert mem_store.count() == N_ROWS


def test_import_csv_exclude_ids(mem_store, val_csv, val_rows):
    excluded = list(val_rows.material_id[:5])
    report = import_csv(mem_store, val_csv, exclude_ids=excluded, source="pool", workers=1)
    assert report.added == N_ROWS - 5
    assert mem_store.ids().isdisjoint(excluded)
    assert {d["source"] for d in mem_store.docs(properties=["source"])} == {"pool"}


def test_import_csv_broken_cif_is_reported(mem_store, tmp_path, val_rows):
    rows = val_rows.head(4).copy()
    broken_id = rows.material_id.iloc[1]
    rows.loc[rows.index[1], "cif"] = "data_broken\n_cell_length_a 1.0\nnot a cif at all\n"
    rows.loc[rows.index[2], "cif"] = np.nan
    path = tmp_path / "broken.csv"
    rows.to_csv(path, index=False)
    report = import_csv(mem_store, path, workers=1)
    assert report.added == 2
    assert sorted(mid for mid, _ in report.failed) == sorted([broken_id, rows.material_id.iloc[2]])
    assert all(msg for _, msg in report.failed)
    assert mem_store.ids() == {rows.material_id.iloc[0], rows.material_id.iloc[3]}
    assert "2 unreadable" in report.summary()


def test_import_csv_duplicate_ids_imported_once(mem_store, tmp_path, val_rows):
    rows = pd.concat([val_rows.head(3), val_rows.head(1)])
    path = tmp_path / "dups.csv"
    rows.to_csv(path, index=False)
    report = import_csv(mem_store, path, workers=1)
    assert report.added == 3
    assert [mid for mid, _ in report.failed] == [val_rows.material_id.iloc[0]]
    assert mem_store.count() == 3


def test_import_csv_custom_columns_and_property_spellings(mem_store, tmp_path, val_rows):
    rows = val_rows.head(3).rename(
        columns={"material_id": "id", "cif": "structure_cif", "e_above_hull": "energy_above_hull"}
    )
    path = tmp_path / "custom.csv"
    rows.to_csv(path, index=False)
    report = import_csv(mem_store, path, id_column="id", cif_column="structure_cif", workers=1)
    assert report.added == 3
    doc = mem_store.get(rows.id.iloc[0])
    assert doc.e_above_hull == pytest.approx(rows.energy_above_hull.iloc[0])


def test_import_csv_missing_column(mem_store, tmp_path, val_rows):
    path = tmp_path / "nocif.csv"
    val_rows.head(2).drop(columns=["cif"]).to_csv(path, index=False)
    with pytest.raises(CSPMLError, match="no 'cif' column"):
        import_csv(mem_store, path, workers=1)
    with pytest.raises(CSPMLError, match="no 'mpid' column"):
        import_csv(mem_store, path, id_column="mpid", workers=1)
    assert mem_store.count() == 0


def test_import_csv_missing_or_unreadable_file(mem_store, tmp_path):
    with pytest.raises(CSPMLError, match="not found"):
        import_csv(mem_store, tmp_path / "missing.csv.gz")
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(CSPMLError, match="cannot read CSV"):
        import_csv(mem_store, bad)


def test_import_csv_parallel_matches_serial(tmp_path, val_rows):
    path = tmp_path / "many.csv.gz"
    val_rows.head(60).to_csv(path, index=False)
    with gzip.open(path, "rt") as fh:  # the fixture really is gzipped
        assert fh.readline().startswith("Unnamed: 0,material_id")
    serial, parallel = TemplateStore.open("memory://serial"), TemplateStore.open("memory://parallel")
    assert import_csv(serial, path, workers=1).added == 60
    report = import_csv(parallel, path, workers=2, batch_size=25)
    assert (report.added, report.failed) == (60, [])
    assert parallel.ids() == serial.ids()
    mid = val_rows.material_id.iloc[42]
    a, b = serial.get(mid), parallel.get(mid)
    assert (a.formula, a.prototype, a.nsites_primitive) == (b.formula, b.prototype, b.nsites_primitive)


# ---------------------------------------------------------------- import_folder


@pytest.fixture
def structure_folder(tmp_path, nacl, srtio3, cscl, zincblende) -> Path:
    folder = tmp_path / "structures"
    folder.mkdir()
    nacl.to(filename=str(folder / "nacl.cif"))
    srtio3.to(filename=str(folder / "srtio3.vasp"), fmt="poscar")
    cscl.to(filename=str(folder / "POSCAR_cscl"), fmt="poscar")
    zincblende.to(filename=str(folder / "zns.poscar"), fmt="poscar")
    (folder / "notes.txt").write_text("not a structure")
    (folder / "sub").mkdir()
    return folder


def test_structure_files(structure_folder, tmp_path):
    names = [p.name for p in structure_files(structure_folder)]
    assert names == sorted(["nacl.cif", "srtio3.vasp", "POSCAR_cscl", "zns.poscar"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CSPMLError, match="no CIF/POSCAR"):
        structure_files(empty)
    with pytest.raises(CSPMLError, match="not found"):
        structure_files(tmp_path / "missing")


def test_import_folder(mem_store, structure_folder):
    report = import_folder(mem_store, structure_folder, id_prefix="user-", workers=1)
    assert (report.added, report.failed) == (4, [])
    ids = {f.name: file_id(f, "user-") for f in structure_files(structure_folder)}
    assert mem_store.ids() == {ids[n] for n in ("nacl.cif", "srtio3.vasp", "POSCAR_cscl", "zns.poscar")}
    assert ids["nacl.cif"].startswith("user-nacl-") and len(ids["nacl.cif"]) == len("user-nacl-") + 12
    assert mem_store.get(ids["srtio3.vasp"]).formula == "SrTiO3"
    assert mem_store.get(ids["srtio3.vasp"]).spacegroup_number == 221
    assert mem_store.get(ids["POSCAR_cscl"]).formula == "CsCl"
    assert mem_store.get(ids["zns.poscar"]).spacegroup_number == 216
    assert mem_store.get(ids["nacl.cif"]).source == "folder:structures"
    again = import_folder(mem_store, structure_folder, id_prefix="user-", workers=1)
    assert (again.added, again.skipped_existing) == (0, 4)


def test_import_folder_strict_names_broken_file(mem_store, structure_folder):
    (structure_folder / "zz_broken.cif").write_text("data_x\nloop_\n_garbage\n")
    with pytest.raises(StructureReadError, match=r"zz_broken\.cif"):
        import_folder(mem_store, structure_folder, workers=1)
    assert mem_store.count() == 0  # nothing written before the check


def test_import_folder_lenient_reports_broken_file(mem_store, structure_folder):
    (structure_folder / "zz_broken.cif").write_text("data_x\nloop_\n_garbage\n")
    report = import_folder(mem_store, structure_folder, strict=False, source="mine", workers=1)
    assert report.added == 4
    assert [mid.rsplit("-", 1)[0] for mid, _ in report.failed] == ["zz_broken"]
    assert "zz_broken.cif" in report.failed[0][1]
    assert {d["source"] for d in mem_store.docs(properties=["source"])} == {"mine"}


# ---------------------------------------------------------------- import_store


def _mp_doc(structure: Structure, mid: str, **extra) -> dict:
    return {"structure": structure.as_dict(), **({"material_id": mid} if mid else {}), **extra}


def test_import_store_from_memory_store(mem_store, nacl, srtio3, kbr):
    other = MemoryStore(collection_name="mp_docs", key="task_id")
    other.connect()
    other.update(
        [
            _mp_doc(
                nacl,
                "mp-22862",
                task_id="mp-22862",
                energy_above_hull=0.0,
                formation_energy_per_atom=-2.1,
                energy_per_atom=-3.4,
            ),
            _mp_doc(srtio3, "", task_id="mp-5229", e_above_hull=0.05, uncorrected_energy_per_atom=-8.0),
            {"task_id": "mp-broken", "material_id": "mp-broken", "formula_pretty": "X"},
            _mp_doc(kbr, "mp-23251", task_id="mp-23251", energy_above_hull=0.2),
        ]
    )
    report = import_store(mem_store, other)
    assert report.source == other.name == "mem://mp_docs"
    assert report.added == 3
    assert [mid for mid, _ in report.failed] == ["mp-broken"]
    assert "no 'structure'" in report.failed[0][1]
    nacl_doc = mem_store.get("mp-22862")
    assert (nacl_doc.e_above_hull, nacl_doc.formation_energy_per_atom, nacl_doc.energy_per_atom) == (
        0.0,
        -2.1,
        -3.4,
    )
    assert nacl_doc.source == "mem://mp_docs"  # defaults to the other store's name
    sto = mem_store.get("mp-5229")  # id taken from task_id
    assert sto.formula == "SrTiO3"
    assert (sto.e_above_hull, sto.energy_per_atom) == (0.05, -8.0)

    again = import_store(mem_store, other, source="again")
    assert (again.added, again.skipped_existing) == (0, 3)


def test_import_store_with_criteria(mem_store, nacl, kbr):
    other = MemoryStore(collection_name="crit", key="material_id")
    other.connect()
    other.update([_mp_doc(nacl, "a", energy_above_hull=0.0), _mp_doc(kbr, "b", energy_above_hull=0.3)])
    report = import_store(mem_store, other, criteria={"energy_above_hull": {"$lt": 0.1}}, source="crit-src")
    assert report.added == 1
    assert mem_store.ids() == {"a"}
    assert mem_store.get("a").source == "crit-src"


def test_template_doc_from_mapping_errors(nacl):
    with pytest.raises(CSPMLError, match="no 'structure'"):
        template_doc_from_mapping({"material_id": "x"}, "src")
    with pytest.raises(CSPMLError, match="neither"):
        template_doc_from_mapping({"structure": nacl.as_dict()}, "src")
    doc = template_doc_from_mapping({"task_id": "t", "structure": nacl}, "src")  # a Structure object works too
    assert (doc.material_id, doc.formula, doc.source) == ("t", "NaCl", "src")


# ---------------------------------------------------------------- import_materials_project (fake rester)


class FakeSummaryDoc(BaseModel):
    """Shaped like mp-api's SummaryDoc restricted to MP_FIELDS."""

    material_id: str
    structure: dict
    energy_above_hull: float | None = None
    formation_energy_per_atom: float | None = None
    energy_per_atom: float | None = None


class FakeMPID:
    """mp-api's material ids are MPID objects, not strings."""

    def __init__(self, value: str):
        self.value = value

    def __str__(self) -> str:
        return self.value


class FakeRester:
    def __init__(self, results: list):
        self.calls: list[dict] = []
        self.materials = SimpleNamespace(summary=SimpleNamespace(search=self._search))
        self._results = results

    def _search(self, **kwargs):
        self.calls.append(kwargs)
        return list(self._results)


@pytest.fixture
def mp_results(nacl, kbr, cscl):
    return [
        FakeSummaryDoc(
            material_id="mp-22862",
            structure=nacl.as_dict(),
            energy_above_hull=0.0,
            formation_energy_per_atom=-2.11,
            energy_per_atom=-3.42,
        ),
        {
            "material_id": FakeMPID("mp-23251"),
            "structure": kbr,
            "energy_above_hull": 0.02,
            "formation_energy_per_atom": -1.9,
            "energy_per_atom": -3.1,
        },
        {
            "material_id": "mp-22865",
            "structure": cscl.as_dict(),
            "energy_above_hull": 0.05,
            "formation_energy_per_atom": None,
            "energy_per_atom": -3.0,
        },
        {"material_id": "mp-nostruct", "structure": None, "energy_above_hull": 0.0},
    ]


def test_import_materials_project(mem_store, mp_results):
    rester = FakeRester(mp_results)
    report = import_materials_project(mem_store, chemsys="Na-Cl", rester=rester)
    assert rester.calls == [{"fields": MP_FIELDS, "chemsys": "Na-Cl", "energy_above_hull": (0, 0.1)}]
    assert set(MP_FIELDS) == {
        "material_id",
        "structure",
        "energy_above_hull",
        "formation_energy_per_atom",
        "energy_per_atom",
    }
    assert report.source == "materials-project"
    assert report.added == 3
    assert [mid for mid, _ in report.failed] == ["mp-nostruct"]
    assert mem_store.ids() == {"mp-22862", "mp-23251", "mp-22865"}
    nacl_doc = mem_store.get("mp-22862")
    assert nacl_doc.formula == "NaCl"
    assert (nacl_doc.e_above_hull, nacl_doc.formation_energy_per_atom, nacl_doc.energy_per_atom) == (
        0.0,
        -2.11,
        -3.42,
    )
    assert nacl_doc.source == "materials-project"
    assert nacl_doc.prototype == "AB_cF8_225_a_b"
    kbr_doc = mem_store.get("mp-23251")
    assert (kbr_doc.formula, kbr_doc.e_above_hull) == ("KBr", 0.02)
    cscl_doc = mem_store.get("mp-22865")
    assert cscl_doc.formation_energy_per_atom is None
    assert cscl_doc.spacegroup_number == 221

    again = import_materials_project(mem_store, chemsys="Na-Cl", rester=rester)
    assert (again.added, again.skipped_existing) == (0, 3)


def test_import_materials_project_query_arguments(mem_store, mp_results):
    rester = FakeRester(mp_results[:1])
    import_materials_project(mem_store, formula=["NaCl", "KBr"], max_e_above_hull=None, rester=rester)
    assert rester.calls == [{"fields": MP_FIELDS, "formula": ["NaCl", "KBr"]}]
    rester = FakeRester([])
    report = import_materials_project(
        mem_store, chemsys=["Na-Cl", "K-Br"], formula="NaCl", max_e_above_hull=0.05, rester=rester
    )
    assert rester.calls == [
        {"fields": MP_FIELDS, "chemsys": ["Na-Cl", "K-Br"], "formula": "NaCl", "energy_above_hull": (0, 0.05)}
    ]
    assert (report.added, report.failed) == (0, [])


def test_import_materials_project_without_mp_api(mem_store, monkeypatch):
    monkeypatch.setitem(sys.modules, "mp_api", None)
    monkeypatch.setitem(sys.modules, "mp_api.client", None)
    with pytest.raises(CSPMLError, match="mp-api"):
        import_materials_project(mem_store, chemsys="Na-Cl", api_key="x")


def test_empty_index_and_empty_subset(nacl):
    from cspml_flows.templates.index import TemplateIndex
    from cspml_flows.templates.schema import template_doc_from_structure

    empty = TemplateIndex.empty()
    assert len(empty) == 0 and empty.by_anon == {}
    idx = TemplateIndex.from_docs([template_doc_from_structure(nacl, "nacl").model_dump(mode="json")])
    none = idx.subset(np.zeros(1, dtype=bool))
    assert len(none) == 0 and none.by_anon == {}


def test_concatenated_sequences_read_through():
    """Two sequences end to end: items, slices, equality and take (ascending: still concatenated)."""
    import numpy as np

    from cspml_flows.templates.lazy import Concatenated

    both = Concatenated(["a", "b", "c"], ("d", "e"))
    assert len(both) == 5 and both[3] == "d" and both[-1] == "e" and both[1:4] == ["b", "c", "d"]
    assert both == ["a", "b", "c", "d", "e"] and list(both) == ["a", "b", "c", "d", "e"]
    picked = both.take(np.array([0, 2, 4]))
    assert isinstance(picked, Concatenated) and list(picked) == ["a", "c", "e"]
    assert list(both.take(np.array([4, 0]))) == ["e", "a"]
