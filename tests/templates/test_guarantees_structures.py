"""Structures and formulas that no crystal has never reach spglib, a store or a prediction.

Each bad file gets one line naming it and the problem; a bad row in a CSV is skipped with its reason while
the rest is imported (also with worker processes); an import in which every row fails exits non-zero.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from cspml_flows.cli.main import main
from cspml_flows.core.composition import parse_composition
from cspml_flows.core.errors import CompositionError, StructureReadError
from cspml_flows.core.structure_checks import check_structure, min_periodic_distance
from cspml_flows.templates.readers import structure_from_cif_string
from cspml_flows.templates.store import TemplateStore


def rocksalt() -> Structure:
    """NaCl in the two-site CsCl-type cell (enough for file-format checks)."""
    return Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cif_with(key: str, value: str) -> str:
    """The rock-salt CIF with one cell parameter replaced."""
    return re.sub(rf"_cell_{key}\s+\S+", f"_cell_{key}   {value}", rocksalt().to(fmt="cif"))


def det0_poscar() -> str:
    lines = rocksalt().to(fmt="poscar").splitlines()
    lines[4] = lines[3]  # the third axis repeats the second: zero volume
    return "\n".join(lines) + "\n"


def cif_symbols(old: str, new: str) -> str:
    """The rock-salt CIF with the type symbol ``old`` written as ``new`` (labels kept)."""
    return re.sub(rf"^(\s*){old}(\s+{old}\d)", rf"\g<1>{new}\2", rocksalt().to(fmt="cif"), flags=re.MULTILINE)


# (file name, content, message fragment)
BAD_FILES = [
    ("zero_alpha.cif", cif_with("angle_alpha", "0.0"), "non-finite entries"),  # spglib segfaults on it
    ("zero_gamma.cif", cif_with("angle_gamma", "0.0"), "cannot read structure file"),
    ("negative.cif", cif_with("length_a", "-5.64"), "cell lengths must be positive"),
    ("giant.cif", cif_with("length_a", "1000000"), "outside 0.5-1000"),
    ("nan.cif", cif_with("length_b", "nan"), "is not a number"),
    ("POSCAR", det0_poscar(), "lattice"),
    ("poscar_in.cif", rocksalt().to(fmt="poscar"), "is not a CIF"),
    ("lower.cif", cif_symbols("Na", "na"), "'na' is not an element symbol (write 'Na')"),
    ("upper.cif", cif_symbols("Cl", "CL"), "'CL' is not an element symbol (write 'Cl')"),
    ("heavy_water.cif", rocksalt().to(fmt="cif").replace("Cl", "D"), "isotope symbol 'D'"),
    ("overlap.cif", Structure(Lattice.cubic(4), ["Na", "Cl"], [[0, 0, 0], [0, 0, 0.01]]).to(fmt="cif"), "apart"),
    ("sparse.cif", Structure(Lattice.cubic(900), ["Na"], [[0, 0, 0]]).to(fmt="cif"), "volume per atom"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_bad_structure_file_refused_in_one_line(tmp_path, capsys, name, content, message):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / name).write_text(content)
    store = tmp_path / "store"
    assert main(["import", "folder", str(folder), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err and name in err
    assert TemplateStore.open(store).count() == 0


def test_heavy_water_poscar_refused(tmp_path):
    text = rocksalt().to(fmt="poscar").replace("Na Cl", "D Cl")
    (tmp_path / "POSCAR").write_text(text)
    from cspml_flows.templates.readers import read_structure

    with pytest.raises(StructureReadError, match="isotope symbol 'D'"):
        read_structure(tmp_path / "POSCAR")


def bad_rows_csv(path: Path, data_dir: Path, good: int = 54) -> list[str]:
    """A 60-row CSV: ``good`` real MP rows and one row of each kind that crashed or slipped through."""
    real = pd.read_csv(data_dir / "mp_20_biternary" / "val.csv.gz", nrows=good)[["material_id", "cif"]]
    bad = {
        "bad-zero-alpha": cif_with("angle_alpha", "0.0"),
        "bad-negative": cif_with("length_a", "-5.64"),
        "bad-poscar": rocksalt().to(fmt="poscar"),
        "bad-lower": cif_symbols("Na", "na"),
        "bad-empty": "",
        "bad-deuterium": rocksalt().to(fmt="cif").replace("Cl", "D"),
    }
    rows = pd.concat([real.iloc[:27], pd.DataFrame(bad.items(), columns=real.columns), real.iloc[27:]])
    rows.to_csv(path, index=False)
    return list(bad)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_rows_skipped_with_reasons_never_a_crash(tmp_path, data_dir, workers):
    """The zero-angle row once killed spglib (exit 139) and with it every re-run of the import."""
    csv = tmp_path / "rows.csv"
    bad = bad_rows_csv(csv, data_dir)
    store = tmp_path / "store"
    argv = [sys.executable, "-m", "cspml_flows.cli.main", "import", "csv", str(csv), "--store", str(store)]
    for run in range(2):  # the re-run skips what is there and refuses the same rows again
        out = subprocess.run([*argv, "--workers", str(workers)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        added = 54 if run == 0 else 0
        assert f"{added} added, {54 - added} already present, 6 unreadable" in out.stdout
        for mid in bad:
            assert f"unreadable: {mid}: " in out.stdout
    assert TemplateStore.open(store).count() == 54


def test_import_where_every_row_fails_exits_non_zero(tmp_path, capsys):
    csv = tmp_path / "all_bad.csv"
    rows = [("a", cif_with("angle_alpha", "0.0")), ("b", rocksalt().to(fmt="poscar"))]
    pd.DataFrame(rows, columns=["material_id", "cif"]).to_csv(csv, index=False)
    assert main(["import", "csv", str(csv), "--store", str(tmp_path / "store"), "--workers", "1"]) == 2
    captured = capsys.readouterr()
    assert "0 added, 0 already present, 2 unreadable" in captured.out
    assert captured.err.strip().splitlines()[-1] == f"error: every structure of {csv} was refused (reasons above)"


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("Na0Cl", "amount 0 at position 2"),
        ("NaCl0", "amount 0 at position 4"),
        ("Na0.0Cl", "amount 0"),
        ("Na0.00000001Cl", "below 0.001"),
        ("D2O", "isotope 'D'"),
        ("T2O", "isotope 'T'"),
    ],
)
def test_formula_that_would_ask_another_question_is_an_error(formula, message, template_folder, capsys):
    """Na0Cl was answered as Cl2 and D2O as H2O without a word."""
    with pytest.raises(CompositionError, match=re.escape(message)):
        parse_composition(formula)
    assert main(["predict", formula, "--store", template_folder]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err


def test_min_periodic_distance_of_skewed_and_small_cells():
    """An atom's own image counts; a skewed cell is reduced before the images are searched."""
    skewed = np.array([[3.0, 0, 0], [3.0 * 7, 3.0, 0], [0, 0, 3.0]])  # the cubic 3 Å lattice, sheared
    assert min_periodic_distance(skewed, [[0, 0, 0]]) == pytest.approx(3.0)
    assert min_periodic_distance(np.eye(3) * 4, [[0, 0, 0], [0.999, 0, 0]]) == pytest.approx(0.004)
    assert min_periodic_distance(np.eye(3) * 4, [[0, 0, 0], [0, 0, 0]]) == 0.0
    nacl = rocksalt()  # CsCl-type cell: the body diagonal
    assert min_periodic_distance(nacl.lattice.matrix, nacl.frac_coords) == pytest.approx(5.64 * 3**0.5 / 2)


def test_real_structures_pass(data_dir):
    """Every structure of a shared file passes the check (the ranges hold real crystals)."""
    cifs = pd.read_csv(data_dir / "mpts_52" / "val.csv.gz", usecols=["material_id", "cif"]).iloc[::10]
    for mid, cif in zip(cifs.material_id, cifs.cif, strict=True):
        check_structure(structure_from_cif_string(cif, mid), mid)


def test_index_leaves_out_degenerate_templates_an_older_store_holds(tmp_path, capsys, caplog):
    """A det-0 template written by an earlier version was handed back by predict as a P1 CIF with gamma = 0."""
    from cspml_flows.templates.index import TemplateIndex
    from cspml_flows.templates.schema import template_doc_from_structure

    good = Structure(Lattice.cubic(5.64), ["Na", "Na", "Na", "Na", "Cl", "Cl", "Cl", "Cl"], FCC_ROCKSALT)
    ts = TemplateStore.open(tmp_path / "store")
    ts.add([template_doc_from_structure(good, "good")])
    doc = template_doc_from_structure(good, "flat").model_dump(mode="json")
    flat = doc["structure"]
    flat["lattice"]["matrix"][2] = list(flat["lattice"]["matrix"][1])  # collinear axes: zero volume
    ts.store._collection.insert_one({**doc, "formula": "KBr", "_id": "flat"})
    ts.close()
    index = TemplateIndex.open(tmp_path / "store", workers=1)
    assert list(index.ids) == ["good"]
    assert "1 templates of" in caplog.text and "a cell no crystal has" in caplog.text


FCC_ROCKSALT = [
    [0, 0, 0],
    [0, 0.5, 0.5],
    [0.5, 0, 0.5],
    [0.5, 0.5, 0],
    [0.5, 0.5, 0.5],
    [0.5, 0, 0],
    [0, 0.5, 0],
    [0, 0, 0.5],
]
