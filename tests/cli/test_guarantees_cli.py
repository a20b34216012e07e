"""Command-line and campaign-file guarantees: YAML aliases refused, user values echoed as short excerpts,
every output path checked before the work, unknown optimizers refused, a workdir kept to its campaign.

Each bad input is one line on stderr starting ``error:``, exit code 2.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest
from benchmarks.cli import main as benchmarks_main

from cspml_flows.cli.main import main
from cspml_flows.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``cspml argv`` (or ``python -m benchmarks argv[1:]`` when argv[0] is "benchmarks"): one error line."""
    run = (benchmarks_main, argv[1:]) if argv[0] == "benchmarks" else (main, argv)
    assert run[0](run[1]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def campaign_file(path: Path, templates: str, **over) -> Path:
    doc = {"name": "a", "compositions": ["CuAu"], "model": None, "stores": {"templates": templates}, **over}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


# ------------------------------------------------------------------------------------------------ YAML

BILLION_LAUGHS = "name: lol\nl0: &l0 lol\n" + "".join(
    f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]\n" for k in range(1, 10)
)  # 9 levels of 9 aliases each: 387 million strings once expanded, from a file of a few hundred bytes


def test_yaml_alias_expansion_refused_fast_and_small(tmp_path: Path, capsys):
    import cspml_flows.campaign  # noqa: F401  (imported before measuring: only the file's reading is timed)

    path = tmp_path / "lol.yaml"
    path.write_text(BILLION_LAUGHS + "compositions: *l9\n")
    assert path.stat().st_size < 600
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        err = one_line_error(capsys, ["campaign", "run", str(path)])
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "aliases are not accepted" in err and "alias *l0 on line 3" in err
    assert seconds < 0.5 and peak < 5_000_000, (seconds, peak)
    assert len(err) < 300


def test_yaml_merge_key_is_an_alias_too(tmp_path: Path, template_folder: str, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text(
        f"name: m\ncompositions: [CuAu]\nmodel: null\nstores: {{templates: {template_folder}}}\n"
        "base: &emt {name: emt, steps: 10}\ncalculator:\n  <<: *emt\n"
    )
    assert "alias *emt on line 7" in one_line_error(capsys, ["campaign", "run", str(path)])


def test_yaml_anchor_without_alias_still_reads(tmp_path: Path):
    from cspml_flows.core.config import read_yaml

    path = tmp_path / "anchor.yaml"
    path.write_text("calculator: &c {name: emt}\n")
    assert read_yaml(path, "campaign file") == {"calculator": {"name": "emt"}}


def test_one_yaml_reader_in_the_package():
    """Every YAML file is read by config.read_yaml (size limit, no aliases, safe tags)."""
    readers = ("yaml.safe_load(", "yaml.load(", "yaml.full_load(", "yaml.unsafe_load(", "yaml.compose(")
    found = [
        f"{p.relative_to(ROOT)}: {r}"
        for p in (ROOT / "src").rglob("*.py")
        for r in readers
        if r in p.read_text() and p != ROOT / "src" / "cspml_flows" / "core" / "config.py"
    ]
    assert found == []


HUGE = "x" * 200_000
# (campaign file content, what the message names); each value in the file is far longer than the message
BIG_VALUES = [
    (f"name: {HUGE}\ncompositions: [NaCl]\n", "name: "),
    ("name: a\ncompositions: {chemsys: [" + "Na-" * 50_000 + "Cl]}\n", "chemical system 'Na-Na-"),
    (f"name: a\ncompositions: [NaCl]\n? {HUGE}\n: 1\n", "unknown key"),  # an explicit key: any length
    (f"name: a\ncompositions: [NaCl]\ncalculator: {{optimizer: {HUGE}}}\n", "calculator.optimizer: must be one of"),
    (f"name: a\ncompositions: [NaCl]\ncalculator: {{name: {HUGE}}}\n", "calculator.name: Input should be"),
    ("name: a\ncompositions: [" + "1, " * 50_000 + "1]\n", "valid string (got 1); and 49,999 more"),
    (f"name: a\ncompositions: [NaCl]\nworkers: {'9' * 5000}\n", "Exceeds the limit (4300 digits)"),
    (f"name: a\nbad: [{HUGE}\n", "not valid YAML"),
    ("name: a\nx: " + "[" * 20_000 + "]" * 20_000 + "\n", "not valid YAML"),
]


@pytest.mark.parametrize(("content", "message"), BIG_VALUES, ids=[m for _, m in BIG_VALUES])
def test_user_values_echoed_as_short_excerpts(content: str, message: str, tmp_path: Path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert path.stat().st_size < 1_000_000  # under the size limit: the file is parsed and validated
    err = one_line_error(capsys, ["campaign", "run", str(path)])
    assert message in err
    assert len(err.replace(str(path), "")) < 300, err


def test_command_line_values_echoed_as_short_excerpts(capsys):
    err = one_line_error(capsys, ["predict", "NaCl", "--top", "1" * 5000 + "x"])
    assert "not a whole number" in err and len(err) < 300


def test_excerpt_is_bounded_without_a_full_repr():
    from cspml_flows.core.config import EXCERPT_CHARS, excerpt

    nested: list = ["lol"] * 9
    for _ in range(8):
        nested = [nested] * 9  # shared lists: repr() would be 2.2 GB
    t0 = time.perf_counter()
    text = excerpt(nested)
    assert len(text) <= EXCERPT_CHARS + 3 and time.perf_counter() - t0 < 0.1
    assert excerpt(10**5000).startswith("<int")  # repr() itself would fail


# ---------------------------------------------------------------------------------- output paths


@pytest.fixture
def outputs(tmp_path: Path, template_folder: str, nacl) -> dict[str, str]:
    """A broken symbolic link, a file, a folder, a good campaign file and a structure file."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "nacl.cif").write_text(nacl.to(fmt="cif"))
    good = campaign_file(tmp_path / "good.yaml", template_folder, workdir=str(tmp_path / "work"))
    names = ("link", "a_file", "a_folder", "nacl.cif")
    return {"store": template_folder, "good": str(good), **{n.split(".")[0]: str(tmp_path / n) for n in names}}


# every command that writes output, its output option pointing at a broken link (or a folder through one)
WRITERS = [
    ["predict", "NaCl", "--store", "{store}", "--out", "{link}"],
    ["predict", "NaCl", "--store", "{store}", "--out", "{link}/sub"],
    ["predict", "NaCl", "--store", "{store}", "--polymorphs", "2", "--out", "{link}"],
    ["inverse", "{nacl}", "--elements", "K", "Br", "--store", "{store}", "--out", "{link}"],
    ["demo", "--out", "{link}"],
    ["train", "--store", "{store}", "--model", "{link}"],
    ["train", "--hetero", "--store", "{store}", "--model", "{link}"],
    ["benchmarks", "csp", "--protocol", "mp20bt", "--limit", "5", "--json", "{link}"],
    ["benchmarks", "csp", "--protocol", "mp20bt", "--limit", "5", "--markdown", "{link}"],
    ["campaign", "run", "{good}", "--json", "{link}"],
    ["campaign", "promote", "{good}", "--builder-json", "{link}"],
    ["benchmarks", "relax-flow", "--queries", "2", "--out", "{link}"],
]


@pytest.mark.parametrize("argv", WRITERS, ids=[" ".join(a[:2] + a[-2:]) for a in WRITERS])
def test_broken_link_as_output_fails_before_any_work(argv, outputs, cspml_home: Path, tmp_path: Path, capsys):
    t0 = time.perf_counter()
    err = one_line_error(capsys, [a.format(**outputs) for a in argv])
    assert "is a broken symbolic link (to " in err and outputs["link"] in err
    assert time.perf_counter() - t0 < 20  # nothing trained, indexed or predicted first
    assert list(cspml_home.rglob("*")) == []  # no index cache, model, benchmark pool: nothing ran
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "work").exists()


BAD_OUTPUTS = [
    (["predict", "NaCl", "--store", "{store}", "--out", "{a_file}/sub"], "{a_file} is a file"),
    (["train", "--store", "{store}", "--model", "{a_folder}"], "model file {a_folder} is a folder"),
    (["benchmarks", "csp", "--protocol", "mp20bt", "--json", "{a_file}/r.json"], "{a_file} is a file"),
    (["campaign", "run", "{good}", "--json", "/proc/cspml/r.json"], "(/proc is not writable)"),
    (["benchmarks", "relax-flow", "--out", "{a_file}"], "output folder {a_file} is a file"),
    (["inverse", "{nacl}", "--elements", "K", "Br", "--out", "/proc/cspml"], "(/proc is not writable)"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OUTPUTS, ids=[" ".join(a[:2] + a[-2:]) for a, _ in BAD_OUTPUTS])
def test_unusable_output_fails_before_any_work(argv, message, outputs, cspml_home: Path, capsys):
    err = one_line_error(capsys, [a.format(**outputs) for a in argv])
    assert message.format(**outputs) in err
    assert list(cspml_home.rglob("*")) == []


def test_campaign_workdir_broken_link_fails_before_the_run(tmp_path: Path, template_folder: str, capsys):
    link = tmp_path / "work"
    link.symlink_to(tmp_path / "gone")
    path = campaign_file(tmp_path / "c.yaml", template_folder, workdir=str(link))
    err = one_line_error(capsys, ["campaign", "run", str(path)])
    assert f"campaign a's workdir {link} is a broken symbolic link" in err
    assert not (tmp_path / "gone").exists()


# ------------------------------------------------------------------------------------------- optimizer


def test_unknown_optimizer_refused_at_validation(tmp_path: Path, template_folder: str, capsys):
    from atomate2.ase.utils import OPTIMIZERS

    from cspml_flows.campaign import parse_campaign
    from cspml_flows.flows.calculators import CalculatorSettings

    for name in OPTIMIZERS:  # every name atomate2's relaxer knows is accepted
        assert CalculatorSettings(name="emt", optimizer=name).optimizer == name
    base = {"name": "o", "compositions": ["CuAu"], "model": None}
    with pytest.raises(ConfigError, match=r"tiers\.0\.optimizer: must be one of atomate2's optimizers: FIRE, BFGS"):
        parse_campaign({**base, "tiers": [{"name": "emt", "optimizer": "fire"}]}, "c.yaml")
    path = campaign_file(tmp_path / "c.yaml", template_folder, calculator={"name": "emt", "optimizer": "Adam"})
    err = one_line_error(capsys, ["campaign", "run", str(path)])
    assert "calculator.optimizer: must be one of atomate2's optimizers:" in err and "(got 'Adam')" in err
    assert all(name in err for name in OPTIMIZERS)


# --------------------------------------------------------------------------------- workdir ownership


def test_workdir_of_another_campaign_refused(tmp_path: Path, template_folder: str, capsys):
    from cspml_flows.campaign import campaign_lock, load_campaign

    work = tmp_path / "work"
    a = campaign_file(tmp_path / "a.yaml", template_folder, workdir=str(work))
    b = campaign_file(tmp_path / "b.yaml", template_folder, name="b", workdir=str(work))
    with campaign_lock(load_campaign(a)):  # what a run of campaign a does first: lock and claim the workdir
        pass
    (work / "report.md").write_text("report of a\n")
    owner = json.loads((work / ".campaign.json").read_text())
    assert owner == {"name": "a", "kind": "csp", "config": str(a)}
    for argv in (["campaign", "run", str(b), "--rounds", "1"], ["campaign", "report", str(b)]):
        err = one_line_error(capsys, argv)
        assert f"workdir {work} belongs to campaign a ({a}); campaign b ({b}) stops without writing" in err
        assert "another 'workdir'" in err and f"delete {work}" in err
    assert (work / "report.md").read_text() == "report of a\n"
    assert sorted(p.name for p in work.iterdir()) == [".campaign.json", ".campaign.lock", "report.md"]
    # the same campaign again, also from a copy of its file elsewhere: accepted, the file recorded
    moved = campaign_file(tmp_path / "moved.yaml", template_folder, workdir=str(work))
    with campaign_lock(load_campaign(moved)):
        pass
    assert json.loads((work / ".campaign.json").read_text())["config"] == str(moved)


def test_workdir_of_an_earlier_version_campaign_refused(tmp_path: Path, template_folder: str, capsys):
    """A workdir written before the owner file existed is known by its summary.json."""
    from cspml_flows.campaign import campaign_lock, load_campaign

    work = tmp_path / "work"
    work.mkdir()
    (work / "summary.json").write_text(json.dumps({"campaign": "a", "rounds": []}))
    b = campaign_file(tmp_path / "b.yaml", template_folder, name="b", workdir=str(work))
    assert f"belongs to campaign a; campaign b ({b})" in one_line_error(capsys, ["campaign", "run", str(b)])
    with campaign_lock(load_campaign(campaign_file(tmp_path / "a.yaml", template_folder, workdir=str(work)))):
        pass
    assert json.loads((work / ".campaign.json").read_text())["name"] == "a"
    (work / ".campaign.json").write_text("{not json")
    assert "is not a campaign's record" in one_line_error(capsys, ["campaign", "run", str(b)])
