"""Retrieval stage: rank (template, element assignment) pairs for compositions.

:class:`TemplateRetrievalMaker` is the core CSPML retrieval; the hetero retrieval Makers
(:mod:`cspml_flows.flows.hetero`) have the same ``make`` signature and output, so :class:`~cspml_flows.flows.
makers.CSPMaker` runs either. Jobs take store URIs, never open connections, so they serialise to any worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from jobflow import Maker, job

from cspml_flows.core.composition import as_composition, roles
from cspml_flows.core.errors import ModelError
from cspml_flows.core.schemas import QueryHits, RetrievalOutput, TemplateHit

if TYPE_CHECKING:
    from cspml_flows.templates.index import TemplateIndex


def load_index(template_store: str, workers: int = 1) -> TemplateIndex:
    """The TemplateIndex of a store (cached on disk under ``$CSPML_HOME``, rebuilt when the store changes)."""
    from cspml_flows.templates.index import TemplateIndex

    return TemplateIndex.open(template_store, workers=workers)


@lru_cache(maxsize=4)
def _load_model(path: str, mtime: float):
    from cspml_flows.learning.model import SimilarityModel

    return SimilarityModel.load(path)


def load_model(path: str | None):
    """The similarity model at ``path`` (None: no model, retrieval falls back to the nearest-descriptor metric)."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise ModelError(f"similarity model not found: {path} (train one with 'cspml train')")
    return _load_model(path, os.path.getmtime(path))


def promoted_later(
    template_store: str, campaign: str | None, round: int, index: TemplateIndex | None = None
) -> set[str]:
    """Ids of the templates that ``campaign`` promoted in round ``round`` or later, from the ``source`` and
    ``round`` columns of the store's template index (``index``, else the store's, brought up to date)."""
    if not campaign:
        return set()
    if index is None:
        index = load_index(template_store)
    if index.source is None or index.round is None:  # an index built in memory from documents without them
        from cspml_flows.templates.store import TemplateStore

        with TemplateStore.open(template_store, create=False) as ts:
            query = {"source": f"campaign:{campaign}", "round": {"$gte": int(round)}}
            return {str(d["material_id"]) for d in ts.docs(query, properties=["material_id"])}
    mask = (index.source == f"campaign:{campaign}") & (index.round >= int(round))
    return set(index.ids[mask].tolist())


def retrieval_output(index: TemplateIndex, comps: list, rl: list, ranked: list, round: int) -> RetrievalOutput:
    """Ranked (template, assignment) lists of a retrieval as the stage's typed output."""
    from cspml_flows.predict.validity import smact_valid

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
    return RetrievalOutput(queries=queries, n_templates=len(index), round=round)


@dataclass
class TemplateRetrievalMaker(Maker):
    """Rank templates for compositions with the learned CSPML similarity.

    Parameters
    ----------
    name
        Job name.
    top
        Structures wanted per composition; ``2 * top + 2`` (template, assignment) pairs are retrieved so that
        the deduplication stage can still keep ``top``.
    strict
        Ignore templates of the query formula itself (predict as if the composition were unseen).
    workers
        Processes used to build the template index when the store changed.
    """

    name: str = "retrieve templates"
    top: int = 5
    strict: bool = False
    workers: int = 1

    @job(output_schema=RetrievalOutput)
    def make(
        self,
        compositions: list[str],
        template_store: str,
        model: str | None = None,
        round: int = 1,
        campaign: str | None = None,
    ) -> RetrievalOutput:
        """Ranked templates per composition; ``model`` None: nearest-descriptor retrieval.

        Templates that ``campaign`` promoted in this round or later are ignored, so a round restarted after
        its promotion step retrieves exactly what it retrieved the first time.
        """
        from cspml_flows.predict.retrieve import rank

        index = load_index(template_store, self.workers)
        sim = load_model(model)
        comps = [as_composition(c) for c in compositions]
        rl = [roles(c) for c in comps]
        later = promoted_later(template_store, campaign, round, index)
        ranked = rank(
            sim,
            index,
            rl,
            top=self.top * 2 + 2,
            exclude_ids=[later] * len(rl) if later else None,
            strict=self.strict,
            metric="learned" if sim is not None else "nearest",
        )
        return retrieval_output(index, comps, rl, ranked, round)
