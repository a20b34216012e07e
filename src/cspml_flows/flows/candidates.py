"""Substitution and deduplication stages: retrieved templates -> candidate structures -> distinct ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobflow import Maker, job
from pymatgen.core import Structure

from cspml_flows.core.composition import as_composition
from cspml_flows.core.engines import structure_fingerprint
from cspml_flows.core.equivalence import DistinctStructures
from cspml_flows.core.schemas import CandidateDoc, CandidateSet, RetrievalOutput
from cspml_flows.flows.retrieval import load_index
from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.predict.retrieve import Ranked
from cspml_flows.templates.volumes import volume_table


def candidate_doc(structure: Structure, formula: str, round_number: int, **fields: Any) -> CandidateDoc:
    """A candidate document: fingerprint and chemical system from ``structure``."""
    return CandidateDoc(
        candidate_id=structure_fingerprint(structure),
        formula=formula,
        chemsys=structure.composition.chemical_system,
        structure=structure,
        round=round_number,
        **fields,
    )


@dataclass
class SubstitutionMaker(Maker):
    """Put each query's elements on its retrieved templates (cells rescaled by the retrieval's element volumes,
    0.5 A distance gate).

    Parameters
    ----------
    name
        Job name.
    """

    name: str = "substitute elements"

    @job(output_schema=CandidateSet)
    def make(self, retrieval: RetrievalOutput, template_store: str) -> CandidateSet:
        """Candidate structures of every retrieved (template, assignment) pair, in rank order."""
        retrieval = RetrievalOutput.coerce(retrieval)
        index = load_index(template_store)
        pos = {str(m): i for i, m in enumerate(index.ids)}
        comps, ranked = [], []
        for q in retrieval.queries:
            comps.append(as_composition(q.formula))
            ranked.append(
                [
                    Ranked(
                        pos[h.template_id],
                        tuple(h.perm),
                        h.score,
                        h.cluster,
                        tuple(pos[a] for a in h.alternates if a in pos),
                    )
                    for h in q.hits
                    if h.template_id in pos
                ]
            )
        out = CandidateSet(candidates=[], round=retrieval.round)
        volumes = volume_table(retrieval.element_volumes) if retrieval.element_volumes else None
        preds = CSPPredictor(index, None, volumes=volumes).realize(comps, ranked, top=10**6, dedup=False)
        for q, pred in zip(retrieval.queries, preds, strict=True):
            if pred.message or q.message:
                out.messages[q.formula] = q.message or pred.message or ""
            for c in pred.candidates:
                out.candidates.append(
                    candidate_doc(
                        c.structure,
                        pred.formula,
                        retrieval.round,
                        rank=c.rank,
                        score=c.score,
                        template_id=c.template_id,
                        template_formula=c.template_formula,
                        prototype=c.prototype,
                        assignment=c.assignment,
                        min_distance=c.min_distance,
                    )
                )
        return out


@dataclass
class DedupMaker(Maker):
    """Symmetry deduplication (StructureMatcher): the best-ranked of each equivalence class.

    Parameters
    ----------
    name
        Job name.
    top
        Distinct candidates kept per composition.
    """

    name: str = "deduplicate"
    top: int = 5

    @job(output_schema=CandidateSet)
    def make(self, candidates: CandidateSet) -> CandidateSet:
        """At most ``top`` distinct candidates per formula, re-ranked 1..n."""
        cs = CandidateSet.coerce(candidates)
        kept: dict[str, list[CandidateDoc]] = {}
        seen: dict[str, DistinctStructures] = {}
        removed = 0
        for c in sorted(cs.candidates, key=lambda c: (c.formula, c.rank)):
            group = kept.setdefault(c.formula, [])
            if len(group) >= self.top:
                continue
            distinct = seen.setdefault(c.formula, DistinctStructures())
            if any(k.candidate_id == c.candidate_id for k in group) or not distinct.add(c.structure):
                removed += 1
                continue
            group.append(c)
        out = [c.model_copy(update={"rank": i + 1}) for group in kept.values() for i, c in enumerate(group)]
        return CandidateSet(candidates=out, messages=cs.messages, n_removed=removed, round=cs.round)
