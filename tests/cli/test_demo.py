"""``cspml demo`` end to end as a subprocess, on a small data folder cut from ``../shared/data``.

The demo imports the folder's ``mp_20_biternary/val`` and ``mpts_52/val`` files, indexes them, predicts
its six compositions with the shipped model (or one it trains with ``--train``), prints a table and writes
CIFs; a second run only predicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.core import Structure

from cspml_flows.cli.commands import DEMO_COMPOSITIONS, DEMO_FILES
from cspml_flows.core.composition import roles

ROWS = 150  # first rows of each demo file, plus every row sharing an anonymous formula with a demo composition
DEMO_ANON = {roles(c).anonymous_formula for c in DEMO_COMPOSITIONS}


def _anon_from_cif(cif: str) -> str:
    for line in cif.splitlines():
        if line.startswith("_chemical_formula_sum"):
            return roles(line.split(None, 1)[1].strip().strip("'\"")).anonymous_formula
    return ""


@pytest.fixture(scope="module")
def small_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with the demo's two files, each cut to a few hundred real rows."""
    root = tmp_path_factory.mktemp("demo-data")
    for rel in DEMO_FILES:
        df = pd.read_csv(data_dir / rel)
        anon = df["cif"].map(_anon_from_cif)
        keep = (df.index < ROWS) | (anon.isin(DEMO_ANON) & (df.index < 1500))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        df[keep].to_csv(root / rel, index=False)
    return root


def _run_demo(workdir: Path, data: Path, *extra: str, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CSPML_HOME", "CSPML_CONFIG")}
    env["CSPML_DATA_DIR"] = str(data)
    if home is not None:
        env["CSPML_HOME"] = str(home)
    script = Path(sys.executable).with_name("cspml")  # the installed console script, as a user runs it
    entry = [str(script)] if script.is_file() else [sys.executable, "-m", "cspml_flows.cli.main"]
    cmd = [*entry, "demo", "--workers", "1", "--out", "out/demo", *extra]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    return proc


def _check_table_and_cifs(stdout: str, out: Path) -> list[dict]:
    summary = json.loads((out / "predictions.json").read_text())
    assert [p["formula"] for p in summary] == list(DEMO_COMPOSITIONS)
    predicted = [p for p in summary if p["candidates"]]
    assert len(predicted) >= 4, summary  # the slice holds templates for most demo compositions
    for p in summary:
        assert f"\n{p['formula']} ({p['anonymous_formula']})" in stdout
        for c in p["candidates"]:
            cif = Path(c["cif"]) if Path(c["cif"]).is_absolute() else out.parent.parent / c["cif"]
            s = Structure.from_file(cif)
            assert s.composition.reduced_formula == p["formula"]
            assert f"{c['rank']:>4} {c['score']:>6.3f}  {c['spacegroup_symbol']} ({c['spacegroup']})" in stdout
    return summary


def test_demo_end_to_end_twice(small_data: Path, tmp_path: Path):
    """First run: import, index, shipped model, predict; second run: nothing imported, same predictions.
    No home is given: the demo makes ``./.cspml`` and the next call finds it again from the folder."""
    (tmp_path / ".cspml").mkdir()
    first = _run_demo(tmp_path, small_data)
    assert f"home {tmp_path / '.cspml'}" in first.stdout
    assert "model shipped in the package" in first.stdout
    assert "stage times: import" in first.stdout and "predict" in first.stdout
    assert " 0 already present" in first.stdout
    summary = _check_table_and_cifs(first.stdout, tmp_path / "out" / "demo")
    assert "it/s" in first.stderr or "structure/s" in first.stderr  # progress bars with a rate

    second = _run_demo(tmp_path, small_data)
    assert " 0 added" in second.stdout
    again = _check_table_and_cifs(second.stdout, tmp_path / "out" / "demo")
    assert [[c["template_id"] for c in p["candidates"]] for p in again] == [
        [c["template_id"] for c in p["candidates"]] for p in summary
    ]


def test_demo_trains_with_train_flag(small_data: Path, tmp_path: Path):
    """``--train``: the demo trains on its store, saves the model under the home, and predicts with it;
    afterwards a plain run uses that trained model."""
    home = tmp_path / "home"
    proc = _run_demo(tmp_path, small_data, "--train", "--ranker-queries", "150", home=home)
    model = home / "models" / "cspml.json.gz"
    assert "train the similarity model" in proc.stdout and f"-> {model}" in proc.stdout
    assert "ranker on" in proc.stdout or "no ranker" in proc.stdout
    assert model.is_file()
    _check_table_and_cifs(proc.stdout, tmp_path / "out" / "demo")
    again = _run_demo(tmp_path, small_data, home=home)
    assert f"use the trained model: {model}" in again.stdout
