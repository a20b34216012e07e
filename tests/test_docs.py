"""The documentation: the MkDocs site builds with --strict (generated pages included), the README stays a short
entry page that starts with the two commands, and the paths and test names the pages cite exist."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cspml_flows.campaign.config import CampaignConfig, StoresConfig
from cspml_flows.flows.calculators import CalculatorSettings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import render  # noqa: E402

DOCS = ROOT / "docs"
README = ROOT / "README.md"
TWO_COMMANDS = ("make demo", "make test")
MAX_README_LINES = 150
PAGES = sorted(DOCS.rglob("*.md"))
SITE_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_site_packages() -> list[str]:
    missing = []
    for name in SITE_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _missing_site_packages()
    if missing:
        pytest.skip(f"documentation packages not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _text(html_file: Path) -> str:
    """A built page as plain text: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", html_file.read_text())).split())


def test_site_builds_strict(site: Path):
    for page in PAGES:
        rel = page.relative_to(DOCS).with_suffix("")
        folder = rel.parent if rel.name == "index" else rel
        assert (site / folder / "index.html").is_file(), f"{page.relative_to(ROOT)} was not built"


def test_configuration_reference_lists_every_campaign_key(site: Path):
    text = _text(site / "reference" / "configuration" / "index.html")
    assert "<!-- generated" not in text
    for model in (CampaignConfig, CalculatorSettings, StoresConfig):
        assert model.__name__ in text
        for name, field in model.model_fields.items():
            assert (field.alias or name) in text, f"{model.__name__}.{name} missing from the configuration reference"
    assert "MAX_COMPOSITIONS" in text


def test_benchmark_tables_are_generated_from_the_result_files(site: Path):
    text = _text(site / "benchmarks" / "index.html")
    assert "generated:" not in text
    result = json.loads((ROOT / "benchmarks" / "results" / "scale.json").read_text())
    rows = render.targets(result).splitlines()[2:]
    assert rows
    for row in rows:
        cells = " ".join(cell.strip() for cell in row.strip("|").split("|"))
        assert cells in text, f"targets row not on the Benchmarks page: {cells}"
    bounds = sorted((ROOT / "benchmarks" / "results" / "training-bounds").glob("*.json"))
    assert bounds
    for path in bounds:
        top1 = json.loads(path.read_text())["top1"]
        assert f"{path.name} " in text
        assert f"{100 * top1:.1f} %" in text


def test_api_reference_has_a_page_per_public_module(site: Path):
    api = site / "reference" / "api"
    assert "import_structures" in _text(api / "cspml_flows.api" / "index.html")
    layers = ("core", "templates", "learning", "predict", "training", "flows", "campaign")
    for layer in layers:
        for path in (ROOT / "src" / "cspml_flows" / layer).glob("[!_]*.py"):
            module = f"cspml_flows.{layer}.{path.stem}"
            assert (api / module / "index.html").is_file(), f"no API page for {module}"


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    body = [line for line in lines if line.strip() and not line.startswith("# ")]
    assert body[0].startswith("```"), "the README's first content is the code block of the two commands"
    end = body.index("```", 1)
    commands = [line.split("#")[0].strip() for line in body[1:end]]
    assert tuple(commands) == TWO_COMMANDS


def test_readme_links_to_pages_that_exist():
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text())
    assert links
    for link in links:
        assert (ROOT / link).is_file(), f"README.md links to a missing page: {link}"


def _cited(pattern: str) -> set[str]:
    found: set[str] = set()
    for page in [*PAGES, README]:
        found |= set(re.findall(pattern, page.read_text()))
    return found


def test_cited_repository_files_exist():
    paths = _cited(r"(?<![\w/.$<-])((?:tests|configs|workflows|benchmarks)/[\w./-]+\.(?:py|yaml|sh|json|md))")
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"pages cite files that do not exist: {missing}"


def test_cited_tests_exist():
    defined = set()
    files = {path.stem for path in (ROOT / "tests").rglob("*.py")}
    for path in (ROOT / "tests").rglob("*.py"):
        defined |= set(re.findall(r"^\s*def (test_\w+)", path.read_text(), flags=re.MULTILINE))
    cited = {name for name in _cited(r"\b(test_\w+)\b(?!\.py)") if name not in files}
    assert cited
    missing = sorted(cited - defined)
    assert not missing, f"pages cite tests that do not exist: {missing}"
