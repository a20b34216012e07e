"""The template index kept on disk and brought up to date by the store's changes: an updated index equals a
rebuilt one (rows, clusters, predictions), a kill mid-update leaves a usable index, readers see the old or
the new index, an up-to-date open reads no document, and the store answers what changed since a position
(journal on the embedded store, dates and counts on MongoDB via mongomock, digests on a JSON file)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Structure

from cspml_flows.cli.main import main
from cspml_flows.templates import index_rows, index_update
from cspml_flows.templates.index import TemplateIndex, open_index, sync_index
from cspml_flows.templates.index_update import PAUSE_ENV, index_dir
from cspml_flows.templates.schema import template_doc_from_structure
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_sqlite import JOURNAL_TABLE, collection_file

POOL = 100  # real structures (first rows of mp_20_biternary/val) besides the hand-built prototypes
QUERIES = ["NaCl", "SrTiO3", "KBr", "GaN", "MgAl2O4", "LiF", "CsI", "BaTiO3"]


@pytest.fixture(scope="module")
def pool(val_docs, hand_docs) -> list[dict]:
    """Template documents: hand-built prototypes (partitions with several groups) and real structures."""
    return [dict(d) for d in hand_docs] + [dict(d) for d in val_docs[:POOL]]


@pytest.fixture(scope="module")
def model():
    from cspml_flows.core.config import PACKAGED_MODEL
    from cspml_flows.learning.model import SimilarityModel

    return SimilarityModel.load(PACKAGED_MODEL)


def fill(path: Path | str, docs: list, fresh: bool = False) -> Path | str:
    """Write ``docs`` into a store (``fresh``: dated now, as a new import or promotion would be)."""
    now = datetime.now(UTC).isoformat()
    ts = TemplateStore.open(path)
    ts.add([d if not isinstance(d, dict) else {**d, "last_updated": now} if fresh else dict(d) for d in docs])
    ts.close()
    return path


def remove(path: Path | str, ids: list[str]) -> None:
    ts = TemplateStore.open(path)
    ts.store.remove_docs({"material_id": {"$in": ids}})
    ts.close()


def rebuilt(path: Path | str, root: Path) -> TemplateIndex:
    """The index of the store built from scratch in a folder of its own."""
    with TemplateStore.open(path, create=False) as ts:
        idx, report = sync_index(ts, workers=1, rebuild=True, root=root)
    assert report.action == "rebuilt" and idx is not None
    return idx


def clusters(idx: TemplateIndex) -> set[frozenset[str]]:
    return {frozenset(idx.ids[idx.cluster == c].tolist()) for c in np.unique(idx.cluster)}


def assert_same(a: TemplateIndex, b: TemplateIndex) -> None:
    """Same rows in the same order, same clusters (and cluster numbers), same columns."""
    assert list(a.ids) == list(b.ids)
    assert clusters(a) == clusters(b)
    assert np.array_equal(a.cluster, b.cluster)
    for name in ("stats", "role_props", "role_fracs", "e_above_hull", "min_dist", "nprim", "spacegroup", "round"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    for name in ("formulas", "anon", "prototype", "source", "digest"):
        assert list(getattr(a, name)) == list(getattr(b, name)), name
    assert list(a.roles) == list(b.roles) and list(a.role_syms) == list(b.role_syms)
    assert a.structures == b.structures


def top5(idx: TemplateIndex, model) -> list:
    """Top-5 (template id, assignment, score) per query, and the predicted structures' templates."""
    from cspml_flows.core.composition import roles
    from cspml_flows.predict.predictor import CSPPredictor
    from cspml_flows.predict.retrieve import rank

    ranked = rank(model, idx, [roles(q) for q in QUERIES], top=5)
    out = [[(str(idx.ids[h.template]), tuple(h.perm), round(h.score, 9)) for h in hits] for hits in ranked]
    preds = CSPPredictor(idx, model).predict(QUERIES[:3], top=5)
    out.append([[(c.template_id, c.structure.composition.reduced_formula) for c in p.candidates] for p in preds])
    return out


# ---------------------------------------------------------------- incremental == rebuilt


def test_incremental_equals_rebuilt_after_random_adds_and_removes(tmp_path, pool, model):
    """Random adds, removes and replacements (same id, new content), each followed by an incremental
    update: the index equals a rebuilt one, clusters and top-5 predictions included, and an update fits
    only pairs it has not fitted before."""
    rng = random.Random(7)
    path = tmp_path / "store"
    present = set(rng.sample(range(len(pool)), 60))
    fill(path, [pool[i] for i in sorted(present)])
    first = TemplateIndex.open(path, workers=1)
    assert len(first) == 60
    for step in range(4):
        absent = sorted(set(range(len(pool))) - present)
        add = rng.sample(absent, min(len(absent), rng.randint(3, 15)))
        gone = rng.sample(sorted(present), rng.randint(1, 6))
        remove(path, [pool[i]["material_id"] for i in gone])
        present -= set(gone)
        changed = []
        if step == 1:  # a replaced template: same id, a strained structure and another energy
            i = sorted(present)[0]
            strained = Structure.from_dict(pool[i]["structure"])
            strained.scale_lattice(strained.volume * 1.1)
            changed = [template_doc_from_structure(strained, pool[i]["material_id"], e_above_hull=0.5)]
        fill(path, [pool[i] for i in add] + changed)
        present |= set(add)
        with TemplateStore.open(path, create=False) as ts:
            idx, report = sync_index(ts, workers=1)
        assert report.action == "updated" and report.added == len(add) + len(changed)
        assert report.removed == len(gone) + len(changed)
        assert len(idx) == len(present)
    again = rebuilt(path, tmp_path / "rebuilt")
    assert_same(idx, again)
    assert top5(idx, model) == top5(again, model)


def test_build_over_id_ranges_in_two_processes_equals_one_process(tmp_path, pool, monkeypatch):
    """A full build of an embedded store with two workers (forked processes over id ranges) equals one with
    one worker."""
    monkeypatch.setattr(index_rows, "CHUNK", 25)
    path = fill(tmp_path / "store", pool)
    with TemplateStore.open(path, create=False) as ts:
        two, report = sync_index(ts, workers=2, rebuild=True, root=tmp_path / "two")
    assert report.templates == len(pool)
    assert_same(two, rebuilt(path, tmp_path / "one"))


def test_chunked_build_as_jobflow_jobs_equals_one_build(tmp_path, pool, model):
    """The index built by ChunkedIndexMaker (a job per chunk of templates, then the assembly) under
    run_locally equals a one-process rebuild; a template added while the chunks ran is in it too."""
    from jobflow import run_locally

    from cspml_flows.core.schemas import IndexBuildReport, IndexChunkReport
    from cspml_flows.flows.chunked import ChunkedIndexMaker
    from cspml_flows.templates.chunked_build import assemble, build_chunk, plan_build

    path = fill(tmp_path / "store", pool[:-1])
    flow = ChunkedIndexMaker(chunk_size=25, workers=1).make(str(path))
    responses = run_locally(flow, ensure_success=True)
    reports = [r[1].output for r in responses.values() if isinstance(r[1].output, IndexBuildReport)]
    assert len(reports) == 1 and reports[0].templates == len(pool) - 1
    chunks = [u for u, r in responses.items() if isinstance(r[1].output, IndexChunkReport)]
    assert len(chunks) == -(-(len(pool) - 1) // 25)
    with TemplateStore.open(path, create=False) as ts:
        chunked, report = sync_index(ts, workers=1)
    assert report.action == "up to date"
    again = rebuilt(path, tmp_path / "rebuilt")
    assert_same(chunked, again)
    assert top5(chunked, model) == top5(again, model)

    with TemplateStore.open(path, create=False) as ts:  # a store change between plan and assembly
        plan = plan_build(ts, 40)
        parts = [build_chunk(ts, plan, k) for k in range(plan.n_chunks)]
        fill(path, pool[-1:])
        assemble(ts, plan, parts)
        latest, report = sync_index(ts, workers=1)
    assert report.action == "up to date" and len(latest) == len(pool)
    assert_same(latest, rebuilt(path, tmp_path / "rebuilt-2"))


def test_update_fits_only_new_pairs(tmp_path, hand_docs):
    """Adding a template to a partition fits it against the representatives there, not the old pairs again;
    removing a representative (the group's smallest id) makes the next one represent its group."""
    path = fill(tmp_path / "store", hand_docs)
    with TemplateStore.open(path, create=False) as ts:
        _, built = sync_index(ts, workers=1)
    assert built.fits > 0
    nacl = next(d for d in hand_docs if d["material_id"] == "hand-nacl")
    fill(path, [{**nacl, "material_id": "hand-aaa-nacl"}])  # the new smallest id of the rocksalt group
    with TemplateStore.open(path, create=False) as ts:
        idx, report = sync_index(ts, workers=1)
    assert 0 < report.fits < built.fits
    assert_same(idx, rebuilt(path, tmp_path / "r1"))
    remove(path, ["hand-aaa-nacl", "hand-cscl"])
    with TemplateStore.open(path, create=False) as ts:
        idx, report = sync_index(ts, workers=1)
    assert report.removed == 2
    assert_same(idx, rebuilt(path, tmp_path / "r2"))


def test_many_small_updates_merge_segments(tmp_path, hand_docs, monkeypatch):
    """More segments than the limit: the smallest are merged (dead rows dropped); the index stays equal to a
    rebuilt one and files no manifest names are removed."""
    monkeypatch.setattr(index_update, "MAX_SEGMENTS", 3)
    path = fill(tmp_path / "store", hand_docs[:4])
    TemplateIndex.open(path, workers=1)
    for k in range(4, len(hand_docs), 2):
        fill(path, hand_docs[k : k + 2])
        remove(path, [hand_docs[k - 3]["material_id"]])
        with TemplateStore.open(path, create=False) as ts:
            idx, report = sync_index(ts, workers=1)
        assert report.segments <= 3
    assert_same(idx, rebuilt(path, tmp_path / "rebuilt"))
    root = index_dir(TemplateStore.open(path, create=False))
    manifest = json.loads((root / "manifest.json").read_text())
    on_disk = {p.name for p in root.iterdir() if p.name.startswith(("seg-", "gen-", ".tmp"))}
    assert on_disk == {*manifest["segments"], manifest["state"]}


def test_cli_index_updates_and_rebuilds(tmp_path, hand_docs, capsys):
    path = fill(tmp_path / "store", hand_docs[:8])
    assert main(["-q", "index", "--store", str(path), "--workers", "1"]) == 0
    assert "index built" in capsys.readouterr().out
    fill(path, hand_docs[8:])
    assert main(["-q", "index", "--store", str(path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "index updated: 8 added, 0 removed" in out and "16 templates" in out
    assert main(["-q", "index", "--store", str(path)]) == 0
    assert "index up to date" in capsys.readouterr().out
    updated = TemplateIndex.open(path, workers=1)
    assert main(["-q", "index", "--store", str(path), "--rebuild", "--workers", "1"]) == 0
    assert "index rebuilt" in capsys.readouterr().out
    assert_same(TemplateIndex.open(path, workers=1), updated)


# ---------------------------------------------------------------- kills and concurrent readers


def _update_with_pause(path: str, pause: str) -> None:
    os.environ[PAUSE_ENV] = pause
    with TemplateStore.open(path, create=False) as ts:
        sync_index(ts, workers=1)


def _wait_for(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "the update never reached the point"
        time.sleep(0.02)


def _unnamed(root: Path, prefix: str) -> bool:
    """Whether ``root`` holds a ``prefix`` folder its manifest does not name (written by a running update)."""
    manifest = json.loads((root / "manifest.json").read_text())
    named = {*manifest["segments"], manifest["state"]}
    return any(p.name.startswith(prefix) and p.name not in named for p in root.iterdir())


@pytest.mark.parametrize("stage", ["segment", "state", "manifest"])
def test_kill_during_update_leaves_a_usable_index(tmp_path, pool, stage):
    """An update killed (SIGKILL) after writing its segment, after writing its state, or after replacing the
    manifest: the index reads as the old or the new one, and the next open completes the update."""
    path = fill(tmp_path / "store", pool[:30])
    old = TemplateIndex.open(path, workers=1)
    root = index_dir(TemplateStore.open(path, create=False))
    generation = json.loads((root / "manifest.json").read_text())["generation"]
    fill(path, pool[30:40])
    remove(path, [pool[0]["material_id"]])
    child = mp.get_context("fork").Process(target=_update_with_pause, args=(str(path), f"{stage}:120"))
    child.start()
    try:
        if stage == "manifest":
            _wait_for(lambda: json.loads((root / "manifest.json").read_text())["generation"] > generation)
        else:
            _wait_for(lambda: _unnamed(root, "seg-" if stage == "segment" else "gen-"))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    seen = open_index(root)
    assert seen is not None
    expected = rebuilt(path, tmp_path / "rebuilt")
    assert_same(seen, expected if stage == "manifest" else old)
    again = TemplateIndex.open(path, workers=1)
    assert_same(again, expected)
    fill(path, pool[40:41])  # the next update removes what the killed one left
    TemplateIndex.open(path, workers=1)
    assert not _unnamed(root, "seg-") and not _unnamed(root, "gen-")
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_reader_during_update_sees_old_or_new_index(tmp_path, pool):
    """A reader opening the index over and over while another process updates it (pausing before and after
    it replaces the manifest) sees the old index or the new one, whole, never an error."""
    path = fill(tmp_path / "store", pool[:30])
    old = tuple(TemplateIndex.open(path, workers=1).ids)
    root = index_dir(TemplateStore.open(path, create=False))
    fill(path, pool[30:45])
    remove(path, [pool[3]["material_id"], pool[20]["material_id"]])
    new = tuple(rebuilt(path, tmp_path / "rebuilt").ids)
    child = mp.get_context("fork").Process(target=_update_with_pause, args=(str(path), "state:1.5"))
    child.start()
    seen = []
    while child.is_alive():
        idx = open_index(root)
        seen.append(tuple(idx.ids))
        assert isinstance(idx.structures[len(idx) - 1]["sites"], list)  # decoded from the blob it names
        time.sleep(0.02)
    child.join()
    assert child.exitcode == 0
    assert set(seen) <= {old, new} and old in seen
    assert tuple(open_index(root).ids) == new


# ---------------------------------------------------------------- reading only what changed


def test_up_to_date_open_reads_no_documents(tmp_path, pool):
    path = fill(tmp_path / "store", pool[:30])
    TemplateIndex.open(path, workers=1)
    before = TemplateStore.documents_read
    idx = TemplateIndex.open(path, workers=1)
    assert TemplateStore.documents_read == before and len(idx) == 30
    fill(path, pool[30:33])
    remove(path, [pool[5]["material_id"]])
    before = TemplateStore.documents_read
    assert len(TemplateIndex.open(path, workers=1)) == 32
    assert TemplateStore.documents_read - before == 3  # the three written: the removed one is not read


def test_journal_follows_writes_of_any_writer(tmp_path, hand_docs):
    """Writes through maggma and through sqlite itself land in the journal (triggers), in the same
    transaction; a store made before the journal gets it when opened for writing."""
    path = tmp_path / "store"
    ts = TemplateStore.open(path)
    ts.add(hand_docs[:3])
    start = ts.position()
    assert start.startswith("journal|") and start.endswith("|3")
    doc = dict(hand_docs[0])
    ts.store.update([{**doc, "e_above_hull": 0.25}])  # maggma's own write
    coll = collection_file(path, "db", "templates")
    with contextlib.closing(sqlite3.connect(coll)) as con, con:
        con.execute("DELETE FROM documents WHERE rowid = (SELECT MAX(rowid) FROM documents)")
    now, changed = ts.changed_since(start)
    assert now.endswith("|2") and len(changed) == 2 and doc["material_id"] in changed
    ts.close()
    idx = TemplateIndex.open(path, workers=1)
    assert len(idx) == 2 and idx.e_above_hull[list(idx.ids).index(doc["material_id"])] == 0.25
    # an older store: no journal; the index compares digests, opening for writing adds the journal
    with contextlib.closing(sqlite3.connect(coll)) as con, con:
        for name in ("cspml_journal_insert", "cspml_journal_update", "cspml_journal_delete"):
            con.execute(f"DROP TRIGGER {name}")
        con.execute(f"DROP TABLE {JOURNAL_TABLE}")
    ro = TemplateStore.open(path, create=False)
    assert ro.position().startswith("sqlite|") and ro.changed_since(start)[1] is None
    ro.close()
    fill(path, hand_docs[3:5])  # opened for writing: journal again
    assert TemplateStore.open(path, create=False).position().startswith("journal|")
    assert_same(TemplateIndex.open(path, workers=1), rebuilt(path, tmp_path / "rebuilt"))


def test_stored_geometry_is_used_and_older_documents_get_it_computed(tmp_path, hand_docs):
    docs = [dict(d) for d in hand_docs[12:]]  # perovskites: tied roles, several role symmetries
    assert all(d["min_dist"] > 0 and d["role_syms"][0] == [0, 1, 2] for d in docs)
    older = [{k: v for k, v in d.items() if k not in ("min_dist", "role_syms")} for d in docs]
    a, b = TemplateIndex.from_docs(docs), TemplateIndex.from_docs(older)
    assert np.array_equal(a.min_dist, b.min_dist) and list(a.role_syms) == list(b.role_syms)
    marked = [{**docs[0], "min_dist": 1.2345}, *docs[1:]]
    assert TemplateIndex.from_docs(marked).min_dist[0] == 1.2345  # read, not recomputed


# ---------------------------------------------------------------- other backends


def test_mongodb_store_indexes_and_changes_on_mongomock(monkeypatch, tmp_path, pool):
    """MongoDB path, on mongomock standing in for a server: opening for writing creates the indexes; the
    index follows adds (newer last_updated) and removals (the count) without reading unchanged documents."""
    import maggma.stores.mongolike
    import mongomock_ng

    class Client(mongomock_ng.MongoClient):
        def close(self) -> None:  # a server keeps its data when a client disconnects (mongomock's would not)
            self._closed = True

    server = mongomock_ng.MongoClient()._store  # every store opened below gets a client of this one server
    monkeypatch.setattr(maggma.stores.mongolike, "MongoClient", lambda *args, **kwargs: Client(_store=server))
    db = f"cspml_{tmp_path.name}"
    uri = f"mongodb://localhost:27017/{db}"
    ts = TemplateStore.open(uri)
    keys = {v["key"][0][0]: v for v in ts.store._collection.index_information().values()}
    assert {"material_id", "source", "round", "formula", "last_updated"} <= set(keys)
    assert keys["material_id"].get("unique") is True
    ts.add(pool[:20])
    ts.close()
    TemplateIndex.open(uri, workers=1)
    fill(uri, pool[20:25], fresh=True)
    remove(uri, [pool[2]["material_id"]])
    before = TemplateStore.documents_read
    idx = TemplateIndex.open(uri, workers=1)
    assert TemplateStore.documents_read - before == 5 and len(idx) == 24
    assert_same(idx, rebuilt(uri, tmp_path / "rebuilt"))


def test_json_store_edited_by_hand_is_compared_by_digest(tmp_path, hand_docs):
    path = tmp_path / "s.json"
    fill(path, hand_docs[:6])
    TemplateIndex.open(path, workers=1)
    rows = json.loads(path.read_text())
    rows[2]["e_above_hull"] = 0.125  # one document changed, no date touched
    path.write_text(json.dumps(rows))
    with TemplateStore.open(path, create=False) as ts:
        idx, report = sync_index(ts, workers=1)
    assert (report.added, report.removed) == (1, 1)
    assert 0.125 in idx.e_above_hull.tolist()
    assert_same(idx, rebuilt(path, tmp_path / "rebuilt"))


# ---------------------------------------------------------------- campaign queries answered by the index


def test_campaign_queries_come_from_the_index(tmp_path, hand_docs):
    from cspml_flows.campaign.config import CampaignConfig
    from cspml_flows.campaign.runner import external_templates
    from cspml_flows.flows.retrieval import promoted_later

    path = fill(tmp_path / "store", hand_docs[:6])
    promoted = [
        template_doc_from_structure(Structure.from_dict(d["structure"]), f"cspml-x-r{k}-{i}", "campaign:x", round=k)
        for i, (k, d) in enumerate(zip((1, 2, 2), hand_docs[6:9], strict=True))
    ]
    cfg = CampaignConfig.model_validate(
        {"name": "x", "compositions": ["NaCl"], "stores": {"templates": str(path)}, "workdir": str(tmp_path / "w")}
    )
    token = external_templates(cfg)
    fill(path, promoted)
    assert external_templates(cfg) == token  # the campaign's own promotions do not change it
    assert promoted_later(str(path), "x", 2) == {"cspml-x-r2-1", "cspml-x-r2-2"}
    assert promoted_later(str(path), "x", 1) == {d.material_id for d in promoted}
    assert promoted_later(str(path), "y", 1) == set() and promoted_later(str(path), None, 1) == set()
    fill(path, hand_docs[9:10])
    assert external_templates(cfg) != token


# ---------------------------------------------------------------- emulated field indexes of the embedded store


def test_embedded_store_queries_through_field_indexes_equal_montydb(tmp_path, hand_docs):
    """Queries on formula, source, round, material_id, last_updated and chemsys of a template store go
    through the field table (kept up to date from the journal) and return what montydb's scan returns, in
    the same order, after writes of every kind, whether the store was opened to write or to read; a query
    it cannot express goes to montydb."""
    from maggma.stores import MontyStore

    from cspml_flows.templates.store_embedded import EmbeddedStore
    from cspml_flows.templates.store_uri import store_from_uri

    path = tmp_path / "store"
    fill(path, hand_docs[:10])
    promoted = [
        template_doc_from_structure(Structure.from_dict(d["structure"]), f"cspml-x-r{k}-{i}", "campaign:x", round=k)
        for i, (k, d) in enumerate(zip((1, 2, 2), hand_docs[10:13], strict=True))
    ]
    fill(path, promoted)
    store = store_from_uri(path)
    store.connect()
    queries = [
        ({"formula": "NaCl"}, {"properties": ["material_id", "structure"]}),
        ({"formula": {"$in": ["KBr", "SrTiO3", "CsI"]}}, {}),
        ({"source": {"$ne": "campaign:x"}}, {"properties": {"material_id": 1, "_id": 0}}),
        ({"source": "campaign:x", "round": {"$gte": 2}}, {"properties": ["material_id"]}),
        ({"source": "campaign:x"}, {"sort": {"last_updated": -1}, "limit": 1, "properties": ["last_updated"]}),
        ({"material_id": {"$in": ["hand-nacl", "nope"]}}, {}),
        ({}, {"sort": {"formula": 1}, "skip": 2, "limit": 4}),
        ({"chemsys": {"$in": ["Cl-Na", "Br-K", "O-Sr-Ti"]}}, {"properties": ["material_id", "chemsys"]}),
    ]

    def same() -> None:
        before = EmbeddedStore.indexed_queries
        for crit, kw in queries:
            assert list(store.query(crit, **kw)) == list(MontyStore.query(store, crit, **kw)), crit
        assert EmbeddedStore.indexed_queries - before == len(queries)

    same()
    fill(path, hand_docs[13:])  # added
    remove(path, ["hand-kbr"])  # removed through maggma
    store.update([{**hand_docs[0], "formula": hand_docs[0]["formula"], "source": "edited"}])  # replaced by maggma
    same()
    crit = {"structure.lattice.a": {"$gt": 5}}  # a field without an index: montydb
    before = EmbeddedStore.indexed_queries
    assert list(store.query(crit)) == list(MontyStore.query(store, crit)) and EmbeddedStore.indexed_queries == before
    reader = store_from_uri(path, create=False)  # opened to read: the field table too
    reader.connect()
    assert list(reader.query({"formula": "NaCl"})) == list(MontyStore.query(store, {"formula": "NaCl"}))
    assert EmbeddedStore.indexed_queries == before + 1
    dated = {**hand_docs[1], "material_id": "dated", "last_updated": datetime.now(UTC)}
    store._collection.insert_one({**dated, "_id": "dated"})  # a date, not text: MongoDB's type rules needed
    assert list(store.query({"formula": "NaCl"})) == list(MontyStore.query(store, {"formula": "NaCl"}))
    assert EmbeddedStore.indexed_queries == before + 1
