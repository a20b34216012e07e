"""jobflow Makers, one per stage (as in atomate2), and :class:`CSPMaker` composing them into one Flow."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobflow import Flow, Job, Maker

from cspml_flows.flows import jobs
from cspml_flows.flows.calculators import CalculatorSettings


@dataclass
class TemplateRetrievalMaker(Maker):
    """Rank templates for compositions with the learned similarity (nearest-descriptor without a model)."""

    name: str = "retrieve templates"
    top: int = 5
    strict: bool = False
    workers: int = 1

    def make(
        self,
        compositions: list[str],
        template_store: str,
        model: str | None = None,
        round: int = 1,
        campaign: str | None = None,
    ) -> Job:
        j = jobs.retrieve_templates(
            list(compositions),
            str(template_store),
            model and str(model),
            self.top,
            self.strict,
            round,
            campaign,
            self.workers,
        )
        j.name = self.name
        return j


@dataclass
class SubstitutionMaker(Maker):
    """Element substitution onto retrieved templates."""

    name: str = "substitute elements"

    def make(self, retrieval, template_store: str) -> Job:
        j = jobs.substitute_elements(retrieval, str(template_store))
        j.name = self.name
        return j


@dataclass
class DedupMaker(Maker):
    """Symmetry deduplication (StructureMatcher) keeping ``top`` candidates per composition."""

    name: str = "deduplicate"
    top: int = 5

    def make(self, candidates) -> Job:
        j = jobs.deduplicate_candidates(candidates, self.top)
        j.name = self.name
        return j


@dataclass
class RelaxationMaker(Maker):
    """Relax candidates with the configured calculator; fans out into batch jobs at run time."""

    name: str = "relax"
    calculator: CalculatorSettings = field(default_factory=CalculatorSettings)

    def make(self, candidates, results_store: str) -> Job:
        j = jobs.relax_candidates(candidates, self.calculator.model_dump(), str(results_store))
        j.name = self.name
        return j


@dataclass
class StabilityMaker(Maker):
    """Competing phases relaxed with the same calculator (cached), then e_above_hull per chemical system."""

    name: str = "stability"
    calculator: CalculatorSettings = field(default_factory=CalculatorSettings)
    max_references: int = 40

    def make(self, relaxed, template_store: str, results_store: str, round: int = 1) -> Job:
        j = jobs.stability_stage(
            relaxed, str(template_store), self.calculator.model_dump(), str(results_store), self.max_references, round
        )
        j.name = self.name
        return j


@dataclass
class TemplateUpdateMaker(Maker):
    """Promote candidates with e_above_hull <= ``threshold`` (eV/atom) into the template store."""

    name: str = "update templates"
    threshold: float = 0.1
    campaign: str = "campaign"

    def make(self, stability, template_store: str, round: int = 1) -> Job:
        j = jobs.promote_candidates(stability, str(template_store), self.threshold, round, self.campaign)
        j.name = self.name
        return j


@dataclass
class CSPMaker(Maker):
    """One round of crystal structure prediction and validation as a single jobflow Flow:

    retrieve -> substitute -> deduplicate -> relax -> stability -> update templates.
    """

    name: str = "cspml"
    template_store: str = ""
    results_store: str = ""
    model: str | None = None
    top: int = 5
    strict: bool = False
    calculator: CalculatorSettings = field(default_factory=CalculatorSettings)
    hull_threshold: float = 0.1
    max_references: int = 40
    campaign: str = "campaign"
    promote: bool = True
    workers: int = 1

    def make(self, compositions: list[str], round: int = 1) -> Flow:
        retrieve = TemplateRetrievalMaker(top=self.top, strict=self.strict, workers=self.workers).make(
            compositions, self.template_store, self.model, round, self.campaign
        )
        stages, output = realize_and_validate(
            retrieve, self.top, self.calculator, self.template_store, self.results_store, self.max_references, round
        )
        if self.promote:
            update = TemplateUpdateMaker(threshold=self.hull_threshold, campaign=self.campaign).make(
                output["stability"], self.template_store, round
            )
            stages.append(update)
            output["promotion"] = update.output
        return Flow(stages, output=output, name=f"{self.name} round {round}")


def validate_candidates(
    candidates, calculator: CalculatorSettings, template_store: str, results_store: str, max_references: int, round: int
) -> tuple[list[Job], dict]:
    """The relaxation and stability stages for a candidate set: jobs, and outputs ``relaxed``/``stability``."""
    relax = RelaxationMaker(calculator=calculator).make(candidates, results_store)
    stability = StabilityMaker(calculator=calculator, max_references=max_references).make(
        relax.output, template_store, results_store, round
    )
    return [relax, stability], {"relaxed": relax.output, "stability": stability.output}


def realize_and_validate(
    retrieve: Job,
    top: int,
    calculator: CalculatorSettings,
    template_store: str,
    results_store: str,
    max_references: int,
    round: int,
) -> tuple[list[Job], dict]:
    """A retrieval job followed by substitution, deduplication (``top`` per composition), relaxation and
    stability: the jobs in order, and outputs ``retrieval``/``candidates``/``relaxed``/``stability``."""
    substitute = SubstitutionMaker().make(retrieve.output, template_store)
    dedup = DedupMaker(top=top).make(substitute.output)
    stages, output = validate_candidates(dedup.output, calculator, template_store, results_store, max_references, round)
    return [retrieve, substitute, dedup, *stages], {"retrieval": retrieve.output, "candidates": dedup.output, **output}
