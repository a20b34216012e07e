"""Stability stage: competing phases relaxed with the same calculator (cached), then e_above_hull per
chemical system; and the selection of candidates close to a tier's hull for the next calculator tier."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from jobflow import Flow, Maker, Response, job

from cspml_flows.core.schemas import CandidateDoc, CandidateSet, RelaxOutput, StabilityOutput
from cspml_flows.flows.relax import RelaxationMaker
from cspml_flows.flows.stability import competing_phases, hull_analysis
from cspml_flows.flows.stores import RESULTS_COLLECTION, close_store, open_store, write_docs


@dataclass
class StabilityMaker(Maker):
    """Relax the competing phases of every candidate's chemical system and build the hulls.

    Parameters
    ----------
    name
        Job name.
    relaxation
        Relaxes the competing phases; :class:`~cspml_flows.flows.makers.CSPMaker` sets it to the tier's
        relaxation, so candidates and references always share one calculator.
    max_references
        Store templates relaxed per chemical subsystem (lowest stored e_above_hull first).
    tier
        Calculator tier this hull belongs to (1: the first calculator).
    """

    name: str = "stability"
    relaxation: RelaxationMaker = field(default_factory=RelaxationMaker)
    max_references: int = 40
    tier: int = 1

    @job
    def make(self, relaxed: RelaxOutput, template_store: str, results_store: str, round_number: int = 1) -> Response:
        """Competing phases relaxed (once; cached), then the hull job."""
        ro = RelaxOutput.coerce(relaxed)
        systems = sorted({r.chemsys for r in ro.records if r.status == "successful" and r.kind == "candidate"})
        refs = competing_phases(str(template_store), systems, max_per_system=self.max_references)
        sub = self.relaxation.relax_flow(refs, str(results_store), "relax competing phases")
        hull = hull_job(ro, sub.output, self.relaxation, str(results_store), round_number, self.tier)
        return Response(replace=Flow([sub, hull], output=hull.output, name=self.name))


@job
def hull_job(
    relaxed: RelaxOutput,
    references: RelaxOutput,
    relaxation: RelaxationMaker,
    results_store: str,
    round_number: int = 1,
    tier: int = 1,
) -> StabilityOutput:
    """e_above_hull of each candidate against candidates and references of the same calculator; the value is
    also written onto the candidate's record in the results store (``last_updated`` refreshed)."""
    ro, refs = RelaxOutput.coerce(relaxed), RelaxOutput.coerce(references)
    cands = [r for r in ro.records if r.kind == "candidate"]
    records, systems = hull_analysis(cands, refs.records, vasp=relaxation.vasp)
    by_key = {r.key: r for r in records}
    updates = []
    for c in cands:
        st = by_key.get(c.key)
        if st is not None and st.e_above_hull is not None:
            c.e_above_hull = st.e_above_hull
            c.last_updated = datetime.now(UTC)
            updates.append(c.model_dump(mode="json"))
    if updates:
        store = open_store(results_store, RESULTS_COLLECTION)
        try:
            write_docs(store, updates)
        finally:
            close_store(store)
    return StabilityOutput(
        calculator=relaxation.calc_id,
        records=records,
        candidates=cands,
        n_references=sum(r.status == "successful" for r in refs.records),
        chemsys_references=systems,
        round=round_number,
        tier=tier,
    )


@job(output_schema=CandidateSet)
def near_hull(stability: StabilityOutput, window: float) -> CandidateSet:
    """The candidates of a tier within ``window`` eV/atom of its hull, as input of the next tier, each
    starting from the structure this tier relaxed (fewer steps for the costlier calculator)."""
    so = StabilityOutput.coerce(stability)
    ehull = {r.key: r.e_above_hull for r in so.records}
    kept: list[CandidateDoc] = []
    for c in so.candidates:
        e = ehull.get(c.key)
        if c.status == "successful" and c.candidate is not None and c.structure and e is not None and e <= window:
            kept.append(c.candidate.model_copy(update={"structure": c.structure}))
    return CandidateSet(candidates=kept, n_removed=len(so.candidates) - len(kept), round=so.round)
