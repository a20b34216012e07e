"""jobflow/atomate2 validation flows, one module per stage: retrieval -> candidates (substitution, dedup) ->
relax -> hull -> promotion; :class:`CSPMaker` composes them."""

from cspml_flows.core.engines import structure_fingerprint
from cspml_flows.flows.calculators import CalculatorSettings, relax_maker
from cspml_flows.flows.candidates import DedupMaker, SubstitutionMaker
from cspml_flows.flows.chunked import ChunkedRetrievalMaker
from cspml_flows.flows.hull import StabilityMaker
from cspml_flows.flows.makers import CSPMaker
from cspml_flows.flows.promotion import PromotionBuilder, TemplateUpdateMaker
from cspml_flows.flows.relax import RelaxationMaker
from cspml_flows.flows.retrieval import RetrievalMaker, TemplateRetrievalMaker

__all__ = [
    "CSPMaker",
    "CalculatorSettings",
    "ChunkedRetrievalMaker",
    "DedupMaker",
    "PromotionBuilder",
    "RelaxationMaker",
    "RetrievalMaker",
    "StabilityMaker",
    "SubstitutionMaker",
    "TemplateRetrievalMaker",
    "TemplateUpdateMaker",
    "relax_maker",
    "structure_fingerprint",
]
