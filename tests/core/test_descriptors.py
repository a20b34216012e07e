"""Magpie statistics (checked against matminer), role properties and role fractions."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Composition, Element

from cspml_flows.core.composition import Roles, roles
from cspml_flows.core.descriptors import (
    DESCRIPTOR_VERSION,
    MAGPIE_PROPERTIES,
    MAGPIE_STATS,
    MAX_ROLES,
    ROLE_PROPERTIES,
    element_table,
    magpie_feature_labels,
    magpie_stats,
    role_fractions,
    role_properties,
)
from cspml_flows.core.errors import CompositionError

N_FEATURES = len(MAGPIE_PROPERTIES) * len(MAGPIE_STATS)


@pytest.fixture(scope="module")
def matminer_magpie():
    from matminer.featurizers.composition import ElementProperty

    return ElementProperty.from_preset("magpie")


MATMINER_FORMULAS = [
    "NaCl",
    "SrTiO3",
    "Li3PS4",
    "Fe2O3",
    "LiFePO4",
    "CsPbI3",
    "Ba2YCu3O7",
    "Fe0.5Ni0.5",
    "Fe",
    "He",  # MeltingT and Electronegativity missing: matminer imputes them
    "ArO",  # Electronegativity missing for Ar
    "XeF2",
    "NaPu",
    "LaNi5H6",
]


@pytest.mark.parametrize("formula", MATMINER_FORMULAS)
def test_magpie_stats_equals_matminer(matminer_magpie, formula):
    comp = Composition(formula)
    expected = np.array(matminer_magpie.featurize(comp), dtype=float)
    ours = magpie_stats([comp])
    assert ours.shape == (1, N_FEATURES)
    assert np.allclose(ours[0], expected, equal_nan=True, rtol=1e-9, atol=1e-9)


def test_magpie_stats_batch_equals_matminer(matminer_magpie):
    comps = [Composition(f) for f in MATMINER_FORMULAS]
    expected = np.array([matminer_magpie.featurize(c) for c in comps], dtype=float)
    ours = magpie_stats(comps)
    assert ours.shape == (len(comps), N_FEATURES)
    assert np.allclose(ours, expected, equal_nan=True, rtol=1e-9, atol=1e-9)


def test_magpie_stats_accepts_strings_and_rows_are_independent():
    batch = magpie_stats(["NaCl", "SrTiO3", "Li3PS4"])
    for i, f in enumerate(["NaCl", "SrTiO3", "Li3PS4"]):
        assert np.array_equal(batch[i], magpie_stats([f])[0])
    # the reduced formula and any multiple give the same descriptor
    assert np.array_equal(magpie_stats(["Na4Cl4"])[0], batch[0])


def test_magpie_stats_known_values():
    labels = magpie_feature_labels()
    row = dict(zip(labels, magpie_stats(["SrTiO3"])[0], strict=True))
    assert row["MagpieData minimum Number"] == 8
    assert row["MagpieData maximum Number"] == 38
    assert row["MagpieData range Number"] == 30
    assert row["MagpieData mean Number"] == pytest.approx((38 + 22 + 3 * 8) / 5)
    assert row["MagpieData mode Number"] == 8  # O is the most abundant element
    # ties in the mode go to the smallest value
    nacl = dict(zip(labels, magpie_stats(["NaCl"])[0], strict=True))
    assert nacl["MagpieData mode Number"] == 11
    assert nacl["MagpieData avg_dev Number"] == pytest.approx(3.0)


def test_magpie_stats_no_nan_for_elements_with_missing_data():
    # matminer's default imputes missing element properties; so must we (no silent zeros either)
    out = magpie_stats(["He", "ArO", "Og"])
    assert not np.isnan(out).any()
    labels = magpie_feature_labels()
    he = dict(zip(labels, out[0], strict=True))
    table = element_table(impute_nan=True)
    col = MAGPIE_PROPERTIES.index("MeltingT")
    assert he["MagpieData mean MeltingT"] == pytest.approx(table[2, col])
    assert he["MagpieData mean MeltingT"] > 0


def test_magpie_stats_empty_input():
    out = magpie_stats([])
    assert out.shape == (0, N_FEATURES)


def test_magpie_stats_bad_formula_raises():
    with pytest.raises(CompositionError):
        magpie_stats(["NaCl", "Xx2O"])


def test_magpie_feature_labels_match_matminer(matminer_magpie):
    assert magpie_feature_labels() == matminer_magpie.feature_labels()
    assert len(magpie_feature_labels()) == N_FEATURES


def test_element_table():
    table = element_table()
    assert table.shape == (119, len(MAGPIE_PROPERTIES))
    assert np.isnan(table[0]).all()
    number = MAGPIE_PROPERTIES.index("Number")
    assert table[Element("Na").Z, number] == 11
    assert table[Element("Pu").Z, number] == 94
    x = MAGPIE_PROPERTIES.index("Electronegativity")
    assert table[Element("F").Z, x] == pytest.approx(3.98)
    assert np.isnan(table[Element("Ar").Z, x])  # raw table keeps unknowns as NaN
    imputed = element_table(impute_nan=True)
    assert not np.isnan(imputed[1:]).any()
    assert imputed[Element("F").Z, x] == pytest.approx(3.98)
    assert imputed[Element("Ar").Z, x] == pytest.approx(np.nanmean(table[1:, x]))


def test_descriptor_version_is_a_string():
    assert isinstance(DESCRIPTOR_VERSION, str) and DESCRIPTOR_VERSION


# ---------------------------------------------------------------- role descriptors


def _prop(name: str) -> int:
    return ROLE_PROPERTIES.index(name)


def test_role_properties_shape_and_padding():
    rs = [roles("NaCl"), roles("SrTiO3"), roles("LiFePO4")]
    out = role_properties(rs)
    assert out.shape == (3, MAX_ROLES, len(ROLE_PROPERTIES))
    for i, r in enumerate(rs):
        n = len(r.elements)
        assert not np.isnan(out[i, :n]).any()
        assert np.isnan(out[i, n:]).all()


def test_role_properties_values_in_role_order():
    out = role_properties([roles("ClNa"), roles("SrTiO3")])
    z = _prop("Number")
    assert out[0, :2, z].tolist() == [11, 17]  # Na then Cl
    assert out[1, :3, z].tolist() == [38, 22, 8]  # Sr, Ti, O
    x = _prop("Electronegativity")
    assert out[1, :3, x] == pytest.approx([0.95, 1.54, 3.44])


def test_role_properties_with_permutations():
    r = roles("SrTiO3")
    out = role_properties([r, r], perms=[(0, 1, 2), (1, 0, 2)])
    z = _prop("Number")
    assert out[0, :3, z].tolist() == [38, 22, 8]
    assert out[1, :3, z].tolist() == [22, 38, 8]


def test_role_properties_truncates_beyond_max_roles():
    els = ("Li", "Na", "K", "Rb", "Cs", "Fr", "O")
    r = Roles(els, tuple(float(i + 1) for i in range(len(els))))
    out = role_properties([r])
    assert out.shape == (1, MAX_ROLES, len(ROLE_PROPERTIES))
    assert out[0, :, _prop("Number")].tolist() == [3, 11, 19, 37, 55, 87]


def test_role_properties_empty():
    assert role_properties([]).shape == (0, MAX_ROLES, len(ROLE_PROPERTIES))


def test_role_fractions():
    out = role_fractions([roles("SrTiO3"), roles("NaCl"), roles("Li3PS4")])
    assert out.shape == (3, MAX_ROLES)
    assert out[0, :3] == pytest.approx([0.2, 0.2, 0.6])
    assert out[1, :2] == pytest.approx([0.5, 0.5])
    assert out[2, :3] == pytest.approx([1 / 8, 3 / 8, 4 / 8])
    assert np.isnan(out[0, 3:]).all() and np.isnan(out[1, 2:]).all()
    assert np.nansum(out, axis=1) == pytest.approx([1, 1, 1])
