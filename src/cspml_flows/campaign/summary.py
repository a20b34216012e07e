"""Round summaries of a campaign: read back from the JobStore after a round's flow, merged after a run of
added compositions, and read from the results store for a report."""

from __future__ import annotations

import logging
from typing import Any

from jobflow import Flow, JobStore
from jobflow.core.reference import OutputReference

from cspml_flows.campaign.config import CampaignConfig, CampaignError
from cspml_flows.core.schemas import (
    CampaignSummary,
    CandidateRow,
    CandidateSet,
    PromotionOutput,
    RelaxOutput,
    RoundSummary,
    StabilityOutput,
    TierResult,
    TierSummary,
)
from cspml_flows.flows.stores import STATE_COLLECTION, close_store, open_store

logger = logging.getLogger(__name__)


def resolve_output(ref: OutputReference, store: JobStore) -> Any:
    """The output a reference points to; None when its job did not finish (no output in the store)."""
    try:
        return ref.resolve(store, on_missing="error")
    except (ValueError, KeyError, AttributeError, IndexError):  # the job failed or never ran: no output
        logger.debug("no output for %s", ref, exc_info=True)
        return None


def tier_results(t: int, stability: StabilityOutput) -> dict[str, TierResult]:
    """Each candidate's result on tier ``t``, by candidate id (the relaxation key for a record without one)."""
    ehull = {r.key: r for r in stability.records}
    out = {}
    for c in stability.candidates:
        st = ehull.get(c.key)
        cid = c.candidate.candidate_id if c.candidate else c.key
        out[cid] = TierResult(
            tier=t,
            calculator=c.calculator,
            key=c.key,
            status=c.status,
            reason=c.reason,
            energy_per_atom=c.energy_per_atom,
            e_above_hull=st.e_above_hull if st else None,
            hull_note=st.reason if st else None,
            n_steps=c.n_steps,
            corrections=[
                f"{x.get('handler')}: {', '.join(map(str, x.get('errors') or []))}" for x in c.corrections or []
            ],
        )
    return out


def candidate_rows(stability: StabilityOutput) -> dict[str, CandidateRow]:
    """The first tier's rows, by candidate id: each candidate with its first-tier result."""
    results = tier_results(1, stability)
    rows = {}
    for c in stability.candidates:
        cand = c.candidate
        cid = cand.candidate_id if cand else c.key
        rows[cid] = CandidateRow(
            formula=c.formula,
            rank=cand.rank if cand else None,
            score=cand.score if cand else None,
            template_id=c.source_id,
            **results[cid].model_dump(),
        )
    return rows


def tier_summary(t: int, stability: StabilityOutput, relaxed: RelaxOutput) -> TierSummary:
    """The counts of one finished tier."""
    return TierSummary(
        tier=t,
        finished=True,
        calculator=stability.calculator,
        n_candidates=len(stability.candidates),
        n_computed=relaxed.n_computed,
        n_cached=relaxed.n_cached,
        n_failed=relaxed.n_failed,
        n_references=stability.n_references,
    )


def summarize_round(flow: Flow, store: JobStore, k: int, seconds: float) -> RoundSummary:
    """Read a round's outputs back from the JobStore: one row per candidate (first tier), with the later tiers'
    results per row; a stage that did not finish before the first hull raises CampaignError."""
    store.connect()
    try:
        cands = resolve_output(flow.output["candidates"], store)
        tiers = [{name: resolve_output(ref, store) for name, ref in t.items()} for t in flow.output["tiers"]]
        prom = resolve_output(flow.output["promotion"], store) if "promotion" in flow.output else None
    finally:
        store.close()
    if cands is None or tiers[0]["stability"] is None or tiers[0]["relaxed"] is None:
        raise CampaignError(f"round {k} did not finish: a stage failed before the stability analysis (see the log)")
    rows: dict[str, CandidateRow] = {}
    tier_rows = []
    for t, tier in enumerate(tiers, 1):
        if tier["stability"] is None or tier["relaxed"] is None:
            tier_rows.append(TierSummary(tier=t, finished=False))
            continue
        so, ro = StabilityOutput.coerce(tier["stability"]), RelaxOutput.coerce(tier["relaxed"])
        if t == 1:
            rows = candidate_rows(so)
        else:
            for cid, result in tier_results(t, so).items():
                if cid in rows:
                    rows[cid].tiers.append(result)
        tier_rows.append(tier_summary(t, so, ro))
    cs = CandidateSet.coerce(cands)
    first = tier_rows[0]
    return RoundSummary(
        round=k,
        seconds=seconds,
        n_candidates=len(cs.candidates),
        messages=cs.messages,
        n_failed=sum(r.status == "failed" for r in rows.values()),
        n_computed=sum(t.n_computed or 0 for t in tier_rows),
        n_cached=sum(t.n_cached or 0 for t in tier_rows),
        n_references=first.n_references,
        candidates=list(rows.values()),
        tiers=tier_rows,
        promoted=PromotionOutput.coerce(prom).promoted if prom is not None else [],
        calculator=first.calculator,
    )


def merge_summaries(old: RoundSummary, new: RoundSummary) -> RoundSummary:
    """A round's summary after a run of added compositions: the new rows, and the old rows of the others."""
    formulas = {c.formula for c in new.candidates} | set(new.messages)
    candidates = [c for c in old.candidates if c.formula not in formulas] + new.candidates
    return new.model_copy(
        update={
            "candidates": candidates,
            "messages": {**{f: m for f, m in old.messages.items() if f not in formulas}, **new.messages},
            "n_candidates": old.n_candidates + new.n_candidates,
            "n_failed": sum(c.status == "failed" for c in candidates),
            "promoted": sorted(set(old.promoted) | set(new.promoted)),
        }
    )


def finished_rounds(cfg: CampaignConfig) -> CampaignSummary:
    """The summaries of a campaign's finished rounds, read from its results store."""
    state = open_store(cfg.results_store(), STATE_COLLECTION, key="round_id", create=False)
    try:
        docs = [d for d in state.query({"status": "done"}) if str(d["round_id"]).startswith(f"{cfg.name}:")]
    finally:
        close_store(state)
    if not docs:
        raise CampaignError(f"campaign {cfg.name} has no finished round in {cfg.results_store()}")
    rounds = sorted((RoundSummary.model_validate(d["summary"]) for d in docs), key=lambda r: r.round)
    calcs = cfg.calc_ids()
    return CampaignSummary(campaign=cfg.name, kind=cfg.kind, calculators=calcs, calculator=calcs[0], rounds=rounds)
