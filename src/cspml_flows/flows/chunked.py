"""Stages that grow with the work, in chunks: one jobflow job per chunk, then one merge job.

:class:`ChunkedRetrievalMaker` retrieves a large campaign's compositions in chunks. It wraps any retrieval
Maker (CSPML or hetero) and keeps its ``make`` signature and output, so
:class:`~cspml_flows.flows.makers.CSPMaker` runs it in the retrieval Maker's place. Under ``run_locally`` the
chunks run one after the other; under jobflow-remote or FireWorks each chunk is a job of its own that any
worker can run, so the retrieval of 100k compositions spreads over the nodes.

:class:`ChunkedIndexMaker` builds a template store's index from scratch the same way, in chunks of
templates (:mod:`cspml_flows.templates.chunked_build`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from jobflow import Flow, Maker, Response, job

from cspml_flows.core.schemas import IndexBuildReport, IndexChunkReport, RetrievalOutput
from cspml_flows.flows.retrieval import RetrievalMaker, TemplateRetrievalMaker
from cspml_flows.templates.chunked_build import ChunkResult, IndexPlan, assemble, build_chunk, plan_build
from cspml_flows.templates.store import TemplateStore


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
    retrieval: RetrievalMaker = field(default_factory=TemplateRetrievalMaker)
    chunk_size: int = 1000

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")

    @property
    def returns_candidates(self) -> bool:
        """Whether the wrapped Maker yields candidate structures itself (see CSPMaker)."""
        return self.retrieval.returns_candidates

    def make(
        self,
        compositions: list[str],
        template_store: str,
        model: str | None = None,
        round_number: int = 1,
        campaign: str | None = None,
    ) -> Flow:
        """A Flow of one retrieval job per chunk and a merge job; its output is the merged retrieval output."""
        comps = list(compositions)
        chunks = [comps[i : i + self.chunk_size] for i in range(0, len(comps), self.chunk_size)] or [[]]
        jobs = []
        for k, chunk in enumerate(chunks, 1):
            part = self.retrieval.make(chunk, template_store, model, round_number, campaign)
            part.name = f"{part.name} {k}/{len(chunks)}"
            jobs.append(part)
        if len(jobs) == 1:
            return Flow(jobs, output=jobs[0].output, name=self.name)
        merge = merge_retrievals([j.output for j in jobs])
        return Flow([*jobs, merge], output=merge.output, name=self.name)


@job(output_schema=IndexChunkReport)
def index_chunk(template_store: str, plan: dict[str, Any], k: int, workers: int = 1) -> IndexChunkReport:
    """Index segments of the plan's ``k``-th id range (:func:`~cspml_flows.templates.chunked_build.build_chunk`)."""
    with TemplateStore.open(template_store, create=False) as ts:
        return IndexChunkReport(**asdict(build_chunk(ts, IndexPlan(**plan), k, workers)))


@job(output_schema=IndexBuildReport)
def assemble_index(
    template_store: str, plan: dict[str, Any], parts: list[IndexChunkReport], workers: int = 1
) -> IndexBuildReport:
    """Commit the chunks as the store's index and bring it up to date; the index report."""
    chunks = [ChunkResult(**IndexChunkReport.coerce(p).model_dump()) for p in parts]
    with TemplateStore.open(template_store, create=False) as ts:
        report = assemble(ts, IndexPlan(**plan), chunks, workers)
    return IndexBuildReport(**asdict(report))


@job
def plan_index_build(template_store: str, chunk_size: int, workers: int = 1) -> Response:
    """Plan a chunked index build and replace this job by one job per chunk and the assembly."""
    with TemplateStore.open(template_store, create=False) as ts:
        plan = plan_build(ts, chunk_size)
    n = plan.n_chunks
    chunks = []
    for k in range(n):
        chunk = index_chunk(template_store, asdict(plan), k, workers)
        chunk.name = f"index chunk {k + 1}/{n}"
        chunks.append(chunk)
    final = assemble_index(template_store, asdict(plan), [c.output for c in chunks], workers)
    final.name = "assemble index"
    return Response(replace=Flow([*chunks, final], output=final.output, name="index build in chunks"))


@dataclass
class ChunkedIndexMaker(Maker):
    """Build a template store's index from scratch in chunks of ``chunk_size`` templates, one job per chunk
    (any worker of jobflow-remote or FireWorks that sees the index folder can run it), then one assembly
    job; the result equals ``cspml index --rebuild``.

    Parameters
    ----------
    name
        Flow name.
    chunk_size
        Templates per chunk job.
    workers
        Processes each job uses on its node.
    """

    name: str = "index build in chunks"
    chunk_size: int = 100_000
    workers: int = 1

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")

    def make(self, template_store: str) -> Flow:
        """A Flow whose output is the index report of the assembled index."""
        planner = plan_index_build(template_store, self.chunk_size, self.workers)
        return Flow([planner], output=planner.output, name=self.name)
