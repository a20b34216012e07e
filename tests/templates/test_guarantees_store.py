"""Template stores and the index cache: identity per location, content-keyed caches, cache files checked
against their layout, embedded collections created at open under a lock, MongoDB timeouts, file modes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from cspml_flows.cli.main import main
from cspml_flows.core.errors import ConfigError, StoreError
from cspml_flows.core.safeio import atomic_open
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.index_update import index_dir
from cspml_flows.templates.schema import template_doc_from_structure
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_embedded import STORE_LOCK
from cspml_flows.templates.store_mongo import mongo_timeout_ms
from cspml_flows.templates.store_sqlite import collection_file
from cspml_flows.templates.store_uri import store_from_uri, store_identity

ROOT = Path(__file__).resolve().parents[2]
FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]


def rocksalt(a: float = 5.64) -> Structure:
    return Structure(Lattice.cubic(a), ["Na"] * 4 + ["Cl"] * 4, FCC + [[(x + 0.5) % 1 for x in s] for s in FCC])


def b2(a: float = 4.12) -> Structure:
    return Structure(Lattice.cubic(a), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def undated(s: Structure, mid: str) -> dict:
    """A template document as a JSON file may hold it: no ``last_updated``."""
    d = template_doc_from_structure(s, mid).model_dump(mode="json")
    d.pop("last_updated")
    return d


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def predicted_space_group(capsys, store: Path | str) -> str:
    assert main(["-q", "predict", "KBr", "--store", str(store), "--top", "1"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    return row[2]  # rank, score, space group, ...


# ---------------------------------------------------------------- identity and content of a store


def test_json_stores_with_same_count_and_no_dates_each_answer_for_themselves(tmp_path, cspml_home, capsys):
    """Two JSON stores, one undated document each under the same id, different structures: each store's
    prediction comes from its own template, and each has its own index folder."""
    a, b = tmp_path / "A.json", tmp_path / "B.json"
    a.write_text(json.dumps([undated(b2(), "t-1")]))
    b.write_text(json.dumps([undated(rocksalt(), "t-1")]))
    assert predicted_space_group(capsys, b) == "Fm-3m"
    assert predicted_space_group(capsys, a) == "Pm-3m"
    assert predicted_space_group(capsys, b) == "Fm-3m"  # read back from B's own cache
    assert len(list((cspml_home / "index").glob("*/manifest.json"))) == 2


def test_store_identity_is_unique_per_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = TemplateStore.open("store")
    assert folder.identity == TemplateStore.open(tmp_path / "store").identity
    assert str(tmp_path / "store") in folder.identity
    assert folder.identity != TemplateStore.open(tmp_path / "other").identity
    assert TemplateStore.open("a.json").identity == str(tmp_path / "a.json") == TemplateStore.open("a.json").name
    assert TemplateStore.open("a.json").identity != TemplateStore.open("b.json").identity
    uri = "mongodb://alice:s3cret@db.example:27017/prod"
    ids = {store_identity(store_from_uri(uri, collection=c)) for c in ("templates", "other")}
    ids.add(store_identity(store_from_uri("mongodb://alice:s3cret@db.example:27017/test")))
    assert len(ids) == 3 and not any("s3cret" in i for i in ids)
    assert "mongodb://alice:***@db.example:27017/prod#prod/templates" in ids


@pytest.mark.parametrize("backend", ["folder", "json"])
def test_changed_document_with_same_count_rebuilds_the_index_cache(tmp_path, backend):
    """One document replaced (same id, same count, same date, same file size, modification time set back):
    the index is rebuilt from the new content, not read from the cache."""
    uri = tmp_path / ("store" if backend == "folder" else "s.json")
    doc = template_doc_from_structure(rocksalt(5.64), "t-1").model_dump(mode="json")
    other = template_doc_from_structure(b2(), "t-2").model_dump(mode="json")
    ts = TemplateStore.open(uri)
    ts.add([doc, other])
    ts.close()
    first = TemplateIndex.open(uri, workers=1)
    assert first.structures[0]["lattice"]["a"] == pytest.approx(5.64)
    target = collection_file(uri, "db", "templates") if backend == "folder" else uri
    before = target.stat()
    if backend == "folder":
        changed = template_doc_from_structure(rocksalt(5.46), "t-1").model_dump(mode="json")
        changed["last_updated"] = doc["last_updated"]
        ts = TemplateStore.open(uri)
        ts.add([changed])
        ts.close()
    else:  # edited by hand: the lattice constant's digits swapped, nothing else
        target.write_text(target.read_text().replace("5.64", "5.46"))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # a stamp check could not tell
    assert target.stat().st_size == before.st_size
    again = TemplateIndex.open(uri, workers=1)
    assert len(again) == 2 and again.structures[0]["lattice"]["a"] == pytest.approx(5.46)
    assert again.signature != first.signature


def test_memory_store_fingerprint_follows_ids_and_dates():
    ts = TemplateStore.open("memory://fingerprint")
    ts.add([template_doc_from_structure(b2(), "t-1")])
    one = ts.fingerprint()
    assert ts.fingerprint() == one
    ts.add([template_doc_from_structure(b2(4.2), "t-1")])  # a new TemplateDoc: a new last_updated
    assert ts.fingerprint() != one


# ---------------------------------------------------------------- index cache checked against its layout


def _damage(arrays: dict[str, np.ndarray], kind: str) -> None:
    """Damage one array of an index (a column of its segment or its state) the way a foreign, older or
    corrupted file could."""
    if kind == "stats width":
        arrays["stats"] = arrays["stats"][:, :-1]
    elif kind == "role_props shape":
        arrays["role_props"] = arrays["role_props"][:, :, :-1]
    elif kind == "role_fracs on padding":
        arrays["role_fracs"] = np.nan_to_num(arrays["role_fracs"], nan=0.5)
    elif kind == "role_fracs infinite":
        arrays["role_fracs"] = np.where(np.isnan(arrays["role_fracs"]), np.nan, np.inf)
    elif kind == "stats infinite":
        arrays["stats"] = arrays["stats"].copy()
        arrays["stats"][0, 0] = np.inf
    elif kind == "ids short":
        arrays["ids"] = arrays["ids"][:-1]
    elif kind == "ids numeric":
        arrays["ids"] = np.arange(len(arrays["ids"]))
    elif kind == "formulas 2-d":
        arrays["formulas"] = np.stack([arrays["formulas"]] * 2, axis=1)
    elif kind == "cluster out of range":
        arrays["cluster"] = arrays["cluster"] + len(arrays["cluster"])
    elif kind == "spacegroup text":
        arrays["spacegroup"] = arrays["spacegroup"].astype(str)
    elif kind == "min_dist nan":
        arrays["min_dist"] = arrays["min_dist"].copy()
        arrays["min_dist"][1] = np.nan
    elif kind == "no e_above_hull":
        del arrays["e_above_hull"]
    elif kind == "roles malformed":
        arrays["role_amt"] = arrays["role_amt"].copy()
        arrays["role_amt"][0, 0] = -1.0
    elif kind == "role_syms not permutations":
        arrays["perms"] = arrays["perms"].copy()
        arrays["perms"][0, :2] = 0
    elif kind == "structures outside their blob":
        arrays["str_end"] = arrays["str_end"] + len(arrays["structures"])
    elif kind == "order repeats a row":
        arrays["order"] = np.zeros_like(arrays["order"])
    else:
        raise AssertionError(kind)


DAMAGE = [
    "stats width",
    "role_props shape",
    "role_fracs on padding",
    "role_fracs infinite",
    "stats infinite",
    "ids short",
    "ids numeric",
    "formulas 2-d",
    "cluster out of range",
    "spacegroup text",
    "min_dist nan",
    "no e_above_hull",
    "roles malformed",
    "role_syms not permutations",
    "structures outside their blob",
    "order repeats a row",
]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, hand_docs) -> Path:
    path = tmp_path_factory.mktemp("index_store") / "store"
    ts = TemplateStore.open(path)
    ts.add([dict(d) for d in hand_docs[:6]])
    ts.close()
    return path


def _index_files(root: Path) -> dict[str, Path]:
    """The ``.npy`` files of a one-segment index: its segment's columns and its state's arrays, by name."""
    manifest = json.loads((root / "manifest.json").read_text())
    (segment,) = manifest["segments"]
    files = {p.stem: p for p in (root / segment).glob("*.npy")}
    return files | {p.stem: p for p in (root / manifest["state"]).glob("*.npy")}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_index_is_rebuilt_with_one_log_line(small_store, kind, caplog):
    """An index whose manifest is current but whose arrays have the wrong layout is never used: one log
    line, a rebuild, and the rebuilt index is read back without a word."""
    built = TemplateIndex.open(small_store, workers=1)
    ts = TemplateStore.open(small_store, create=False)
    root = index_dir(ts)
    ts.close()
    files = _index_files(root)
    original = {k: np.load(p, allow_pickle=False) for k, p in files.items()}
    arrays = dict(original)
    _damage(arrays, kind)
    for name, path in files.items():
        if name not in arrays:
            path.unlink()
        elif arrays[name] is not original[name]:
            with atomic_open(path, "wb") as fh:  # a new file: the index opened above keeps its mapping
                np.save(fh, arrays[name], allow_pickle=False)
    with caplog.at_level(logging.INFO, logger="cspml_flows.templates"):
        rebuilt = TemplateIndex.open(small_store, workers=1)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "rebuilding" in message and len(message.splitlines()) == 1
    assert list(rebuilt.ids) == list(built.ids) and rebuilt.structures == built.structures
    assert list(rebuilt.roles) == list(built.roles) and list(rebuilt.role_syms) == list(built.role_syms)
    for name in ("stats", "role_props", "role_fracs", "cluster", "min_dist"):
        assert np.array_equal(getattr(rebuilt, name), getattr(built, name), equal_nan=True), name
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cspml_flows.templates"):
        TemplateIndex.open(small_store, workers=1)
    assert caplog.records == []  # the rebuilt index is whole


# ---------------------------------------------------------------- embedded store: creation under a lock


def _sqlite_tables(f: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{f}?mode=rw", uri=True)) as con:  # rw: leaves no -wal/-shm
        return [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]


def test_opening_for_writing_creates_the_collection_at_once(tmp_path):
    path = tmp_path / "store"
    old = os.umask(0o022)
    try:
        TemplateStore.open(path).close()
    finally:
        os.umask(old)
    coll = collection_file(path, "db", "templates")
    assert sorted(_sqlite_tables(coll)) == ["cspml_changes", "cspml_journal", "documents", "sqlite_sequence"]
    assert stat.S_IMODE(coll.stat().st_mode) == 0o644  # as montydb itself would create it
    assert sorted(p.name for p in coll.parent.iterdir()) == ["templates.collection"]  # no temporary file left
    assert (path / STORE_LOCK).is_file() and (path / "monty.storage.cfg").is_file()
    reader = tmp_path / "reader"
    reader.mkdir()
    with pytest.raises(StoreError, match="is not a template store"):
        TemplateStore.open(reader, create=False)
    assert list(reader.iterdir()) == []  # opening to read writes nothing


def _half_created(path: Path, variant: str) -> Path:
    """An embedded store folder as a kill during montydb's lazy collection creation left it."""
    from montydb import set_storage

    set_storage(str(path), storage="sqlite", use_bson=True, mongo_version="4.0")  # as maggma's MontyStore does
    coll = collection_file(path, "db", "templates")
    coll.parent.mkdir(parents=True)
    if variant == "empty file":
        coll.touch()
    else:  # the journal mode set, the table not yet created
        with contextlib.closing(sqlite3.connect(coll)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    return coll


@pytest.mark.parametrize("variant", ["empty file", "wal file without table"])
def test_half_created_store_is_named_then_repaired(tmp_path, variant, capsys, caplog, nacl, kbr):
    path = (tmp_path / "store").resolve()
    coll = _half_created(path, variant)
    command = f"cspml import folder --store {path}"
    with pytest.raises(StoreError, match="half-created") as info:
        TemplateStore.open(path, create=False).count()
    assert command in str(info.value) and len(str(info.value).splitlines()) == 1
    assert command in one_line_error(capsys, ["predict", "NaCl", "--store", str(path)])
    with caplog.at_level(logging.WARNING, logger="cspml_flows.templates.store_embedded"):
        assert main(command.split()[1:]) == 0  # the command the error names
    assert "repaired" in caplog.text
    assert "documents" in _sqlite_tables(coll)
    ts = TemplateStore.open(path)
    ts.add([template_doc_from_structure(nacl, "t-nacl"), template_doc_from_structure(kbr, "t-kbr")])
    ts.close()
    assert TemplateStore.open(path, create=False).ids() == {"t-nacl", "t-kbr"}


def test_write_open_repairs_a_half_created_store_directly(tmp_path, nacl):
    path = tmp_path / "store"
    _half_created(path, "empty file")
    ts = TemplateStore.open(path)
    assert ts.add([template_doc_from_structure(nacl, "t-nacl")]) == 1
    assert TemplateStore.open(path, create=False).count() == 1


def _stress(iterations: int, folder: Path) -> subprocess.CompletedProcess:
    script = ROOT / "tests" / "templates" / "stress_first_write.py"
    return subprocess.run(
        [sys.executable, str(script), str(iterations), str(folder)], capture_output=True, text=True, timeout=900
    )


def test_concurrent_first_writes_into_new_stores(tmp_path):
    """Two processes open a store that does not exist yet and write into it at the same moment, 10 times:
    every store holds each id once (tests/templates/stress_first_write.py)."""
    out = _stress(10, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "10 of 10 passed"


@pytest.mark.slow
def test_concurrent_first_writes_into_new_stores_200_times(tmp_path):
    out = _stress(200, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "200 of 200 passed"


# ---------------------------------------------------------------- MongoDB: fail fast, in one line


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mongodb_fails_fast_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("CSPML_MONGO_TIMEOUT_MS", "400")
    uri = f"mongodb://alice:s3cret@127.0.0.1:{closed_port()}/cspml"
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        TemplateStore.open(uri)
    assert time.monotonic() - start < 3
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "s3cret" not in message
    assert message.startswith(f"cannot reach template store {uri.replace('s3cret', '***')}: ")
    assert "within 0.4 s" in message and "Topology" not in message
    err = one_line_error(capsys, ["predict", "NaCl", "--store", uri])
    assert "no MongoDB server answered within 0.4 s" in err
    from cspml_flows.flows.stores import open_store

    with pytest.raises(StoreError, match=r"cannot reach store \(relaxations\) mongodb://alice:\*\*\*@"):
        open_store(uri, "relaxations")


def test_mongodb_timeout_default_setting_and_uri(monkeypatch, tmp_path):
    """5 s by default; CSPML_MONGO_TIMEOUT_MS or config mongo_timeout_ms; the URI's own option wins. Read
    from the pymongo client the store makes (connecting a client does not contact the server)."""

    def selection_timeout(uri: str) -> float:
        store = store_from_uri(uri)
        store.connect()
        try:
            return store._collection.database.client.options.server_selection_timeout
        finally:
            store.close()

    monkeypatch.delenv("CSPML_MONGO_TIMEOUT_MS", raising=False)
    assert mongo_timeout_ms() == 5000
    assert selection_timeout("mongodb://127.0.0.1:1/db") == 5.0
    config = tmp_path / "config.yaml"
    config.write_text("mongo_timeout_ms: 1500\n")
    monkeypatch.setenv("CSPML_CONFIG", str(config))
    assert selection_timeout("mongodb://127.0.0.1:1/db") == 1.5
    monkeypatch.setenv("CSPML_MONGO_TIMEOUT_MS", "2500")
    assert selection_timeout("mongodb://127.0.0.1:1/db") == 2.5
    assert selection_timeout("mongodb://127.0.0.1:1/db?serverSelectionTimeoutMS=700") == 0.7
    monkeypatch.setenv("CSPML_MONGO_TIMEOUT_MS", "soon")
    with pytest.raises(ConfigError, match="mongo_timeout_ms must be a whole number"):
        store_from_uri("mongodb://127.0.0.1:1/db")


def test_mongodb_normal_path_on_mongomock(monkeypatch, nacl, kbr):
    """A reachable server (mongomock standing in for one): open (with its ping), write, read, digest."""
    import maggma.stores.mongolike
    import mongomock_ng

    client = mongomock_ng.MongoClient()
    monkeypatch.setattr(maggma.stores.mongolike, "MongoClient", lambda *args, **kwargs: client)
    ts = TemplateStore.open("mongodb://localhost:27017/cspml_test")
    assert ts.add([template_doc_from_structure(nacl, "t-nacl"), template_doc_from_structure(kbr, "t-kbr")]) == 2
    before = ts.fingerprint()
    assert TemplateStore.open("mongodb://localhost:27017/cspml_test").count() == 2
    ts.add([template_doc_from_structure(nacl, "t-nacl")])
    assert ts.fingerprint() != before and ts.count() == 2


# ---------------------------------------------------------------- file modes of atomic writes


@pytest.mark.parametrize("mode", [0o640, 0o664, 0o600])
def test_json_store_write_keeps_the_file_mode(tmp_path, mode, nacl, kbr):
    path = tmp_path / "s.json"
    ts = TemplateStore.open(path)
    ts.add([template_doc_from_structure(nacl, "t-nacl")])
    os.chmod(path, mode)
    ts.add([template_doc_from_structure(kbr, "t-kbr")])
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert TemplateStore.open(path, create=False).count() == 2


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_get_the_umask_mode(tmp_path, umask, nacl):
    old = os.umask(umask)
    try:
        TemplateStore.open(tmp_path / "s.json").add([template_doc_from_structure(nacl, "t-nacl")])
        with atomic_open(tmp_path / "plain.txt") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    for name in ("s.json", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
