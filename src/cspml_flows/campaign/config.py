"""The campaign file (YAML, validated with pydantic) and the CSPMaker it describes.

Three kinds share one file layout and one runner: ``csp`` (CSPML retrieval), ``metastable`` (K polymorphs per
composition from the hetero model) and ``inverse`` (compositions of given elements on a user structure).
``calculator`` is the first relaxation tier; ``tiers`` adds costlier calculators that only see candidates
within their ``hull_window`` of the previous hull. Relative paths in a campaign file are relative to the
file's folder. Limits (each a one-line error): ``MAX_COMPOSITIONS`` compositions per campaign,
``MAX_SYSTEM_ELEMENTS`` elements per chemical system, and a composition space of at most ``MAX_CANDIDATES``
formulas before the charge-balance filter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pymatgen.core import Composition, Element

from cspml_flows.core.composition import check_formulas, parse_composition
from cspml_flows.core.config import default_store_path, excerpt, excerpt_text, read_yaml, resolve_path
from cspml_flows.core.config import model_path as resolve_model
from cspml_flows.core.errors import ConfigError, CSPMLError
from cspml_flows.flows.calculators import CalculatorSettings
from cspml_flows.flows.relax import RelaxationMaker, as_relaxation
from cspml_flows.learning.hetero.model import default_hetero_path
from cspml_flows.predict.validity import smact_valid

MAX_COMPOSITIONS = 10_000  # compositions of one campaign
MAX_SYSTEM_ELEMENTS = 6  # elements of one chemical system in a composition space
MAX_CANDIDATES = 20_000  # formulas of a composition space before the (slow) charge-balance filter
MAX_NAME = 100  # characters of a campaign name (it names folders)
MAX_ERRORS_SHOWN = 3  # validation errors listed in one message


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
        for cs in value:
            els = cs.split("-")
            bad = [e for e in els if not Element.is_valid_symbol(e)]
            if bad or len(set(els)) != len(els) or len(els) < 2:
                raise ValueError(f"chemical system {excerpt(cs)} must be 2+ distinct element symbols joined by '-'")
            if len(els) > MAX_SYSTEM_ELEMENTS:
                raise ValueError(
                    f"chemical system {excerpt(cs)} has {len(els)} elements; at most {MAX_SYSTEM_ELEMENTS}"
                )
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
    kind: Literal["csp", "metastable", "inverse"] = Field("csp", description="which retrieval stage")
    compositions: list[str] | CompositionSpace = Field(default_factory=list, description="csp, metastable")
    top_k: int = Field(5, ge=1, le=50, description="csp: structures per composition; inverse: compositions")
    polymorphs: int = Field(3, ge=1, le=20, description="metastable: distinct structures per composition")
    structure: str | None = Field(None, description="inverse: CIF/POSCAR file of the user structure")
    elements: list[str] = Field(default_factory=list, description="inverse: elements to substitute")
    strict: bool = Field(False, description="ignore templates of the query's own formula")
    calculator: CalculatorSettings = Field(default_factory=CalculatorSettings)
    tiers: list[CalculatorSettings] = Field(
        default_factory=list, description="further calculators; each relaxes candidates within its hull_window"
    )
    hull_threshold: float = Field(0.1, ge=0, description="promote candidates with e_above_hull <= this (eV/atom)")
    rounds: int = Field(1, ge=1, le=100)
    max_references: int = Field(40, ge=1, description="competing phases per chemical subsystem")
    model: str | None = Field(
        "default", description="model file (csp: similarity, else hetero); 'default': $CSPML_HOME; null: none (csp)"
    )
    stores: StoresConfig = Field(default_factory=StoresConfig)
    workdir: str | None = Field(None, description="reports and default stores (default: out/campaigns/<name>)")
    workers: int = Field(1, ge=1, description="processes for building the template index")
    retrieval_chunk: int = Field(
        1000, ge=1, description="csp, metastable: compositions per retrieval job; more fan out as one job per chunk"
    )
    _source: str | None = PrivateAttr(None)  # the campaign file this configuration was read from

    @property
    def source(self) -> str | None:
        """The campaign file this configuration was read from (None: built in Python)."""
        return self._source

    @model_validator(mode="before")
    @classmethod
    def _legacy_hetero_keys(cls, data: Any) -> Any:
        """Hetero campaign files of earlier versions: ``hetero_model``, ``top``, flat store keys."""
        if isinstance(data, dict) and data.get("kind") in ("metastable", "inverse"):
            data = dict(data)
            if "hetero_model" in data:
                data.setdefault("model", data.pop("hetero_model"))
            if "top" in data:
                data.setdefault("top_k", data.pop("top"))
            stores = dict(data.get("stores") or {})
            for old, new in (("template_store", "templates"), ("results_store", "results"), ("jobs_store", "jobs")):
                if old in data:
                    stores.setdefault(new, data.pop(old))
            if stores:
                data["stores"] = stores
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _check_kind(self) -> CampaignConfig:
        if self.kind == "inverse":
            if not self.structure:
                raise ValueError("an inverse campaign needs 'structure' (a CIF/POSCAR file)")
            if not self.elements:
                raise ValueError("an inverse campaign needs 'elements'")
        elif isinstance(self.compositions, list) and not self.compositions:
            raise ValueError(f"compositions: at least one composition is needed for a {self.kind} campaign")
        if self.kind != "csp" and self.model is None:
            raise ValueError(f"a {self.kind} campaign needs a hetero model ('model: default' or a file)")
        for k, tier in enumerate(self.tiers, 2):
            if tier.name == self.calculator.name and tier == self.calculator:
                raise ValueError(f"tiers[{k - 2}] repeats the first calculator")
        return self

    @field_validator("compositions")
    @classmethod
    def _check_formulas(cls, value: list[str] | CompositionSpace) -> list[str] | CompositionSpace:
        if isinstance(value, list):
            if len(value) > MAX_COMPOSITIONS:
                raise ValueError(f"{len(value):,} compositions; a campaign may have at most {MAX_COMPOSITIONS:,}")
            check_formulas(value)
        return value

    # ---- derived paths ------------------------------------------------------------------------------
    def formulas(self) -> list[str]:
        """The campaign's reduced formulas (none for an inverse campaign: its retrieval generates them)."""
        if isinstance(self.compositions, CompositionSpace):
            return self.compositions.enumerate()
        return [parse_composition(f).reduced_formula for f in self.compositions]

    def workdir_path(self) -> Path:
        """The campaign's folder: reports, and the default stores."""
        return Path(self.workdir or f"out/campaigns/{self.name}").expanduser()

    def template_store(self) -> str:
        """URI of the template store."""
        return str(self.stores.templates or default_store_path())

    def results_store(self) -> str:
        """URI of the results store (relaxations and campaign state)."""
        return str(self.stores.results or self.workdir_path() / "results")

    def jobs_store(self) -> str:
        """URI of the jobflow JobStore."""
        return str(self.stores.jobs or self.workdir_path() / "jobstore")

    def model_path(self) -> str | None:
        """The model file: similarity model (csp) or hetero model (metastable, inverse)."""
        if self.model is None:
            return None
        if self.kind != "csp":
            return str(default_hetero_path() if self.model == "default" else Path(self.model).expanduser())
        return str(resolve_model(None if self.model == "default" else self.model))

    def relaxations(self) -> list[RelaxationMaker]:
        """The RelaxationMaker of every calculator tier, first to last."""
        return [as_relaxation(self.calculator), *(as_relaxation(t) for t in self.tiers)]

    def calc_ids(self) -> list[str]:
        """The calculator id of every tier."""
        return [r.calc_id for r in self.relaxations()]


def _format_errors(exc: ValidationError) -> str:
    """The validation errors on one line: each key path, message and (an excerpt of) the value given; at most
    ``MAX_ERRORS_SHOWN`` of them, every user value cut to an excerpt."""
    lines = []
    for e in exc.errors(include_url=False):
        if e["type"] == "list_type" and isinstance(e.get("input"), dict):
            continue  # a composition space was meant, not a list: its own errors follow
        parts = [str(x) for x in e["loc"]]  # str() of a key from the file: may be long, cut below
        loc = ".".join(
            excerpt_text(x, 40) for x in parts if "[" not in x[:200] and not x.startswith("CompositionSpace")
        )
        msg = excerpt_text(e["msg"].replace("Value error, ", ""), 200)
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        given = e.get("input")
        shown = (
            f" (got {excerpt(given, 60)})"
            if e["type"] != "extra_forbidden" and not isinstance(given, dict | list)
            else ""
        )
        lines.append(f"{loc or '<top>'}: {msg}{shown}")
    unique = list(dict.fromkeys(lines))
    more = f"; and {len(unique) - MAX_ERRORS_SHOWN:,} more" if len(unique) > MAX_ERRORS_SHOWN else ""
    return "; ".join(unique[:MAX_ERRORS_SHOWN]) + more


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
        cfg.structure = resolve_path(cfg.structure, base)
        cfg._source = source
    return cfg


def load_campaign(path: str | Path) -> CampaignConfig:
    """Read and validate a campaign YAML file (relative paths in it: relative to its folder)."""
    p = Path(path).expanduser()
    return parse_campaign(read_yaml(p, "campaign file"), str(p), base=p.resolve().parent)


def with_rounds(cfg: CampaignConfig, rounds: int) -> CampaignConfig:
    """The campaign with another number of rounds, validated like the file's value."""
    try:
        out = CampaignConfig.model_validate({**cfg.model_dump(), "rounds": rounds})
    except ValidationError as exc:
        raise ConfigError(f"--rounds: {_format_errors(exc)}") from None
    out._source = cfg.source
    return out
