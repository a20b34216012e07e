"""Template promotion as a maggma Builder: relaxed candidates close to their hull become templates.

:class:`PromotionBuilder` reads relaxation records (source: the results store) and writes template documents
(target: the template store), incrementally by ``last_updated``: a record is considered again only after a
newer hull analysis. Like emmet's builders it runs alone (``cspml campaign promote CONFIG``, or maggma's
``mrun`` on its JSON) and inside a campaign flow (:class:`TemplateUpdateMaker`, restricted to its round).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jobflow import Maker, job
from maggma.core import Builder, Store
from pymatgen.core import Structure

from cspml_flows.core.equivalence import DistinctStructures
from cspml_flows.core.schemas import PromotionOutput, RelaxRecord, StabilityOutput
from cspml_flows.flows.stores import RESULTS_COLLECTION, close_store
from cspml_flows.templates.schema import KEY, template_doc_from_structure
from cspml_flows.templates.store_uri import COLLECTION, make_store
from cspml_flows.templates.store_write import upsert


def promoted_id(campaign: str, round_number: int, fingerprint: str) -> str:
    """Template id of a promoted candidate: campaign, round and structure fingerprint."""
    return f"cspml-{campaign}-r{round_number}-{fingerprint[:12]}"


class PromotionBuilder(Builder):
    """Promote successful candidate relaxations with ``e_above_hull <= threshold`` into the template store.

    A relaxed structure that matches (StructureMatcher) a template of the same formula already in the store,
    or another promoted in the same run, is not added twice. Provenance kept on each new template: source
    ``campaign:<name>``, round, parent template, calculator, energy per atom, e_above_hull, relaxation key.
    """

    def __init__(
        self,
        relaxations: Store,
        templates: Store,
        campaign: str,
        threshold: float = 0.1,
        calculator: str | None = None,
        query: dict | None = None,
        incremental: bool = True,
    ):
        self.relaxations = relaxations
        self.templates = templates
        self.campaign = campaign
        self.threshold = threshold
        self.calculator = calculator
        self.query = query or {}
        self.incremental = incremental
        self.promoted: list[str] = []
        self.n_considered = 0
        super().__init__(sources=[relaxations], targets=[templates])

    def criteria(self) -> dict:
        """The query of the records to consider (incremental: updated since the newest promoted template)."""
        crit: dict[str, Any] = {
            "kind": "candidate",
            "status": "successful",
            "e_above_hull": {"$lte": float(self.threshold)},
            **self.query,
        }
        if self.calculator:
            crit["calculator"] = self.calculator
        if self.incremental:
            last = self.templates.query_one(
                {"source": f"campaign:{self.campaign}"}, properties=["last_updated"], sort={"last_updated": -1}
            )
            if last and last.get("last_updated") is not None:
                crit["last_updated"] = {"$gt": _as_text(last["last_updated"])}
        return crit

    def get_items(self) -> Iterator[dict]:
        """Records to consider, grouped by formula, with the store's templates of that formula."""
        self.promoted, self.n_considered = [], 0
        by_formula: dict[str, list[dict]] = {}
        for d in self.relaxations.query(self.criteria()):
            d.pop("_id", None)
            by_formula.setdefault(d["formula"], []).append(d)
        self.total = len(by_formula)
        for formula in sorted(by_formula):
            known = list(self.templates.query({"formula": formula}, properties=["material_id", "structure"]))
            yield {"formula": formula, "records": by_formula[formula], "known": known}

    def process_item(self, item: dict) -> dict:
        """New template documents of one formula (no database access)."""
        known_ids = {str(d["material_id"]) for d in item["known"]}
        known = DistinctStructures(Structure.from_dict(d["structure"]) for d in item["known"])
        docs, already = [], []
        records = sorted((RelaxRecord.coerce(r) for r in item["records"]), key=lambda r: r.e_above_hull or 0.0)
        for r in records:
            mid = promoted_id(self.campaign, int(r.round or 1), r.fingerprint)
            if mid in known_ids:  # promoted by an earlier run
                already.append(mid)
                continue
            s = r.structure
            if not known.add(s):
                continue
            doc = template_doc_from_structure(
                s,
                mid,
                source=f"campaign:{self.campaign}",
                round=int(r.round or 1),
                parent_id=r.source_id,
                calculator=r.calculator,
                energy_per_atom=r.energy_per_atom,
                e_above_hull=r.e_above_hull,
                relaxation_key=r.key,
            )
            docs.append(doc.model_dump(mode="json"))
        return {"docs": docs, "already": already, "n": len(records)}

    def update_targets(self, items: list[dict]) -> None:
        """Write the new templates (one document per id, whatever runs twice)."""
        docs = [d for it in items for d in it["docs"]]
        if docs:
            upsert(self.templates, docs, KEY)
        for it in items:
            self.n_considered += it["n"]
            self.promoted += it["already"] + [d["material_id"] for d in it["docs"]]


def _as_text(value: Any) -> Any:
    """Documents store ``last_updated`` as ISO text (UTC), which sorts in time order."""
    return value.isoformat() if isinstance(value, datetime) else value


def promotion_builder(
    results_store: str, template_store: str, campaign: str, threshold: float, calculator: str | None = None, **kw: Any
) -> PromotionBuilder:
    """A :class:`PromotionBuilder` on store URIs (see :func:`cspml_flows.templates.store_uri.make_store`)."""
    return PromotionBuilder(
        make_store(results_store, RESULTS_COLLECTION),
        make_store(template_store, COLLECTION, key=KEY, create=False),
        campaign,
        threshold,
        calculator,
        **kw,
    )


def run_builder(builder: PromotionBuilder) -> PromotionOutput:
    """Run the builder's get_items / process_item / update_targets in this process."""
    builder.connect()
    try:
        items = [builder.process_item(it) for it in builder.get_items()]
        builder.update_targets(items)
    finally:
        for st in (builder.relaxations, builder.templates):
            close_store(st)
    return PromotionOutput(promoted=builder.promoted, n_considered=builder.n_considered, threshold=builder.threshold)


@dataclass
class TemplateUpdateMaker(Maker):
    """Run the promotion Builder on this round's candidates after the (last tier's) hull.

    Parameters
    ----------
    name
        Job name.
    threshold
        Promote candidates with e_above_hull <= threshold (eV/atom).
    campaign
        Campaign name (template ids and provenance).
    """

    name: str = "update templates"
    threshold: float = 0.1
    campaign: str = "campaign"

    @job(output_schema=PromotionOutput)
    def make(
        self, stability: StabilityOutput, template_store: str, results_store: str, round_number: int = 1
    ) -> PromotionOutput:
        """Promote this hull's candidates (the Builder restricted to their relaxation keys)."""
        so = StabilityOutput.coerce(stability)
        keys = [c.key for c in so.candidates]
        builder = promotion_builder(
            str(results_store),
            str(template_store),
            self.campaign,
            self.threshold,
            so.calculator,
            query={"key": {"$in": keys}},
            incremental=False,
        )
        out = run_builder(builder)
        return out.model_copy(update={"round": round_number})
