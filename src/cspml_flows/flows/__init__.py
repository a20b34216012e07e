"""jobflow/atomate2 validation flows: retrieval -> substitution -> dedup -> relaxation -> stability -> promotion."""

from cspml_flows.flows.calculators import CalculatorSettings, relax_maker, structure_fingerprint
from cspml_flows.flows.makers import (
    CSPMaker,
    DedupMaker,
    RelaxationMaker,
    StabilityMaker,
    SubstitutionMaker,
    TemplateRetrievalMaker,
    TemplateUpdateMaker,
)

__all__ = [
    "CSPMaker",
    "CalculatorSettings",
    "DedupMaker",
    "RelaxationMaker",
    "StabilityMaker",
    "SubstitutionMaker",
    "TemplateRetrievalMaker",
    "TemplateUpdateMaker",
    "relax_maker",
    "structure_fingerprint",
]
