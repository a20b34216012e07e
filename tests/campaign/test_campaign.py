"""Campaign YAML validation, composition enumeration, rounds that feed the template store, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cspml_flows.campaign import CompositionSpace, load_campaign, parse_campaign, run_campaign
from cspml_flows.cli.main import main
from cspml_flows.core.errors import ConfigError, ModelError, StoreError
from cspml_flows.flows.stores import RESULTS_COLLECTION, open_store
from cspml_flows.templates.store import TemplateStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"topk": 3}, "topk: unknown key"),
        ({"calculator": {"name": "lammps"}}, "calculator.name"),
        ({"calculator": {"name": "emt", "fmax": -1}}, "calculator.fmax"),
        ({"calculator": {"name": "emt", "stepz": 3}}, "calculator.stepz: unknown key"),
        ({"compositions": ["CuAu", "Xx2O"]}, "unknown element 'Xx'"),
        ({"compositions": {"chemsys": ["Cu-Qq"]}}, "Cu-Qq"),
        ({"hull_threshold": -0.1}, "hull_threshold"),
        ({"rounds": 0}, "rounds"),
        ({"stores": {"template": "x"}}, "stores.template: unknown key"),
        ({"name": "bad name/"}, "name"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, change: dict, message: str, campaign_config):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_campaign(campaign_config("x", **change), "c.yaml")


def test_config_files_in_configs_are_valid():
    files = sorted((ROOT / "configs").glob("campaign_*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_campaign(f)
        assert cfg.formulas()


def test_missing_file_store_and_model(tmp_path: Path, template_folder: str, campaign_config):
    with pytest.raises(ConfigError, match="not found"):
        load_campaign(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_campaign(tmp_path / "bad.yaml")
    cfg = parse_campaign(campaign_config(str(tmp_path / "missing_store")))
    with pytest.raises(StoreError, match="missing_store"):
        run_campaign(cfg).model_dump()
    cfg = parse_campaign(campaign_config(template_folder, model=str(tmp_path / "m.joblib")))
    with pytest.raises(ModelError, match=r"m\.joblib"):
        run_campaign(cfg).model_dump()
    # the CLI prints the error in one line and exits with 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(campaign_config("x", calculator={"name": "gulp"})))
    assert main(["campaign", "run", str(tmp_path / "c.yaml")]) == 2


def test_chemical_system_enumeration_with_charge_balance():
    assert CompositionSpace(chemsys=["Li-O"], max_atoms=3).enumerate() == ["Li2O"]
    got = CompositionSpace(chemsys=["Li-P-S"], max_atoms=8).enumerate()
    assert "Li3PS4" in got and all(f.startswith("Li") for f in got)
    everything = CompositionSpace(chemsys=["Li-P-S"], max_atoms=8, charge_balanced=False).enumerate()
    assert set(got) < set(everything)
    assert "LiO2" in CompositionSpace(chemsys=["Li-O"], max_atoms=3, charge_balanced=False).enumerate()
    metals = CompositionSpace(chemsys=["Cu-Au"], max_atoms=4, charge_balanced=True).enumerate()
    assert set(metals) == {"CuAu", "Cu2Au", "CuAu2", "Cu3Au", "CuAu3"}


def test_two_rounds_feed_the_template_store(tmp_path: Path, template_folder: str, trained_model, campaign_config):
    """Round 1 promotes relaxed structures; round 2 (strict: no template of the query's own formula) builds
    candidates on them. Learned retrieval with the session model; report and hull plots are written."""
    model = trained_model.save(tmp_path / "model.joblib")
    cfg = parse_campaign(campaign_config(template_folder, rounds=2, strict=True, model=str(model)))
    result = run_campaign(cfg).model_dump()
    r1, r2 = result["rounds"]
    assert r1["promoted"], r1
    assert all(m.startswith("cspml-t-r1-") for m in r1["promoted"])
    used = {c["template_id"] for c in r2["candidates"]}
    assert used & set(r1["promoted"]), (used, r1["promoted"])
    ts = TemplateStore.open(template_folder)
    docs = {d["material_id"]: d for d in ts.docs({"round": 1})}
    ts.close()
    assert set(docs) == set(r1["promoted"])
    for d in docs.values():
        assert d["parent_id"].startswith("hand-") and d["calculator"].startswith("emt/")
        assert d["e_above_hull"] <= cfg.hull_threshold and d["energy_per_atom"] is not None
    report = Path(result["report"]).read_text()
    assert "## Round 1" in report and "## Round 2" in report and "e_above_hull" in report
    pngs = sorted(p.name for p in cfg.workdir_path().glob("hull_*.png"))
    assert "hull_Au-Cu.png" in pngs and "hull_Ag-Pd.png" in pngs
    # re-running finds both rounds done and recomputes nothing
    rs = open_store(cfg.results_store(), RESULTS_COLLECTION)
    n = rs.count()
    again = run_campaign(cfg, report=False).model_dump()
    assert [r["round"] for r in again["rounds"]] == [1, 2]
    assert rs.count() == n


def _count(results: str) -> int:
    try:
        store = open_store(results, RESULTS_COLLECTION)
        try:
            return store.count({"kind": "candidate"})
        finally:
            store.close()
    except Exception:
        return 0


def test_kill_mid_round_and_resume(tmp_path: Path, template_folder: str, campaign_config):
    """SIGKILL a real `cspml campaign run` process mid-round; the resumed run keeps every finished relaxation
    and computes only the rest."""
    comps = ["CuAu", "AgPd", "NiAl", "PtNi", "CuPd", "AgAu", "NiCu", "PdPt", "AlCu", "AuPd"]
    cfg_dict = campaign_config(
        template_folder,
        compositions=comps,
        top_k=3,
        calculator={"name": "emt", "fmax": 0.005, "steps": 400, "batch_size": 50},
    )
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_campaign(path)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    log = tmp_path / "campaign.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cspml_flows.cli.main", "campaign", "run", str(path)], env=env, stdout=fh, stderr=fh
        )
    deadline = time.time() + 120
    while time.time() < deadline and _count(cfg.results_store()) < 1 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, (
        f"the campaign process ended by itself (exit {proc.returncode}) before the kill: {log.read_text()[-2000:]}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rs = open_store(cfg.results_store(), RESULTS_COLLECTION)
    before = {d["key"]: d for d in rs.query({"kind": "candidate"})}
    rs.close()
    assert len(before) >= 1, "the campaign was not killed mid-round"
    result = run_campaign(cfg, report=False).model_dump()
    r1 = result["rounds"][0]
    assert r1["n_cached"] == len(before) and r1["n_computed"] == r1["n_candidates"] - len(before) > 0
    rs = open_store(cfg.results_store(), RESULTS_COLLECTION)
    after = {d["key"]: d for d in rs.query({"kind": "candidate"})}
    keys = [d["key"] for d in rs.query({}, properties=["key"])]
    rs.close()
    assert len(keys) == len(set(keys))
    assert len(after) == r1["n_candidates"]
    for k, d in before.items():  # nothing written before the kill was lost or recomputed
        assert after[k]["worker"] == d["worker"] and after[k]["energy"] == d["energy"]
    assert {d["worker"] for d in before.values()} != {after[k]["worker"] for k in set(after) - set(before)}
