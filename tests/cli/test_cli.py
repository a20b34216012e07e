"""The core command line end to end on a small real store, and its one-line errors for bad input."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from cspml_flows.cli.main import main
from cspml_flows.cli.parsers import build_parser
from cspml_flows.templates.store import TemplateStore

N_ROWS = 300  # real MP-20 rows in the CLI store


@pytest.fixture(scope="module")
def cli_files(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store imported with ``cspml import csv`` (real rows plus hand-built rocksalts) and a model from
    ``cspml train``, both under a module-wide folder."""
    from conftest import hand_built_structures

    root = tmp_path_factory.mktemp("cli")
    df = pd.read_csv(data_dir / "mp_20_biternary" / "val.csv.gz", nrows=N_ROWS)[["material_id", "cif"]]
    hand = pd.DataFrame(
        [{"material_id": f"hand-{k}", "cif": s.to(fmt="cif")} for k, s in hand_built_structures().items()]
    )
    csv = root / "templates.csv"
    pd.concat([df, hand]).to_csv(csv, index=False)
    store, model = root / "store", root / "model.joblib"
    home = root / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("CSPML_HOME", str(home))
    train_out = io.StringIO()
    try:
        assert main(["import", "csv", str(csv), "--store", str(store), "--workers", "1"]) == 0
        train = ["train", "--store", str(store), "--model", str(model), "--workers", "1"]
        with contextlib.redirect_stdout(train_out):
            assert main([*train, "--max-iter", "60", "--check-labels", "20", "--ranker-queries", "100"]) == 0
    finally:
        mp.undo()
    return {"store": store, "model": model, "root": root, "train_output": train_out.getvalue()}


def test_import_train_predict_end_to_end(cli_files, tmp_path: Path, capsys, hand_structures):
    out = tmp_path / "pred"
    args = ["predict", "KBr", "BaZrO3", "--top", "3", "--exclude-same-formula"]
    args += ["--store", str(cli_files["store"]), "--model", str(cli_files["model"]), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "KBr" in printed and "BaZrO3" in printed
    summary = json.loads((out / "predictions.json").read_text())
    assert [p["formula"] for p in summary] == ["KBr", "BaZrO3"]
    sm = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    for entry, ref in zip(summary, (hand_structures["kbr"], hand_structures["bazro3"]), strict=True):
        assert entry["candidates"], entry
        cifs = sorted(out.glob(f"{entry['formula']}_*.cif"))
        assert len(cifs) == len(entry["candidates"])
        first = Structure.from_file(cifs[0])
        assert first.composition.reduced_formula == entry["formula"]
        assert sm.fit(first, ref)  # rocksalt KBr and cubic perovskite BaZrO3 come back first
        assert "_symmetry_space_group_name_H-M" in cifs[0].read_text()


def test_train_report_printed(cli_files):
    """Training prints held-out pair metrics beside the unlearned distance and where the model went."""
    text = cli_files["train_output"]
    assert "ROC-AUC" in text and "unlearned distance" in text and "label agreement" in text
    assert str(cli_files["model"]) in text


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_predict_bad_formulas(cli_files, capsys):
    paths = ["--store", str(cli_files["store"]), "--model", str(cli_files["model"])]
    assert "Xx" in _error(capsys, ["predict", "Xx2O", *paths])
    assert "Na(Cl" in _error(capsys, ["predict", "Na(Cl", *paths])


def test_predict_missing_store_and_model(cli_files, tmp_path: Path, capsys):
    missing_store = tmp_path / "no-store"
    err = _error(capsys, ["predict", "KBr", "--store", str(missing_store), "--model", str(cli_files["model"])])
    assert "not found" in err and str(missing_store) in err
    missing_model = tmp_path / "no-model.joblib"
    err = _error(capsys, ["predict", "KBr", "--store", str(cli_files["store"]), "--model", str(missing_model)])
    assert "model file not found" in err and str(missing_model) in err
    assert not missing_store.exists()  # a read must not create an empty store


def test_train_on_empty_store(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    TemplateStore.open(empty).close()  # an existing store without documents
    assert "empty" in _error(capsys, ["train", "--store", str(empty), "--model", str(tmp_path / "m.joblib")])


def _folder(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "cifs"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_import_empty_folder(tmp_path: Path, capsys):
    assert "no CIF/POSCAR files" in _error(capsys, ["import", "folder", str(_folder(tmp_path, {}))])


def test_import_folder_broken_cif(tmp_path: Path, capsys, nacl):
    folder = _folder(tmp_path, {"good.cif": nacl.to(fmt="cif"), "broken.cif": "data_x\n_cell_length_a 5\nloop_\n"})
    store = tmp_path / "store"
    err = _error(capsys, ["import", "folder", str(folder), "--store", str(store)])
    assert "broken.cif" in err
    # --skip-invalid keeps the good file and lists the bad one
    assert main(["import", "folder", str(folder), "--store", str(store), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "broken.cif" in out and "1 templates" in out


def test_missing_config_file(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("CSPML_CONFIG", str(tmp_path / "nope.yaml"))
    assert "config file not found" in _error(capsys, ["predict", "KBr"])


def _subparsers(parser: argparse.ArgumentParser, path: str = "cspml"):
    """Every parser under ``parser`` (itself included), with its command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{path} {name}")


def test_every_option_has_help_stating_its_default():
    """Every option of every command says what it does and its default; no reStructuredText markup."""
    parser = build_parser("description")
    missing, markup = [], []
    for path, p in _subparsers(parser):
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            text = formatter._expand_help(action) if action.help else ""
            if "``" in text:
                markup.append(f"{path} {action.dest}")
            if not text or (action.option_strings and "default" not in text):
                missing.append(f"{path} {action.option_strings or action.dest}: {text!r}")
    assert not missing, missing
    assert not markup, markup


def test_help_prints_and_a_command_imports_only_its_module():
    """``cspml predict --help`` works, and the predict command's modules do not import jobflow."""
    code = (
        "import sys; from cspml_flows.cli.main import command_function; from cspml_flows.cli.parsers import COMMANDS; "
        "command_function(COMMANDS['predict']); print('jobflow' in sys.modules, 'atomate2' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.split() == ["False", "False"], run.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-m", "cspml_flows.cli.main", "predict", "--help"], capture_output=True, text=True
    )
    assert run.returncode == 0 and "(default: 5)" in run.stdout and "``" not in run.stdout
