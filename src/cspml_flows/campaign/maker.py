"""The CSPMaker a campaign file describes: its retrieval Maker by kind, one RelaxationMaker per calculator tier."""

from __future__ import annotations

from pathlib import Path

from cspml_flows.campaign.config import CampaignConfig
from cspml_flows.flows.candidates import DedupMaker
from cspml_flows.flows.chunked import ChunkedRetrievalMaker
from cspml_flows.flows.hetero import HeteroRetrievalMaker, InverseRetrievalMaker
from cspml_flows.flows.hull import StabilityMaker
from cspml_flows.flows.makers import CSPMaker
from cspml_flows.flows.promotion import TemplateUpdateMaker
from cspml_flows.flows.retrieval import RetrievalMaker, TemplateRetrievalMaker
from cspml_flows.predict.inverse import check_elements
from cspml_flows.templates.readers import read_structure


def retrieval_maker(cfg: CampaignConfig) -> tuple[RetrievalMaker | ChunkedRetrievalMaker, int]:
    """The campaign's retrieval Maker (in chunks when it has more compositions than ``retrieval_chunk``) and
    the structures kept per composition."""
    top = cfg.top_k
    if cfg.kind == "csp":
        retrieval: RetrievalMaker = TemplateRetrievalMaker(top=top, strict=cfg.strict, workers=cfg.workers)
    elif cfg.kind == "metastable":
        retrieval = HeteroRetrievalMaker(polymorphs=cfg.polymorphs, strict=cfg.strict, workers=cfg.workers)
        top = cfg.polymorphs
    else:
        structure = read_structure(cfg.structure)
        retrieval = InverseRetrievalMaker(
            structure=structure.as_dict(),
            structure_name=Path(str(cfg.structure)).name,
            elements=check_elements(cfg.elements),
            top=top,
        )
    if cfg.kind != "inverse" and len(cfg.formulas()) > cfg.retrieval_chunk:
        return ChunkedRetrievalMaker(retrieval=retrieval, chunk_size=cfg.retrieval_chunk), top
    return retrieval, top


def make_maker(cfg: CampaignConfig) -> CSPMaker:
    """The CSPMaker of a campaign: its retrieval Maker by kind, one RelaxationMaker per calculator tier."""
    retrieval, top = retrieval_maker(cfg)
    first, *more = cfg.relaxations()
    return CSPMaker(
        name=f"cspml {cfg.name}",
        template_store=cfg.template_store(),
        results_store=cfg.results_store(),
        model=cfg.model_path(),
        campaign=cfg.name,
        retrieval=retrieval,
        dedup=DedupMaker(top=top),
        relaxation=first,
        tiers=more,
        stability=StabilityMaker(max_references=cfg.max_references),
        promotion=TemplateUpdateMaker(threshold=cfg.hull_threshold, campaign=cfg.name),
    )
