"""Campaigns: a YAML config (validated with pydantic), N rounds of :class:`CSPMaker` flows run with jobflow,
state in maggma stores so that a re-run or a restart after a kill recomputes nothing finished.

Round k+1 retrieves from the template store that round k updated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from cspml_flows.config import read_yaml
from cspml_flows.errors import ConfigError, CSPMLError
from cspml_flows.flows.calculators import CalculatorSettings


class CampaignError(CSPMLError):
    """A campaign round whose flow did not finish."""


class CompositionSpace(BaseModel):
    """Enumerate compositions of chemical systems: every element present, at most ``max_atoms`` atoms per
    reduced formula unit, optionally only SMACT charge-balanced ones (all-metal compositions pass)."""

    model_config = {"extra": "forbid"}

    chemsys: list[str] = Field(min_length=1, description="e.g. ['Cu-Au', 'Li-P-S']")
    max_atoms: int = Field(6, ge=2, le=20)
    charge_balanced: bool = True

    @field_validator("chemsys")
    @classmethod
    def _check_systems(cls, value: list[str]) -> list[str]:
        from pymatgen.core import Element

        for cs in value:
            els = cs.split("-")
            bad = [e for e in els if not Element.is_valid_symbol(e)]
            if bad or len(set(els)) != len(els) or len(els) < 2:
                raise ValueError(f"chemical system {cs!r} must be 2+ distinct element symbols joined by '-'")
        return value

    def enumerate(self) -> list[str]:
        from pymatgen.core import Composition

        from cspml_flows.predict.validity import smact_valid

        out: list[str] = []  # plain formulas in the system's element order (Li3PS4, not pymatgen's Li3(PS4))
        for cs in self.chemsys:
            els = cs.split("-")
            for counts in product(range(1, self.max_atoms + 1), repeat=len(els)):
                if sum(counts) > self.max_atoms or math.gcd(*counts) != 1:
                    continue
                if self.charge_balanced and not smact_valid(Composition(dict(zip(els, counts, strict=True)))):
                    continue
                formula = "".join(f"{el}{n if n > 1 else ''}" for el, n in zip(els, counts, strict=True))
                if formula not in out:
                    out.append(formula)
        return out


class StoresConfig(BaseModel):
    """Store URIs: a folder (embedded on-disk store), ``mongodb://...`` or ``memory://NAME`` (tests)."""

    model_config = {"extra": "forbid"}

    templates: str | None = Field(None, description="template store (default: $CSPML_HOME/store)")
    results: str | None = Field(None, description="relaxation results and campaign state (default: <workdir>/results)")
    jobs: str | None = Field(None, description="jobflow JobStore (default: <workdir>/jobstore)")


class CampaignConfig(BaseModel):
    """One campaign file in ``configs/``."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9_.]+$", description="letters, digits, '_' and '.'")
    compositions: list[str] | CompositionSpace
    top_k: int = Field(5, ge=1, le=50)
    strict: bool = Field(False, description="ignore templates of the query's own formula")
    calculator: CalculatorSettings = Field(default_factory=CalculatorSettings)
    hull_threshold: float = Field(0.1, ge=0, description="promote candidates with e_above_hull <= this (eV/atom)")
    rounds: int = Field(1, ge=1, le=100)
    max_references: int = Field(40, ge=1, description="competing phases per chemical subsystem")
    model: str | None = Field("default", description="similarity model file; 'default': $CSPML_HOME; null: none")
    stores: StoresConfig = Field(default_factory=StoresConfig)
    workdir: str | None = Field(None, description="reports and default stores (default: out/campaigns/<name>)")
    workers: int = Field(1, ge=1, description="processes for building the template index")

    @field_validator("compositions")
    @classmethod
    def _check_formulas(cls, value: list[str] | CompositionSpace) -> list[str] | CompositionSpace:
        from cspml_flows.composition import check_formulas

        if isinstance(value, list):
            if not value:
                raise ValueError("at least one composition is needed")
            check_formulas(value)
        return value

    # ---- derived paths ------------------------------------------------------------------------------
    def formulas(self) -> list[str]:
        from cspml_flows.composition import parse_composition

        if isinstance(self.compositions, CompositionSpace):
            return self.compositions.enumerate()
        return [parse_composition(f).reduced_formula for f in self.compositions]

    def workdir_path(self) -> Path:
        return Path(self.workdir or f"out/campaigns/{self.name}").expanduser()

    def template_store(self) -> str:
        from cspml_flows.config import default_store_path

        return str(self.stores.templates or default_store_path())

    def results_store(self) -> str:
        return str(self.stores.results or self.workdir_path() / "results")

    def jobs_store(self) -> str:
        return str(self.stores.jobs or self.workdir_path() / "jobstore")

    def model_path(self) -> str | None:
        from cspml_flows.config import model_path as resolve_model

        if self.model is None:
            return None
        return str(resolve_model(None if self.model == "default" else self.model))


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("list[", "CompositionSpace")))
        msg = e["msg"].replace("Value error, ", "")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        given = e.get("input")
        shown = f" (got {given!r})" if e["type"] != "extra_forbidden" and not isinstance(given, dict | list) else ""
        lines.append(f"{loc or '<top>'}: {msg}{shown}")
    return "; ".join(dict.fromkeys(lines))


def parse_campaign(data: Any, source: str = "campaign config") -> CampaignConfig:
    """Validate a mapping; ConfigError names every bad key or value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys, got {type(data).__name__}")
    try:
        return CampaignConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from None


def load_campaign(path: str | Path) -> CampaignConfig:
    """Read and validate a campaign YAML file."""
    p = Path(path).expanduser()
    return parse_campaign(read_yaml(p, "campaign file"), str(p))


# ---------------------------------------------------------------------------------------------- running
def make_maker(cfg: CampaignConfig):
    from cspml_flows.flows.makers import CSPMaker

    return CSPMaker(
        name=f"cspml {cfg.name}",
        template_store=cfg.template_store(),
        results_store=cfg.results_store(),
        model=cfg.model_path(),
        top=cfg.top_k,
        strict=cfg.strict,
        calculator=cfg.calculator,
        hull_threshold=cfg.hull_threshold,
        max_references=cfg.max_references,
        campaign=cfg.name,
        workers=cfg.workers,
    )


def check_inputs(cfg: CampaignConfig) -> None:
    """Fail early, naming the problem: a missing or empty template store, a missing model."""
    from cspml_flows.errors import ModelError
    from cspml_flows.templates.store import TemplateStore

    ts = TemplateStore.open(cfg.template_store(), create=False)
    try:
        ts.require_nonempty()
    finally:
        ts.close()
    model = cfg.model_path()
    if model is not None and not Path(model).is_file():
        raise ModelError(f"similarity model not found: {model} (train one with 'cspml train', or set 'model: null')")


def round_flow(cfg: CampaignConfig, k: int):
    """The jobflow Flow of round ``k`` (what the local runner, jobflow-remote and FireWorks all execute)."""
    return make_maker(cfg).make(cfg.formulas(), round=k)


def run_campaign(cfg: CampaignConfig, log: Callable[[str], None] = print, report: bool = True) -> dict[str, Any]:
    """Run (or resume) every round locally with ``run_locally``; returns the per-round summaries."""
    from jobflow import run_locally

    from cspml_flows.flows.stores import STATE_COLLECTION, close_store, job_store, open_store

    check_inputs(cfg)
    cfg.workdir_path().mkdir(parents=True, exist_ok=True)
    state = open_store(cfg.results_store(), STATE_COLLECTION, key="round_id")
    rounds: list[dict[str, Any]] = []
    try:
        for k in range(1, cfg.rounds + 1):
            rid = f"{cfg.name}:{k}"
            prev = state.query_one({"round_id": rid})
            if prev is not None and prev.get("status") == "done":
                log(f"round {k}: already finished, skipped")
                rounds.append(prev["summary"])
                continue
            flow = round_flow(cfg, k)
            log(f"round {k}: {len(cfg.formulas())} compositions, calculator {cfg.calculator.calc_id}")
            t0 = time.perf_counter()
            store = job_store(cfg.jobs_store())
            run_locally(flow, store=store, create_folders=False, ensure_success=False, log=False)
            summary = summarize_round(flow, store, k, time.perf_counter() - t0)
            state.update([{"round_id": rid, "status": "done", "summary": summary}], key="round_id")
            rounds.append(summary)
            log(
                f"round {k}: {summary['n_candidates']} candidates, {summary['n_computed']} relaxed now, "
                f"{summary['n_cached']} cached, {summary['n_failed']} failed, {len(summary['promoted'])} promoted "
                f"({summary['seconds']:.1f} s)"
            )
    finally:
        close_store(state)
    result = {"campaign": cfg.name, "calculator": cfg.calculator.calc_id, "rounds": rounds}
    if report:
        from cspml_flows.report import write_report

        result["report"] = str(write_report(cfg, result))
        log(f"report: {result['report']}")
    return result


def finished_rounds(cfg: CampaignConfig) -> dict[str, Any]:
    """The summaries of a campaign's finished rounds, read from its results store."""
    from cspml_flows.flows.stores import STATE_COLLECTION, close_store, open_store

    state = open_store(cfg.results_store(), STATE_COLLECTION, key="round_id", create=False)
    try:
        docs = [d for d in state.query({"status": "done"}) if str(d["round_id"]).startswith(f"{cfg.name}:")]
    finally:
        close_store(state)
    if not docs:
        raise CampaignError(f"campaign {cfg.name} has no finished round in {cfg.results_store()}")
    rounds = sorted((d["summary"] for d in docs), key=lambda r: r["round"])
    return {"campaign": cfg.name, "calculator": cfg.calculator.calc_id, "rounds": rounds}


def _resolve(ref, store) -> Any:
    try:
        return ref.resolve(store, on_missing="error")
    except Exception:
        return None


def summarize_round(flow, store, k: int, seconds: float) -> dict[str, Any]:
    """Read a round's outputs back from the JobStore; a stage that did not finish raises CampaignError."""
    from cspml_flows.flows.schemas import CandidateSet, PromotionOutput, RelaxOutput, StabilityOutput

    store.connect()
    try:
        cands = _resolve(flow.output["candidates"], store)
        stab = _resolve(flow.output["stability"], store)
        relaxed = _resolve(flow.output["relaxed"], store)
        prom = _resolve(flow.output.get("promotion"), store) if "promotion" in flow.output else None
    finally:
        store.close()
    if cands is None or stab is None or relaxed is None:
        raise CampaignError(f"round {k} did not finish: a stage failed before the stability analysis (see the log)")
    cs, so = CandidateSet.coerce(cands), StabilityOutput.coerce(stab)
    po = PromotionOutput.coerce(prom) if prom is not None else None
    ehull = {r.key: r for r in so.records}
    rows = []
    for c in so.candidates:
        cand = c.candidate
        st = ehull.get(c.key)
        rows.append(
            {
                "formula": c.formula,
                "rank": cand.rank if cand else None,
                "score": cand.score if cand else None,
                "template_id": c.source_id,
                "key": c.key,
                "status": c.status,
                "reason": c.reason,
                "energy_per_atom": c.energy_per_atom,
                "e_above_hull": st.e_above_hull if st else None,
                "hull_note": st.reason if st else None,
                "n_steps": c.n_steps,
            }
        )
    ro = RelaxOutput.coerce(relaxed)
    return {
        "round": k,
        "seconds": seconds,
        "n_candidates": len(cs.candidates),
        "messages": cs.messages,
        "n_failed": sum(r["status"] == "failed" for r in rows),
        "n_computed": ro.n_computed,
        "n_cached": ro.n_cached,
        "n_references": so.n_references,
        "candidates": rows,
        "promoted": po.promoted if po else [],
        "calculator": so.calculator,
    }
