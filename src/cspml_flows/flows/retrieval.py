"""Retrieval stage: rank (template, element assignment) pairs for compositions.

:class:`RetrievalMaker` is the base of every retrieval stage of :class:`~cspml_flows.flows.makers.CSPMaker`:
:class:`TemplateRetrievalMaker` (the core CSPML retrieval) here, the hetero and inverse retrieval Makers in
:mod:`cspml_flows.flows.hetero`. Jobs take store URIs, never open connections, so they serialise to any worker.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from jobflow import Maker, job
from pymatgen.core import Composition

from cspml_flows.core.composition import Roles, as_composition, roles
from cspml_flows.core.errors import ModelError
from cspml_flows.core.schemas import CandidateSet, QueryHits, RetrievalOutput, TemplateHit
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.predict.retrieve import Ranked, overfetch, rank
from cspml_flows.predict.validity import smact_valid
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.store import TemplateStore


def load_index(template_store: str, workers: int = 1) -> TemplateIndex:
    """The TemplateIndex of a store (cached on disk under ``$CSPML_HOME``, rebuilt when the store changes)."""
    return TemplateIndex.open(template_store, workers=workers)


@lru_cache(maxsize=4)
def _load_model(path: str, mtime: float) -> SimilarityModel:
    """The model at ``path`` as of its modification time ``mtime`` (the cache key)."""
    return SimilarityModel.load(path)


def load_model(path: str | None) -> SimilarityModel | None:
    """The similarity model at ``path`` (None: no model, retrieval falls back to the nearest-descriptor metric)."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise ModelError(f"similarity model not found: {path} (train one with 'cspml train')")
    return _load_model(path, os.path.getmtime(path))


def promoted_later(
    template_store: str, campaign: str | None, round_number: int, index: TemplateIndex | None = None
) -> set[str]:
    """Ids of the templates that ``campaign`` promoted in round ``round_number`` or later, from the ``source``
    and ``round`` columns of the store's template index (``index``, else the store's, brought up to date)."""
    if not campaign:
        return set()
    if index is None:
        index = load_index(template_store)
    if index.source is None or index.round is None:  # an index built in memory from documents without them
        with TemplateStore.open(template_store, create=False) as ts:
            query = {"source": f"campaign:{campaign}", "round": {"$gte": int(round_number)}}
            return {str(d["material_id"]) for d in ts.docs(query, properties=["material_id"])}
    mask = (index.source == f"campaign:{campaign}") & (index.round >= int(round_number))
    return set(index.ids[mask].tolist())


def retrieval_output(
    index: TemplateIndex,
    comps: list[Composition],
    rl: list[Roles],
    ranked: list[list[Ranked]],
    round_number: int,
    model: SimilarityModel | None = None,
) -> RetrievalOutput:
    """Ranked (template, assignment) lists of a retrieval as the stage's typed output, with the element volumes
    of the similarity ``model`` that ranked them."""
    queries = []
    for c, r, hits in zip(comps, rl, ranked, strict=True):
        q = QueryHits(formula=c.reduced_formula, anonymous_formula=r.anonymous_formula, smact_valid=smact_valid(c))
        q.hits = [
            TemplateHit(
                template_id=str(index.ids[h.template]),
                perm=list(h.perm),
                score=float(h.score),
                cluster=int(h.cluster),
                alternates=[str(index.ids[a]) for a in h.alternates],
            )
            for h in hits
        ]
        if not hits:
            q.message = f"no template with anonymous formula {r.anonymous_formula} in {len(index)} templates"
        queries.append(q)
    volumes = model.meta.get("element_volumes") if model is not None else None
    return RetrievalOutput(queries=queries, n_templates=len(index), round=round_number, element_volumes=volumes)


@dataclass
class RetrievalMaker(Maker, ABC):
    """Base of the retrieval stages: compositions in, ranked (template, assignment) pairs out.

    :class:`~cspml_flows.flows.makers.CSPMaker` calls ``make`` with the compositions, the template store URI,
    the model file, the round and the campaign; a subclass implements :meth:`retrieve`. One whose
    ``returns_candidates`` is True returns a :class:`CandidateSet` (candidate structures, no substitution
    stage); the others a :class:`RetrievalOutput`.

    Parameters
    ----------
    name
        Job name.
    workers
        Processes used to build the template index (and the hetero structure bank) when the store changed.
    """

    returns_candidates: ClassVar[bool] = False

    name: str = "retrieve"
    workers: int = 1

    @job(output_schema=RetrievalOutput)
    def make(
        self,
        compositions: list[str],
        template_store: str,
        model: str | None = None,
        round_number: int = 1,
        campaign: str | None = None,
    ) -> RetrievalOutput | CandidateSet:
        """The retrieval job: :meth:`retrieve` on the compositions."""
        return self.retrieve(list(compositions), template_store, model, round_number, campaign)

    @abstractmethod
    def retrieve(
        self,
        compositions: list[str],
        template_store: str | None,
        model: str | None,
        round_number: int,
        campaign: str | None,
    ) -> RetrievalOutput | CandidateSet:
        """Rank templates for ``compositions``; templates ``campaign`` promoted in ``round_number`` or later
        are ignored, so a round restarted after its promotion step retrieves what it retrieved the first time.

        Parameters
        ----------
        compositions
            Query formulas.
        template_store
            URI of the template store retrieved from.
        model
            Model file (None: the Maker's fallback, where it has one).
        round_number
            Campaign round.
        campaign
            Campaign name (None: no promoted template is ignored).

        Returns
        -------
        RetrievalOutput or CandidateSet
            Ranked hits per composition, or candidate structures when ``returns_candidates``.
        """


@dataclass
class TemplateRetrievalMaker(RetrievalMaker):
    """Rank templates for compositions with the learned CSPML similarity.

    Parameters
    ----------
    name
        Job name.
    workers
        Processes used to build the template index when the store changed.
    top
        Structures wanted per composition; ``overfetch(top)`` (template, assignment) pairs are retrieved so that
        the deduplication stage can still keep ``top``.
    strict
        Ignore templates of the query formula itself (predict as if the composition were unseen).
    """

    name: str = "retrieve templates"
    top: int = 5
    strict: bool = False

    def retrieve(
        self,
        compositions: list[str],
        template_store: str | None,
        model: str | None,
        round_number: int,
        campaign: str | None,
    ) -> RetrievalOutput:
        """Ranked templates per composition with the similarity model ``model`` (None: nearest descriptor)."""
        index = load_index(template_store, self.workers)
        sim = load_model(model)
        comps = [as_composition(c) for c in compositions]
        rl = [roles(c) for c in comps]
        later = promoted_later(template_store, campaign, round_number, index)
        ranked = rank(
            sim,
            index,
            rl,
            top=overfetch(self.top),
            exclude_ids=[later] * len(rl) if later else None,
            strict=self.strict,
            metric="learned" if sim is not None else "nearest",
        )
        return retrieval_output(index, comps, rl, ranked, round_number, sim)
