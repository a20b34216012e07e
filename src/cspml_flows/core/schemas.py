"""Typed documents of the validation flows (pydantic, in emmet's style): job outputs and store records.

Structures are pymatgen ``Structure`` fields: validated from a structure dict or a ``Structure``, written as
the structure dict (``as_dict``) by ``model_dump``, so stored documents and job outputs stay plain JSON.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, Field, PlainSerializer, SerializerFunctionWrapHandler, model_serializer, model_validator
from pymatgen.core import Structure

#: A pymatgen Structure field: validated from its dict or itself, dumped as its dict.
StructureType = Annotated[Structure, PlainSerializer(lambda s: s.as_dict(), return_type=dict)]


class Document(BaseModel):
    """Base of the documents: tolerates the ``@module``/``@class`` keys monty adds when a job output is
    stored, and pymatgen objects that jobflow decodes when it resolves references."""

    model_config = {"extra": "ignore"}

    @model_validator(mode="before")
    @classmethod
    def undecode(cls, data: Any) -> Any:
        """Turn pymatgen objects other than structures (decoded by jobflow) back into dicts."""
        if isinstance(data, dict):
            return {
                k: v.as_dict() if hasattr(v, "as_dict") and not isinstance(v, BaseModel | Structure) else v
                for k, v in data.items()
            }
        return data

    @classmethod
    def coerce(cls, value: Any) -> Self:
        """``value`` as this model (it may arrive as the model itself or as a stored dict)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, BaseModel):
            value = value.model_dump()
        return cls.model_validate(value)


class TemplateHit(Document):
    """One retrieved (template, element assignment) pair for a query composition."""

    template_id: str = Field(description="material id of the template")
    perm: list[int] = Field(description="query role filling each template role")
    score: float = Field(description="retrieval score (higher ranks first)")
    cluster: int = Field(description="prototype cluster of the template in the index")
    alternates: list[str] = Field(default_factory=list, description="equivalent templates of the same cluster")


class QueryResult(Document):
    """What every answer for one query composition states: the query, and why it has no result, if none.

    The base of :class:`QueryHits` (retrieved pairs) and of ``cspml_flows.predict.predictor.Prediction``
    (structures).
    """

    formula: str = Field(description="reduced formula of the query")
    anonymous_formula: str = Field(description="anonymous formula of the query (its roles)")
    smact_valid: bool = Field(description="whether SMACT finds the composition charge-balanced")
    message: str | None = Field(None, description="why the query has no result, if it has none")


class QueryHits(QueryResult):
    """The ranked hits of one query composition."""

    hits: list[TemplateHit] = Field(default_factory=list, description="retrieved pairs, best first")


class RetrievalOutput(Document):
    """Output of template retrieval: ranked hits per composition."""

    queries: list[QueryHits] = Field(description="one entry per query composition, in input order")
    n_templates: int = Field(description="templates in the index retrieved from")
    round: int = Field(1, description="campaign round")
    element_volumes: dict[str, float] | None = Field(
        None,
        description="volume per atom of each element that substitution rescales cells with (the similarity "
        "model's, learned from its pool; None: the pure elements')",
    )


class CandidateDoc(Document):
    """One unrelaxed candidate structure."""

    candidate_id: str = Field(description="structure fingerprint")
    formula: str = Field(description="reduced formula")
    chemsys: str = Field(description="chemical system, elements joined by '-'")
    rank: int = Field(description="rank among the candidates of its formula (1: best)")
    score: float = Field(description="retrieval score of its (template, assignment) pair")
    template_id: str = Field(description="material id of the template (user:<name> for a user structure)")
    template_formula: str = Field(description="reduced formula of the template")
    prototype: str | None = Field(None, description="prototype label of the template")
    assignment: dict[str, str] = Field(default_factory=dict, description="template element -> query element")
    min_distance: float = Field(description="shortest interatomic distance after substitution (A)")
    structure: StructureType = Field(description="the candidate structure")
    round: int = Field(1, description="campaign round")


class CandidateSet(Document):
    """Output of substitution and of deduplication."""

    candidates: list[CandidateDoc] = Field(description="candidates, grouped by formula in rank order")
    messages: dict[str, str] = Field(default_factory=dict, description="formula -> why it has no candidate")
    n_removed: int = Field(0, description="candidates removed (duplicates, or outside a hull window)")
    round: int = Field(1, description="campaign round")


class RelaxRecord(Document):
    """One relaxation, keyed by (structure fingerprint, calculator, settings); also stored in the results store."""

    key: str = Field(description="cache key: fingerprint and calculator id")
    fingerprint: str = Field(description="fingerprint of the initial structure")
    calculator: str = Field(description="calculator id: name/settings hash")
    kind: Literal["candidate", "reference"] = Field("candidate", description="candidate or competing phase")
    status: Literal["successful", "failed"] = Field(description="whether the relaxation gave a usable energy")
    reason: str | None = Field(None, description="why it failed")
    formula: str = Field(description="reduced formula")
    chemsys: str = Field(description="chemical system, elements joined by '-'")
    nsites: int = Field(description="sites in the cell")
    energy: float | None = Field(None, description="final total energy (eV)")
    energy_per_atom: float | None = Field(None, description="final energy per atom (eV/atom)")
    n_steps: int | None = Field(None, description="ionic steps taken")
    converged: bool | None = Field(None, description="whether the forces converged (ASE calculators)")
    elapsed_s: float | None = Field(None, description="wall time of the relaxation (s)")
    initial_structure: StructureType = Field(description="structure before relaxation")
    structure: StructureType | None = Field(None, description="relaxed structure")
    entry: dict[str, Any] | None = Field(None, description="ComputedEntry (VASP: with run parameters for MP2020)")
    source_id: str | None = Field(None, description="template id (candidate) or material id (reference)")
    candidate: CandidateDoc | None = Field(None, description="the candidate document relaxed (candidates only)")
    round: int | None = Field(None, description="campaign round of the candidate")
    e_above_hull: float | None = Field(None, description="latest hull analysis of this record (eV/atom)")
    worker: str | None = Field(None, description="host:pid of the process that computed it")
    corrections: list[dict[str, Any]] = Field(
        default_factory=list, description="custodian's corrections of the run (VASP): handler, errors, actions"
    )
    last_updated: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="when computed or last placed on a hull (UTC)"
    )


class RelaxOutput(Document):
    """Output of a relaxation stage: every record, in input order."""

    records: list[RelaxRecord] = Field(description="one record per input structure, in input order")
    n_cached: int = Field(0, description="records found in the results store")
    n_computed: int = Field(0, description="records computed by this stage")
    n_failed: int = Field(0, description="failed records")


class StabilityRecord(Document):
    """The hull analysis of one candidate."""

    key: str = Field(description="relaxation key of the candidate")
    formula: str = Field(description="reduced formula")
    chemsys: str = Field(description="chemical system, elements joined by '-'")
    energy_per_atom: float | None = Field(None, description="relaxed energy per atom (eV/atom)")
    corrected_energy_per_atom: float | None = Field(None, description="energy per atom on the hull (eV/atom)")
    formation_energy_per_atom: float | None = Field(None, description="formation energy per atom (eV/atom)")
    e_above_hull: float | None = Field(None, description="energy above the hull (eV/atom)")
    decomposition: dict[str, float] = Field(default_factory=dict, description="hull phases -> amount")
    reason: str | None = Field(None, description="why no e_above_hull could be computed")


class StabilityOutput(Document):
    """Output of the stability stage: e_above_hull per candidate, hull data per chemical system."""

    calculator: str = Field(description="calculator id of every energy on these hulls")
    records: list[StabilityRecord] = Field(description="one hull analysis per candidate, in input order")
    candidates: list[RelaxRecord] = Field(description="the candidates' relaxation records")
    n_references: int = Field(description="competing phases relaxed successfully")
    chemsys_references: dict[str, list[str]] = Field(
        default_factory=dict, description="chemical system -> relaxation keys of its competing phases"
    )
    round: int = Field(1, description="campaign round")
    tier: int = Field(1, description="calculator tier (1: first calculator)")


class PromotionOutput(Document):
    """Output of template promotion."""

    promoted: list[str] = Field(default_factory=list, description="material ids written to the template store")
    n_considered: int = Field(0, description="relaxation records considered")
    threshold: float = Field(description="e_above_hull threshold of promotion (eV/atom)")
    round: int = Field(1, description="campaign round")


class IndexChunkReport(Document):
    """Output of one chunk job of a chunked index build (the fields of ``templates.chunked_build.ChunkResult``)."""

    segments: list[str] = Field(default_factory=list, description="segments written, inside the staging folder")
    skipped: list[str] = Field(default_factory=list, description="ids of the templates left out of the index")


class IndexBuildReport(Document):
    """What an index build did (the fields of ``templates.index.IndexReport``)."""

    action: str = Field(description="'up to date', 'updated', 'built' or 'rebuilt'")
    templates: int = Field(0, description="templates in the index")
    clusters: int = Field(0, description="prototype clusters in the index")
    added: int = Field(0, description="templates added")
    removed: int = Field(0, description="templates removed")
    left_out: int = Field(0, description="templates left out of the index")
    segments: int = Field(0, description="index segments")
    fits: int = Field(0, description="prototype fits (structure comparisons) made")
    seconds: float = Field(0.0, description="wall time (s)")


class TierResult(Document):
    """A candidate's relaxation and hull result on one calculator tier (campaign summary)."""

    tier: int = Field(description="calculator tier (1: first calculator)")
    calculator: str = Field(description="calculator id")
    key: str = Field(description="relaxation key")
    status: str = Field(description="relaxation status: successful or failed")
    reason: str | None = Field(None, description="why the relaxation failed")
    energy_per_atom: float | None = Field(None, description="relaxed energy per atom (eV/atom)")
    e_above_hull: float | None = Field(None, description="energy above the tier's hull (eV/atom)")
    hull_note: str | None = Field(None, description="why no e_above_hull could be computed")
    n_steps: int | None = Field(None, description="ionic steps taken")
    corrections: list[str] = Field(default_factory=list, description="custodian's corrections: 'handler: errors'")


class CandidateRow(TierResult):
    """One candidate of a round summary: its first-tier result and its results on the later tiers."""

    formula: str = Field(description="reduced formula")
    rank: int | None = Field(None, description="rank among the candidates of its formula")
    score: float | None = Field(None, description="retrieval score")
    template_id: str | None = Field(None, description="template the candidate was made from")
    tiers: list[TierResult] = Field(default_factory=list, description="results on the later calculator tiers")


class TierSummary(Document):
    """Counts of one calculator tier in a round (only ``tier`` and ``finished`` for a tier that did not finish)."""

    tier: int = Field(description="calculator tier (1: first calculator)")
    finished: bool = Field(description="whether the tier's hull was built")
    calculator: str | None = Field(None, description="calculator id")
    n_candidates: int | None = Field(None, description="candidates the tier relaxed")
    n_computed: int | None = Field(None, description="relaxations computed in this run")
    n_cached: int | None = Field(None, description="relaxations found in the results store")
    n_failed: int | None = Field(None, description="failed relaxations")
    n_references: int | None = Field(None, description="competing phases relaxed successfully")

    @model_serializer(mode="wrap")
    def drop_counts(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A tier that did not finish is written as its number and ``finished: false`` only."""
        data = handler(self)
        return data if self.finished else {"tier": self.tier, "finished": False}


class RoundSummary(Document):
    """What one campaign round did (stored as the round's state, written to ``summary.json``)."""

    round: int = Field(description="campaign round")
    seconds: float = Field(description="wall time of the round's flow (s)")
    n_candidates: int = Field(description="distinct candidates after deduplication")
    messages: dict[str, str] = Field(default_factory=dict, description="formula -> why it has no candidate")
    n_failed: int = Field(0, description="candidates whose first-tier relaxation failed")
    n_computed: int = Field(0, description="relaxations computed in this run, all tiers")
    n_cached: int = Field(0, description="relaxations found in the results store, all tiers")
    n_references: int = Field(0, description="competing phases relaxed successfully (first tier)")
    candidates: list[CandidateRow] = Field(default_factory=list, description="one row per candidate")
    tiers: list[TierSummary] = Field(default_factory=list, description="counts per calculator tier")
    promoted: list[str] = Field(default_factory=list, description="template ids promoted")
    calculator: str | None = Field(None, description="calculator id of the first tier")
    index_update_s: float = Field(0.0, description="time spent bringing the template index up to date (s)")


class CampaignSummary(Document):
    """The rounds of a campaign (``summary.json`` holds every field but ``report``)."""

    campaign: str = Field(description="campaign name")
    kind: str = Field(description="campaign kind: csp, metastable or inverse")
    calculators: list[str] = Field(description="calculator id of every tier, first to last")
    calculator: str = Field(description="calculator id of the first tier")
    rounds: list[RoundSummary] = Field(description="round summaries, first to last")
    report: str | None = Field(None, description="path of the Markdown report, when one was written")
