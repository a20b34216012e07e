"""jobflow jobs of the validation flows, one per stage; each returns a typed schema from ``schemas``.

retrieve -> substitute -> deduplicate -> relax (fans out into batch jobs with ``Response(replace=...)``)
-> stability (relaxes competing phases once, then the hull) -> promote (writes to the template store).
Jobs take store URIs, never open connections, so they serialise and run on any worker.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
from jobflow import Flow, Response, job
from jobflow.core.reference import OnMissing
from monty.json import jsanitize
from pymatgen.core import Structure

from cspml_flows.composition import as_composition, roles
from cspml_flows.errors import ModelError
from cspml_flows.flows.calculators import CalculatorSettings, relax_key, relax_maker, structure_fingerprint
from cspml_flows.flows.schemas import (
    CandidateDoc,
    CandidateSet,
    PromotionOutput,
    QueryHits,
    RelaxOutput,
    RelaxRecord,
    RetrievalOutput,
    StabilityOutput,
    TemplateHit,
)
from cspml_flows.flows.stores import RESULTS_COLLECTION, close_store, open_store, write_docs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ loading helpers
def load_index(template_store: str, workers: int = 1):
    """The TemplateIndex of a store (cached on disk under ``$CSPML_HOME``, rebuilt when the store changes)."""
    from cspml_flows.templates.index import TemplateIndex

    return TemplateIndex.open(template_store, workers=workers)


@lru_cache(maxsize=4)
def _load_model(path: str, mtime: float):
    from cspml_flows.learning.model import SimilarityModel

    return SimilarityModel.load(path)


def load_model(path: str | None):
    """The similarity model at ``path`` (None: no model, retrieval falls back to the nearest-descriptor metric)."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise ModelError(f"similarity model not found: {path} (train one with 'cspml train')")
    return _load_model(path, os.path.getmtime(path))


def as_structure(value: Structure | dict) -> Structure:
    """A Structure from a dict or a Structure (engines such as FireWorks decode job arguments)."""
    return value if isinstance(value, Structure) else Structure.from_dict(value)


# ------------------------------------------------------------------------------------------ stage jobs
@job
def retrieve_templates(
    compositions: list[str],
    template_store: str,
    model: str | None = None,
    top: int = 5,
    strict: bool = False,
    round: int = 1,
    campaign: str | None = None,
    workers: int = 1,
) -> RetrievalOutput:
    """Rank (template, element assignment) pairs for each composition with the learned similarity.

    Templates that ``campaign`` promoted in this round or later are ignored, so a round restarted after its
    promotion step retrieves exactly what it retrieved the first time.
    """
    from cspml_flows.predict.retrieve import rank

    index = load_index(template_store, workers)
    sim = load_model(model)
    comps = [as_composition(c) for c in compositions]
    rl = [roles(c) for c in comps]
    later = set()
    if campaign:
        prefix = f"cspml-{campaign}-r"
        for mid in index.ids:
            head = str(mid)[len(prefix) :].split("-", 1)[0] if str(mid).startswith(prefix) else ""
            if head.isdigit() and int(head) >= round:
                later.add(str(mid))
    metric = "learned" if sim is not None else "nearest"
    ranked = rank(
        sim, index, rl, top=top * 2 + 2, exclude_ids=[later] * len(rl) if later else None, strict=strict, metric=metric
    )
    return retrieval_output(index, comps, rl, ranked, round)


def retrieval_output(index, comps: list, rl: list, ranked: list, round: int) -> RetrievalOutput:
    """Ranked (template, assignment) lists of a retrieval as the stage's typed output."""
    from cspml_flows.predict.validity import smact_valid

    queries = []
    for c, r, hits in zip(comps, rl, ranked, strict=True):
        q = QueryHits(formula=c.reduced_formula, anonymous_formula=r.anonymous_formula, smact_valid=smact_valid(c))
        q.hits = [
            TemplateHit(
                template_id=str(index.ids[h.template]),
                perm=list(h.perm),
                score=float(h.score),
                cluster=int(h.cluster),
                alternates=[str(index.ids[a]) for a in h.alternates],
            )
            for h in hits
        ]
        if not hits:
            q.message = f"no template with anonymous formula {r.anonymous_formula} in {len(index)} templates"
        queries.append(q)
    return RetrievalOutput(queries=queries, n_templates=len(index), round=round)


@job
def substitute_elements(retrieval: RetrievalOutput, template_store: str) -> CandidateSet:
    """Put each query's elements on its retrieved templates (volume rescaled, 0.5 A distance gate)."""
    from cspml_flows.predict.predictor import CSPPredictor
    from cspml_flows.predict.retrieve import Ranked

    retrieval = RetrievalOutput.coerce(retrieval)
    index = load_index(template_store)
    pos = {str(m): i for i, m in enumerate(index.ids)}
    comps, ranked = [], []
    for q in retrieval.queries:
        comps.append(as_composition(q.formula))
        ranked.append(
            [
                Ranked(
                    pos[h.template_id],
                    tuple(h.perm),
                    h.score,
                    h.cluster,
                    tuple(pos[a] for a in h.alternates if a in pos),
                )
                for h in q.hits
                if h.template_id in pos
            ]
        )
    predictor = CSPPredictor(index, None)
    out = CandidateSet(candidates=[], round=retrieval.round)
    for q, pred in zip(retrieval.queries, predictor.realize(comps, ranked, top=10**6, dedup=False), strict=True):
        if pred.message or q.message:
            out.messages[q.formula] = q.message or pred.message or ""
        for c in pred.candidates:
            out.candidates.append(
                candidate_doc(
                    c.structure,
                    pred.formula,
                    retrieval.round,
                    rank=c.rank,
                    score=c.score,
                    template_id=c.template_id,
                    template_formula=c.template_formula,
                    prototype=c.prototype,
                    assignment=c.assignment,
                    min_distance=c.min_distance,
                )
            )
    return out


def candidate_doc(structure: Structure, formula: str, round: int, **fields: Any) -> CandidateDoc:
    """A candidate document: fingerprint, chemical system and structure dict from ``structure``."""
    return CandidateDoc(
        candidate_id=structure_fingerprint(structure),
        formula=formula,
        chemsys=structure.composition.chemical_system,
        structure=structure.as_dict(),
        round=round,
        **fields,
    )


@job
def deduplicate_candidates(candidates: CandidateSet, top: int = 5) -> CandidateSet:
    """Keep the best-ranked of each StructureMatcher-equivalence class, at most ``top`` per formula."""
    from cspml_flows.prototype import structure_matcher

    cs = CandidateSet.coerce(candidates)
    sm = structure_matcher()
    kept: dict[str, list[tuple[CandidateDoc, Structure]]] = {}
    removed = 0
    for c in sorted(cs.candidates, key=lambda c: (c.formula, c.rank)):
        group = kept.setdefault(c.formula, [])
        if len(group) >= top:
            continue
        s = Structure.from_dict(c.structure)
        if any(k.candidate_id == c.candidate_id or _fits(sm, ks, s) for k, ks in group):
            removed += 1
            continue
        group.append((c, s))
    out = []
    for group in kept.values():
        for i, (c, _) in enumerate(group):
            out.append(c.model_copy(update={"rank": i + 1}))
    return CandidateSet(candidates=out, messages=cs.messages, n_removed=removed, round=cs.round)


def _fits(sm, a: Structure, b: Structure) -> bool:
    try:
        return bool(sm.fit(a, b))
    except Exception:
        return False


@job
def relax_candidates(candidates: CandidateSet, calculator: dict, results_store: str) -> Response:
    """Relax every candidate: cached results are reused, the rest fan out into batch jobs."""
    cs = CandidateSet.coerce(candidates)
    items = [
        {
            "structure": c.structure,
            "kind": "candidate",
            "source_id": c.template_id,
            "candidate": c.model_dump(mode="json"),
            "round": c.round,
        }
        for c in cs.candidates
    ]
    return Response(replace=relax_flow(items, CalculatorSettings(**calculator), results_store, "relax candidates"))


def relax_flow(items: list[dict], settings: CalculatorSettings, results_store: str, name: str) -> Flow:
    """A Flow relaxing ``items`` (dicts with ``structure``, ``kind``, ``source_id``...) whose output is a
    :class:`RelaxOutput` in input order. Finished relaxations (any status) come from the results store."""
    keys = [relax_key(structure_fingerprint(it["structure"]), settings) for it in items]
    store = open_store(results_store, RESULTS_COLLECTION)
    try:
        done = {d["key"] for d in store.query({"key": {"$in": sorted(set(keys))}}, properties=["key"])}
    finally:
        close_store(store)
    todo, seen = [], set()
    for k, it in zip(keys, items, strict=True):
        if k not in done and k not in seen:
            seen.add(k)
            todo.append(it)
    jobs: list = []
    parts: list = []
    if settings.name == "vasp":
        maker = relax_maker(settings)
        for it in todo:
            sub = maker.make(as_structure(it["structure"]))
            rec = vasp_record(sub.output, it, settings.model_dump(), results_store)
            rec.config.on_missing_references = OnMissing.NONE
            jobs += [sub, rec]
            parts.append(rec.output)
    else:
        for start in range(0, len(todo), settings.batch_size):
            batch = relax_batch(todo[start : start + settings.batch_size], settings.model_dump(), results_store)
            batch.name = f"{name} {start // settings.batch_size + 1}"
            jobs.append(batch)
            parts.append(batch.output)
    gather = gather_relaxations(keys, parts, results_store, n_cached=len(items) - len(todo))
    gather.config.on_missing_references = OnMissing.NONE
    gather.name = f"{name}: gather"
    return Flow([*jobs, gather], output=gather.output, name=name)


def _new_record(item: dict, settings: CalculatorSettings, **fields: Any) -> RelaxRecord:
    s = as_structure(item["structure"])
    fp = structure_fingerprint(s)
    candidate = item.get("candidate")
    return RelaxRecord(
        key=relax_key(fp, settings),
        fingerprint=fp,
        calculator=settings.calc_id,
        kind=item.get("kind", "candidate"),
        formula=s.composition.reduced_formula,
        chemsys=s.composition.chemical_system,
        nsites=len(s),
        initial_structure=s.as_dict(),
        source_id=item.get("source_id"),
        candidate=CandidateDoc.coerce(candidate) if candidate is not None else None,
        round=item.get("round"),
        worker=f"{socket.gethostname()}:{os.getpid()}",
        **fields,
    )


def relax_one(maker, item: dict, settings: CalculatorSettings) -> RelaxRecord:
    """Relax one structure with the atomate2 maker's own ``make`` body; failures become failed records."""
    make = type(maker).make.original  # the undecorated atomate2 job function: same code, no nested job
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            doc = make(maker, as_structure(item["structure"]))
    except Exception as exc:
        reason = f"calculator error: {type(exc).__name__}: {exc}"[:500]
        return _new_record(item, settings, status="failed", reason=reason, elapsed_s=time.perf_counter() - t0)
    final = doc.output.mol_or_struct
    energy = None if doc.output.energy is None else float(doc.output.energy)  # CHGNet returns numpy float32
    n_steps = None if doc.output.n_steps is None else int(doc.output.n_steps)
    converged = None if doc.is_force_converged is None else bool(doc.is_force_converged)
    fields: dict[str, Any] = {"n_steps": n_steps, "converged": converged, "elapsed_s": time.perf_counter() - t0}
    finite = energy is not None and math.isfinite(energy)
    if finite and final is not None:
        finite = bool(np.all(np.isfinite(final.frac_coords)) and np.all(np.isfinite(final.lattice.matrix)))
    if final is not None and finite:
        structure = jsanitize(final.as_dict(), strict=False)  # numpy scalars (float32 from CHGNet) -> Python
        fields |= {"structure": structure, "energy": energy, "energy_per_atom": energy / len(final)}
    if not finite:
        return _new_record(item, settings, status="failed", reason="non-finite energy or structure (NaN)", **fields)
    if converged is False:
        reason = f"not converged: forces above {settings.fmax} eV/A after {n_steps} steps"
        return _new_record(item, settings, status="failed", reason=reason, **fields)
    return _new_record(item, settings, status="successful", **fields)


@job
def relax_batch(items: list[dict], calculator: dict, results_store: str) -> list[RelaxRecord]:
    """Relax a batch with one calculator instance; each result is written to the results store at once."""
    from tqdm import tqdm

    settings = CalculatorSettings(**calculator)
    maker = relax_maker(settings)
    store = open_store(results_store, RESULTS_COLLECTION)
    out = []
    try:
        bar = tqdm(items, desc=f"relax ({settings.name})", unit="structure", file=sys.stderr, leave=False)
        for it in bar:
            key = relax_key(structure_fingerprint(it["structure"]), settings)
            prev = store.query_one({"key": key})
            if prev is not None:  # another worker (or an earlier, killed run) finished it
                out.append(RelaxRecord.coerce(prev))
                continue
            rec = relax_one(maker, it, settings)
            write_docs(store, [rec.model_dump(mode="json")])
            out.append(rec)
    finally:
        close_store(store)
    return out


@job
def vasp_record(task_doc: Any, item: dict, calculator: dict, results_store: str) -> RelaxRecord:
    """Turn the final task document of atomate2's VASP double relaxation into a record (and store it)."""
    settings = CalculatorSettings(**calculator)
    rec = record_from_task_doc(task_doc, item, settings)
    store = open_store(results_store, RESULTS_COLLECTION)
    try:
        write_docs(store, [rec.model_dump(mode="json")])
    finally:
        close_store(store)
    return rec


def record_from_task_doc(task_doc: Any, item: dict, settings: CalculatorSettings) -> RelaxRecord:
    """A :class:`RelaxRecord` from a VASP TaskDoc (object or stored dict); None means the VASP job failed."""
    if task_doc is None:
        return _new_record(item, settings, status="failed", reason="VASP relaxation job failed (see its job error)")
    from monty.json import jsanitize

    d = (
        jsanitize(task_doc, strict=False, allow_bson=True, enum_values=True)
        if not isinstance(task_doc, dict)
        else task_doc
    )
    output = d.get("output") or {}
    energy = output.get("energy")
    structure = output.get("structure")
    if isinstance(structure, Structure):
        structure = structure.as_dict()
    entry = d.get("entry")
    if entry is not None and not isinstance(entry, dict):
        entry = entry.as_dict()
    state = str(d.get("state") or "successful").lower()
    fields: dict[str, Any] = {"entry": entry, "n_steps": None}
    if structure is not None and energy is not None and math.isfinite(energy):
        n = len(structure["sites"])
        fields |= {"structure": structure, "energy": energy, "energy_per_atom": energy / n}
        if "successful" in state:
            return _new_record(item, settings, status="successful", **fields)
        return _new_record(item, settings, status="failed", reason=f"VASP task state {state}", **fields)
    return _new_record(item, settings, status="failed", reason="VASP task document without a finite energy", **fields)


@job
def gather_relaxations(keys: list[str], parts: list[Any], results_store: str, n_cached: int = 0) -> RelaxOutput:
    """Collect records in input order from the results store (the source of truth); a key with no record
    (its batch job crashed) is reported as failed."""
    store = open_store(results_store, RESULTS_COLLECTION)
    try:
        found = {d["key"]: d for d in store.query({"key": {"$in": sorted(set(keys))}})}
    finally:
        close_store(store)
    crashed = sum(p is None for p in parts)
    records = []
    for k in keys:
        if k in found:
            records.append(RelaxRecord.coerce(found[k]))
        else:
            fp, calc = k.split(":", 1)
            records.append(
                RelaxRecord(
                    key=k,
                    fingerprint=fp,
                    calculator=calc,
                    status="failed",
                    reason=f"relaxation job failed before recording a result ({crashed} batch job(s) failed)",
                    formula="?",
                    chemsys="?",
                    nsites=0,
                    initial_structure={},
                )
            )
    n_failed = sum(r.status == "failed" for r in records)
    return RelaxOutput(records=records, n_cached=n_cached, n_computed=len(keys) - n_cached, n_failed=n_failed)


@job
def stability_stage(
    relaxed: RelaxOutput,
    template_store: str,
    calculator: dict,
    results_store: str,
    max_references: int = 40,
    round: int = 1,
) -> Response:
    """Relax the competing phases of every candidate's chemical system (once; cached) and build the hulls."""
    from cspml_flows.stability import competing_phases

    ro = RelaxOutput.coerce(relaxed)
    settings = CalculatorSettings(**calculator)
    systems = sorted({r.chemsys for r in ro.records if r.status == "successful" and r.kind == "candidate"})
    refs = competing_phases(template_store, systems, max_per_system=max_references)
    sub = relax_flow(refs, settings, results_store, "relax competing phases")
    hull = hull_job(ro, sub.output, calculator, results_store, round)
    return Response(replace=Flow([sub, hull], output=hull.output, name="stability"))


@job
def hull_job(
    relaxed: RelaxOutput, references: RelaxOutput, calculator: dict, results_store: str, round: int = 1
) -> StabilityOutput:
    """e_above_hull of each candidate against candidates and references of the same calculator."""
    from cspml_flows.stability import hull_analysis

    settings = CalculatorSettings(**calculator)
    ro, refs = RelaxOutput.coerce(relaxed), RelaxOutput.coerce(references)
    cands = [r for r in ro.records if r.kind == "candidate"]
    records, systems = hull_analysis(cands, refs.records, vasp=settings.name == "vasp")
    store = open_store(results_store, RESULTS_COLLECTION)
    try:
        by_key = {r.key: r for r in records}
        updates = []
        for c in cands:
            st = by_key.get(c.key)
            if st is not None and st.e_above_hull is not None:
                c.e_above_hull = st.e_above_hull
                updates.append(c.model_dump(mode="json"))
        if updates:
            write_docs(store, updates)
    finally:
        close_store(store)
    return StabilityOutput(
        calculator=settings.calc_id,
        records=records,
        candidates=cands,
        n_references=sum(r.status == "successful" for r in refs.records),
        chemsys_references=systems,
        round=round,
    )


@job
def promote_candidates(
    stability: StabilityOutput, template_store: str, threshold: float, round: int = 1, campaign: str = "campaign"
) -> PromotionOutput:
    """Write relaxed candidates with e_above_hull <= threshold into the template store, with provenance.

    A relaxed structure that matches a template of the same formula already in the store is not added twice.
    """
    from cspml_flows.prototype import structure_matcher
    from cspml_flows.templates.schema import template_doc_from_structure
    from cspml_flows.templates.store import TemplateStore

    so = StabilityOutput.coerce(stability)
    ehull = {r.key: r.e_above_hull for r in so.records}
    out = PromotionOutput(threshold=threshold, round=round)
    ts = TemplateStore.open(template_store, create=False)
    sm = structure_matcher()
    docs = []
    try:
        for c in so.candidates:
            e = ehull.get(c.key)
            if c.status != "successful" or e is None or e > threshold or c.structure is None:
                continue
            out.n_considered += 1
            mid = f"cspml-{campaign}-r{round}-{c.fingerprint[:12]}"
            if ts.get(mid) is not None:  # promoted by an earlier run of this round
                out.promoted.append(mid)
                continue
            s = Structure.from_dict(c.structure)
            known = [
                Structure.from_dict(d["structure"])
                for d in ts.docs({"formula": s.composition.reduced_formula}, properties=["structure", "material_id"])
            ]
            known += [Structure.from_dict(d.structure) for d in docs if d.formula == s.composition.reduced_formula]
            if any(_fits(sm, k, s) for k in known):
                continue
            docs.append(
                template_doc_from_structure(
                    s,
                    mid,
                    source=f"campaign:{campaign}",
                    round=round,
                    parent_id=c.source_id,
                    calculator=c.calculator,
                    energy_per_atom=c.energy_per_atom,
                    e_above_hull=e,
                )
            )
        if docs:
            ts.add(docs)
    finally:
        ts.close()
    out.promoted += [d.material_id for d in docs]
    return out
