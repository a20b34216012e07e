"""Running campaigns: rounds of the campaign's CSPMaker flow with jobflow ``run_locally``, state in the
results store, so that a re-run does only new work.

A scheduled re-run (cron, a systemd timer) of the same file: a round already finished for every composition,
with the template store unchanged since, is skipped; compositions added to the file since are run alone; a
template store that gained templates from elsewhere re-runs the round's retrieval for all compositions, and
only new candidates are relaxed (relaxations are cached by structure and calculator). Two runs of one
campaign never overlap: the second stops at once with a message naming the lock and its holder. A workdir
belongs to the campaign that first ran in it (``<workdir>/.campaign.json``, name and campaign file): another
campaign pointed at it is refused before anything is written.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cspml_flows.campaign.config import CampaignConfig, CampaignError, make_maker
from cspml_flows.flows.stores import STATE_COLLECTION, close_store, job_store, open_store, write_docs

LOCK_FILE = ".campaign.lock"
OWNER_FILE = ".campaign.json"


def _describe(name: str, source: str | None) -> str:
    return f"campaign {name}" + (f" ({source})" if source else "")


def workdir_owner(workdir: Path) -> tuple[str, str | None] | None:
    """The (name, campaign file) of the campaign a workdir belongs to: its ``.campaign.json``, else the
    ``summary.json`` an earlier version wrote; None for a workdir no campaign has used."""
    from cspml_flows.core.config import excerpt_text

    for name, key in ((OWNER_FILE, "name"), ("summary.json", "campaign")):
        path = workdir / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get(key), str):
            raise CampaignError(
                f"{path} is not a campaign's record: check that workdir {workdir} is the campaign's, then delete it"
            )
        source = doc.get("config") if name == OWNER_FILE else None
        return excerpt_text(doc[key], 100), excerpt_text(source, 300) if isinstance(source, str) else None
    return None


def check_workdir(cfg: CampaignConfig, claim: bool = False) -> Path:
    """CampaignError when the campaign's workdir belongs to another campaign, or cannot be written (a file, a
    broken link, no permission). ``claim``: record this campaign as its owner (``.campaign.json``)."""
    from cspml_flows.core.config import check_output_path
    from cspml_flows.core.safeio import atomic_open

    workdir = cfg.workdir_path()
    check_output_path(workdir, label=f"campaign {cfg.name}'s workdir")
    owner = workdir_owner(workdir)
    source = str(Path(cfg.source).resolve()) if cfg.source else None
    if owner is not None and owner[0] != cfg.name:
        raise CampaignError(
            f"workdir {workdir} belongs to {_describe(*owner)}; {_describe(cfg.name, source)} stops without writing "
            f"anything: give it another 'workdir', or delete {workdir} if {owner[0]}'s results are no longer wanted"
        )
    if claim and (owner is None or (source and owner[1] != source)):
        workdir.mkdir(parents=True, exist_ok=True)
        with atomic_open(workdir / OWNER_FILE) as fh:
            json.dump({"name": cfg.name, "kind": cfg.kind, "config": source}, fh)
    return workdir


@contextmanager
def campaign_lock(cfg: CampaignConfig) -> Iterator[Path]:
    """Hold ``<workdir>/.campaign.lock`` (an exclusive ``flock``, released when the process ends, even if it
    is killed) and claim the workdir for the campaign; CampaignError names the holder when another run has
    it, or the campaign the workdir belongs to."""
    workdir = check_workdir(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            raise CampaignError(
                f"campaign {cfg.name} is already running ({holder}; lock {path}): this run stops, nothing was done"
            ) from None
        check_workdir(cfg, claim=True)  # again under the lock: another campaign may have claimed it meanwhile
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC".encode(),
            0,
        )
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def check_inputs(cfg: CampaignConfig) -> None:
    """Fail early, naming the problem: a missing or empty template store, a missing model."""
    from cspml_flows.core.errors import ModelError
    from cspml_flows.templates.store import TemplateStore

    with TemplateStore.open(cfg.template_store(), create=False) as ts:
        ts.require_nonempty()
    model = cfg.model_path()
    if cfg.kind != "csp":
        from cspml_flows.flows.hetero import load_hetero

        load_hetero(model)  # a missing or incompatible hetero model fails before anything runs
    elif model is not None and not Path(model).is_file():
        raise ModelError(f"similarity model not found: {model} (train one with 'cspml train', or set 'model: null')")


def round_flow(cfg: CampaignConfig, k: int, formulas: list[str] | None = None):
    """The jobflow Flow of round ``k`` (what the local runner, jobflow-remote and FireWorks all execute)."""
    return make_maker(cfg).make(cfg.formulas() if formulas is None else formulas, round=k)


def external_templates(cfg: CampaignConfig) -> str:
    """A token that changes when templates from elsewhere (not this campaign's promotions) are added, removed
    or changed: their count and the sum of their document digests, read from the template index (brought
    up to date with the store's changes; no scan of the store)."""
    from cspml_flows.templates.index import TemplateIndex

    index = TemplateIndex.open(cfg.template_store(), workers=cfg.workers)
    if len(index) == 0:
        return "0|0"
    return index.content_token(index.source != f"campaign:{cfg.name}")


def job_folders(cfg: CampaignConfig) -> dict[str, Any]:
    """``run_locally`` folder arguments: a folder per job under ``<workdir>/jobs`` when a tier runs VASP
    (each VASP job writes its inputs and outputs in its working directory), none otherwise."""
    if not any(r.vasp for r in cfg.relaxations()):
        return {"create_folders": False}
    root = cfg.workdir_path() / "jobs"
    root.mkdir(parents=True, exist_ok=True)
    return {"create_folders": True, "root_dir": root}


def run_campaign(cfg: CampaignConfig, log: Callable[[str], None] = print, report: bool = True) -> dict[str, Any]:
    """Run (or resume, or update) every round locally with ``run_locally``; returns the per-round summaries."""
    check_workdir(cfg)  # a workdir of another campaign, or one that cannot be written, fails before any work
    check_inputs(cfg)
    with campaign_lock(cfg):
        rounds = _run_rounds(cfg, log)
    result = {"campaign": cfg.name, "kind": cfg.kind, "calculators": cfg.calc_ids(), "rounds": rounds}
    result["calculator"] = result["calculators"][0]
    (cfg.workdir_path() / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    if report:
        from cspml_flows.campaign.report import write_report

        result["report"] = str(write_report(cfg, result))
        log(f"report: {result['report']}")
    return result


def _run_rounds(cfg: CampaignConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    state = open_store(cfg.results_store(), STATE_COLLECTION, key="round_id")
    rounds: list[dict[str, Any]] = []
    formulas = cfg.formulas()
    t_ext = time.perf_counter()
    ext = external_templates(cfg)  # this campaign's own promotions do not change it: once per run
    index_s = time.perf_counter() - t_ext  # the template index brought up to date with the store
    try:
        for k in range(1, cfg.rounds + 1):
            rid = f"{cfg.name}:{k}"
            prev = state.query_one({"round_id": rid})
            todo = list(formulas)
            if prev is not None and prev.get("status") == "done":
                covered = set(prev.get("formulas") or formulas)
                if prev.get("templates") == ext and (covered >= set(formulas) or cfg.kind == "inverse"):
                    log(f"round {k}: already finished for every composition, skipped")
                    rounds.append(prev["summary"])
                    continue
                if prev.get("templates") == ext:
                    todo = [f for f in formulas if f not in covered]
                    log(f"round {k}: {len(todo)} composition(s) added since the last run")
                else:
                    log(f"round {k}: the template store changed since the last run: retrieval runs again")
            log(f"round {k}: {len(todo)} compositions, calculator(s) {', '.join(cfg.calc_ids())}")
            t0 = time.perf_counter()
            flow = round_flow(cfg, k, todo)
            store = job_store(cfg.jobs_store())
            from jobflow import run_locally

            with warnings.catch_warnings():  # jobflow enters each job's folder with monty's deprecated cd()
                warnings.filterwarnings("ignore", "cd is deprecated", FutureWarning, "jobflow.managers.local")
                run_locally(flow, store=store, ensure_success=False, log=False, **job_folders(cfg))
            summary = summarize_round(flow, store, k, time.perf_counter() - t0)
            summary["index_update_s"], index_s = index_s, 0.0
            if prev is not None and prev.get("status") == "done" and set(todo) != set(formulas):
                summary = merge_summaries(prev["summary"], summary)
            doc = {"round_id": rid, "status": "done", "summary": summary, "formulas": formulas, "templates": ext}
            write_docs(state, [doc], key="round_id")
            rounds.append(summary)
            log(
                f"round {k}: {summary['n_candidates']} candidates, {summary['n_computed']} relaxed now, "
                f"{summary['n_cached']} cached, {summary['n_failed']} failed, {len(summary['promoted'])} promoted "
                f"({summary['seconds']:.1f} s)"
            )
    finally:
        close_store(state)
    return rounds


def merge_summaries(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A round's summary after a run of added compositions: the new rows, and the old rows of the others."""
    formulas = {c["formula"] for c in new["candidates"]} | set(new["messages"])
    merged = dict(new)
    merged["candidates"] = [c for c in old["candidates"] if c["formula"] not in formulas] + new["candidates"]
    merged["messages"] = {**{f: m for f, m in old["messages"].items() if f not in formulas}, **new["messages"]}
    merged["n_candidates"] = old["n_candidates"] + new["n_candidates"]
    merged["n_cached"] = new["n_cached"]
    merged["n_failed"] = sum(c["status"] == "failed" for c in merged["candidates"])
    merged["promoted"] = sorted(set(old["promoted"]) | set(new["promoted"]))
    return merged


def finished_rounds(cfg: CampaignConfig) -> dict[str, Any]:
    """The summaries of a campaign's finished rounds, read from its results store."""
    state = open_store(cfg.results_store(), STATE_COLLECTION, key="round_id", create=False)
    try:
        docs = [d for d in state.query({"status": "done"}) if str(d["round_id"]).startswith(f"{cfg.name}:")]
    finally:
        close_store(state)
    if not docs:
        raise CampaignError(f"campaign {cfg.name} has no finished round in {cfg.results_store()}")
    rounds = sorted((d["summary"] for d in docs), key=lambda r: r["round"])
    calcs = cfg.calc_ids()
    return {"campaign": cfg.name, "kind": cfg.kind, "calculators": calcs, "calculator": calcs[0], "rounds": rounds}


def _resolve(ref, store) -> Any:
    try:
        return ref.resolve(store, on_missing="error")
    except Exception:
        return None


def summarize_round(flow, store, k: int, seconds: float) -> dict[str, Any]:
    """Read a round's outputs back from the JobStore: one row per candidate (first tier), with the later tiers'
    results per row; a stage that did not finish before the first hull raises CampaignError."""
    from cspml_flows.core.schemas import CandidateSet, PromotionOutput, RelaxOutput, StabilityOutput

    store.connect()
    try:
        cands = _resolve(flow.output["candidates"], store)
        tiers = [{name: _resolve(ref, store) for name, ref in t.items()} for t in flow.output["tiers"]]
        prom = _resolve(flow.output["promotion"], store) if "promotion" in flow.output else None
    finally:
        store.close()
    if cands is None or tiers[0]["stability"] is None or tiers[0]["relaxed"] is None:
        raise CampaignError(f"round {k} did not finish: a stage failed before the stability analysis (see the log)")
    cs = CandidateSet.coerce(cands)
    po = PromotionOutput.coerce(prom) if prom is not None else None
    rows: dict[str, dict[str, Any]] = {}
    tier_rows = []
    for t, tier in enumerate(tiers, 1):
        if tier["stability"] is None or tier["relaxed"] is None:
            tier_rows.append({"tier": t, "finished": False})
            continue
        so, ro = StabilityOutput.coerce(tier["stability"]), RelaxOutput.coerce(tier["relaxed"])
        ehull = {r.key: r for r in so.records}
        for c in so.candidates:
            cid = c.candidate.candidate_id if c.candidate else c.key
            st = ehull.get(c.key)
            result = {
                "tier": t,
                "calculator": c.calculator,
                "key": c.key,
                "status": c.status,
                "reason": c.reason,
                "energy_per_atom": c.energy_per_atom,
                "e_above_hull": st.e_above_hull if st else None,
                "hull_note": st.reason if st else None,
                "n_steps": c.n_steps,
                "corrections": [
                    f"{x.get('handler')}: {', '.join(map(str, x.get('errors') or []))}" for x in c.corrections or []
                ],
            }
            if t == 1:
                cand = c.candidate
                rows[cid] = {
                    "formula": c.formula,
                    "rank": cand.rank if cand else None,
                    "score": cand.score if cand else None,
                    "template_id": c.source_id,
                    **result,
                    "tiers": [],
                }
            elif cid in rows:
                rows[cid]["tiers"].append(result)
        tier_rows.append(
            {
                "tier": t,
                "finished": True,
                "calculator": so.calculator,
                "n_candidates": len(so.candidates),
                "n_computed": ro.n_computed,
                "n_cached": ro.n_cached,
                "n_failed": ro.n_failed,
                "n_references": so.n_references,
            }
        )
    first = tier_rows[0]
    return {
        "round": k,
        "seconds": seconds,
        "n_candidates": len(cs.candidates),
        "messages": cs.messages,
        "n_failed": sum(r["status"] == "failed" for r in rows.values()),
        "n_computed": sum(t.get("n_computed", 0) for t in tier_rows),
        "n_cached": sum(t.get("n_cached", 0) for t in tier_rows),
        "n_references": first["n_references"],
        "candidates": list(rows.values()),
        "tiers": tier_rows,
        "promoted": po.promoted if po else [],
        "calculator": first["calculator"],
    }


def campaign_builder(cfg: CampaignConfig, incremental: bool = True):
    """The campaign's promotion Builder on its stores, with the last tier's calculator; incremental: only
    records updated since the campaign's newest promoted template (False: every record)."""
    from cspml_flows.flows.promotion import promotion_builder

    return promotion_builder(
        cfg.results_store(),
        cfg.template_store(),
        cfg.name,
        cfg.hull_threshold,
        cfg.calc_ids()[-1],
        incremental=incremental,
    )


def promote(cfg: CampaignConfig, log: Callable[[str], None] = print, incremental: bool = True):
    """Run the campaign's promotion Builder (:func:`campaign_builder`) alone, in this process."""
    from cspml_flows.flows.promotion import run_builder

    out = run_builder(campaign_builder(cfg, incremental))
    log(f"{len(out.promoted)} template(s) promoted of {out.n_considered} record(s) considered")
    return out
