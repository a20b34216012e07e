"""Campaigns: a YAML config (validated with pydantic), N rounds of :class:`CSPMaker` flows run with jobflow,
state in maggma stores so that a re-run or a restart after a kill recomputes nothing finished.

Round k+1 retrieves from the template store that round k updated. Relative paths in a campaign file are
relative to the file's folder. Limits (each a one-line error): ``MAX_COMPOSITIONS`` compositions per campaign,
``MAX_SYSTEM_ELEMENTS`` elements per chemical system, and a composition space of at most ``MAX_CANDIDATES``
formulas before the charge-balance filter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from cspml_flows.config import read_yaml, resolve_path
from cspml_flows.errors import ConfigError, CSPMLError
from cspml_flows.flows.calculators import CalculatorSettings

MAX_COMPOSITIONS = 10_000  # compositions of one campaign
MAX_SYSTEM_ELEMENTS = 6  # elements of one chemical system in a composition space
MAX_CANDIDATES = 20_000  # formulas of a composition space before the (slow) charge-balance filter
MAX_NAME = 100  # characters of a campaign name (it names folders)


class CampaignError(CSPMLError):
    """A campaign round whose flow did not finish."""


def check_name(value: str) -> str:
    """Pydantic-validator helper: a campaign name that can name a folder."""
    if len(value) > MAX_NAME:
        raise ValueError(f"at most {MAX_NAME} characters (got {len(value)})")
    if set(value) <= {"."}:
        raise ValueError("must contain a letter, digit or '_'")
    return value


def _counts(n: int, total: int) -> Iterator[tuple[int, ...]]:
    """Tuples of ``n`` positive integers with sum at most ``total``."""
    if n == 0:
        yield ()
        return
    for first in range(1, total - n + 2):
        for rest in _counts(n - 1, total - first):
            yield (first, *rest)


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
            if len(els) > MAX_SYSTEM_ELEMENTS:
                raise ValueError(f"chemical system {cs!r} has {len(els)} elements; at most {MAX_SYSTEM_ELEMENTS}")
        return value

    @model_validator(mode="after")
    def _check_size(self) -> CompositionSpace:
        if self.size() > MAX_CANDIDATES:
            raise ValueError(
                f"{', '.join(self.chemsys)} with max_atoms {self.max_atoms} spans {self.size():,} formulas (at most "
                f"{MAX_CANDIDATES:,}): lower max_atoms or use fewer elements per system"
            )
        return self

    def size(self) -> int:
        """Formulas before the gcd and charge-balance filters (counted, not enumerated)."""
        return sum(math.comb(self.max_atoms, len(cs.split("-"))) for cs in self.chemsys)

    def enumerate(self) -> list[str]:
        """The formulas of the space; ConfigError when there are more than a campaign may have."""
        from pymatgen.core import Composition

        from cspml_flows.predict.validity import smact_valid

        out: dict[str, None] = {}  # plain formulas in the system's element order (Li3PS4, not pymatgen's Li3(PS4))
        for cs in self.chemsys:
            els = cs.split("-")
            for counts in _counts(len(els), self.max_atoms):
                if math.gcd(*counts) != 1:
                    continue
                if self.charge_balanced and not smact_valid(Composition(dict(zip(els, counts, strict=True)))):
                    continue
                out["".join(f"{el}{n if n > 1 else ''}" for el, n in zip(els, counts, strict=True))] = None
        if len(out) > MAX_COMPOSITIONS:
            raise ConfigError(f"compositions: {len(out):,} formulas; a campaign may have at most {MAX_COMPOSITIONS:,}")
        return list(out)


class StoresConfig(BaseModel):
    """Store URIs: a folder (embedded on-disk store), ``mongodb://...`` or ``memory://NAME`` (tests)."""

    model_config = {"extra": "forbid"}

    templates: str | None = Field(None, description="template store (default: $CSPML_HOME/store)")
    results: str | None = Field(None, description="relaxation results and campaign state (default: <workdir>/results)")
    jobs: str | None = Field(None, description="jobflow JobStore (default: <workdir>/jobstore)")


class CampaignConfig(BaseModel):
    """One campaign file in ``configs/``."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9_.]+$", description="letters, digits, '_' and '.' (at most 100)")
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

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("compositions")
    @classmethod
    def _check_formulas(cls, value: list[str] | CompositionSpace) -> list[str] | CompositionSpace:
        from cspml_flows.composition import check_formulas

        if isinstance(value, list):
            if not value:
                raise ValueError("at least one composition is needed")
            if len(value) > MAX_COMPOSITIONS:
                raise ValueError(f"{len(value):,} compositions; a campaign may have at most {MAX_COMPOSITIONS:,}")
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
        if e["type"] == "list_type" and isinstance(e.get("input"), dict):
            continue  # a composition space was meant, not a list: its own errors follow
        loc = ".".join(str(x) for x in e["loc"] if "[" not in str(x) and not str(x).startswith("CompositionSpace"))
        msg = e["msg"].replace("Value error, ", "")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        given = e.get("input")
        text = repr(given) if len(repr(given)) <= 60 else repr(given)[:57] + "..."
        shown = f" (got {text})" if e["type"] != "extra_forbidden" and not isinstance(given, dict | list) else ""
        lines.append(f"{loc or '<top>'}: {msg}{shown}")
    return "; ".join(dict.fromkeys(lines))


def parse_campaign(data: Any, source: str = "campaign config", base: Path | None = None) -> CampaignConfig:
    """Validate a mapping; ConfigError names every bad key or value. With ``base`` (the folder of the
    campaign file), relative paths (stores, workdir, model) are taken relative to it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys, got {type(data).__name__}")
    try:
        cfg = CampaignConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from None
    if base is not None:
        stores = {k: resolve_path(v, base) for k, v in cfg.stores.model_dump().items()}
        cfg.stores = StoresConfig(**stores)
        cfg.workdir = resolve_path(cfg.workdir, base)
        cfg.model = resolve_path(cfg.model, base)
    return cfg


def load_campaign(path: str | Path) -> CampaignConfig:
    """Read and validate a campaign YAML file (relative paths in it: relative to its folder)."""
    p = Path(path).expanduser()
    return parse_campaign(read_yaml(p, "campaign file"), str(p), base=p.resolve().parent)


def with_rounds(cfg: CampaignConfig, rounds: int) -> CampaignConfig:
    """The campaign with another number of rounds, validated like the file's value."""
    try:
        return CampaignConfig.model_validate({**cfg.model_dump(), "rounds": rounds})
    except ValidationError as exc:
        raise ConfigError(f"--rounds: {_format_errors(exc)}") from None


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

    from cspml_flows.flows.stores import STATE_COLLECTION, close_store, job_store, open_store, write_docs

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
            write_docs(state, [{"round_id": rid, "status": "done", "summary": summary}], key="round_id")
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
