"""The scale benchmark's tools: the deterministic pool generator and the benchmark itself on a tiny pool."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from benchmarks.render import markdown
from benchmarks.stages import BenchmarkError
from pymatgen.core import Lattice, Structure

from benchmarks import pool_recipes, pools, render, scale, scale_results, scale_run
from cspml_flows.core.composition import roles
from cspml_flows.core.prototype import prototype_info
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.schema import TemplateDoc, check_template_structure, template_doc_from_structure
from cspml_flows.templates.store import TemplateStore

N_PARENTS = 200


@pytest.fixture(scope="module")
def parents(data_dir: Path) -> list[dict]:
    """Template documents of the first rows of mpts_52/val (1 to 52 sites), as an import stores them."""
    df = pd.read_csv(data_dir / "mpts_52" / "val.csv.gz", nrows=N_PARENTS, dtype={"material_id": str})
    docs = [
        template_doc_from_structure(Structure.from_str(cif, fmt="cif"), mid, e_above_hull=float(e)).model_dump(
            mode="json"
        )
        for mid, cif, e in zip(df["material_id"], df["cif"], df["energy_above_hull"], strict=True)
    ]
    return sorted(docs, key=lambda d: d["material_id"])


def test_generator_gives_byte_identical_documents(parents):
    first = pool_recipes.generated_docs(parents, 0, N_PARENTS, seed=0)
    again = pool_recipes.generated_docs(parents, 0, N_PARENTS, seed=0, workers=2)  # forked workers: same bytes
    assert len(first) == N_PARENTS
    assert json.dumps(first).encode() == json.dumps(again).encode()
    other = pool_recipes.generated_docs(parents[:50], 0, 50, seed=1)
    assert [d["formula"] for d in other] != [d["formula"] for d in pool_recipes.generated_docs(parents[:50], 0, 50)]
    # a smaller pool is a prefix of a larger one, and a slice of the plan is the same documents
    counts = [len(pool_recipes.parent_recipes(p)) for p in parents]
    assert pool_recipes.plan(counts, 0, 500)[:200] == pool_recipes.plan(counts, 0, 200)
    assert pool_recipes.plan(counts, 650, 100) == pool_recipes.plan(counts, 0, 750)[650:]
    tail = pool_recipes.generated_docs(parents, 150, 50, seed=0)
    assert json.dumps(tail) == json.dumps(first[150:])


def test_generated_documents_pass_the_template_checks(parents):
    docs = pool_recipes.generated_docs(parents, 0, 2 * N_PARENTS)
    by_id = {p["material_id"]: p for p in parents}
    assert len({d["material_id"] for d in docs}) == len(docs)
    kinds = Counter(d["source"] for d in docs)
    assert set(kinds) == {f"generated:{k}" for k in ("order", "anion", "vacancy", "relabel")}
    for d in docs:
        s = Structure.from_dict(d["structure"])
        check_template_structure(s, d["material_id"])
        assert TemplateDoc(**d).model_dump(mode="json") == d
        assert d["parent_id"] in by_id and d["formula"] != by_id[d["parent_id"]]["formula"]
        assert s.composition.reduced_formula == d["formula"]
    # a relabelled copy reuses its parent's symmetry without spglib: its document is the one the full
    # analysis gives (space group, prototype label, geometry, role symmetries in its own role order)
    relabels = [d for d in docs if d["source"] == "generated:relabel"]
    tied = [d for d in relabels if len(d["elements"]) != len(set(roles(d["formula"]).amounts))]
    assert len(tied) >= 5
    for d in relabels[:30] + tied[:10]:
        s = Structure.from_dict(d["structure"])
        full = template_doc_from_structure(s, d["material_id"], source=d["source"], e_above_hull=d["e_above_hull"])
        full.parent_id, full.last_updated = d["parent_id"], pool_recipes.GENERATED_AT
        assert full.model_dump(mode="json") == d
        assert prototype_info(s).label == by_id[d["parent_id"]]["prototype"]


def test_relabelling_that_reorders_tied_roles_keeps_the_full_analysis_document():
    # Ca, Se, S one atom each on a line: the inversion at S swaps Ca and Se. Relabelling S to Te (less
    # electronegative than Se) moves it from role 2 to role 1, so the swap becomes roles (0 2), not (0 1).
    s = Structure(Lattice.tetragonal(4.0, 6.0), ["Ca", "Se", "S"], [[0, 0, 0], [0, 0, 0.5], [0, 0, 0.25]])
    parent = template_doc_from_structure(s, "p-1", e_above_hull=0.0).model_dump(mode="json")
    doc = pool_recipes.variant_doc(parent, ("relabel", (("S", "Te"),)), "p-1~00")
    relabelled = Structure(s.lattice, ["Ca", "Se", "Te"], s.frac_coords)
    full = template_doc_from_structure(relabelled, "p-1~00", source="generated:relabel", e_above_hull=0.0)
    full.parent_id, full.last_updated = "p-1", pool_recipes.GENERATED_AT
    assert full.model_dump(mode="json") == doc
    if "role_syms" in doc:
        assert doc["role_syms"] != parent["role_syms"]


def test_new_prototypes_grow_the_cluster_count(parents):
    base = parents[:60]
    docs = pool_recipes.generated_docs(base, 0, 240)
    new = [d for d in docs if d["source"] != "generated:relabel"]
    relabels = [d for d in docs if d["source"] == "generated:relabel"]
    n_base = len(np.unique(TemplateIndex.from_docs(base).cluster))
    n_relabel = len(np.unique(TemplateIndex.from_docs(base + relabels).cluster))
    n_new = len(np.unique(TemplateIndex.from_docs(base + new).cluster))
    assert n_relabel == n_base  # same prototypes, more members
    assert n_new >= n_base + len(new) // 2  # most new structures open a cluster of their own


def tiny_pool(root: Path, parents: list[dict], hand_docs: list[dict]) -> str:
    """A union pool of 40 real parents and the hand-built prototypes (metal B2 cells for the EMT campaign),
    and a generated pool of 20 more templates; returns the generated pool's label."""
    union = parents[:40] + [dict(d) for d in hand_docs]
    with TemplateStore.open(pools.store_path(pools.UNION, root)) as ts:
        ts.add(union)
    pools.write_manifest(pools.UNION, root, {"label": pools.UNION, "generated": False, "complete": True})
    label = str(len(union) + 20)
    manifest = pools.build_pool(label, root, workers=1)
    assert manifest["complete"] and manifest["n_generated"] == 20
    again = pools.build_pool(label, root, workers=1)  # resumable: nothing left to do
    assert again["n_generated"] == 20
    return label


def test_scale_benchmark_runs_end_to_end_on_a_tiny_pool(tmp_path, parents, hand_docs):
    root = tmp_path / "pools"
    label = tiny_pool(root, parents, hand_docs)
    opts = scale.SizeOptions(workers=1, queries=12, isolate=False, adds=(3, 7), campaign_add=3, compositions=("NiAl",))
    size = scale.run_size(label, root, opts)
    st = size["stages"]
    assert size["templates"] == int(label) and 0 < size["clusters"] <= size["pool"]["label_groups"]
    assert st["build"]["cache_bytes"] > 0
    assert st["cold"]["candidates"] > 0
    assert st["predict"]["compositions"] == 12 and st["predict"]["per_s"] > 0
    assert st["add3.open"]["templates"] == int(label) + 3
    assert st["add7.open"]["templates"] == int(label) + 10
    assert st["campaign.first"]["relaxed"] > 0
    assert st["campaign.round"]["relaxed"] == 0 and st["campaign.round"]["cached"] > 0
    result = scale_results.merge_results(tmp_path / "scale.json", {label: size}, workers=1)
    json_path, md_path = scale_results.write_results(tmp_path / "scale", result)
    assert json.loads(json_path.read_text())["sizes"][label]["clusters"] == size["clusters"]
    assert f"| {label} |" in md_path.read_text() and md_path.read_text() == markdown(result)
    assert st["campaign.round"]["overhead_s"] >= st["campaign.round"]["round_s"]
    # a later run of some stages replaces only those stages of the size
    partial = {label: {"stages": {"predict": {**st["predict"], "per_s": 1.0}}, "workers": 1}}
    merged = scale_results.merge_results(json_path, partial, workers=1, partial=True)["sizes"][label]
    assert merged["stages"]["predict"]["per_s"] == 1.0 and merged["stages"]["build"] == st["build"]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{render.BEGIN}\nSTALE TABLE\n{render.END}\nrest\n")
    render.update_block(readme, result)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "STALE TABLE" not in text
    assert "| full index build, s | 150k | <= 600 | - | - |" in text


def test_a_stage_in_its_own_process_reports_its_peak_rss(tmp_path, hand_docs):
    store = tmp_path / "store"
    with TemplateStore.open(store) as ts:
        ts.add([dict(d) for d in hand_docs])
    ctx = {"run": str(tmp_path), "home": str(tmp_path / "home"), "store": str(store), "workers": 1}
    ballast = b"x" * (900 * 2**20)  # a large parent: a child's ru_maxrss would count it from the fork
    out = scale_run.run_stage("open", ctx)
    assert out["templates"] == len(hand_docs) and out["wall_s"] > out["seconds"]
    assert 50 < out["peak_rss_mb"] < 800 and out["tree_pss_mb"] < 800
    del ballast
    with pytest.raises(BenchmarkError, match="stage open exited"):
        scale_run.run_stage("open", ctx | {"store": str(tmp_path / "missing")})
