"""The same Flow through other engines: JSON round trip, FireWorks (LaunchPad on mongomock), jobflow-remote."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mongomock
import pytest
import yaml
from jobflow import Flow, JobStore, run_locally
from maggma.stores import MemoryStore
from monty.json import MontyDecoder, MontyEncoder

from cspml_flows.campaign import load_campaign, round_flow
from cspml_flows.core.schemas import StabilityOutput
from cspml_flows.flows.stores import job_store
from cspml_flows.templates.store import TemplateStore

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "workflows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def campaign_file(tmp_path: Path, hand_docs: list[dict]) -> Path:
    ts = TemplateStore.open(tmp_path / "templates")
    ts.add([dict(d) for d in hand_docs])
    ts.close()
    cfg = {
        "name": "eng",
        "compositions": ["CuAu"],
        "top_k": 2,
        "calculator": {"name": "emt", "steps": 200},
        "hull_threshold": 5.0,
        "model": None,
        "stores": {"templates": str(tmp_path / "templates")},
        "workdir": str(tmp_path / "work"),
    }
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_flow_json_round_trip_runs(campaign_file: Path):
    flow = round_flow(load_campaign(campaign_file), 1)
    text = json.dumps(flow.as_dict(), cls=MontyEncoder)
    again = MontyDecoder().process_decoded(json.loads(text))
    assert isinstance(again, Flow) and [j.uuid for j in again.jobs] == [j.uuid for j in flow.jobs]
    store = JobStore(MemoryStore())
    run_locally(again, store=store, create_folders=False, log=False)
    stab = StabilityOutput.coerce(again.output["stability"].resolve(store))
    assert stab.records and all(r.e_above_hull is not None for r in stab.records)


def test_fireworks_launchpad_on_mongomock(campaign_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """flow_to_workflow -> LaunchPad.add_wf -> rapidfire: every Firework (the dynamic relaxation batches
    included) completes and the outputs land in the campaign's job store."""
    import fireworks.core.launchpad as launchpad_module
    import fireworks.core.rocket as rocket_module
    from fireworks import FWorker, LaunchPad
    from fireworks.core.rocket_launcher import rapidfire

    client = mongomock.MongoClient()
    monkeypatch.setattr(launchpad_module, "MongoClient", lambda *a, **k: client)
    monkeypatch.setattr(launchpad_module, "GRIDFS_FALLBACK_COLLECTION", None)  # GridFS needs a real server
    # A Rocket's ping thread pings its launch once more after the Rocket has stopped it, racing the next Rocket on
    # the mongomock client (not thread-safe): once in a while it found no launch and raised in its thread. Nothing
    # here needs the pings (they mark a launch alive for a long-running job), so no ping thread is started.
    monkeypatch.setattr(rocket_module, "start_ping_launch", lambda *a, **k: None)
    lp = LaunchPad(name="cspml_test")
    lp.reset("", require_password=False)
    script = load_script("submit_fireworks")
    flow, wf = script.build_workflow(str(campaign_file), 1)
    assert len(wf.fws) == len(flow.jobs) == 6
    ids = lp.add_wf(wf)
    assert len(ids) == 6
    monkeypatch.chdir(tmp_path)
    rapidfire(lp, FWorker(), nlaunches=0, sleep_time=0, strm_lvl="ERROR")
    states = [lp.get_fw_by_id(i).state for i in lp.get_fw_ids()]
    assert len(states) > 6  # the relaxation stage replaced itself with batch jobs at run time
    assert set(states) == {"COMPLETED"}
    cfg = load_campaign(campaign_file)
    store = job_store(cfg.jobs_store())
    store.connect()
    stab = StabilityOutput.coerce(store.get_output(flow.jobs[4].uuid))
    assert stab.records and all(r.e_above_hull is not None for r in stab.records)


def test_jobflow_remote_queue_accepts_the_flow(campaign_file: Path, tmp_path: Path):
    """What ``submit_flow`` does, on a mongomock queue store: the round's jobs enter jobflow-remote's queue,
    the first stage READY and the rest WAITING on it. (Running them needs ``jf runner`` and a MongoDB.)"""
    from jobflow_remote import JobController
    from jobflow_remote.config.base import Project
    from jobflow_remote.jobs.state import JobState

    script = load_script("submit_jobflow_remote")
    flow = script.build_flow(str(campaign_file), 1)
    queue = MemoryStore(collection_name="jobs")
    queue.connect()
    project = Project(
        name="cspml_test",
        base_dir=str(tmp_path / "jfr"),
        workers={"local": {"type": "local", "scheduler_type": "shell", "work_dir": str(tmp_path / "jfr_work")}},
        queue={"store": {"type": "MemoryStore", "collection_name": "jobs"}},
        jobstore={"docs_store": {"type": "MemoryStore"}},
    )
    controller = JobController(queue_store=queue, jobstore=JobStore(MemoryStore()), project=project)
    controller.reset(reset_output=False, validation="")
    ids = controller.add_flow(flow, worker="local")
    assert len(ids) == len(flow.jobs) == 6
    states = {j.uuid: j.state for j in controller.get_jobs_info()}
    assert states[flow.jobs[0].uuid] == JobState.READY
    assert all(states[j.uuid] == JobState.WAITING for j in flow.jobs[1:])
    doc = controller.get_job_doc(job_id=flow.jobs[3].uuid)
    # the stage's job is its Maker's make (atomate2 idiom): the Maker, with its atomate2 relax Maker, travels
    assert doc.job.function.__name__ == "make" and type(doc.job.maker).__name__ == "RelaxationMaker"
    assert type(doc.job.maker.relax_maker).__name__ == "EmtRelaxMaker"
