"""Relaxation stage: :class:`RelaxationMaker` relaxes candidates with any atomate2 relax Maker.

ASE-based Makers (``EmtRelaxMaker``, ``ForceFieldRelaxMaker`` with CHGNet, SevenNet...) run in batches: one
job relaxes ``batch_size`` structures with one calculator instance, through the Maker's own ``make`` body.
Any other Maker (``DoubleRelaxMaker`` for VASP, a user's own) runs as its own job or flow per structure and
its task document becomes a record (:mod:`cspml_flows.flows.vasp`). Every result is written to the results
store at once under the key (structure fingerprint, calculator id), so nothing finished is computed twice.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jobflow import Flow, Maker, Response, job
from jobflow.core.reference import OnMissing
from monty.json import jsanitize
from tqdm import tqdm

from cspml_flows.core.engines import pin_torch_threads, relax_key, structure_fingerprint
from cspml_flows.core.schemas import CandidateSet, RelaxOutput, RelaxRecord
from cspml_flows.flows.calculators import (
    CalculatorSettings,
    calculator_id,
    calculator_label,
    is_vasp_maker,
    relax_maker,
    runs_in_process,
)
from cspml_flows.flows.records import as_structure, candidate_items, new_record
from cspml_flows.flows.stores import RESULTS_COLLECTION, close_store, open_store, write_docs
from cspml_flows.flows.vasp import task_record


def default_relax_maker() -> Maker:
    """ASE EMT, FIRE with the cell relaxed, fmax 0.05 eV/A, 300 steps (metals; seconds)."""
    return relax_maker(CalculatorSettings())


@dataclass
class RelaxationMaker(Maker):
    """Relax candidate structures with an atomate2 relax Maker; fans out into jobs at run time.

    Parameters
    ----------
    name
        Job name.
    relax_maker
        Any atomate2 relax Maker: ``EmtRelaxMaker``, ``ForceFieldRelaxMaker(force_field_name=...)``,
        ``DoubleRelaxMaker`` (VASP) or a user's own. Its settings are part of every result's cache key.
    batch_size
        Structures per job for ASE-based Makers (not part of the key).
    hull_window
        Tiered validation: only candidates within this distance (eV/atom) of the previous tier's hull are
        relaxed by this tier; unused for the first tier.
    """

    name: str = "relax"
    relax_maker: Maker = field(default_factory=default_relax_maker)
    batch_size: int = 25
    hull_window: float | None = None

    @property
    def label(self) -> str:
        """Short calculator name (``emt``, ``chgnet``, ``vasp``...)."""
        return calculator_label(self.relax_maker)

    @property
    def calc_id(self) -> str:
        """Calculator id ``label/digest`` of the relax Maker's settings: one hull per id."""
        return calculator_id(self.relax_maker)

    @property
    def vasp(self) -> bool:
        """Whether the relax Maker is one of atomate2's VASP Makers."""
        return is_vasp_maker(self.relax_maker)

    @job
    def make(self, candidates: CandidateSet, results_store: str) -> Response:
        """Relax every candidate: cached results are reused, the rest fan out into jobs."""
        return Response(replace=self.relax_flow(candidate_items(candidates), str(results_store), "relax candidates"))

    def relax_flow(self, items: list[dict], results_store: str, name: str) -> Flow:
        """A Flow relaxing ``items`` (dicts with ``structure``, ``kind``, ``source_id``...) whose output is a
        :class:`RelaxOutput` in input order. Finished relaxations (any status) come from the results store."""
        cid = self.calc_id
        keys = [relax_key(structure_fingerprint(it["structure"]), cid) for it in items]
        store = open_store(results_store, RESULTS_COLLECTION)
        try:
            done = {d["key"] for d in store.query({"key": {"$in": sorted(set(keys))}}, properties=["key"])}
        finally:
            close_store(store)
        todo: dict[str, dict] = {}
        for k, it in zip(keys, items, strict=True):
            if k not in done and k not in todo:
                todo[k] = it
        jobs: list = []
        parts: list = []
        if runs_in_process(self.relax_maker):
            pending = list(todo.values())
            for start in range(0, len(pending), self.batch_size):
                batch = relax_batch(pending[start : start + self.batch_size], self, results_store)
                batch.name = f"{name} {start // self.batch_size + 1}"
                jobs.append(batch)
                parts.append(batch.output)
        else:
            for it in todo.values():
                sub = self.relax_maker.make(as_structure(it["structure"]))
                earlier = [j.output for j in sub.jobs[:-1]] if isinstance(sub, Flow) else []  # VASP: relax 1
                rec = task_record(sub.output, it, self, results_store, earlier)
                rec.config.on_missing_references = OnMissing.NONE
                rec.name = f"{name}: record"
                jobs += [sub, rec]
                parts.append(rec.output)
        gather = gather_relaxations(keys, list(todo.values()), parts, self, results_store, len(items) - len(todo))
        gather.config.on_missing_references = OnMissing.NONE
        gather.name = f"{name}: gather"
        return Flow([*jobs, gather], output=gather.output, name=name)


def as_relaxation(value: RelaxationMaker | Maker | CalculatorSettings) -> RelaxationMaker:
    """A :class:`RelaxationMaker` from itself, an atomate2 relax Maker, or YAML calculator settings."""
    if isinstance(value, RelaxationMaker):
        return value
    if isinstance(value, Maker):
        return RelaxationMaker(relax_maker=value)
    if isinstance(value, CalculatorSettings):
        return RelaxationMaker(
            relax_maker=relax_maker(value), batch_size=value.batch_size, hull_window=value.hull_window
        )
    raise TypeError(f"cannot relax with {type(value).__name__}: pass an atomate2 Maker or calculator settings")


def relax_flow(items: list[dict], relaxation: Any, results_store: str, name: str) -> Flow:
    """:meth:`RelaxationMaker.relax_flow` for a RelaxationMaker, an atomate2 Maker or calculator settings."""
    return as_relaxation(relaxation).relax_flow(items, str(results_store), name)


def relax_one(relaxation: RelaxationMaker, item: dict) -> RelaxRecord:
    """Relax one structure with the atomate2 Maker's own ``make`` body; failures become failed records."""
    maker = relaxation.relax_maker
    make = type(maker).make.original  # the undecorated atomate2 job function: same code, no nested job
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            doc = make(maker, as_structure(item["structure"]))
    except Exception as exc:  # any calculator error is this structure's answer: a failed record, kept
        reason = f"calculator error: {type(exc).__name__}: {exc}"[:500]
        return new_record(item, relaxation, status="failed", reason=reason, elapsed_s=time.perf_counter() - t0)
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
        return new_record(item, relaxation, status="failed", reason="non-finite energy or structure (NaN)", **fields)
    if converged is False:
        fmax = (maker.relax_kwargs or {}).get("fmax", "?")
        reason = f"not converged: forces above {fmax} eV/A after {n_steps} steps"
        return new_record(item, relaxation, status="failed", reason=reason, **fields)
    return new_record(item, relaxation, status="successful", **fields)


@job
def relax_batch(items: list[dict], relaxation: RelaxationMaker, results_store: str) -> list[RelaxRecord]:
    """Relax a batch with one calculator instance; each result is written to the results store at once."""
    if relaxation.label == "sevennet":
        pin_torch_threads()
    cid = relaxation.calc_id
    store = open_store(results_store, RESULTS_COLLECTION)
    out = []
    try:
        bar = tqdm(items, desc=f"relax ({relaxation.label})", unit="structure", file=sys.stderr, leave=False)
        for it in bar:
            key = relax_key(structure_fingerprint(it["structure"]), cid)
            prev = store.query_one({"key": key})
            if prev is not None:  # another worker (or an earlier, killed run) finished it
                out.append(RelaxRecord.coerce(prev))
                continue
            rec = relax_one(relaxation, it)
            write_docs(store, [rec.model_dump(mode="json")])
            out.append(rec)
    finally:
        close_store(store)
    return out


@job
def gather_relaxations(
    keys: list[str],
    pending: list[dict],
    parts: list[Any],
    relaxation: RelaxationMaker,
    results_store: str,
    n_cached: int = 0,
) -> RelaxOutput:
    """Collect records in input order from the results store (the source of truth). A pending item with no
    record (its job crashed) becomes a failed record with its real formula; it is not stored, so a rerun
    retries it."""
    store = open_store(results_store, RESULTS_COLLECTION)
    try:
        found = {d["key"]: RelaxRecord.coerce(d) for d in store.query({"key": {"$in": sorted(set(keys))}})}
    finally:
        close_store(store)
    crashed = sum(p is None for p in parts)
    reason = f"relaxation job failed before recording a result ({crashed} job(s) failed; see the job log)"
    cid = relaxation.calc_id
    for it in pending:  # only an item without a stored record is built into a failed one
        if relax_key(structure_fingerprint(it["structure"]), cid) not in found:
            rec = new_record(it, relaxation, status="failed", reason=reason)
            found[rec.key] = rec
    records = [found[k] for k in keys]
    n_failed = sum(r.status == "failed" for r in records)
    return RelaxOutput(records=records, n_cached=n_cached, n_computed=len(keys) - n_cached, n_failed=n_failed)
