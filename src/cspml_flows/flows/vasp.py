"""VASP through atomate2 and task documents as relaxation records.

:func:`vasp_relax_maker` is atomate2's MP GGA double relaxation (pymatgen's ``MPRelaxSet``: PBE POTCARs,
GGA, +U where MP applies it), so every task document is a GGA/GGA+U entry that MP2020 corrects. atomate2's
generic ``RelaxSetGenerator`` runs PBEsol (``GGA = PS``), whose entries MP2020 rejects.

:func:`task_record` turns the final task document of one per-structure relaxation job (the VASP double
relaxation, or a user's Maker) into a record. A failed job (custodian gave up, the job raised) arrives as
``None`` and becomes a failed record with the real formula; a VASP task document counts as successful only
when its ``state`` says so. The record keeps custodian's corrections of that run.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from atomate2.vasp.flows.mp import MPGGADoubleRelaxMaker
from atomate2.vasp.jobs.mp import MPGGARelaxMaker
from jobflow import Maker, job
from monty.json import jsanitize
from pydantic import BaseModel
from pymatgen.core import Structure
from pymatgen.io.vasp.sets import MPRelaxSet

from cspml_flows.core.schemas import RelaxRecord
from cspml_flows.flows.records import Relaxation, new_record
from cspml_flows.flows.stores import RESULTS_COLLECTION, close_store, open_store, write_docs


def vasp_relax_maker(
    incar: dict[str, Any] | None = None, run_vasp: dict[str, Any] | None = None, potcar_spec: bool = False
) -> Maker:
    """atomate2's ``MPGGADoubleRelaxMaker`` with user INCAR settings on both relaxations.

    ``run_vasp`` goes to atomate2's ``run_vasp`` (``vasp_cmd``, ``max_errors``, ``wall_time``,
    ``custodian_kwargs``...); custodian runs with atomate2's default handlers. ``potcar_spec`` writes
    POTCAR.spec (symbols only) instead of POTCAR, for runs without a POTCAR library."""

    def relax(**kwargs: Any) -> MPGGARelaxMaker:
        inputs = MPRelaxSet(
            force_gamma=True, auto_metal_kpoints=True, inherit_incar=False, user_incar_settings=dict(incar or {})
        )
        return MPGGARelaxMaker(
            input_set_generator=inputs,
            run_vasp_kwargs=dict(run_vasp or {}),
            write_input_set_kwargs={"potcar_spec": True} if potcar_spec else {},
            **kwargs,
        )

    second = relax(copy_vasp_kwargs={"additional_vasp_files": ("WAVECAR", "CHGCAR")})
    return MPGGADoubleRelaxMaker(relax_maker1=relax(), relax_maker2=second)


@job
def task_record(
    task_doc: Any, item: dict, relaxation: Relaxation, results_store: str, earlier: list | None = None
) -> RelaxRecord:
    """Turn the final task document of one relaxation flow into a record (and store it); ``earlier`` are the
    outputs of the flow's other jobs (the first VASP relaxation), whose custodian corrections it keeps."""
    rec = record_from_task_doc(task_doc, item, relaxation, earlier)
    store = open_store(results_store, RESULTS_COLLECTION)
    try:
        write_docs(store, [rec.model_dump(mode="json")])
    finally:
        close_store(store)
    return rec


def _as_dict(task_doc: Any) -> dict:
    """A task document (emmet ``TaskDoc``, another pydantic model, or a stored dict) as a plain dict."""
    if isinstance(task_doc, BaseModel):
        task_doc = task_doc.model_dump()  # python mode: custodian's handler objects stay objects
    elif not isinstance(task_doc, dict):
        raise TypeError(f"not a task document: {type(task_doc).__name__}")
    return jsanitize(task_doc, strict=False, recursive_msonable=True, enum_values=True)


def corrections(d: dict) -> list[dict[str, Any]]:
    """Custodian's corrections in a VASP task document: one entry per correction (job, handler, errors,
    actions)."""
    out = []
    for run in d.get("custodian") or []:
        for corr in (run or {}).get("corrections") or []:
            handler = corr.get("handler")
            name = handler.get("@class") if isinstance(handler, dict) else type(handler).__name__
            errors = list(corr.get("errors") or [])
            out.append({"job": d.get("task_label"), "handler": name, "errors": errors, "actions": corr.get("actions")})
    return out


def _run_info(d: dict) -> dict[str, Any]:
    """Ionic step count and elapsed time of the last calculation in a VASP task document, when present."""
    calcs = d.get("calcs_reversed") or []
    if not calcs:
        return {}
    out = calcs[0].get("output") or {}
    steps = out.get("ionic_steps")
    stats = out.get("run_stats") or {}
    elapsed = stats.get("elapsed_time") if isinstance(stats, dict) else None
    return {"n_steps": len(steps) if steps is not None else None, "elapsed_s": elapsed}


def record_from_task_doc(task_doc: Any, item: dict, relaxation: Relaxation, earlier: list | None = None) -> RelaxRecord:
    """A :class:`RelaxRecord` from a task document (object or stored dict); None means the job failed.
    Custodian's corrections of ``earlier`` task documents (None for a failed job) come first."""
    what = "VASP" if relaxation.vasp else relaxation.label
    before = [c for doc in earlier or [] if isinstance(doc, dict | BaseModel) for c in corrections(_as_dict(doc))]
    if task_doc is None:
        reason = f"{what} relaxation job failed: no task document (custodian gave up or the job raised; see its log)"
        return new_record(item, relaxation, status="failed", reason=reason, corrections=before)
    d = _as_dict(task_doc)
    output = d.get("output") or {}
    energy = output.get("energy")
    structure = output.get("structure") or d.get("structure")
    if isinstance(structure, Structure):
        structure = structure.as_dict()
    entry = d.get("entry")
    if entry is not None and not isinstance(entry, dict):
        entry = entry.as_dict()
    state = d.get("state")
    state = None if state is None else str(state.value if isinstance(state, Enum) else state).lower()
    fields: dict[str, Any] = {"entry": entry, "corrections": before + corrections(d), **_run_info(d)}
    if structure is None or energy is None or not math.isfinite(energy):
        reason = f"{what} task document without a finite energy"
        return new_record(item, relaxation, status="failed", reason=reason, **fields)
    n = len(structure["sites"])
    fields |= {"structure": structure, "energy": energy, "energy_per_atom": energy / n}
    if state is None and relaxation.vasp:
        return new_record(item, relaxation, status="failed", reason="VASP task document without a state", **fields)
    if state is not None and "success" not in state:
        reason = f"{what} task state {state} (the relaxation did not converge)"
        return new_record(item, relaxation, status="failed", reason=reason, **fields)
    return new_record(item, relaxation, status="successful", **fields)
