""":class:`CSPMaker`: one round of crystal structure prediction and validation as a jobflow Flow.

retrieve -> substitute -> deduplicate -> [relax -> hull] per calculator tier -> promote templates.

Each stage is a Maker whose ``make`` is the job (as atomate2's), held as a field, so
``Flow.update_maker_kwargs`` reaches every stage and the atomate2 relax Makers inside them. The metastable
(hetero) and inverse flows are this Maker with another retrieval Maker (:mod:`cspml_flows.flows.hetero`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from jobflow import Flow, Maker

from cspml_flows.flows.candidates import DedupMaker, SubstitutionMaker
from cspml_flows.flows.chunked import ChunkedRetrievalMaker
from cspml_flows.flows.hull import StabilityMaker, near_hull
from cspml_flows.flows.promotion import TemplateUpdateMaker
from cspml_flows.flows.relax import RelaxationMaker, as_relaxation
from cspml_flows.flows.retrieval import RetrievalMaker, TemplateRetrievalMaker

DEFAULT_HULL_WINDOW = 0.1  # eV/atom: candidates this close to a tier's hull go to the next tier


@dataclass
class CSPMaker(Maker):
    """Predict structures for compositions and validate them, as one jobflow Flow.

    Parameters
    ----------
    name
        Flow name (the round is appended).
    template_store, results_store
        Store URIs (folder, ``mongodb://...``, ``memory://NAME``): templates; relaxation records.
    model
        Model file of the retrieval Maker (CSPML similarity, or hetero model); None: nearest descriptor.
    campaign
        Campaign name: promoted template ids and provenance.
    retrieval
        Retrieval Maker (a :class:`~cspml_flows.flows.retrieval.RetrievalMaker`: CSPML's
        :class:`TemplateRetrievalMaker`, a hetero or inverse retrieval Maker, or one of them in chunks). One
        whose ``returns_candidates`` is True yields candidate structures itself (no substitution stage).
    substitution, dedup
        Substitution and symmetry-deduplication Makers (``dedup.top``: structures kept per composition).
    relaxation
        A :class:`RelaxationMaker`, or any atomate2 relax Maker (``ForceFieldRelaxMaker``, ``EmtRelaxMaker``,
        ``DoubleRelaxMaker``, a user's own), which is wrapped in one.
    tiers
        Further calculator tiers in order (RelaxationMakers or atomate2 Makers): each relaxes only the
        candidates within its ``hull_window`` (default 0.1 eV/atom) of the previous tier's hull, and builds
        its own hull; energies of different calculators never share a hull.
    stability
        Hull Maker (competing phases); its ``relaxation`` is set to each tier's.
    promotion
        Template update after the last tier's hull; None: no promotion.
    """

    name: str = "cspml"
    template_store: str = ""
    results_store: str = ""
    model: str | None = None
    campaign: str = "campaign"
    retrieval: RetrievalMaker | ChunkedRetrievalMaker = field(default_factory=TemplateRetrievalMaker)
    substitution: SubstitutionMaker = field(default_factory=SubstitutionMaker)
    dedup: DedupMaker = field(default_factory=DedupMaker)
    relaxation: Maker = field(default_factory=RelaxationMaker)
    tiers: list[Maker] = field(default_factory=list)
    stability: StabilityMaker = field(default_factory=StabilityMaker)
    promotion: TemplateUpdateMaker | None = field(default_factory=TemplateUpdateMaker)

    def __post_init__(self) -> None:
        self.relaxation = as_relaxation(self.relaxation)
        self.tiers = [_tier(t) for t in self.tiers]

    def tier_makers(self) -> list[RelaxationMaker]:
        """The relaxation of every calculator tier, first to last."""
        return [self.relaxation, *self.tiers]

    def make(self, compositions: list[str], round_number: int = 1) -> Flow:
        """The round's Flow; outputs ``retrieval``, ``candidates``, ``relaxed`` and ``stability`` (first tier),
        ``tiers`` (per tier: ``candidates``, ``relaxed``, ``stability``), ``final`` (the last tier's hull)
        and ``promotion``."""
        ts, rs = self.template_store, self.results_store
        retrieve = self.retrieval.make(list(compositions), ts, self.model, round_number, self.campaign)
        jobs: list = [retrieve]
        if self.retrieval.returns_candidates:
            found = retrieve.output
        else:
            substitute = self.substitution.make(retrieve.output, ts)
            jobs.append(substitute)
            found = substitute.output
        dedup = self.dedup.make(found)
        jobs.append(dedup)
        output: dict[str, Any] = {"retrieval": retrieve.output, "candidates": dedup.output}
        tiers: list[dict[str, Any]] = []
        candidates, stab = dedup.output, None
        for k, relaxation in enumerate(self.tier_makers(), 1):
            if stab is not None:
                window = DEFAULT_HULL_WINDOW if relaxation.hull_window is None else relaxation.hull_window
                select = near_hull(stab.output, window)
                select.name = f"tier {k}: within {window} eV/atom of tier {k - 1}'s hull"
                jobs.append(select)
                candidates = select.output
            relax = relaxation.make(candidates, rs)
            stab = replace(self.stability, relaxation=relaxation, tier=k).make(relax.output, ts, rs, round_number)
            if k > 1:
                relax.name, stab.name = f"{relax.name} (tier {k})", f"{stab.name} (tier {k})"
            jobs += [relax, stab]
            tiers.append({"candidates": candidates, "relaxed": relax.output, "stability": stab.output})
        output |= {"relaxed": tiers[0]["relaxed"], "stability": tiers[0]["stability"], "tiers": tiers}
        output["final"] = tiers[-1]["stability"]
        if self.promotion is not None:
            update = self.promotion.make(output["final"], ts, rs, round_number)
            jobs.append(update)
            output["promotion"] = update.output
        return Flow(jobs, output=output, name=f"{self.name} round {round_number}")


def _tier(maker: Maker) -> RelaxationMaker:
    r = as_relaxation(maker)
    return r if r.hull_window is not None else replace(r, hull_window=DEFAULT_HULL_WINDOW)
