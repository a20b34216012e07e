"""Paths and settings: environment variables first, then a YAML config file, then defaults.

- ``CSPML_DATA_DIR`` / config key ``data_dir``: the benchmark data folder (``../shared/data`` by default).
- ``CSPML_HOME`` / config key ``home``: where the default template store, models and caches live; without
  either, the nearest ``.cspml`` folder in the working directory or above it (what ``make demo`` makes), else
  ``~/.cspml-flows``.
- ``CSPML_CONFIG``: a YAML file with those keys (default: ``<home>/config.yaml`` if it exists).
- ``CSPML_MAX_TEMPLATE_ATOMS`` / config key ``max_template_atoms``: the most sites a template structure may
  have (default 200); larger structures are refused at import.

YAML files (config and campaign files) larger than ``MAX_YAML_BYTES`` are refused before they are parsed, and
so are YAML aliases (``*name``): an alias repeats a node without copying it, so a few hundred bytes of nested
aliases describe a document of billions of values. Error messages show user values through :func:`excerpt`.
"""

from __future__ import annotations

import os
import reprlib
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cspml_flows.core.errors import ConfigError

DATA_ENV = "CSPML_DATA_DIR"
HOME_ENV = "CSPML_HOME"
CONFIG_ENV = "CSPML_CONFIG"
MAX_ATOMS_ENV = "CSPML_MAX_TEMPLATE_ATOMS"
DEFAULT_MAX_TEMPLATE_ATOMS = 200  # MP-20 has at most 20 sites, MPTS-52 52; prediction memory grows as N^2
MAX_YAML_BYTES = 1_000_000
EXCERPT_CHARS = 80  # characters of a user value that an error message shows


def _project_root() -> Path:
    """The source checkout root when installed in editable mode (src/cspml_flows/core/config.py)."""
    return Path(__file__).resolve().parents[3]


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = EXCERPT_CHARS + 2, 40, EXCERPT_CHARS


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters plus ``...``, without building the repr of a whole large value."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails (e.g. an int over Python's digit limit)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def excerpt_text(text: str, limit: int = 2 * EXCERPT_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters plus ``...``."""
    text = " ".join(str(text)[: limit * 4].split())
    return text if len(text) <= limit else text[:limit] + "..."


def _yaml_loader() -> type:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _refuse_aliases(text: str) -> None:
    """YAMLError at the first alias event (``*name``, also in a ``<<: *name`` merge key)."""
    for event in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.YAMLError(
                f"alias *{excerpt_text(event.anchor or '', 40)} on line {event.start_mark.line + 1}: YAML aliases "
                "are not accepted (write the values out)"
            )


def read_yaml(path: str | Path, what: str) -> Any:
    """Parsed YAML of a file (safe tags only, no aliases); ConfigError names a missing file or invalid YAML
    (``what``: e.g. 'config file')."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {p} is {size / 1e6:.1f} MB; at most {MAX_YAML_BYTES / 1e6:.0f} MB is read")
    try:
        text = p.read_text()
        _refuse_aliases(text)  # before any node is built
        return yaml.load(text, Loader=_yaml_loader())  # a safe loader: standard tags only
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: e.g. an integer over Python's digit limit; RecursionError: thousands of nested brackets
        reason = excerpt_text(str(exc) or type(exc).__name__, 200)
        raise ConfigError(f"{what} {p} is not valid YAML: {reason}") from None


def resolve_path(value: str | None, base: Path) -> str | None:
    """A path written in a file at ``base``: relative paths are relative to that folder; URIs
    (``scheme://``), absolute and ``~`` paths, ``None`` and ``default`` are returned as they are."""
    if value is None or value == "default" or "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def int_setting(
    env: str, key: str, default: int, config: dict[str, Any] | None = None, unit: str = "whole number"
) -> int:
    """A whole-number setting of at least 1: the environment variable ``env``, else config ``key``, else
    ``default``; ConfigError names ``key`` when the value is not a whole number (``unit``: how the message
    calls one) or is below 1."""
    value = os.environ.get(env)
    if not value:
        config = load_config() if config is None else config
        value = config.get(key, default)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {unit}, got {excerpt(value)}") from None
    if n < 1:
        raise ConfigError(f"{key} must be at least 1, got {n}")
    return n


def max_template_atoms(config: dict[str, Any] | None = None) -> int:
    """The most sites a template may have: ``CSPML_MAX_TEMPLATE_ATOMS``, config ``max_template_atoms``, else
    ``DEFAULT_MAX_TEMPLATE_ATOMS``."""
    return int_setting(MAX_ATOMS_ENV, "max_template_atoms", DEFAULT_MAX_TEMPLATE_ATOMS, config)


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


def check_output_path(out: str | Path, kind: str = "folder", label: str | None = None) -> Path:
    """Refuse, before any work is done, an output ``kind`` ('folder' or 'file') that cannot be written: a broken
    symbolic link on its path, a file where a folder is needed (or a folder where a file is), a nearest
    existing folder that does not take a (deleted at once) temporary file. Nothing is created; returns the path."""
    label = label or f"output {kind}"
    path = Path(out).expanduser()
    existing = path
    try:
        while not existing.exists():
            if existing.is_symlink():
                target = os.readlink(existing)
                if existing == path:
                    raise ConfigError(f"{label} {out} is a broken symbolic link (to {target}): remove it or repoint it")
                raise ConfigError(f"cannot create {label} {out}: {existing} is a broken symbolic link (to {target})")
            if existing == existing.parent:
                break
            existing = existing.parent
    except OSError as exc:
        raise ConfigError(f"cannot reach {label} {out}: {exc.strerror or exc}") from None
    if existing == path:
        if kind == "folder" and not path.is_dir():
            raise ConfigError(f"{label} {out} is a file")
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{label} {out} is a folder")
        if kind == "file" and not os.access(path, os.W_OK):
            raise ConfigError(f"cannot write to {label} {out}: permission denied")
    elif not existing.is_dir():
        raise ConfigError(f"cannot create {label} {out}: {existing} is a file")
    # must take a temporary file: the folder the missing part would be created in, the folder itself, or the
    # folder of a file (files are written beside themselves, then renamed)
    folder = existing if existing != path else path if kind == "folder" else path.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        where = "" if folder == path else f" ({folder} is not writable)"
        raise ConfigError(f"cannot write to {label} {out}{where}: {exc.strerror or exc}") from None
    return path


LOCAL_HOME = ".cspml"
PACKAGED_MODEL = Path(__file__).resolve().parents[1] / "data" / "cspml-model.json.gz"


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
