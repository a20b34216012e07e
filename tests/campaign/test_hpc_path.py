"""The HPC path, atomate2-style: stage Makers whose ``make`` is the job, any atomate2 relax Maker, calculator
tiers, crash records, scheduled re-runs that do only new work, the campaign lock, and promotion as a
maggma Builder (ASE EMT; seconds)."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from jobflow import JobStore, Maker, job, run_locally
from maggma.stores import MemoryStore
from pymatgen.core import Lattice, Structure

from cspml_flows.campaign import CampaignError, campaign_lock, load_campaign, parse_campaign, run_campaign
from cspml_flows.cli.main import main
from cspml_flows.core.schemas import RelaxOutput
from cspml_flows.flows import (
    CalculatorSettings,
    CSPMaker,
    DedupMaker,
    RelaxationMaker,
    StabilityMaker,
    SubstitutionMaker,
    TemplateRetrievalMaker,
    TemplateUpdateMaker,
)
from cspml_flows.flows.calculators import runs_in_process
from cspml_flows.flows.relax import as_relaxation, relax_flow
from cspml_flows.flows.stores import RESULTS_COLLECTION, open_store
from cspml_flows.templates.schema import template_doc_from_structure
from cspml_flows.templates.store import TemplateStore

EMT = CalculatorSettings(name="emt", steps=200, fmax=0.05, batch_size=4)


HPC = {"max_references": 5}  # a small reference set per chemical system


def candidate_keys(results: str) -> dict[str, dict]:
    rs = open_store(results, RESULTS_COLLECTION)
    try:
        return {d["key"]: d for d in rs.query({"kind": "candidate"})}
    finally:
        rs.close()


# ------------------------------------------------------------------------------------ atomate2 idiom
def test_stage_jobs_belong_to_their_makers_and_update_maker_kwargs_reaches_them(template_folder: str):
    from atomate2.ase.jobs import EmtRelaxMaker

    maker = CSPMaker(template_store=template_folder, results_store="memory://kw", relaxation=as_relaxation(EMT))
    flow = maker.make(["CuAu"])
    kinds = [type(j.maker).__name__ for j in flow.jobs]
    assert kinds == [
        "TemplateRetrievalMaker",
        "SubstitutionMaker",
        "DedupMaker",
        "RelaxationMaker",
        "StabilityMaker",
        "TemplateUpdateMaker",
    ]
    flow.update_maker_kwargs({"top": 1}, class_filter=DedupMaker)
    flow.update_maker_kwargs(
        {"steps": 1, "relax_kwargs": {"fmax": 1e-6, "final_atoms_object_file": None}},
        class_filter=EmtRelaxMaker,
        nested=True,
    )
    assert flow.jobs[2].maker.top == 1
    assert flow.jobs[3].maker.relax_maker.steps == 1
    assert flow.jobs[4].maker.relaxation.relax_maker.steps == 1  # competing phases use the same settings
    store = JobStore(MemoryStore())
    run_locally(flow, store=store, create_folders=False, log=False)
    store.connect()
    relaxed = RelaxOutput.coerce(flow.output["relaxed"].resolve(store))
    assert len(relaxed.records) == 1  # dedup top 1
    rec = relaxed.records[0]
    updated = RelaxationMaker(relax_maker=flow.jobs[3].maker.relax_maker)
    assert rec.calculator == updated.calc_id != EMT.calc_id  # the run used the updated Maker...
    assert rec.n_steps <= 1  # ...with its single optimizer step


@dataclass
class PairPotentialRelaxMaker(Maker):
    """A user's own Maker (not ASE-based in atomate2's sense): a one-job "relaxation" returning a task-like
    document, as any code could."""

    name: str = "user relax"
    scale: float = 1.0

    @job
    def make(self, structure: Structure) -> dict:
        from ase.calculators.emt import EMT as AseEmt

        s = structure.copy()
        s.scale_lattice(s.volume * self.scale)
        atoms = s.to_ase_atoms()
        atoms.calc = AseEmt()
        return {"state": "successful", "output": {"energy": float(atoms.get_potential_energy()), "structure": s}}


def test_relaxation_accepts_any_atomate2_maker(tmp_path: Path):
    from atomate2.ase.jobs import EmtRelaxMaker
    from atomate2.forcefields.jobs import ForceFieldRelaxMaker
    from atomate2.vasp.flows.core import DoubleRelaxMaker

    chg = CSPMaker(relaxation=ForceFieldRelaxMaker(force_field_name="CHGNet")).relaxation
    assert isinstance(chg, RelaxationMaker) and chg.label == "chgnet" and runs_in_process(chg.relax_maker)
    sev = RelaxationMaker(relax_maker=ForceFieldRelaxMaker(force_field_name="SevenNet"))
    assert sev.label == "sevennet" and sev.calc_id != chg.calc_id
    vasp = CSPMaker(relaxation=DoubleRelaxMaker()).relaxation
    assert vasp.label == "vasp" and vasp.vasp and not runs_in_process(vasp.relax_maker)
    assert CSPMaker(relaxation=EmtRelaxMaker()).relaxation.label == "emt"
    # a user's own Maker runs one job per structure; its document becomes a record
    user = RelaxationMaker(relax_maker=PairPotentialRelaxMaker(scale=1.02))
    cu = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    flow = relax_flow([{"structure": cu.as_dict(), "kind": "reference"}], user, str(tmp_path / "r"), "user")
    assert [j.name for j in flow.jobs] == ["user relax", "user: record", "user: gather"]
    store = JobStore(MemoryStore())
    run_locally(flow, store=store, create_folders=False, log=False)
    store.connect()
    rec = RelaxOutput.coerce(flow.output.resolve(store)).records[0]
    assert rec.status == "successful" and rec.calculator.startswith("pairpotential/") and rec.energy is not None
    other = RelaxationMaker(relax_maker=PairPotentialRelaxMaker(scale=1.05))
    assert other.calc_id != user.calc_id  # the Maker's settings are part of the key


# ------------------------------------------------------------------------------------ calculator tiers
def test_tiers_relax_only_near_hull_candidates_and_never_mix_hulls(
    tmp_path: Path, template_folder: str, campaign_config
):
    tier2 = {"name": "emt", "steps": 300, "fmax": 0.02, "batch_size": 4, "hull_window": 0.05}
    cfg = parse_campaign(campaign_config(template_folder, **HPC, tiers=[tier2], hull_threshold=0.02))
    first, second = cfg.calc_ids()
    assert first != second
    result = run_campaign(cfg).model_dump()
    r1 = result["rounds"][0]
    t1, t2 = r1["tiers"]
    assert t1["calculator"] == first and t2["calculator"] == second
    near = [c for c in r1["candidates"] if c["status"] == "successful" and c["e_above_hull"] <= 0.05]
    assert 0 < t2["n_candidates"] == len(near) < t1["n_candidates"]
    assert t2["n_references"] > 0  # the second tier relaxed its own competing phases
    assert all(len(c["tiers"]) == (c in near) for c in r1["candidates"])
    assert all(t["calculator"] == second for c in near for t in c["tiers"])
    records = open_store(cfg.results_store(), RESULTS_COLLECTION)
    by_calc = {d["calculator"] for d in records.query({"kind": "reference"}, properties=["calculator"])}
    assert by_calc == {first, second}
    ts = TemplateStore.open(template_folder)
    promoted = list(ts.docs({"source": "campaign:t"}))
    ts.close()
    assert promoted and all(d["calculator"] == second for d in promoted)  # promotion reads the last tier
    report = Path(result["report"]).read_text()
    assert "| tier | calculator |" in report and "tier 2 e_above_hull" in report


# ------------------------------------------------------------------------------------ crash path
def test_crashed_batch_job_gives_failed_records_with_real_formulas(
    tmp_path: Path, template_folder: str, monkeypatch: pytest.MonkeyPatch, campaign_config
):
    import cspml_flows.flows.relax as relax_module

    real = relax_module.relax_one

    def crash_on_agpd(relaxation, item):
        if Structure.from_dict(item["structure"]).composition.reduced_formula == "AgPd":
            raise MemoryError("worker killed")  # what a batch job dying looks like to jobflow
        return real(relaxation, item)

    monkeypatch.setattr(relax_module, "relax_one", crash_on_agpd)
    calc = {"name": "emt", "steps": 200, "batch_size": 1}
    cfg = parse_campaign(campaign_config(template_folder, **HPC, calculator=calc))
    result = run_campaign(cfg).model_dump()
    rows = result["rounds"][0]["candidates"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and {r["formula"] for r in failed} == {"AgPd"}
    assert all("job(s) failed" in r["reason"] for r in failed)
    assert all(r["e_above_hull"] is not None for r in rows if r["formula"] == "CuAu")
    assert "AgPd" in Path(result["report"]).read_text() and (cfg.workdir_path() / "summary.json").is_file()
    assert not any(d["formula"] == "AgPd" for d in candidate_keys(cfg.results_store()).values())  # retried later


# ------------------------------------------------------------------------------------ scheduled campaigns
def test_scheduled_reruns_do_only_new_work(tmp_path: Path, template_folder: str, caplog, campaign_config):
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign_config(template_folder, **HPC, compositions=["CuAu"])))
    caplog.set_level(logging.INFO, logger="cspml_flows.campaign")
    run_campaign(load_campaign(path), report=False).model_dump()
    results = load_campaign(path).results_store()
    before = candidate_keys(results)
    assert before and {d["formula"] for d in before.values()} == {"CuAu"}
    # new input between two scheduled rounds: only AgPd is retrieved and relaxed
    path.write_text(yaml.safe_dump(campaign_config(template_folder, **HPC, compositions=["CuAu", "AgPd"])))
    caplog.clear()
    r = run_campaign(load_campaign(path), report=False).model_dump()["rounds"][0]
    assert any("1 composition(s) added" in m for m in caplog.messages)
    after = candidate_keys(results)
    new = set(after) - set(before)
    assert new and {after[k]["formula"] for k in new} == {"AgPd"}
    assert all(after[k]["worker"] == d["worker"] and after[k]["energy"] == d["energy"] for k, d in before.items())
    assert {c["formula"] for c in r["candidates"]} == {"CuAu", "AgPd"}  # the summary covers both
    # nothing new: the round is skipped, nothing is written
    caplog.clear()
    run_campaign(load_campaign(path), report=False).model_dump()
    assert any("already finished" in m for m in caplog.messages) and candidate_keys(results) == after
    # the template store gained a template from elsewhere: retrieval runs again, cached relaxations stay
    l10 = Structure(Lattice.tetragonal(2.8, 3.7), ["Cu", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    ts = TemplateStore.open(template_folder)
    ts.add([template_doc_from_structure(l10, "hand-L10", source="hand-built", e_above_hull=0.0)])
    ts.close()
    caplog.clear()
    r = run_campaign(load_campaign(path), report=False).model_dump()["rounds"][0]
    assert any("template store changed" in m for m in caplog.messages)
    latest = candidate_keys(results)
    assert 0 < r["n_computed"] == len(set(latest) - set(after))  # the new template's candidates only
    assert r["n_cached"] == sum(c["key"] in after for c in r["candidates"])
    assert any(c["template_id"] == "hand-L10" for c in r["candidates"])
    assert all(latest[k]["worker"] == d["worker"] and latest[k]["energy"] == d["energy"] for k, d in after.items())


def test_overlapping_runs_are_refused(tmp_path: Path, template_folder: str, campaign_config):
    cfg = parse_campaign(campaign_config(template_folder, **HPC))
    with campaign_lock(cfg) as lock:
        with pytest.raises(CampaignError, match="already running"):
            run_campaign(cfg).model_dump()
        assert "pid" in lock.read_text()
    assert not candidate_keys(cfg.results_store())  # the refused run did nothing


# ------------------------------------------------------------------------------------ promotion Builder
def test_promotion_builder_runs_alone_incrementally(tmp_path: Path, template_folder: str, capsys, campaign_config):
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign_config(template_folder, **HPC, hull_threshold=0.0)))
    cfg = load_campaign(path)
    first = run_campaign(cfg, report=False).model_dump()["rounds"][0]["promoted"]
    # a looser threshold: the incremental builder has nothing newer, '--all' looks at every record
    path.write_text(yaml.safe_dump(campaign_config(template_folder, **HPC, hull_threshold=5.0)))
    assert main(["campaign", "promote", str(path)]) == 0
    assert "0 template(s) promoted of 0 record(s)" in capsys.readouterr().out
    assert main(["campaign", "promote", str(path), "--all"]) == 0
    out = capsys.readouterr().out
    ts = TemplateStore.open(template_folder)
    docs = {d["material_id"]: d for d in ts.docs({"source": "campaign:t"})}
    ts.close()
    assert set(first) < set(docs)
    assert all(d["relaxation_key"] and d["round"] == 1 and d["parent_id"].startswith("hand-") for d in docs.values())
    assert f"of {len(candidate_keys(cfg.results_store()))} record(s)" in out
    # a record placed on a hull again later is the only one the next incremental run considers
    rs = open_store(cfg.results_store(), RESULTS_COLLECTION)
    doc = rs.query_one({"kind": "candidate", "status": "successful"})
    doc["last_updated"] = datetime.now(UTC).isoformat()
    rs.update([doc], key="key")
    rs.close()
    assert main(["campaign", "promote", str(path)]) == 0
    assert "of 1 record(s)" in capsys.readouterr().out
    # maggma's mrun runs the same Builder from its JSON
    builder_json = tmp_path / "promote.json"
    assert main(["campaign", "promote", str(path), "--builder-json", str(builder_json)]) == 0
    mrun = Path(sys.executable).with_name("mrun")
    proc = subprocess.run([str(mrun), str(builder_json)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_direct_cspmaker_stage_fields(template_folder: str):
    """CSPMaker holds its stage Makers; nothing is re-declared."""
    maker = CSPMaker(
        template_store=template_folder,
        retrieval=TemplateRetrievalMaker(top=2, strict=True),
        substitution=SubstitutionMaker(),
        dedup=DedupMaker(top=2),
        stability=StabilityMaker(max_references=3),
        promotion=TemplateUpdateMaker(threshold=0.2),
        tiers=[as_relaxation(CalculatorSettings(name="emt", fmax=0.01))],
    )
    assert maker.tiers[0].hull_window == 0.1  # the default window of a later tier
    names = [j.name for j in maker.make(["CuAu"]).jobs]
    assert names[-4:] == [
        "tier 2: within 0.1 eV/atom of tier 1's hull",
        "relax (tier 2)",
        "stability (tier 2)",
        "update templates",
    ]
