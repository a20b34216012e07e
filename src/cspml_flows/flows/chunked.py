"""Retrieval of a large campaign in chunks: one jobflow job per chunk of compositions, then one merge job.

:class:`ChunkedRetrievalMaker` wraps any retrieval Maker (CSPML or hetero) and keeps its ``make`` signature
and output, so :class:`~cspml_flows.flows.makers.CSPMaker` runs it in the retrieval Maker's place. Under
``run_locally`` the chunks run one after the other; under jobflow-remote or FireWorks each chunk is a job of
its own that any worker can run, so the retrieval of 100k compositions spreads over the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobflow import Flow, Maker, job

from cspml_flows.flows.retrieval import TemplateRetrievalMaker
from cspml_flows.flows.schemas import RetrievalOutput


@job(output_schema=RetrievalOutput)
def merge_retrievals(parts: list[RetrievalOutput]) -> RetrievalOutput:
    """The chunks' ranked hits in composition order, as one retrieval output."""
    docs = [RetrievalOutput.coerce(p) for p in parts]
    queries = [q for d in docs for q in d.queries]
    return RetrievalOutput(queries=queries, n_templates=max(d.n_templates for d in docs), round=docs[0].round)


@dataclass
class ChunkedRetrievalMaker(Maker):
    """Run a retrieval Maker on chunks of at most ``chunk_size`` compositions, then merge the outputs.

    Parameters
    ----------
    name
        Flow name.
    retrieval
        The retrieval Maker run on every chunk (default: CSPML's :class:`TemplateRetrievalMaker`).
    chunk_size
        Compositions per chunk job; a campaign that fits in one chunk runs the retrieval job alone.
    """

    name: str = "retrieve templates in chunks"
    retrieval: Maker = field(default_factory=TemplateRetrievalMaker)
    chunk_size: int = 1000

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")

    @property
    def returns_candidates(self) -> bool:
        """Whether the wrapped Maker yields candidate structures itself (see CSPMaker)."""
        return bool(getattr(self.retrieval, "returns_candidates", False))

    def make(
        self,
        compositions: list[str],
        template_store: str,
        model: str | None = None,
        round: int = 1,
        campaign: str | None = None,
    ) -> Flow:
        """A Flow of one retrieval job per chunk and a merge job; its output is the merged retrieval output."""
        comps = list(compositions)
        chunks = [comps[i : i + self.chunk_size] for i in range(0, len(comps), self.chunk_size)] or [[]]
        jobs = []
        for k, chunk in enumerate(chunks, 1):
            part = self.retrieval.make(chunk, template_store, model, round, campaign)
            part.name = f"{part.name} {k}/{len(chunks)}"
            jobs.append(part)
        if len(jobs) == 1:
            return Flow(jobs, output=jobs[0].output, name=self.name)
        merge = merge_retrievals([j.output for j in jobs])
        return Flow([*jobs, merge], output=merge.output, name=self.name)
