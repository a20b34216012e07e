"""Typed outputs of the validation-flow jobs (pydantic, as atomate2's task documents)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator


class _Doc(BaseModel):
    """Base: tolerate the ``@module``/``@class`` keys monty adds when a job output is stored."""

    model_config = {"extra": "ignore"}

    @model_validator(mode="before")
    @classmethod
    def _undecode(cls, data: Any) -> Any:
        """Turn pymatgen objects (decoded by jobflow when it resolves references) back into dicts."""
        if isinstance(data, dict):
            return {
                k: v.as_dict() if hasattr(v, "as_dict") and not isinstance(v, BaseModel) else v for k, v in data.items()
            }
        return data

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """``value`` as this model (it may arrive as the model itself or as a stored dict)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, BaseModel):
            value = value.model_dump()
        return cls.model_validate(value)


class TemplateHit(_Doc):
    """One retrieved (template, element assignment) pair for a query composition."""

    template_id: str
    perm: list[int] = Field(description="query role filling each template role")
    score: float
    cluster: int
    alternates: list[str] = Field(default_factory=list, description="equivalent templates of the same cluster")


class QueryHits(_Doc):
    formula: str
    anonymous_formula: str
    smact_valid: bool
    hits: list[TemplateHit] = Field(default_factory=list)
    message: str | None = None


class RetrievalOutput(_Doc):
    """Output of template retrieval: ranked hits per composition."""

    queries: list[QueryHits]
    n_templates: int
    round: int = 1


class CandidateDoc(_Doc):
    """One unrelaxed candidate structure."""

    candidate_id: str = Field(description="structure fingerprint")
    formula: str
    chemsys: str
    rank: int
    score: float
    template_id: str
    template_formula: str
    prototype: str | None = None
    assignment: dict[str, str] = Field(default_factory=dict)
    min_distance: float
    structure: dict[str, Any]
    round: int = 1


class CandidateSet(_Doc):
    """Output of substitution and of deduplication."""

    candidates: list[CandidateDoc]
    messages: dict[str, str] = Field(default_factory=dict, description="formula -> why it has no candidate")
    n_removed: int = 0
    round: int = 1


class RelaxRecord(_Doc):
    """One relaxation, keyed by (structure fingerprint, calculator, settings); also stored in the results store."""

    key: str
    fingerprint: str
    calculator: str = Field(description="calculator id: name/settings hash")
    kind: Literal["candidate", "reference"] = "candidate"
    status: Literal["successful", "failed"]
    reason: str | None = None
    formula: str
    chemsys: str
    nsites: int
    energy: float | None = Field(None, description="final total energy (eV)")
    energy_per_atom: float | None = None
    n_steps: int | None = None
    converged: bool | None = None
    elapsed_s: float | None = None
    initial_structure: dict[str, Any]
    structure: dict[str, Any] | None = Field(None, description="relaxed structure")
    entry: dict[str, Any] | None = Field(None, description="ComputedEntry (VASP: with run parameters for MP2020)")
    source_id: str | None = Field(None, description="template id (candidate) or material id (reference)")
    candidate: CandidateDoc | None = None
    round: int | None = None
    e_above_hull: float | None = Field(None, description="latest hull analysis of this record (eV/atom)")
    worker: str | None = Field(None, description="host:pid of the process that computed it")
    corrections: list[dict[str, Any]] = Field(
        default_factory=list, description="custodian's corrections of the run (VASP): handler, errors, actions"
    )
    last_updated: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="when computed or last placed on a hull (UTC)"
    )


class RelaxOutput(_Doc):
    """Output of a relaxation stage: every record, in input order."""

    records: list[RelaxRecord]
    n_cached: int = 0
    n_computed: int = 0
    n_failed: int = 0


class StabilityRecord(_Doc):
    key: str
    formula: str
    chemsys: str
    energy_per_atom: float | None = None
    corrected_energy_per_atom: float | None = None
    formation_energy_per_atom: float | None = None
    e_above_hull: float | None = None
    decomposition: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None


class StabilityOutput(_Doc):
    """Output of the stability stage: e_above_hull per candidate, hull data per chemical system."""

    calculator: str
    records: list[StabilityRecord]
    candidates: list[RelaxRecord]
    n_references: int
    chemsys_references: dict[str, list[str]] = Field(default_factory=dict)
    round: int = 1
    tier: int = Field(1, description="calculator tier (1: first calculator)")


class PromotionOutput(_Doc):
    promoted: list[str] = Field(default_factory=list, description="material ids written to the template store")
    n_considered: int = 0
    threshold: float
    round: int = 1
