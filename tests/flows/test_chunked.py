"""Work that grows with the campaign runs as jobflow jobs in chunks, with the single-job result."""

from __future__ import annotations

from jobflow import JobStore, run_locally
from maggma.stores import MemoryStore

from cspml_flows.core.schemas import RetrievalOutput
from cspml_flows.flows import CSPMaker, DedupMaker, TemplateRetrievalMaker
from cspml_flows.flows.chunked import ChunkedRetrievalMaker

COMPOSITIONS = ["NaCl", "KBr", "CuAu", "SrTiO3", "AgPd", "LiF", "MgO"]


def retrieve(maker, template_folder: str) -> RetrievalOutput:
    flow = maker.make(COMPOSITIONS, template_folder, None, 1, None)
    store = JobStore(MemoryStore())
    run_locally(flow, store=store, create_folders=False, log=False)
    return RetrievalOutput.coerce(flow.output.resolve(store))


def test_chunked_retrieval_equals_one_job(template_folder):
    single = retrieve(TemplateRetrievalMaker(top=3), template_folder)
    chunked_maker = ChunkedRetrievalMaker(retrieval=TemplateRetrievalMaker(top=3), chunk_size=3)
    flow = chunked_maker.make(COMPOSITIONS, template_folder)
    assert [j.name for j in flow.jobs] == [
        "retrieve templates 1/3",
        "retrieve templates 2/3",
        "retrieve templates 3/3",
        "merge_retrievals",
    ]
    chunked = retrieve(chunked_maker, template_folder)
    assert chunked.model_dump() == single.model_dump()
    assert [q.formula for q in chunked.queries] == [q.formula for q in single.queries]
    assert any(q.hits for q in chunked.queries)


def test_chunked_retrieval_inside_a_csp_flow(template_folder):
    maker = CSPMaker(
        template_store=template_folder,
        results_store="memory://chunked",
        retrieval=ChunkedRetrievalMaker(retrieval=TemplateRetrievalMaker(top=2), chunk_size=1),
        dedup=DedupMaker(top=2),
        promotion=None,
    )
    flow = maker.make(["CuAu", "AgPd"], round_number=1)
    assert flow.jobs[0].name == "retrieve templates in chunks"
    assert [j.name for j in flow.jobs[0].jobs] == [
        "retrieve templates 1/2",
        "retrieve templates 2/2",
        "merge_retrievals",
    ]


def test_campaign_with_more_compositions_than_a_chunk_fans_out(template_folder, tmp_path):
    from cspml_flows.campaign.config import parse_campaign
    from cspml_flows.campaign.maker import make_maker

    base = {"name": "fan", "compositions": ["NaCl", "KBr", "CuAu"], "stores": {"templates": template_folder}}
    cfg = parse_campaign({**base, "model": None, "retrieval_chunk": 2}, "fan.yaml", base=tmp_path)
    maker = make_maker(cfg)
    assert isinstance(maker.retrieval, ChunkedRetrievalMaker) and maker.retrieval.chunk_size == 2
    one = make_maker(parse_campaign({**base, "model": None}, "fan.yaml", base=tmp_path))
    assert isinstance(one.retrieval, TemplateRetrievalMaker)
