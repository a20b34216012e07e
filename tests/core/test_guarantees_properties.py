"""Property-based checks (hypothesis): generated formulas and generated cells go through parsing, import and
prediction and end in a result or a one-line error, never a crash, a traceback or a hang."""

from __future__ import annotations

import math
import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cspml_flows.cli.main import main
from cspml_flows.core.composition import anonymous_formula, parse_composition, roles
from cspml_flows.core.errors import CompositionError
from cspml_flows.core.structure_checks import check_structure
from cspml_flows.templates.importers import doc_from_csv_row
from cspml_flows.templates.schema import TemplateDoc

SYMBOLS = ["Na", "Cl", "K", "Br", "O", "Ti", "Sr", "H", "D", "T", "Xx", "na", "CL", "Uuo", "X", "E"]
FORMULA_PIECES = st.one_of(
    st.sampled_from(SYMBOLS),
    st.sampled_from(["0", "1", "2", "3", "12", "0.5", "0.0", "1e3", "00", "10000", "99999", ".5", "-1"]),
    st.sampled_from(["(", ")", " ", "[", "]", "·", "\u0663", "\n", "*", "+"]),
)
formulas = st.lists(FORMULA_PIECES, min_size=1, max_size=10).map("".join) | st.text(max_size=20)


def one_line(message: str) -> bool:
    return "\n" not in message and 0 < len(message) < 500 and "Traceback" not in message


@settings(max_examples=400, deadline=None)
@given(formulas)
def test_generated_formulas_parse_or_fail_in_one_line(formula):
    t0 = time.perf_counter()
    try:
        comp = parse_composition(formula)
    except CompositionError as exc:
        assert one_line(str(exc)), str(exc)
    else:
        assert comp.num_atoms > 0 and all(amt >= 1e-3 for amt in comp.values())
        assert anonymous_formula(comp) and roles(comp).elements
        assert all(el.symbol in formula for el in comp) and not {"D", "T"} & {el.symbol for el in comp}
    assert time.perf_counter() - t0 < 2


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(formula=st.lists(FORMULA_PIECES, min_size=1, max_size=6).map("".join))
def test_generated_formulas_through_predict(formula, template_folder, capsys):
    """The command line answers (exit 0) or names the problem in one line (exit 2)."""
    t0 = time.perf_counter()
    code = main(["-q", "predict", formula, "--store", template_folder, "--top", "2"])
    captured = capsys.readouterr()
    assert code in (0, 2), (formula, code, captured.err)
    if code == 2:
        err = captured.err.strip()
        assert err.startswith("error: ") and one_line(err), err
    assert "Traceback" not in captured.err
    assert time.perf_counter() - t0 < 30


EXTREME = [0.0, -5.0, math.nan, math.inf, -math.inf, 1e6, 1e-9, 1e300]
lengths = st.one_of(st.floats(2.0, 12.0), st.sampled_from(EXTREME), st.floats(allow_nan=True, allow_infinity=True))
angles = st.one_of(
    st.floats(60.0, 120.0), st.sampled_from([*EXTREME, 180.0, 179.99, 0.001, 360.0]), st.floats(-400, 400)
)
coords = st.one_of(st.floats(-1.5, 1.5), st.sampled_from([math.nan, math.inf, 1e12]))
sites = st.lists(
    st.tuples(st.sampled_from(["Na", "Cl", "O", "Ti", "D", "na", "Xx"]), coords, coords, coords),
    min_size=0,
    max_size=6,
)


def p1_cif(abc: tuple[float, ...], angles_: tuple[float, ...], atoms: list[tuple]) -> str:
    cell = "\n".join(
        f"_cell_{k}   {v!r}"
        for k, v in zip(
            ["length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma"], abc + angles_, strict=True
        )
    )
    rows = "\n".join(f"  {sym}  {sym}{i}  1  {x!r}  {y!r}  {z!r}  1" for i, (sym, x, y, z) in enumerate(atoms))
    return f"""data_generated
_symmetry_space_group_name_H-M   'P 1'
{cell}
_symmetry_Int_Tables_number   1
loop_
 _symmetry_equiv_pos_site_id
 _symmetry_equiv_pos_as_xyz
  1  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_symmetry_multiplicity
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
{rows}
"""


@settings(max_examples=300, deadline=None)
@given(st.tuples(lengths, lengths, lengths), st.tuples(angles, angles, angles), sites)
def test_generated_cells_import_or_fail_in_one_line(abc, angles_, atoms):
    """What one CSV row goes through on import: a template document or the row's one-line reason."""
    t0 = time.perf_counter()
    result = doc_from_csv_row(("gen", p1_cif(abc, angles_, atoms), "generated", {}, 200))
    if isinstance(result, dict):
        doc = TemplateDoc(**result)
        check_structure(doc.get_structure(), "stored")  # what is stored passes the check again
    else:
        mid, reason = result
        assert mid == "gen" and one_line(reason), reason
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("seed_cell", [((5.64,) * 3, (90.0,) * 3, [("Na", 0, 0, 0), ("Cl", 0.5, 0.5, 0.5)])])
def test_generator_makes_importable_cells(seed_cell):
    """The generator is not vacuous: a sane generated cell becomes a template."""
    assert isinstance(doc_from_csv_row(("gen", p1_cif(*seed_cell), "generated", {}, 200)), dict)


@pytest.mark.parametrize("abc", [(1e300, 1e300, 1e300), (1e200, 5.0, 5.0), (1e160, 1e160, 4.0)])
def test_astronomical_cells_are_refused_without_numeric_warnings(abc):
    """Cell lengths whose squares overflow: the row's one-line reason, no RuntimeWarning printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = doc_from_csv_row(("gen", p1_cif(abc, (90.0, 90.0, 90.0), [("Na", 0, 0, 0)]), "generated", {}, 200))
    assert not isinstance(result, dict) and one_line(result[1])
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
