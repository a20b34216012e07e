"""Hetero retrieval Makers: :class:`~cspml_flows.flows.makers.CSPMaker` with one of these as its retrieval
stage is the metastable or the inverse campaign flow (same substitution, relaxation, hull and promotion).

- :class:`HeteroRetrievalMaker`: K polymorphs per composition ranked by the hetero model.
- :class:`InverseRetrievalMaker`: "which compositions crystallise in this user structure?": compositions of
  the given elements ranked on the structure, each already a candidate structure (no substitution stage).

Campaign files with ``kind: metastable`` or ``kind: inverse`` run them (``cspml campaign run FILE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

from jobflow import job
from pymatgen.core import Structure

from cspml_flows.core.composition import as_composition, roles
from cspml_flows.core.errors import ModelError
from cspml_flows.core.schemas import CandidateSet, RetrievalOutput
from cspml_flows.flows.candidates import candidate_doc
from cspml_flows.flows.retrieval import RetrievalMaker, load_index, promoted_later, retrieval_output
from cspml_flows.learning.hetero.model import HeteroModel
from cspml_flows.predict.hetero_rank import hetero_rank
from cspml_flows.predict.inverse import inverse_from_structure, inverse_pool


@lru_cache(maxsize=4)
def _load_hetero(path: str, mtime: float) -> HeteroModel:
    """The hetero model at ``path`` as of its modification time ``mtime`` (the cache key)."""
    return HeteroModel.load(path)


def load_hetero(path: str | None) -> HeteroModel:
    """The hetero model at ``path`` (cached while the file is unchanged); ModelError names a missing file."""
    if not path or not os.path.isfile(path):
        raise ModelError(f"hetero model file not found: {path} (train one with 'cspml train --hetero')")
    return _load_hetero(path, os.path.getmtime(path))


@dataclass
class HeteroRetrievalMaker(RetrievalMaker):
    """Template retrieval with the hetero model (polymorphs ranked by the fused score).

    Parameters
    ----------
    name
        Job name.
    workers
        Processes used to build the template index and the structure bank.
    polymorphs
        Distinct structures wanted per composition (``3 * polymorphs + 2`` pairs are retrieved).
    strict
        Ignore templates of the query formula itself.
    """

    name: str = "hetero retrieve"
    polymorphs: int = 3
    strict: bool = False

    def retrieve(
        self,
        compositions: list[str],
        template_store: str | None,
        model: str | None,
        round_number: int,
        campaign: str | None,
    ) -> RetrievalOutput:
        """Rank (template, assignment) pairs with the hetero model ``model``, one per prototype cluster and
        assignment; templates ``campaign`` promoted in this round or later are ignored."""
        hetero = load_hetero(model)
        index = load_index(template_store, self.workers)
        bank = hetero.bank(index, workers=self.workers)
        comps = [as_composition(c) for c in compositions]
        rl = [roles(c) for c in comps]
        ranked = hetero_rank(hetero, bank, rl, top=self.polymorphs * 3 + 2, strict=self.strict)
        later = promoted_later(template_store, campaign, round_number)
        if later:
            ranked = [[h for h in hits if str(index.ids[h.template]) not in later] for hits in ranked]
        return retrieval_output(index, comps, rl, ranked, round_number, hetero.core)


@dataclass
class InverseRetrievalMaker(RetrievalMaker):
    """Compositions of ``elements`` ranked for a user structure; each becomes a candidate structure.

    Parameters
    ----------
    name
        Job name.
    workers
        Processes used to index the template store the structure's prototype competes with.
    structure
        The user structure (``Structure.as_dict()``), from no database.
    structure_name
        Its name (candidate template ids are ``user:<name>``).
    elements
        Elements to substitute onto its sites.
    top
        Compositions kept (best-ranked first).
    """

    returns_candidates: ClassVar[bool] = True

    name: str = "inverse candidates"
    structure: dict = field(default_factory=dict)
    structure_name: str = "user"
    elements: list[str] = field(default_factory=list)
    top: int = 10

    @job(output_schema=CandidateSet)
    def make(
        self,
        compositions: list[str] | None = None,
        template_store: str | None = None,
        model: str | None = None,
        round_number: int = 1,
        campaign: str | None = None,
    ) -> CandidateSet:
        """The inverse retrieval job (its output is a candidate set): :meth:`retrieve`."""
        return self.retrieve(list(compositions or []), template_store, model, round_number, campaign)

    def retrieve(
        self,
        compositions: list[str],
        template_store: str | None,
        model: str | None,
        round_number: int,
        campaign: str | None,
    ) -> CandidateSet:
        """Candidates of the ranked compositions (``compositions`` and ``campaign`` are unused: compositions
        are generated from ``elements``; the structure is the only template, ``template_store`` the database
        its prototype competes with in the normalised score)."""
        s = Structure.from_dict(self.structure)
        hetero = load_hetero(model)
        pool = inverse_pool(hetero, template_store, self.workers)
        res = inverse_from_structure(hetero, s, self.elements, top=self.top, name=self.structure_name, pool=pool)
        out = CandidateSet(candidates=[], round=round_number)
        for c in res.candidates:
            out.candidates.append(
                candidate_doc(
                    c.structure,
                    c.formula,
                    round_number,
                    rank=c.rank,
                    score=c.score,
                    template_id=f"user:{self.structure_name}",
                    template_formula=res.template_formula,
                    assignment=c.assignment,
                    min_distance=c.min_distance,
                )
            )
        return out
