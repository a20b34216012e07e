"""Bad input never loses data, never runs code, never eats the machine (issue 11).

A table of bad command lines (exit code 2 and a one-line message each), payload files that would create a
marker file if they were unpickled, corrupt and concurrent stores, import ids, refused structures, limits.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from cspml_flows.cli.main import main
from cspml_flows.core.errors import ModelError, StoreError, StructureReadError
from cspml_flows.templates.importers import import_csv, import_folder
from cspml_flows.templates.readers import read_structure, read_template_file
from cspml_flows.templates.schema import template_doc_from_structure
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_write import upsert

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers


class Payload:
    """Unpickling this creates ``marker``: the file must never exist after a load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump({"meta": {}, "A": Payload(marker)}, fh)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def disordered() -> Structure:
    return Structure(Lattice.cubic(5.64), [{"Na": 0.5, "K": 0.5}, "Br"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def short_poscar(nacl: Structure) -> str:
    """A POSCAR whose counts (4 Na, 3 Cl) are one short of its 8 coordinate lines."""
    lines = nacl.to(fmt="poscar").splitlines()
    lines[6] = "4 3"
    return "\n".join(lines) + "\n"


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


# ---------------------------------------------------------------- the table of bad command lines


@pytest.fixture
def bad_inputs(tmp_path: Path, template_folder: str, nacl: Structure) -> dict[str, Path]:
    """Files the table refers to by name."""
    paths: dict[str, Path] = {"store": Path(template_folder)}
    garbage = tmp_path / "garbage_store"
    TemplateStore.open(garbage).close()
    (garbage / "db").mkdir(exist_ok=True)
    (garbage / "db" / "templates.collection").write_text("this is not an sqlite file")
    paths["garbage_store"] = garbage
    paths["not_a_store"] = tmp_path / "plain_folder"
    paths["not_a_store"].mkdir()
    paths["a_file"] = tmp_path / "a_file.txt"
    paths["a_file"].write_text("x")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('[{"material_id": "a", "formula": "NaCl"')  # truncated
    paths["corrupt_json"] = corrupt
    for name, content in {
        "disordered": disordered().to(fmt="cif"),
        "short_poscar": short_poscar(nacl),
        "big": (nacl * (4, 4, 4)).to(fmt="cif"),  # 512 sites
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / ("POSCAR" if name == "short_poscar" else f"{name}.cif")).write_text(content)
        paths[name] = folder
    campaign = tmp_path / "campaign"
    campaign.mkdir()
    base = {"name": "bad", "compositions": ["NaCl"], "stores": {"templates": template_folder}, "model": None}
    for name, change in {
        "long_name": {"name": "n" * 300},
        "eight_elements": {"compositions": {"chemsys": ["Li-Na-K-Rb-Cs-Mg-Ca-Sr"], "max_atoms": 20}},
        "wide_space": {"compositions": {"chemsys": ["Li-Na-K-Rb-Cs-O"], "max_atoms": 20}},
        "too_many": {"compositions": ["NaCl"] * 10_001},
        "good": {"workdir": "work"},
    }.items():
        (campaign / f"{name}.yaml").write_text(json.dumps({**base, **change}))  # JSON is YAML
    huge = campaign / "huge.yaml"
    huge.write_text("name: huge\ncompositions:\n" + "  - NaCl\n" * 200_000)  # 1.8 MB
    unsafe = campaign / "unsafe.yaml"
    unsafe.write_text(f"name: !!python/object/apply:os.system ['touch {tmp_path / 'yaml_marker'}']\n")
    paths["campaign"] = campaign
    (campaign / "work").mkdir()
    (campaign / "work" / "report.md").write_text("earlier report\n")
    return paths


# (argv with {name} placeholders for bad_inputs paths, expected message fragment)
BAD_COMMAND_LINES = [
    (["predict", "Na" + "1" * 400], "too large"),
    (["predict", "Xx2O"], "unknown element 'Xx'"),
    (["predict", "Na(Cl"], "unbalanced parentheses"),
    (["predict", "Na\u0663Cl"], "unexpected '\u0663'"),  # an Arabic-Indic digit three
    (["predict", "HLiNaKRbCsBeMgCaSrBaZnCd"], "at most 12"),
    (["predict", "NaCl", "--top", "0"], "must be at least 1"),
    (["predict", "NaCl", "--top", "-1"], "must be at least 1"),
    (["predict", "NaCl", "--workers", "0"], "must be at least 1"),
    (["predict", "NaCl", "--store", "{garbage_store}"], "cannot read template store"),
    (["predict", "NaCl", "--store", "{not_a_store}"], "is not a template store"),
    (["predict", "NaCl", "--store", "{corrupt_json}"], "corrupt.json cannot be read"),
    (["predict", "NaCl", "--store", "{store}", "--out", "{a_file}"], "is a file"),
    (["predict", "NaCl", "--store", "{store}", "--out", "{a_file}/sub"], "is a file"),
    (["predict", "NaCl", "--store", "{not_a_store}/missing", "--out", "/proc/cspml-out"], "cannot write"),
    (["import", "folder", "{disordered}", "--store", "{store}"], "disordered.cif has partial occupancies (site 0: "),
    (["import", "folder", "{short_poscar}", "--store", "{store}"], "declares 7 atoms (counts 4 3) but lists 8"),
    (["import", "folder", "{big}", "--store", "{store}"], "512 sites; a template may have at most 200"),
    (["import", "folder", "{big}", "--store", "{corrupt_json}"], "corrupt.json cannot be read"),
    (["campaign", "run", "{campaign}/good.yaml", "--rounds", "-1"], "must be at least 1"),
    (["campaign", "run", "{campaign}/good.yaml", "--rounds", "0"], "must be at least 1"),
    (["campaign", "run", "{campaign}/good.yaml", "--rounds", "500"], "rounds: Input should be less than or equal"),
    (["campaign", "run", "{campaign}/long_name.yaml"], "name: at most 100 characters"),
    (["campaign", "run", "{campaign}/eight_elements.yaml"], "has 8 elements; at most 6"),
    (["campaign", "run", "{campaign}/wide_space.yaml"], "spans 38,760 formulas"),
    (["campaign", "run", "{campaign}/too_many.yaml"], "10,001 compositions"),
    (["campaign", "run", "{campaign}/huge.yaml"], "1.8 MB; at most 1 MB"),
    (["campaign", "run", "{campaign}/unsafe.yaml"], "not valid YAML"),
    (["inverse", "{a_file}", "--elements", "Na", "--top", "0"], "must be at least 1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_COMMAND_LINES, ids=[" ".join(a)[:60] for a, _ in BAD_COMMAND_LINES])
def test_bad_command_line_one_line_error(argv, message, bad_inputs, capsys, tmp_path):
    names = {k: str(v) for k, v in bad_inputs.items()}
    store_before = files_state(bad_inputs["store"])
    corrupt_before = bad_inputs["corrupt_json"].read_bytes()
    t0 = time.perf_counter()
    err = one_line_error(capsys, [a.format(**names) for a in argv])
    assert message in err
    assert time.perf_counter() - t0 < 30  # fails fast: nothing hangs or enumerates first
    assert files_state(bad_inputs["store"]) == store_before  # nothing imported, nothing written
    assert bad_inputs["corrupt_json"].read_bytes() == corrupt_before  # a corrupt store is never overwritten
    assert list(bad_inputs["not_a_store"].iterdir()) == []  # no store files in a folder that is not a store
    assert (bad_inputs["campaign"] / "work" / "report.md").read_text() == "earlier report\n"
    assert not (tmp_path / "yaml_marker").exists()


def test_out_folder_checked_before_the_prediction(bad_inputs, capsys, monkeypatch):
    """An unusable --out fails before anything is loaded or predicted (the work would be lost)."""
    import cspml_flows.api

    def never(*args, **kwargs):
        raise AssertionError("the prediction ran before --out was checked")

    monkeypatch.setattr(cspml_flows.api, "predict", never)
    err = one_line_error(capsys, ["predict", "NaCl", "--store", str(bad_inputs["store"]), "--out", "/proc/x/y"])
    assert "cannot write to output folder /proc/x/y (/proc is not writable)" in err


def test_fractional_formula_normalised(bad_inputs, capsys):
    assert main(["-q", "predict", "Na0.5Cl0.5", "--store", str(bad_inputs["store"]), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "NaCl (AB)" in out and "Fm-3m" in out


def test_predict_leaves_the_store_folder_as_it_was(bad_inputs, capsys):
    store = bad_inputs["store"]
    before = files_state(store)
    for _ in range(2):  # index built, then read from the cache
        assert main(["-q", "predict", "KBr", "--store", str(store), "--top", "1"]) == 0
    assert files_state(store) == before


# ---------------------------------------------------------------- payloads never run


def test_index_payload_never_runs(template_folder, cspml_home, tmp_path):
    import json

    from cspml_flows.templates.index import TemplateIndex
    from cspml_flows.templates.index_update import index_dir

    ts = TemplateStore.open(template_folder, create=False)
    digest = hashlib.sha1(ts.name.encode()).hexdigest()[:16]
    root = index_dir(ts)
    ts.close()
    old = cspml_home / "cache" / f"index-{digest}.npz"
    marker = tmp_path / "index_marker"
    write_payload(old, marker)  # index caches of earlier versions
    write_payload(old.with_suffix(".pkl"), marker)
    write_payload(root / "manifest.json", marker)  # a pickle where the manifest should be
    index = TemplateIndex.open(template_folder, workers=1)
    assert len(index) == 16 and not marker.exists()
    assert not old.exists() and not old.with_suffix(".pkl").exists()  # removed, never read
    manifest = json.loads((root / "manifest.json").read_text())  # rebuilt as JSON and plain arrays
    segment = root / manifest["segments"][0]
    assert np.load(segment / "ids.npy", allow_pickle=False).tolist() == list(index.ids)
    # a column file holding a pickled object array is refused too (written as a new file: the index
    # opened above keeps its mapping of the old one)
    tmp = segment / "payload.tmp"
    with tmp.open("wb") as fh:
        np.save(fh, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    os.replace(tmp, segment / "ids.npy")
    again = TemplateIndex.open(template_folder, workers=1)
    assert list(again.ids) == list(index.ids) and not marker.exists()
    assert TemplateIndex.open(template_folder, workers=1).structures == index.structures  # the rebuilt index


def test_hetero_model_payload_never_runs(tmp_path, capsys):
    from cspml_flows.learning.hetero.model import HeteroModel

    marker = tmp_path / "model_marker"
    path = tmp_path / "hetero.json.gz"
    write_payload(path, marker)
    with pytest.raises(ModelError, match="never loaded"):
        HeteroModel.load(path)
    import gzip

    with gzip.open(tmp_path / "gz.json.gz", "wb") as fh:  # a gzipped pickle
        pickle.dump(Payload(marker), fh)
    with pytest.raises(ModelError, match="not a gzipped-JSON"):
        HeteroModel.load(tmp_path / "gz.json.gz")
    nacl = tmp_path / "nacl.cif"
    Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(nacl))
    err = one_line_error(capsys, ["inverse", str(nacl), "--elements", "Na", "Cl", "--model", str(path)])
    assert "cannot read hetero model file" in err
    assert not marker.exists()


def test_geometry_cache_payload_never_runs(tmp_path, hand_docs):
    from cspml_flows.learning.hetero.encoders import geometry_features
    from cspml_flows.templates.index import TemplateIndex

    index = TemplateIndex.from_docs(hand_docs[:3], workers=1)
    cache = tmp_path / "geom.npz"
    marker = tmp_path / "geom_marker"
    write_payload(cache, marker)
    args = (list(index.ids), index.structures, index.roles, list(index.spacegroup), list(index.nprim), 1)
    first = geometry_features(*args, cache=cache)
    assert not marker.exists() and first.shape[0] == 3
    assert np.array_equal(geometry_features(*args, cache=cache), first)  # read back from the rewritten cache


# ---------------------------------------------------------------- stores: corrupt, atomic, concurrent


@pytest.fixture
def docs(nacl, kbr, srtio3, cscl):
    return [template_doc_from_structure(s, f"t-{i}") for i, s in enumerate((nacl, kbr, srtio3, cscl))]


def test_corrupt_json_store_is_an_error_not_an_empty_store(tmp_path, docs):
    path = tmp_path / "s.json"
    ts = TemplateStore.open(path)
    ts.add(docs[:3])
    ts.close()
    with path.open("r+b") as fh:  # `truncate -s -1 s.json`
        fh.truncate(path.stat().st_size - 1)
    damaged = path.read_bytes()
    with pytest.raises(StoreError, match=r"s\.json cannot be read"):
        TemplateStore.open(path).add(docs[3:])
    assert path.read_bytes() == damaged  # left as it was: the three templates can still be recovered
    path.write_text('{"no": "material_id"}')
    with pytest.raises(StoreError, match="without 'material_id'"):
        TemplateStore.open(path)
    # a date field naming a module is not decoded (monty would import it and call it)
    path.write_text('[{"material_id": "a", "last_updated": {"@module": "os", "@class": "system", "string": "x"}}]')
    with pytest.raises(StoreError, match="neither a date"):
        TemplateStore.open(path)


def test_json_store_write_is_atomic(tmp_path, docs, monkeypatch):
    """A crash in the middle of a write leaves the previous file, whole, and no temporary file."""
    path = tmp_path / "s.json"
    ts = TemplateStore.open(path)
    ts.add(docs[:2])
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="disk full"):
        ts.add(docs[2:])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.json.lock"]
    assert TemplateStore.open(path).count() == 2


_ADD_SCRIPT = """
import sys
from pymatgen.core import Lattice, Structure
from cspml_flows.templates.schema import template_doc_from_structure
from cspml_flows.templates.store import TemplateStore
path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
ts = TemplateStore.open(path)
for i in range(n):
    ts.add([template_doc_from_structure(s, f"{who}-{i}")])
ts.close()
"""


def test_json_store_concurrent_writers_keep_every_document(tmp_path):
    path = tmp_path / "s.json"
    TemplateStore.open(path).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", _ADD_SCRIPT, str(path), who, "10"], stderr=subprocess.PIPE, text=True)
        for who in ("a", "b")
    ]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()
    ids = TemplateStore.open(path).ids()
    assert ids == {f"{w}-{i}" for w in ("a", "b") for i in range(10)}


_IMPORT_SCRIPT = """
import pathlib, sys, time
from cspml_flows.templates.importers import import_folder
from cspml_flows.templates.store import TemplateStore
store, folder, ready, go = sys.argv[1:5]
ts = TemplateStore.open(store)
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():  # both start importing at the same moment
    time.sleep(0.002)
r = import_folder(ts, folder, workers=1)
print(r.added, r.skipped_existing)
ts.close()
"""


def test_concurrent_imports_of_one_folder_store_each_id_once(tmp_path, hand_structures):
    """Two processes import the same folder into one embedded store at the same moment: one document per id."""
    folder = tmp_path / "cifs"
    folder.mkdir()
    for k, s in hand_structures.items():
        s.to(filename=str(folder / f"{k}.cif"))
    store = tmp_path / "store"
    TemplateStore.open(store).close()
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _IMPORT_SCRIPT, str(store), str(folder), str(tmp_path / f"ready{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()
    ts = TemplateStore.open(store, create=False)
    docs = list(ts.docs(properties=["material_id"]))
    assert len(docs) == len({d["material_id"] for d in docs}) == len(hand_structures)


def test_upsert_from_threads_and_old_duplicates(tmp_path, docs):
    """Writers racing on the same keys leave one document per key; duplicates left by older versions are
    collapsed by the next write of that key."""
    from cspml_flows.flows.stores import open_store, write_docs

    rows = [{"key": f"k{i}", "energy": float(i)} for i in range(20)]
    errors: list[BaseException] = []
    write_docs(open_store(tmp_path / "results", "relaxations"), rows[:1])  # the store and its table exist

    def writer() -> None:  # a worker of its own: its own connection to the store
        try:
            write_docs(open_store(tmp_path / "results", "relaxations"), rows)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = open_store(tmp_path / "results", "relaxations")
    assert store.count() == 20 and len(store.distinct("key")) == 20
    store._collection.insert_many([{"key": "k1", "energy": -1.0}, {"key": "k1", "energy": -2.0}])  # old dupes
    assert store.count({"key": "k1"}) == 3
    write_docs(store, [{"key": "k1", "energy": 9.0}])
    assert [d["energy"] for d in store.query({"key": "k1"})] == [9.0]
    ts = TemplateStore.open(f"memory://{tmp_path.name}")
    assert upsert(ts.store, [d.model_dump(mode="json") for d in docs] * 2, "material_id") == 4
    assert ts.count() == 4


def test_reading_while_importing_never_fails(tmp_path, data_dir):
    """A reader opening and reading the store over and over while another process imports into it."""
    import pandas as pd

    csv = tmp_path / "rows.csv"
    pd.read_csv(data_dir / "mp_20_biternary" / "val.csv.gz", nrows=60).to_csv(csv, index=False)
    store = tmp_path / "store"
    TemplateStore.open(store).close()
    script = textwrap.dedent(
        f"""
        from cspml_flows.templates.importers import import_csv
        from cspml_flows.templates.store import TemplateStore
        ts = TemplateStore.open({str(store)!r})
        print(import_csv(ts, {str(csv)!r}, workers=1, batch_size=10).added)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    while proc.poll() is None:
        ts = TemplateStore.open(store, create=False)
        seen.append(ts.count())
        assert len(list(ts.docs(properties=["material_id"]))) >= seen[-1]
        ts.close()
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == "60" and TemplateStore.open(store).count() == 60
    assert seen == sorted(seen)


# ---------------------------------------------------------------- import ids, refused structures, limits


def test_same_file_name_in_two_folders_both_kept(tmp_path, nacl, kbr):
    store = TemplateStore.open(tmp_path / "store")
    for run, s in (("run1", nacl), ("run2", kbr)):
        (tmp_path / run).mkdir()
        s.to(filename=str(tmp_path / run / "POSCAR"), fmt="poscar")
        assert import_folder(store, tmp_path / run, workers=1).added == 1
    assert store.count() == 2
    assert all(i.startswith("POSCAR-") for i in store.ids())
    again = import_folder(store, tmp_path / "run1", workers=1)  # the same file again: skipped, stable id
    assert (again.added, again.skipped_existing) == (0, 1)


def test_partial_occupancy_and_short_poscar_refused(tmp_path, nacl):
    cif = tmp_path / "kna.cif"
    disordered().to(filename=str(cif))
    with pytest.raises(StructureReadError, match=r"kna\.cif has partial occupancies"):
        read_template_file(cif)
    with pytest.raises(StructureReadError, match="partial occupancies"):
        template_doc_from_structure(disordered(), "x")
    poscar = tmp_path / "POSCAR"
    poscar.write_text(short_poscar(nacl))
    with pytest.raises(StructureReadError, match="declares 7 atoms"):
        read_structure(poscar)
    long_counts = short_poscar(nacl).replace("\n4 3\n", "\n4 5\n")
    poscar.write_text(long_counts)
    with pytest.raises(StructureReadError, match="declares 9 atoms"):
        read_structure(poscar)
    nacl.to(filename=str(poscar), fmt="poscar")
    assert len(read_structure(poscar)) == 8  # a consistent POSCAR still reads
    # lenient imports report the refused structure and keep going
    folder = tmp_path / "mixed"
    folder.mkdir()
    disordered().to(filename=str(folder / "bad.cif"))
    nacl.to(filename=str(folder / "good.cif"))
    ts = TemplateStore.open(f"memory://{tmp_path.name}")
    report = import_folder(ts, folder, strict=False, workers=1)
    assert report.added == 1 and "partial occupancies" in report.failed[0][1]


def test_template_size_limit_is_configurable(tmp_path, nacl, monkeypatch):
    big = nacl * (4, 4, 4)  # 512 sites
    big.translate_sites([0], [0.3, 0.2, 0.1], frac_coords=False)  # no longer a supercell: few symmetries to test
    with pytest.raises(StructureReadError, match="at most 200"):
        template_doc_from_structure(big, "big")
    monkeypatch.setenv("CSPML_MAX_TEMPLATE_ATOMS", "600")
    assert template_doc_from_structure(big, "big").nsites == 512
    monkeypatch.setenv("CSPML_MAX_TEMPLATE_ATOMS", "lots")
    from cspml_flows.core.errors import ConfigError

    with pytest.raises(ConfigError, match="whole number"):
        template_doc_from_structure(big, "big")
    monkeypatch.delenv("CSPML_MAX_TEMPLATE_ATOMS")
    config = tmp_path / "c.yaml"
    config.write_text("max_template_atoms: 100\n")
    monkeypatch.setenv("CSPML_CONFIG", str(config))
    with pytest.raises(StructureReadError, match="at most 100"):
        template_doc_from_structure(nacl * (2, 2, 4), "x")  # 128 sites


def test_index_leaves_out_templates_an_older_store_holds(tmp_path, nacl, caplog):
    """Stores filled before these checks may hold disordered or oversized templates: never predicted from."""
    from cspml_flows.templates.index import TemplateIndex

    ts = TemplateStore.open(tmp_path / "store")
    ts.add([template_doc_from_structure(nacl, "good")])
    bad = template_doc_from_structure(nacl, "mixed").model_dump(mode="json")
    ts.store._collection.insert_many(
        [{**bad, "structure": disordered().as_dict()}, {**bad, "material_id": "big", "structure": (nacl * 4).as_dict()}]
    )
    ts.close()
    index = TemplateIndex.open(tmp_path / "store", workers=1)
    assert list(index.ids) == ["good"]
    assert "2 templates of" in caplog.text and "left out" in caplog.text


def test_csv_import_reports_refused_rows(tmp_path, nacl):
    import pandas as pd

    csv = tmp_path / "rows.csv"
    rows = [("ok", nacl.to(fmt="cif")), ("mixed", disordered().to(fmt="cif")), ("big", (nacl * 4).to(fmt="cif"))]
    pd.DataFrame(rows, columns=["material_id", "cif"]).to_csv(csv, index=False)
    ts = TemplateStore.open(f"memory://{tmp_path.name}")
    report = import_csv(ts, csv, workers=1)
    assert report.added == 1
    reasons = dict(report.failed)
    assert "partial occupancies" in reasons["mixed"] and "512 sites" in reasons["big"]


def test_campaign_paths_relative_to_the_file(tmp_path, template_folder):
    from cspml_flows.campaign import load_campaign

    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "c.yaml").write_text(
        "name: rel\ncompositions: [NaCl]\nmodel: models/m.json.gz\n"
        f"stores: {{templates: {template_folder}, results: results, jobs: mongodb://host/db}}\nworkdir: ../out/rel\n"
    )
    cfg = load_campaign(sub / "c.yaml")
    sub = sub.resolve()
    assert cfg.results_store() == str(sub / "results")
    assert cfg.workdir_path() == sub.parent / "out" / "rel"
    assert cfg.model_path() == str(sub / "models" / "m.json.gz")
    assert cfg.jobs_store() == "mongodb://host/db" and cfg.template_store() == template_folder
    (sub / "d.yaml").write_text("name: rel\ncompositions: [NaCl]\n")
    cwd_default = load_campaign(sub / "d.yaml")
    assert cwd_default.workdir_path() == Path("out/campaigns/rel")  # defaults stay where the README says


def test_hetero_campaign_paths_relative_to_the_file(tmp_path):
    from cspml_flows.campaign import load_campaign

    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "inv.yaml").write_text(
        "name: inv\nkind: inverse\nstructure: proto.cif\nelements: [Cu, Au]\nhetero_model: m.json.gz\n"
    )
    cfg = load_campaign(sub / "inv.yaml")  # the earlier hetero key 'hetero_model' is read as 'model'
    sub = sub.resolve()
    assert cfg.structure == str(sub / "proto.cif") and cfg.model_path() == str(sub / "m.json.gz")


def test_project_configs_still_load():
    from cspml_flows.campaign import load_campaign

    for f in ("campaign_emt.yaml", "campaign_chgnet.yaml", "campaign_vasp_mongodb.yaml"):
        assert load_campaign(ROOT / "configs" / f).formulas()
    inv = load_campaign(ROOT / "configs" / "hetero_inverse.yaml")
    assert inv.kind == "inverse" and Path(inv.structure).is_file()
