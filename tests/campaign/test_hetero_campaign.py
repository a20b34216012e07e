"""Metastable and inverse campaigns: CSPMaker with a hetero retrieval Maker, run by the one campaign runner
(ASE EMT, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jobflow import JobStore, run_locally
from maggma.stores import MemoryStore
from pymatgen.core import Composition, Lattice, Structure

from cspml_flows.campaign import load_campaign, run_campaign
from cspml_flows.cli.main import main
from cspml_flows.core.errors import ConfigError
from cspml_flows.core.schemas import StabilityOutput
from cspml_flows.flows import CalculatorSettings, CSPMaker, DedupMaker, StabilityMaker
from cspml_flows.flows.hetero import HeteroRetrievalMaker, InverseRetrievalMaker
from cspml_flows.flows.relax import as_relaxation

EMT = CalculatorSettings(name="emt", steps=150, fmax=0.1, batch_size=4)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, template_index, trained_model) -> str:
    from threadpoolctl import threadpool_limits

    from cspml_flows.learning.hetero.model import index_geometry
    from cspml_flows.training.hetero import train_hetero

    geom = index_geometry(template_index, workers=1, cache=False)
    with threadpool_limits(limits=1, user_api="openmp"):
        model, _ = train_hetero(template_index, core=trained_model, geom=geom, variant="none", epochs=10, workers=1)
    return str(model.save(tmp_path_factory.mktemp("hetero") / "hetero.json.gz"))


def l12() -> Structure:
    return Structure(
        Lattice.cubic(3.75), ["Au", "Cu", "Cu", "Cu"], [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    )


def _run(flow) -> dict:
    store = JobStore(MemoryStore())
    run_locally(flow, store=store, create_folders=False, log=False)
    store.connect()
    return {k: v.resolve(store) for k, v in flow.output.items() if hasattr(v, "resolve")}


def _csp(model_file: str, template_folder: str, results: str, retrieval, top: int) -> CSPMaker:
    """The metastable / inverse flow: CSPMaker with another retrieval Maker."""
    return CSPMaker(
        template_store=template_folder,
        results_store=results,
        model=model_file,
        retrieval=retrieval,
        dedup=DedupMaker(top=top),
        relaxation=as_relaxation(EMT),
        stability=StabilityMaker(max_references=5),
        promotion=None,
    )


def test_inverse_flow_relaxes_ranked_compositions(model_file, template_folder):
    inverse = InverseRetrievalMaker(
        structure=l12().as_dict(), structure_name="L12.cif", elements=["Cu", "Au", "Ni", "Pd"], top=3
    )
    flow = _csp(model_file, template_folder, "memory://hinv", inverse, 3).make([])
    assert [j.name for j in flow.jobs] == ["inverse candidates", "deduplicate", "relax", "stability"]
    out = _run(flow)
    cands = out["candidates"].candidates
    assert 1 <= len(cands) <= 3
    assert all(c.rank == 1 for c in cands)  # one structure per composition
    assert all(c.template_id == "user:L12.cif" and len(c.structure) for c in cands)
    assert all(Composition(c.formula).anonymized_formula == "AB3" for c in cands)
    stab = StabilityOutput.coerce(out["stability"])
    assert {r.formula for r in stab.records} == {c.formula for c in cands}
    assert all(r.e_above_hull is not None and r.e_above_hull >= -1e-8 for r in stab.records)


def test_metastable_flow_polymorphs(model_file, template_folder):
    flow = _csp(model_file, template_folder, "memory://hmeta", HeteroRetrievalMaker(polymorphs=2), 2).make(["CuAu"])
    assert [j.name for j in flow.jobs][:3] == ["hetero retrieve", "substitute elements", "deduplicate"]
    out = _run(flow)
    cands = out["candidates"].candidates
    assert 1 <= len(cands) <= 2 and {c.formula for c in cands} == {"CuAu"}
    assert all(c.template_id.startswith("hand-") for c in cands)
    assert len(StabilityOutput.coerce(out["stability"]).records) == len(cands)


def test_hetero_campaign_yaml_and_cli(model_file, template_folder, tmp_path, capsys):
    """An inverse campaign file runs through the one campaign runner."""
    cif = tmp_path / "L12.cif"
    l12().to(filename=str(cif))
    cfg = {
        "name": "inv_test",
        "kind": "inverse",
        "structure": "L12.cif",
        "elements": ["Cu", "Au", "Ni"],
        "top_k": 2,
        "calculator": EMT.model_dump(exclude_none=True),
        "max_references": 5,
        "model": model_file,
        "stores": {"templates": template_folder, "results": "memory://hcamp", "jobs": str(tmp_path / "jobs")},
        "workdir": str(tmp_path / "work"),
    }
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_campaign(path)
    assert Path(loaded.structure) == cif.resolve()
    summary = run_campaign(loaded).model_dump()
    rows = summary["rounds"][0]["candidates"]
    assert 1 <= len(rows) <= 2 and all(r["score"] is not None for r in rows)
    assert (tmp_path / "work" / "summary.json").is_file()
    assert "(inverse)" in (tmp_path / "work" / "report.md").read_text()
    assert main(["campaign", "run", str(path)]) == 0  # a re-run finds the round done
    assert "already finished" in capsys.readouterr().out


def test_hetero_campaign_bad_input(model_file, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "kind": "inverse", "elements": ["Cu"], "model": model_file}))
    with pytest.raises(ConfigError, match="needs 'structure'"):
        load_campaign(path)
    path.write_text(yaml.safe_dump({"name": "x", "kind": "sideways", "compositions": ["CuAu"]}))
    assert main(["campaign", "run", str(path)]) == 2
    assert "kind" in capsys.readouterr().err
    (tmp_path / "bad.cif").write_text("not a cif")
    cfg = {"name": "x", "kind": "inverse", "structure": str(tmp_path / "bad.cif"), "elements": ["Cu", "Au"]}
    cfg["model"] = model_file
    cfg["stores"] = {"templates": str(tmp_path / "nostore")}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["campaign", "run", str(path)]) == 2
    assert "nostore" in capsys.readouterr().err  # the missing template store is named first
    cfg["elements"] = []
    path.write_text(yaml.safe_dump(cfg))
    assert main(["campaign", "run", str(path)]) == 2
    assert "needs 'elements'" in capsys.readouterr().err
