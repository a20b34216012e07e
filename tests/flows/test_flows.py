"""Validation flows with ASE EMT: stages, fan-out, cache keys, failures, stores (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jobflow import Flow, JobStore, run_locally
from maggma.stores import MemoryStore
from pymatgen.core import Lattice, Structure

from cspml_flows.core.engines import relax_key
from cspml_flows.core.schemas import PromotionOutput, RelaxOutput, StabilityOutput
from cspml_flows.flows import (
    CalculatorSettings,
    CSPMaker,
    DedupMaker,
    TemplateRetrievalMaker,
    TemplateUpdateMaker,
    structure_fingerprint,
)
from cspml_flows.flows.calculators import relax_maker
from cspml_flows.flows.relax import as_relaxation, relax_flow
from cspml_flows.flows.stores import RESULTS_COLLECTION, job_store, open_store
from cspml_flows.templates.store import TemplateStore

EMT = CalculatorSettings(name="emt", steps=200, fmax=0.05, batch_size=2)


def fcc(el: str, a: float) -> Structure:
    return Structure(Lattice.cubic(a), [el] * 4, [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])


def outputs(flow: Flow, store: JobStore) -> dict:
    store.connect()
    try:
        return {k: v.resolve(store) for k, v in flow.output.items() if hasattr(v, "resolve")}
    finally:
        store.close()


def test_calculator_key_depends_on_settings_not_batching():
    a = CalculatorSettings(name="emt", fmax=0.05, batch_size=5)
    assert a.calc_id == CalculatorSettings(name="emt", fmax=0.05, batch_size=50).calc_id
    assert a.calc_id != CalculatorSettings(name="emt", fmax=0.01).calc_id
    assert a.calc_id.startswith("emt/")
    with pytest.raises(ValueError, match="name"):
        CalculatorSettings(name="lammps")
    with pytest.raises(ValueError, match="extra"):
        CalculatorSettings(name="emt", fmx=0.1)


def test_fingerprint_is_stable_and_discriminating():
    s = fcc("Cu", 3.61)
    assert structure_fingerprint(s) == structure_fingerprint(Structure.from_dict(s.as_dict()))
    assert structure_fingerprint(s) == structure_fingerprint(s.as_dict())
    moved = s.copy()
    moved.translate_sites([1], [0.01, 0, 0])
    assert structure_fingerprint(moved) != structure_fingerprint(s)
    assert relax_key("abc", EMT) != relax_key("abc", CalculatorSettings(name="chgnet"))


def test_relax_maker_is_atomate2():
    from atomate2.ase.jobs import EmtRelaxMaker
    from atomate2.forcefields.jobs import ForceFieldRelaxMaker
    from atomate2.vasp.flows.core import DoubleRelaxMaker

    assert isinstance(relax_maker(EMT), EmtRelaxMaker)
    ff = relax_maker(CalculatorSettings(name="chgnet"))
    assert isinstance(ff, ForceFieldRelaxMaker) and str(ff.force_field_name).endswith("CHGNet")
    assert isinstance(relax_maker(CalculatorSettings(name="vasp")), DoubleRelaxMaker)


def test_relax_fan_out_failures_and_cache(tmp_path: Path):
    """Batches fan out; a calculator error and an unconverged run are recorded and do not stop the rest;
    a second run computes nothing."""
    results = str(tmp_path / "results")
    good = [fcc("Cu", 3.5), fcc("Ag", 4.2), fcc("Au", 4.0)]
    bad_element = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    items = [{"structure": s.as_dict(), "kind": "reference", "source_id": f"s{i}"} for i, s in enumerate(good)]
    items.insert(1, {"structure": bad_element.as_dict(), "kind": "reference", "source_id": "nacl"})
    flow = relax_flow(items, EMT, results, "relax")
    assert sum(j.name.startswith("relax ") and "gather" not in j.name for j in flow.jobs) == 2  # 4 items / batch 2
    store = JobStore(MemoryStore())
    run_locally(flow, store=store, create_folders=False, log=False)
    out = RelaxOutput.coerce(flow.output.resolve(store))
    assert [r.source_id for r in out.records] == ["s0", "nacl", "s1", "s2"]
    assert out.n_failed == 1 and out.records[1].status == "failed"
    assert "NotImplementedError" in out.records[1].reason and "Na" in out.records[1].reason
    for r in (out.records[0], out.records[2], out.records[3]):
        assert r.status == "successful" and r.converged and r.energy is not None
        assert r.structure.lattice != r.initial_structure.lattice  # the cell relaxed
    cu = out.records[0].structure
    assert 3.55 < cu.lattice.a < 3.65  # EMT's Cu lattice constant (~3.59 A), from 3.5
    # unconverged: one step allowed with a tight force criterion
    tight = CalculatorSettings(name="emt", steps=2, fmax=1e-4)
    distorted = Structure(Lattice.cubic(3.3), ["Cu"] * 4, [[0, 0, 0], [0, 0.5, 0.55], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    f2 = relax_flow([{"structure": distorted.as_dict(), "kind": "reference"}], tight, results, "tight")
    run_locally(f2, store=store, create_folders=False, log=False)
    r2 = RelaxOutput.coerce(f2.output.resolve(store)).records[0]
    assert r2.status == "failed" and r2.reason.startswith("not converged") and r2.energy is not None
    # everything is cached now: the new flow has only the gather job, and records match
    again = relax_flow(items, EMT, results, "relax")
    assert len(again.jobs) == 1
    run_locally(again, store=store, create_folders=False, log=False)
    out2 = RelaxOutput.coerce(again.output.resolve(store))
    assert out2.n_cached == 4 and out2.n_computed == 0
    assert [r.energy for r in out2.records] == [r.energy for r in out.records]
    rs = open_store(results, RESULTS_COLLECTION)
    assert rs.count() == 5  # 4 EMT records + 1 with the tight settings: a different key


def test_csp_flow_emt_end_to_end(template_folder: str, tmp_path: Path):
    """Retrieval -> substitution -> dedup -> relaxation -> hull -> promotion, on mongomock-backed stores."""
    results = "memory://flowtest"
    maker = CSPMaker(
        template_store=template_folder,
        results_store=results,
        campaign="t",
        retrieval=TemplateRetrievalMaker(top=3),
        dedup=DedupMaker(top=3),
        relaxation=as_relaxation(EMT),
        promotion=TemplateUpdateMaker(threshold=5.0, campaign="t"),
    )
    flow = maker.make(["CuAu", "AgPd"], round_number=1)
    assert [j.name for j in flow.jobs] == [
        "retrieve templates",
        "substitute elements",
        "deduplicate",
        "relax",
        "stability",
        "update templates",
    ]
    store = JobStore(MemoryStore())
    run_locally(flow, store=store, create_folders=False, log=False)
    o = outputs(flow, store)
    ret = o["retrieval"]
    assert {q.formula for q in ret.queries} == {"CuAu", "AgPd"}
    assert all(h.template_id.startswith("hand-") for q in ret.queries for h in q.hits)
    cands = o["candidates"].candidates
    assert cands and all(c.rank <= 3 for c in cands)
    assert {c.formula for c in cands} == {"CuAu", "AgPd"}
    stab = StabilityOutput.coerce(o["stability"])
    assert stab.calculator == EMT.calc_id
    assert len(stab.records) == len(cands)
    for r in stab.records:
        assert r.e_above_hull is not None and r.e_above_hull >= -1e-8
        assert set(r.decomposition) <= {"CuAu", "AgPd", "Au", "Cu", "Ag", "Pd"}
    # elemental references were generated (the store has no Cu, Au, Ag, Pd) and relaxed with EMT
    assert stab.n_references >= 4 * 3
    assert all(any(k for k in v) for v in stab.chemsys_references.values())
    prom = PromotionOutput.coerce(o["promotion"])
    assert prom.promoted and prom.n_considered == len(cands)
    ts = TemplateStore.open(template_folder)
    doc = ts.get(prom.promoted[0])
    ts.close()
    assert doc.round == 1 and doc.parent_id.startswith("hand-") and doc.calculator == EMT.calc_id
    assert doc.energy_per_atom is not None and doc.source == "campaign:t"
    # energies are in the results store, with e_above_hull from the hull analysis
    rs = open_store(results, RESULTS_COLLECTION)
    stored = {d["key"]: d for d in rs.query({"kind": "candidate"})}
    for r in stab.records:
        assert stored[r.key]["e_above_hull"] == pytest.approx(r.e_above_hull)


def test_job_outputs_readable_from_new_process(template_folder: str, tmp_path: Path):
    jobs_uri = tmp_path / "jobstore"
    results = str(tmp_path / "results")
    maker = CSPMaker(
        template_store=template_folder,
        results_store=results,
        retrieval=TemplateRetrievalMaker(top=2),
        dedup=DedupMaker(top=2),
        relaxation=as_relaxation(EMT),
        promotion=None,
    )
    flow = maker.make(["CuAu"])
    run_locally(flow, store=job_store(jobs_uri), create_folders=False, log=False)
    stability_uuid = flow.jobs[4].uuid
    code = (
        "import json, sys; from cspml_flows.flows.stores import job_store; s = job_store(sys.argv[1]); s.connect(); "
        "o = s.get_output(sys.argv[2]); print(type(o).__name__, json.dumps([r.e_above_hull for r in o.records]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(jobs_uri), stability_uuid], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    name, values = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert name == "StabilityOutput"  # the typed schema comes back
    values = json.loads(values)
    assert values and all(v is not None for v in values)


def test_substitution_job_rescales_by_the_model_volumes(template_folder: str, tmp_path: Path, trained_model):
    """The retrieval job hands its model's learned element volumes to the substitution job, which rescales
    each candidate's cell by them (not by the pure elements' volumes)."""
    from cspml_flows.core.composition import roles
    from cspml_flows.core.schemas import CandidateSet, RetrievalOutput
    from cspml_flows.flows import SubstitutionMaker
    from cspml_flows.flows.retrieval import load_index
    from cspml_flows.predict.substitute import volume_scale

    model = trained_model.save(tmp_path / "model.json.gz")
    retrieve = TemplateRetrievalMaker(top=3).make(["KBr"], template_folder, str(model))
    substitute = SubstitutionMaker().make(retrieve.output, template_folder)
    store = JobStore(MemoryStore())
    run_locally(Flow([retrieve, substitute]), store=store, create_folders=False, log=False)
    store.connect()
    ret = RetrievalOutput.coerce(retrieve.output.resolve(store))
    cands = CandidateSet.coerce(substitute.output.resolve(store)).candidates
    store.close()
    assert ret.element_volumes == trained_model.meta["element_volumes"]
    index = load_index(template_folder)
    hit = ret.queries[0].hits[0]
    t = int(list(index.ids).index(hit.template_id))
    scale = volume_scale(roles("KBr"), index.roles[t], tuple(hit.perm), trained_model.volumes)
    assert abs(scale - volume_scale(roles("KBr"), index.roles[t], tuple(hit.perm))) > 0.01 * scale
    template_volume = abs(np.linalg.det(index.cell(t)[0]))
    first = next(c for c in cands if c.template_id == hit.template_id)
    assert first.structure.volume == pytest.approx(template_volume * scale, rel=1e-6)
