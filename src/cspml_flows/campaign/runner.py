"""Running campaigns: rounds of the campaign's CSPMaker flow with jobflow ``run_locally``, state in the
results store, so that a re-run does only new work.

A scheduled re-run (cron, a systemd timer) of the same file: a round already finished for every composition,
with the template store unchanged since, is skipped; compositions added to the file since are run alone; a
template store that gained templates from elsewhere re-runs the round's retrieval for all compositions, and
only new candidates are relaxed (relaxations are cached by structure and calculator). Two runs of one
campaign never overlap, and a workdir belongs to one campaign (:mod:`cspml_flows.campaign.workdir`).
Progress goes to this module's logger.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from jobflow import Flow, run_locally

from cspml_flows.campaign.config import CampaignConfig
from cspml_flows.campaign.maker import make_maker
from cspml_flows.campaign.report import write_report
from cspml_flows.campaign.summary import merge_summaries, summarize_round
from cspml_flows.campaign.workdir import campaign_lock, check_workdir
from cspml_flows.core.errors import ModelError
from cspml_flows.core.schemas import CampaignSummary, PromotionOutput, RoundSummary
from cspml_flows.flows.hetero import load_hetero
from cspml_flows.flows.promotion import PromotionBuilder, promotion_builder, run_builder
from cspml_flows.flows.stores import STATE_COLLECTION, close_store, job_store, open_store, write_docs
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.store import TemplateStore

logger = logging.getLogger(__name__)


def check_inputs(cfg: CampaignConfig) -> None:
    """Fail early, naming the problem: a missing or empty template store, a missing model."""
    with TemplateStore.open(cfg.template_store(), create=False) as ts:
        ts.require_nonempty()
    model = cfg.model_path()
    if cfg.kind != "csp":
        load_hetero(model)  # a missing or incompatible hetero model fails before anything runs
    elif model is not None and not Path(model).is_file():
        raise ModelError(f"similarity model not found: {model} (train one with 'cspml train', or set 'model: null')")


def round_flow(cfg: CampaignConfig, k: int, formulas: list[str] | None = None) -> Flow:
    """The jobflow Flow of round ``k`` (what the local runner, jobflow-remote and FireWorks all execute)."""
    return make_maker(cfg).make(cfg.formulas() if formulas is None else formulas, round_number=k)


def external_templates(cfg: CampaignConfig) -> str:
    """A token that changes when templates from elsewhere (not this campaign's promotions) are added, removed
    or changed: their count and the sum of their document digests, read from the template index (brought
    up to date with the store's changes; no scan of the store)."""
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


def run_campaign(cfg: CampaignConfig, report: bool = True) -> CampaignSummary:
    """Run (or resume, or update) every round locally with ``run_locally``; returns the per-round summaries."""
    check_workdir(cfg)  # a workdir of another campaign, or one that cannot be written, fails before any work
    check_inputs(cfg)
    with campaign_lock(cfg):
        rounds = run_rounds(cfg)
    calcs = cfg.calc_ids()
    result = CampaignSummary(campaign=cfg.name, kind=cfg.kind, calculators=calcs, calculator=calcs[0], rounds=rounds)
    summary = result.model_dump(mode="json", exclude={"report"})
    (cfg.workdir_path() / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if report:
        result.report = str(write_report(cfg, result))
        logger.info("report: %s", result.report)
    return result


def round_todo(k: int, prev: dict | None, formulas: list[str], ext: str, inverse: bool) -> list[str] | None:
    """The compositions round ``k`` runs, given its stored state ``prev``; None: nothing to do."""
    if prev is None or prev.get("status") != "done":
        return list(formulas)
    covered = set(prev.get("formulas") or formulas)
    if prev.get("templates") != ext:
        logger.info("round %d: the template store changed since the last run: retrieval runs again", k)
        return list(formulas)
    if covered >= set(formulas) or inverse:
        logger.info("round %d: already finished for every composition, skipped", k)
        return None
    todo = [f for f in formulas if f not in covered]
    logger.info("round %d: %d composition(s) added since the last run", k, len(todo))
    return todo


def run_round(cfg: CampaignConfig, k: int, todo: list[str]) -> RoundSummary:
    """Run round ``k``'s flow on ``todo`` with ``run_locally`` and read its summary back."""
    logger.info("round %d: %d compositions, calculator(s) %s", k, len(todo), ", ".join(cfg.calc_ids()))
    t0 = time.perf_counter()
    flow = round_flow(cfg, k, todo)
    store = job_store(cfg.jobs_store())
    with warnings.catch_warnings():  # jobflow enters each job's folder with monty's deprecated cd()
        warnings.filterwarnings("ignore", "cd is deprecated", FutureWarning, "jobflow.managers.local")
        run_locally(flow, store=store, ensure_success=False, log=False, **job_folders(cfg))
    return summarize_round(flow, store, k, time.perf_counter() - t0)


def run_rounds(cfg: CampaignConfig) -> list[RoundSummary]:
    """Every round of the campaign, each skipped, run for added compositions, or run again."""
    state = open_store(cfg.results_store(), STATE_COLLECTION, key="round_id")
    rounds: list[RoundSummary] = []
    formulas = cfg.formulas()
    t_ext = time.perf_counter()
    ext = external_templates(cfg)  # this campaign's own promotions do not change it: once per run
    index_s = time.perf_counter() - t_ext  # the template index brought up to date with the store
    try:
        for k in range(1, cfg.rounds + 1):
            rid = f"{cfg.name}:{k}"
            prev = state.query_one({"round_id": rid})
            todo = round_todo(k, prev, formulas, ext, cfg.kind == "inverse")
            if todo is None:
                rounds.append(RoundSummary.model_validate(prev["summary"]))
                continue
            summary = run_round(cfg, k, todo)
            summary.index_update_s, index_s = index_s, 0.0
            if prev is not None and prev.get("status") == "done" and set(todo) != set(formulas):
                summary = merge_summaries(RoundSummary.model_validate(prev["summary"]), summary)
            doc = {"round_id": rid, "status": "done", "summary": summary.model_dump(mode="json")}
            write_docs(state, [doc | {"formulas": formulas, "templates": ext}], key="round_id")
            rounds.append(summary)
            logger.info(
                "round %d: %d candidates, %d relaxed now, %d cached, %d failed, %d promoted (%.1f s)",
                k,
                summary.n_candidates,
                summary.n_computed,
                summary.n_cached,
                summary.n_failed,
                len(summary.promoted),
                summary.seconds,
            )
    finally:
        close_store(state)
    return rounds


def campaign_builder(cfg: CampaignConfig, incremental: bool = True) -> PromotionBuilder:
    """The campaign's promotion Builder on its stores, with the last tier's calculator; incremental: only
    records updated since the campaign's newest promoted template (False: every record)."""
    return promotion_builder(
        cfg.results_store(),
        cfg.template_store(),
        cfg.name,
        cfg.hull_threshold,
        cfg.calc_ids()[-1],
        incremental=incremental,
    )


def promote(cfg: CampaignConfig, incremental: bool = True) -> PromotionOutput:
    """Run the campaign's promotion Builder (:func:`campaign_builder`) alone, in this process."""
    out = run_builder(campaign_builder(cfg, incremental))
    logger.info("%d template(s) promoted of %d record(s) considered", len(out.promoted), out.n_considered)
    return out
