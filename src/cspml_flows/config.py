"""Paths and settings: environment variables first, then a YAML config file, then defaults.

- ``CSPML_DATA_DIR`` / config key ``data_dir``: the benchmark data folder (``../shared/data`` by default).
- ``CSPML_HOME`` / config key ``home``: where the default template store, models and caches live; without
  either, the nearest ``.cspml`` folder in the working directory or above it (what ``make demo`` makes), else
  ``~/.cspml-flows``.
- ``CSPML_CONFIG``: a YAML file with those keys (default: ``<home>/config.yaml`` if it exists).
- ``CSPML_MAX_TEMPLATE_ATOMS`` / config key ``max_template_atoms``: the most sites a template structure may
  have (default 200); larger structures are refused at import.

YAML files (config and campaign files) larger than ``MAX_YAML_BYTES`` are refused before they are parsed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from cspml_flows.errors import ConfigError

DATA_ENV = "CSPML_DATA_DIR"
HOME_ENV = "CSPML_HOME"
CONFIG_ENV = "CSPML_CONFIG"
MAX_ATOMS_ENV = "CSPML_MAX_TEMPLATE_ATOMS"
DEFAULT_MAX_TEMPLATE_ATOMS = 200  # MP-20 has at most 20 sites, MPTS-52 52; prediction memory grows as N^2
MAX_YAML_BYTES = 1_000_000


def _project_root() -> Path:
    """The source checkout root when installed in editable mode (src/cspml_flows/config.py)."""
    return Path(__file__).resolve().parents[2]


def read_yaml(path: str | Path, what: str) -> Any:
    """Parsed YAML of a file; ConfigError names a missing file or invalid YAML (``what``: e.g. 'config file')."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {p} is {size / 1e6:.1f} MB; at most {MAX_YAML_BYTES / 1e6:.0f} MB is read")
    try:
        return yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{what} {p} is not valid YAML: {reason}") from None


def resolve_path(value: str | None, base: Path) -> str | None:
    """A path written in a file at ``base``: relative paths are relative to that folder; URIs
    (``scheme://``), absolute and ``~`` paths, ``None`` and ``default`` are returned as they are."""
    if value is None or value == "default" or "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def max_template_atoms(config: dict[str, Any] | None = None) -> int:
    """The most sites a template may have: ``CSPML_MAX_TEMPLATE_ATOMS``, config ``max_template_atoms``, else
    ``DEFAULT_MAX_TEMPLATE_ATOMS``."""
    value = os.environ.get(MAX_ATOMS_ENV)
    if not value:
        config = load_config() if config is None else config
        value = config.get("max_template_atoms", DEFAULT_MAX_TEMPLATE_ATOMS)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"max_template_atoms must be a whole number, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"max_template_atoms must be at least 1, got {n}")
    return n


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """Read the YAML config named by ``path`` or ``CSPML_CONFIG``; empty if neither is set."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return {}
    p = Path(path).expanduser()
    data = read_yaml(p, "config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping, got {type(data).__name__}")
    return data


LOCAL_HOME = ".cspml"
PACKAGED_MODEL = Path(__file__).resolve().parent / "data" / "cspml-model.json.gz"


def local_home(start: Path | None = None) -> Path | None:
    """The nearest ``.cspml`` folder in ``start`` (default: the working directory) or one of its parents."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / LOCAL_HOME).is_dir():
            return folder / LOCAL_HOME
    return None


def home_dir(config: dict[str, Any] | None = None) -> Path:
    """Folder for the default store, models and caches: ``CSPML_HOME``, config ``home``, the nearest
    ``.cspml`` folder upwards from the working directory, else ``~/.cspml-flows``."""
    config = load_config() if config is None else config
    value = os.environ.get(HOME_ENV) or config.get("home") or local_home() or Path.home() / ".cspml-flows"
    path = Path(value).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(config: dict[str, Any] | None = None, required: bool = True) -> Path:
    """The benchmark data folder holding ``mp_20_biternary/`` and ``mpts_52/``."""
    config = load_config() if config is None else config
    value = os.environ.get(DATA_ENV) or config.get("data_dir")
    candidates = (
        [Path(value).expanduser()]
        if value
        else [
            Path.cwd() / ".." / "shared" / "data",
            _project_root() / ".." / "shared" / "data",
            Path.cwd() / "shared" / "data",
        ]
    )
    for cand in candidates:
        if (cand / "mp_20_biternary").is_dir() or (cand / "mpts_52").is_dir():
            return cand.resolve()
    if required:
        tried = ", ".join(str(c) for c in candidates)
        raise ConfigError(f"benchmark data folder not found (tried {tried}); set {DATA_ENV} or 'data_dir'")
    return candidates[0]


def default_store_path(config: dict[str, Any] | None = None) -> Path | str:
    """The template store: config key ``store`` (folder, .json file or mongodb:// URI), else the embedded
    on-disk store ``<home>/store``."""
    config = load_config() if config is None else config
    return config.get("store") or home_dir(config) / "store"


def default_model_path(config: dict[str, Any] | None = None) -> Path:
    """Where ``cspml train`` writes the similarity model: config key ``model``, else
    ``<home>/models/cspml.json.gz``."""
    config = load_config() if config is None else config
    return Path(config["model"]).expanduser() if config.get("model") else home_dir(config) / "models" / "cspml.json.gz"


def model_path(explicit: str | Path | None = None, config: dict[str, Any] | None = None) -> Path:
    """The similarity model to predict with: ``explicit``, else the trained default (:func:`default_model_path`)
    if it exists, else the model shipped in the package (trained on the demo pool, see README)."""
    if explicit:
        return Path(explicit).expanduser()
    trained = default_model_path(config)
    return trained if trained.is_file() or not PACKAGED_MODEL.is_file() else PACKAGED_MODEL
