"""Hetero campaigns as jobflow Makers, built from the validation-flow stages of :mod:`cspml_flows.flows`.

- :class:`MetastableMaker`: K polymorphs per composition ranked by the hetero model -> substitution ->
  deduplication -> relaxation -> hull (which polymorphs survive relaxation, and how far above the hull).
- :class:`InverseMaker`: "which compositions crystallise in this user structure?": ranked compositions of the
  given elements on the structure -> relaxation -> hull, so every answer is checked by the calculator.

Both run from a YAML file (``configs/hetero_*.yaml``) with :func:`run_hetero_campaign`
(``cspml hetero-campaign FILE``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from jobflow import Flow, Job, Maker, job
from pydantic import BaseModel, Field, ValidationError, field_validator

from cspml_flows.config import read_yaml, resolve_path
from cspml_flows.errors import ConfigError, ModelError
from cspml_flows.flows.calculators import CalculatorSettings
from cspml_flows.flows.makers import realize_and_validate, validate_candidates
from cspml_flows.flows.schemas import CandidateSet, RetrievalOutput


@lru_cache(maxsize=4)
def _load_hetero(path: str, mtime: float):
    from cspml_flows.hetero.model import HeteroModel

    return HeteroModel.load(path)


def load_hetero(path: str):
    if not os.path.isfile(path):
        raise ModelError(f"hetero model file not found: {path} (train one with 'cspml train --hetero')")
    return _load_hetero(path, os.path.getmtime(path))


# ------------------------------------------------------------------------------------------------- jobs
@job
def hetero_retrieve(
    compositions: list[str],
    template_store: str,
    hetero_model: str,
    polymorphs: int = 3,
    strict: bool = False,
    round: int = 1,
    workers: int = 1,
) -> RetrievalOutput:
    """Rank (template, assignment) pairs with the hetero model, one per prototype cluster and assignment."""
    from cspml_flows.composition import as_composition, roles
    from cspml_flows.flows.jobs import load_index, retrieval_output
    from cspml_flows.hetero.rank import hetero_rank

    model = load_hetero(hetero_model)
    index = load_index(template_store, workers)
    bank = model.bank(index, workers=workers)
    comps = [as_composition(c) for c in compositions]
    rl = [roles(c) for c in comps]
    ranked = hetero_rank(model, bank, rl, top=polymorphs * 3 + 2, strict=strict)
    return retrieval_output(index, comps, rl, ranked, round)


@job
def inverse_candidates(
    structure: dict, elements: list[str], hetero_model: str, top: int = 10, name: str = "user", round: int = 1
) -> CandidateSet:
    """Compositions of ``elements`` ranked for ``structure``; each becomes a candidate structure."""
    from pymatgen.core import Structure

    from cspml_flows.flows.jobs import candidate_doc
    from cspml_flows.hetero.inverse import inverse_from_structure

    s = structure if isinstance(structure, Structure) else Structure.from_dict(structure)
    res = inverse_from_structure(load_hetero(hetero_model), s, elements, top=top, name=name)
    out = CandidateSet(candidates=[], round=round)
    for c in res.candidates:
        out.candidates.append(
            candidate_doc(
                c.structure,
                c.formula,
                round,
                rank=c.rank,
                score=c.score,
                template_id=f"user:{name}",
                template_formula=res.template_formula,
                assignment=c.assignment,
                min_distance=c.min_distance,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ makers
@dataclass
class HeteroRetrievalMaker(Maker):
    """Template retrieval with the hetero model (energy-aware polymorph ranking)."""

    name: str = "hetero retrieve"
    polymorphs: int = 3
    strict: bool = False
    workers: int = 1

    def make(self, compositions: list[str], template_store: str, hetero_model: str, round: int = 1) -> Job:
        j = hetero_retrieve(
            list(compositions),
            str(template_store),
            str(hetero_model),
            self.polymorphs,
            self.strict,
            round,
            self.workers,
        )
        j.name = self.name
        return j


@dataclass
class MetastableMaker(Maker):
    """K polymorphs per composition: hetero retrieval -> substitute -> dedup -> relax -> stability."""

    name: str = "hetero metastable"
    template_store: str = ""
    results_store: str = ""
    hetero_model: str = ""
    polymorphs: int = 3
    strict: bool = False
    calculator: CalculatorSettings = field(default_factory=CalculatorSettings)
    max_references: int = 40
    workers: int = 1

    def make(self, compositions: list[str], round: int = 1) -> Flow:
        retrieve = HeteroRetrievalMaker(polymorphs=self.polymorphs, strict=self.strict, workers=self.workers).make(
            compositions, self.template_store, self.hetero_model, round
        )
        stages, output = realize_and_validate(
            retrieve,
            self.polymorphs,
            self.calculator,
            self.template_store,
            self.results_store,
            self.max_references,
            round,
        )
        return Flow(stages, output=output, name=f"{self.name} round {round}")


@dataclass
class InverseMaker(Maker):
    """Which compositions crystallise in a structure: hetero inverse design -> relax -> stability."""

    name: str = "hetero inverse"
    template_store: str = ""
    results_store: str = ""
    hetero_model: str = ""
    top: int = 10
    calculator: CalculatorSettings = field(default_factory=CalculatorSettings)
    max_references: int = 40

    def make(self, structure, elements: list[str], structure_name: str = "user", round: int = 1) -> Flow:
        d = structure.as_dict() if hasattr(structure, "as_dict") else structure
        cands = inverse_candidates(d, list(elements), self.hetero_model, self.top, structure_name, round)
        cands.name = "inverse candidates"
        stages, output = validate_candidates(
            cands.output, self.calculator, self.template_store, self.results_store, self.max_references, round
        )
        return Flow([cands, *stages], output={"candidates": cands.output, **output}, name=f"{self.name} round {round}")


# ------------------------------------------------------------------------------------------------ campaigns
class HeteroCampaignConfig(BaseModel):
    """A metastable or inverse campaign file (``configs/hetero_*.yaml``)."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9_.]+$")
    kind: Literal["metastable", "inverse"]
    compositions: list[str] = Field(default_factory=list, description="metastable: compositions")
    polymorphs: int = Field(3, ge=1, le=20, description="metastable: structures per composition")
    strict: bool = False
    structure: str | None = Field(None, description="inverse: CIF/POSCAR file of the user structure")
    elements: list[str] = Field(default_factory=list, description="inverse: elements to substitute")
    top: int = Field(10, ge=1, le=200, description="inverse: compositions to relax")
    calculator: CalculatorSettings = Field(default_factory=CalculatorSettings)
    max_references: int = Field(40, ge=1)
    hetero_model: str = Field("default", description="'default': $CSPML_HOME/models/hetero.json.gz")
    template_store: str | None = None
    results_store: str | None = None
    jobs_store: str | None = None
    workdir: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        from cspml_flows.campaign import check_name

        return check_name(value)

    @field_validator("compositions")
    @classmethod
    def _formulas(cls, value: list[str]) -> list[str]:
        from cspml_flows.campaign import MAX_COMPOSITIONS
        from cspml_flows.composition import check_formulas

        if len(value) > MAX_COMPOSITIONS:
            raise ValueError(f"{len(value):,} compositions; a campaign may have at most {MAX_COMPOSITIONS:,}")
        return check_formulas(value)

    def workdir_path(self) -> Path:
        return Path(self.workdir or f"out/campaigns/{self.name}").expanduser()

    def model_path(self) -> str:
        from cspml_flows.hetero.model import default_hetero_path

        return str(default_hetero_path() if self.hetero_model == "default" else Path(self.hetero_model).expanduser())

    def template_store_uri(self) -> str:
        from cspml_flows.config import default_store_path

        return str(self.template_store or default_store_path())


def load_hetero_campaign(path: str | Path) -> HeteroCampaignConfig:
    p = Path(path).expanduser()
    data = read_yaml(p, "campaign file")
    if not isinstance(data, dict):
        raise ConfigError(f"campaign file {p} must hold a mapping")
    try:
        cfg = HeteroCampaignConfig.model_validate(data)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{p}: {msgs}") from None
    if cfg.kind == "metastable" and not cfg.compositions:
        raise ConfigError(f"{p}: a metastable campaign needs 'compositions'")
    if cfg.kind == "inverse" and not cfg.structure:
        raise ConfigError(f"{p}: an inverse campaign needs 'structure' (a CIF/POSCAR file)")
    base = p.resolve().parent  # relative paths in the file are relative to its folder
    for key in ("structure", "hetero_model", "template_store", "results_store", "jobs_store", "workdir"):
        setattr(cfg, key, resolve_path(getattr(cfg, key), base))
    return cfg


def hetero_flow(cfg: HeteroCampaignConfig) -> Flow:
    """The campaign's jobflow Flow (bad input fails here, before anything runs)."""
    from cspml_flows.hetero.inverse import check_elements

    workdir = cfg.workdir_path()
    results = cfg.results_store or str(workdir / "results")
    model = cfg.model_path()
    load_hetero(model)  # a missing or incompatible model fails before the flow is built
    if cfg.kind == "metastable":
        maker = MetastableMaker(
            template_store=cfg.template_store_uri(),
            results_store=results,
            hetero_model=model,
            polymorphs=cfg.polymorphs,
            strict=cfg.strict,
            calculator=cfg.calculator,
            max_references=cfg.max_references,
        )
        return maker.make(cfg.compositions)
    from cspml_flows.templates.importers import read_structure

    elements = check_elements(cfg.elements)
    structure = read_structure(cfg.structure)
    maker = InverseMaker(
        template_store=cfg.template_store_uri(),
        results_store=results,
        hetero_model=model,
        top=cfg.top,
        calculator=cfg.calculator,
        max_references=cfg.max_references,
    )
    return maker.make(structure, elements, Path(cfg.structure).name)


def run_hetero_campaign(cfg: HeteroCampaignConfig, log=print) -> dict[str, Any]:
    """Run a hetero campaign locally; returns (and writes to ``<workdir>/hetero_summary.json``) one row per
    candidate with its rank, score and e_above_hull after relaxation."""
    from jobflow import run_locally

    from cspml_flows.flows.schemas import StabilityOutput
    from cspml_flows.flows.stores import job_store

    flow = hetero_flow(cfg)
    workdir = cfg.workdir_path()
    workdir.mkdir(parents=True, exist_ok=True)
    store = job_store(cfg.jobs_store or str(workdir / "jobstore"))
    t0 = time.perf_counter()
    run_locally(flow, store=store, create_folders=False, ensure_success=False, log=False)
    store.connect()
    try:
        stab = flow.output["stability"].resolve(store, on_missing="none")
    finally:
        store.close()
    if stab is None:
        raise ConfigError(f"campaign {cfg.name}: the flow did not reach the stability stage (see the log)")
    so = StabilityOutput.coerce(stab)
    ehull = {r.key: r for r in so.records}
    rows = []
    for c in so.candidates:
        st = ehull.get(c.key)
        rows.append(
            {
                "formula": c.formula,
                "rank": c.candidate.rank if c.candidate else None,
                "score": c.candidate.score if c.candidate else None,
                "template_id": c.source_id,
                "status": c.status,
                "e_above_hull": st.e_above_hull if st else None,
            }
        )
    rows.sort(key=lambda r: (r["formula"], r["rank"] or 0))
    summary = {"campaign": cfg.name, "kind": cfg.kind, "seconds": time.perf_counter() - t0, "candidates": rows}
    (workdir / "hetero_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    for r in rows:
        e = "-" if r["e_above_hull"] is None else f"{r['e_above_hull']:.3f}"
        log(f"{r['formula']:<14} rank {r['rank']}  score {r['score']:.3f}  {r['status']:<10} e_above_hull {e}")
    return summary
