"""MkDocs hooks of the cspml-flows site: every page part that is derived from code or data is generated here.

- ``<!-- generated: NAME -->`` lines in a page are replaced by the generator ``NAME`` (see ``GENERATORS``):
  the configuration reference (from the pydantic models of the campaign file) and the benchmark tables
  (from the JSON files in ``benchmarks/results/``, the scale tables through ``benchmarks.render``).
- One API reference page per public module of ``cspml_flows`` (``::: module`` for mkdocstrings), added to the
  files and to the nav under "API reference".
- Sphinx roles left in rendered docstrings (``:class:`~a.b.C```) become optional cross-references.

An unknown marker, a missing result file or a model that cannot be imported stops the build.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "cspml_flows"
RESULTS = ROOT / "benchmarks" / "results"
API_DIR = "reference/api"
NAV_TITLE = "API reference"

# Layers whose modules get no API page: ``cli`` is documented in the guides, ``testing`` is used by tests only.
UNDOCUMENTED_LAYERS = {"cli", "testing"}
IMPORTLINTER = ROOT / ".importlinter"

CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")
MARKER = re.compile(r"^<!-- generated: ([a-z0-9-]+) -->$", re.MULTILINE)


# --------------------------------------------------------------------------------------------- API pages


def layers() -> list[str]:
    """The package's layers, lowest first, as the import-linter layers contract in ``.importlinter`` names them."""
    parser = configparser.ConfigParser()
    if not parser.read(IMPORTLINTER):
        raise PluginError(f"{IMPORTLINTER.name} not found: the layers of the API reference are read from it")
    for section in parser.sections():
        if parser.get(section, "type", fallback="") == "layers":
            names = [line.strip() for line in parser.get(section, "layers").splitlines() if line.strip()]
            return names[::-1]
    raise PluginError(f"{IMPORTLINTER.name} has no layers contract")


def layer_modules(layer: str) -> list[str]:
    """Dotted names of a layer's public modules, read from the source tree (nothing imported)."""
    pkg = SRC / PACKAGE
    if (pkg / f"{layer}.py").is_file():
        return [f"{PACKAGE}.{layer}"]
    names = []
    for path in sorted((pkg / layer).rglob("*.py")):
        parts = list(path.relative_to(pkg).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(p.startswith("_") for p in parts):
            names.append(".".join([PACKAGE, *parts]))
    return sorted(names, key=lambda n: (n.count("."), n))


def public_modules() -> dict[str, list[str]]:
    """Public modules per documented layer, lowest layer first."""
    return {layer: layer_modules(layer) for layer in layers() if layer not in UNDOCUMENTED_LAYERS}


def summary_line(module: str) -> str:
    """The first sentence of a module's docstring, read with ``ast`` (nothing imported)."""
    rel = Path(*module.split(".")[1:])
    path = SRC / PACKAGE / rel.with_suffix(".py")
    if not path.is_file():
        path = SRC / PACKAGE / rel / "__init__.py"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n", 1)[0].split())
    return first.split(". ", 1)[0].rstrip(".")


def layers_table() -> str:
    """Every layer (highest first, as ``.importlinter`` lists them) with its modules and their summaries."""
    lines = ["| layer | module | what it holds |", "|---|---|---|"]
    for layer in reversed(layers()):
        for i, module in enumerate(layer_modules(layer)):
            name = module.removeprefix(f"{PACKAGE}.")
            link = f"[`{name}`](reference/api/{module}.md)" if layer not in UNDOCUMENTED_LAYERS else f"`{name}`"
            lines.append(f"| {f'`{layer}`' if i == 0 else ''} | {link} | {_cell(summary_line(module))} |")
    return "\n".join(lines) + "\n"


def api_page(module: str) -> str:
    """The generated page of a module."""
    return f"{API_DIR}/{module}.md"


def api_index(modules: dict[str, list[str]]) -> str:
    """The API reference's overview page: every module page, layer by layer."""
    lines = [
        "# API reference",
        "",
        "One page per public module of `cspml_flows`, generated from the docstrings at build time. Layers are",
        "listed lowest first: a module imports only its own layer or lower ones. Start with",
        f"[`cspml_flows.api`]({PACKAGE}.api.md), the facade that the `cspml` commands call.",
        "",
    ]
    for layer, names in modules.items():
        lines += [f"## {layer}", ""]
        lines += [f"- [`{name}`]({name}.md)" for name in names]
        lines.append("")
    return "\n".join(lines)


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Put the repository on ``sys.path`` (for ``benchmarks.render``) and the API pages into the nav."""
    for path in (str(SRC), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    section: list[Any] = [{"Overview": f"{API_DIR}/index.md"}]
    for layer, names in public_modules().items():
        pages = [{name.removeprefix(f"{PACKAGE}."): api_page(name)} for name in names]
        section.append(pages[0] if len(pages) == 1 else {layer: pages})
    if not _replace_nav_entry(config.nav or [], NAV_TITLE, section):
        raise PluginError(f"mkdocs.yml nav has no '{NAV_TITLE}' entry for the generated API pages")
    return config


def _replace_nav_entry(nav: list[Any], title: str, value: list[Any]) -> bool:
    """Set the nav entry ``title`` (at any depth) to ``value``; False if there is none."""
    for item in nav:
        if not isinstance(item, dict):
            continue
        for key, sub in item.items():
            if key == title:
                item[key] = value
                return True
            if isinstance(sub, list) and _replace_nav_entry(sub, title, value):
                return True
    return False


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated API pages (index and one page per module)."""
    modules = public_modules()
    files.append(File.generated(config, f"{API_DIR}/index.md", content=api_index(modules)))
    for names in modules.values():
        for name in names:
            files.append(File.generated(config, api_page(name), content=f"::: {name}\n"))
    return files


# ------------------------------------------------------------------------------------ configuration pages


def _models_of(annotation: Any) -> Iterator[type]:
    """The pydantic model classes inside a type annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_of(arg)


def _anchor(model: type) -> str:
    return model.__name__.lower()


def type_text(annotation: Any) -> str:
    """A type annotation in words: ``int``, ``list of str``, ``'a' or 'b'``, links to documented models."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        text = "null"
    elif annotation is Any:
        text = "any"
    elif origin is typing.Literal:
        text = " or ".join(f"`{a!r}`" for a in args)
    elif origin in (typing.Union, types.UnionType):
        text = " or ".join(type_text(a) for a in args)
    elif origin in (list, tuple, set, frozenset):
        text = f"list of {type_text(args[0])}" if args else "list"
    elif origin is dict:
        text = f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        text = f"[{annotation.__name__}](#{_anchor(annotation)})"
    else:
        text = f"`{getattr(annotation, '__name__', annotation)}`"
    return text


def yaml_text(value: Any) -> str:
    """A default value as it would be written in YAML."""
    if isinstance(value, BaseModel):
        return f"see [{type(value).__name__}](#{_anchor(type(value))})"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | tuple):
        return "`[]`" if not value else f"`{json.dumps(list(value))}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{json.dumps(value)}`"
    return f"`{value}`"


def constraint_text(metadata: list[Any]) -> str:
    """``ge=1``-style field constraints in words."""
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for item in metadata:
        for attr, symbol in symbols.items():
            if getattr(item, attr, None) is not None:
                parts.append(f"{symbol} {getattr(item, attr)}")
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length} item(s)")
        if getattr(item, "max_length", None) is not None:
            parts.append(f"at most {item.max_length} item(s)")
        if getattr(item, "pattern", None) is not None:
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    """One table cell: one line; outside code spans (where the table reads them as text) pipes escaped and
    ``<``, ``>`` as HTML entities."""
    text = " ".join(text.split())
    out, end = [], 0
    for span in CODE_SPAN.finditer(text):
        out += [_escape_cell_text(text[end : span.start()]), span.group(0)]
        end = span.end()
    return "".join([*out, _escape_cell_text(text[end:])])


def _escape_cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def model_table(model: type) -> str:
    """Field name, type, default and description of a pydantic model, as a Markdown table."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = yaml_text(field.default_factory())
        else:
            default = yaml_text(field.default)
        description = field.description or ""
        limits = constraint_text(field.metadata)
        if limits:
            description = f"{description} ({limits})" if description else limits
        lines.append(f"| `{key}` | {_cell(type_text(field.annotation))} | {_cell(default)} | {_cell(description)} |")
    return "\n".join(lines)


def documented_models(root: type) -> dict[type, list[str]]:
    """``root`` and every model reachable through its fields, with the YAML keys each one is found under."""
    found: dict[type, list[str]] = {root: []}
    queue = [(root, "")]
    while queue:
        model, prefix = queue.pop(0)
        for name, field in model.model_fields.items():
            key = f"{prefix}{field.alias or name}"
            for sub in _models_of(field.annotation):
                path = f"{key}[]" if _is_list_of(field.annotation, sub) else key
                if sub not in found:
                    found[sub] = []
                    queue.append((sub, f"{path}."))
                found[sub].append(path)
    return found


def _is_list_of(annotation: Any, model: type) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return model in typing.get_args(annotation)
    return any(_is_list_of(a, model) for a in typing.get_args(annotation))


def module_constants(module: types.ModuleType) -> list[tuple[str, Any, str]]:
    """Module-level ``NAME = <int>  # comment`` constants of a module's source, with their comments."""
    source = inspect.getsource(module)
    comments = {
        tok.start[0]: tok.string.lstrip("# ").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            value = getattr(module, name, None)
            if name.isupper() and isinstance(value, int) and not isinstance(value, bool):
                out.append((name, value, comments.get(node.lineno, "")))
    return out


def config_reference() -> str:
    """Every key of the campaign YAML file, generated from ``cspml_flows.campaign.config``."""
    try:
        from cspml_flows.campaign import config as campaign_config
    except ImportError as exc:
        raise PluginError(f"configuration reference: cannot import cspml_flows.campaign.config: {exc}") from exc
    root = campaign_config.CampaignConfig
    parts = [
        f"Generated from `{root.__module__}.{root.__name__}` and the models its fields use. Keys not listed are",
        "refused (`extra: forbid`); a bad value stops the run with one line naming the key.",
        "",
    ]
    for model, paths in documented_models(root).items():
        where = "the top level of the file" if not paths else ", ".join(f"`{p}`" for p in sorted(set(paths)))
        doc = inspect.cleandoc(model.__doc__ or "")
        parts += [f"## {model.__name__}", "", f"`{model.__module__}.{model.__name__}`, at {where}.", ""]
        if doc:
            parts += [doc, ""]
        parts += [model_table(model), ""]
    constants = module_constants(campaign_config)
    if constants:
        parts += ["## Limits", "", f"Module constants of `{campaign_config.__name__}`.", ""]
        parts += ["| constant | value | meaning |", "|---|---:|---|"]
        parts += [f"| `{name}` | {value:,} | {_cell(comment)} |" for name, value, comment in constants]
        parts.append("")
    return "\n".join(parts)


# -------------------------------------------------------------------------------------- benchmark tables


def _result(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PluginError(f"benchmark result missing: {path.relative_to(ROOT)}")
    return json.loads(path.read_text())


def _render() -> Any:
    try:
        from benchmarks import render
    except ImportError as exc:
        raise PluginError(f"cannot import benchmarks.render from {ROOT}: {exc}") from exc
    return render


def scale_full(name: str) -> Callable[[], str]:
    """Every measure of ``benchmarks/results/<name>.json`` per pool size, then the targets."""

    def generate() -> str:
        return _render().markdown(_result(RESULTS / f"{name}.json"))

    return generate


def scale_targets() -> str:
    """The targets of ``scale.json``: bound, measured value, met or not."""
    return _render().targets(_result(RESULTS / "scale.json"))


def scale_table() -> str:
    """The measures of ``scale.json`` without the targets and notes."""
    text = _render().markdown(_result(RESULTS / "scale.json"))
    return text.split("\n\n", 1)[0] + "\n"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def training_bounds() -> str:
    """One row per ``python -m benchmarks csp`` result file in ``benchmarks/results/training-bounds/``."""
    files = sorted((RESULTS / "training-bounds").glob("*.json"))
    if not files:
        raise PluginError("benchmark results missing: benchmarks/results/training-bounds/*.json")
    lines = [
        "| result file | protocol | setting | queries | training pairs | pair ROC-AUC | top-1 | top-5 | top-20 "
        "| nearest top-1 | training, s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in files:
        r = json.loads(path.read_text())
        t = r.get("training") or {}
        nearest = (r.get("baselines") or {}).get("nearest") or {}
        lines.append(
            f"| `{path.name}` | {r.get('protocol', '-')} | {r.get('setting', '-')} | {_num(r.get('n_queries'))} "
            f"| {_num(t.get('n_train_pairs'))} | {_num(t.get('roc_auc'), 3)} | {_pct(r.get('top1'))} "
            f"| {_pct(r.get('top5'))} | {_pct(r.get('top20'))} | {_pct(nearest.get('top1'))} "
            f"| {_num(t.get('train_seconds'))} |"
        )
    return "\n".join(lines) + "\n"


def csp_results(folder: str, pattern: str = "*.json") -> Callable[[], str]:
    """The methods table (:mod:`benchmarks.csp_tables`) of every ``python -m benchmarks csp`` result in
    ``benchmarks/results/<folder>/``, one row block per file, with the code each was measured on."""

    def generate() -> str:
        files = sorted((RESULTS / folder).glob(pattern))
        if not files:
            raise PluginError(f"benchmark results missing: benchmarks/results/{folder}/{pattern}")
        try:
            from benchmarks.csp_tables import methods_table
        except ImportError as exc:
            raise PluginError(f"cannot import benchmarks.csp_tables from {ROOT}: {exc}") from exc
        parts = []
        for path in files:
            r = json.loads(path.read_text())
            code = f" ({r['code']})" if r.get("code") else ""
            parts.append(f"`{path.name}`{code}:\n\n{methods_table([r])}")
        return "\n\n".join(parts) + "\n"

    return generate


def study_results(folder: str, study: str) -> Callable[[], str]:
    """The table (``benchmarks.<study>.markdown``) of every ``python -m benchmarks.<study>`` result
    ``benchmarks/results/<folder>/<study>-*.json``."""

    def generate() -> str:
        files = sorted((RESULTS / folder).glob(f"{study}-*.json"))
        if not files:
            raise PluginError(f"benchmark results missing: benchmarks/results/{folder}/{study}-*.json")
        try:
            markdown = importlib.import_module(f"benchmarks.{study}").markdown
        except ImportError as exc:
            raise PluginError(f"cannot import benchmarks.{study} from {ROOT}: {exc}") from exc
        return "\n".join(f"`{p.name}`:\n\n{markdown(json.loads(p.read_text()))}" for p in files)

    return generate


GENERATORS: dict[str, Callable[[], str]] = {
    "config-reference": config_reference,
    "scale": scale_full("scale"),
    "scale-table": scale_table,
    "scale-targets": scale_targets,
    "scale-baseline": scale_full("scale-baseline"),
    "scale-workers1": scale_full("scale-workers1"),
    "training-bounds": training_bounds,
    "restructure": csp_results("restructure"),
    "ranking-ablation": study_results("ranking", "ablation"),
    "ranking-csp": csp_results("ranking", "csp-*.json"),
    "ranking-volumes": study_results("ranking", "volumes"),
    "layers": layers_table,
}


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Replace each ``<!-- generated: NAME -->`` line with the output of its generator."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: unknown generated block '{name}'")
        return GENERATORS[name]().rstrip("\n")

    return MARKER.sub(replace, markdown)


# ------------------------------------------------------------------------------------------ docstrings

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj):<code>(~?)([\w.]+)(\(\))?</code>")


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Sphinx roles in docstrings (``:func:`~pkg.mod.f```) become cross-references where the target is
    documented, else plain code (``optional``: an unresolved one is no error)."""
    src = page.file.src_uri
    module = src.removeprefix(f"{API_DIR}/").removesuffix(".md") if src.startswith(f"{API_DIR}/") else None

    def replace(match: re.Match[str]) -> str:
        short, target, call = match.group(1), match.group(2), match.group(3) or ""
        title = target.rsplit(".", 1)[-1] if short else target
        if module and not target.startswith(f"{PACKAGE}."):
            target = f"{module}.{target}"  # a name relative to the page's module
        return f'<autoref identifier="{target}" optional><code>{title}{call}</code></autoref>'

    return ROLE.sub(replace, html)
