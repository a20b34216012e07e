"""Formula parsing, canonical role order, tie groups and anonymous formulas."""

from __future__ import annotations

import pytest
from pymatgen.core import Composition, Species

from cspml_flows.core.composition import (
    MAX_ASSIGNMENTS,
    Roles,
    anonymous_formula,
    anonymous_formula_from_amounts,
    as_composition,
    parse_composition,
    reduced_formula,
    roles,
)
from cspml_flows.core.errors import CompositionError, CSPMLError

# ---------------------------------------------------------------- parse_composition


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("NaCl", {"Na": 1, "Cl": 1}),
        ("SrTiO3", {"Sr": 1, "Ti": 1, "O": 3}),
        ("Li3PS4", {"Li": 3, "P": 1, "S": 4}),
        ("Mg3(PO4)2", {"Mg": 3, "P": 2, "O": 8}),
        ("  KBr ", {"K": 1, "Br": 1}),
        ("Fe0.5Ni0.5", {"Fe": 1, "Ni": 1}),  # simple fractions are scaled to whole numbers
        ("Fe0.137Ni", {"Fe": 0.137, "Ni": 1}),  # other decimals are kept
        ("Ca(OH)2", {"Ca": 1, "O": 2, "H": 2}),
    ],
)
def test_parse_composition_valid(formula, expected):
    comp = parse_composition(formula)
    assert isinstance(comp, Composition)
    assert comp.get_el_amt_dict() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("formula", "fragment"),
    [
        ("Xx2O", "unknown element 'Xx'"),
        ("Sr(TiO3", "unbalanced parentheses"),
        ("SrTiO3)", "unbalanced parentheses"),
        (")(NaCl", "unbalanced parentheses"),
        ("", "empty formula"),
        ("   ", "empty formula"),
        ("nacl", "capital letter"),
        ("srTiO3", "unexpected 's' at position 0"),
        ("Na-Cl", "unexpected '-' at position 2"),
        ("NaCl]", "unexpected ']'"),
        ("NaCl2.5.1", "unexpected '.'"),
    ],
)
def test_parse_composition_errors(formula, fragment):
    with pytest.raises(CompositionError) as err:
        parse_composition(formula)
    assert fragment in str(err.value)
    # one-line message, and catchable both as a user error and as a ValueError
    assert "\n" not in str(err.value)
    assert isinstance(err.value, CSPMLError)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("value", [None, 3, 1.5])
def test_parse_composition_rejects_non_strings(value):
    with pytest.raises(CompositionError, match="must be a string"):
        parse_composition(value)


def test_parse_composition_error_names_formula():
    with pytest.raises(CompositionError, match=r"'Qq3Fe'"):
        parse_composition("Qq3Fe")


def test_as_composition_passthrough_and_parse():
    comp = Composition("BaZrO3")
    assert as_composition(comp) is comp
    assert as_composition("BaZrO3") == comp
    with pytest.raises(CompositionError):
        as_composition("Bz2")


def test_reduced_formula():
    assert reduced_formula("Na4Cl4") == "NaCl"
    assert reduced_formula(Composition("Sr2Ti2O6")) == "SrTiO3"


# ---------------------------------------------------------------- roles


@pytest.mark.parametrize(
    ("formula", "elements", "amounts"),
    [
        ("NaCl", ("Na", "Cl"), (1, 1)),
        ("ClNa", ("Na", "Cl"), (1, 1)),
        ("KBr", ("K", "Br"), (1, 1)),
        ("SrTiO3", ("Sr", "Ti", "O"), (1, 1, 3)),
        ("O3TiSr", ("Sr", "Ti", "O"), (1, 1, 3)),
        ("BaZrO3", ("Ba", "Zr", "O"), (1, 1, 3)),
        ("Li3PS4", ("P", "Li", "S"), (1, 3, 4)),  # amount first: P1 < Li3 < S4
        ("Fe2O3", ("Fe", "O"), (2, 3)),
        ("Al2O3", ("Al", "O"), (2, 3)),
        ("LiFePO4", ("Li", "Fe", "P", "O"), (1, 1, 1, 4)),  # X: Li 0.98 < Fe 1.83 < P 2.19
        ("Na4Cl4", ("Na", "Cl"), (1, 1)),  # reduced
        ("H2O2", ("H", "O"), (1, 1)),  # pymatgen keeps H2O2 as its reduced formula; roles reduce it
        ("XeF2", ("Xe", "F"), (1, 2)),
        ("CuSi", ("Si", "Cu"), (1, 1)),  # equal Pauling X (1.90): lower Z first
        ("HeSiO2", ("Si", "He", "O"), (1, 1, 2)),  # no Pauling X for He: after every real value
    ],
)
def test_roles_canonical_order(formula, elements, amounts):
    r = roles(formula)
    assert isinstance(r, Roles)
    assert r.elements == elements
    assert r.amounts == pytest.approx(amounts)


def test_roles_same_for_string_and_composition():
    assert roles("SrTiO3") == roles(Composition("Sr2Ti2O6"))


def test_roles_of_oxidation_state_decorated_composition():
    comp = Composition({Species("Na", 1): 2, Species("Cl", -1): 2})
    r = roles(comp)
    assert r.elements == ("Na", "Cl")
    assert r.amounts == (1.0, 1.0)
    assert anonymous_formula(comp) == "AB"


def test_roles_simple_fractions_scaled_to_integers():
    r = roles("Fe0.25Ni0.75")
    assert r.elements == ("Fe", "Ni")
    assert r.amounts == (1.0, 3.0)
    assert roles(Composition({"Na": 0.5, "Cl": 0.5})) == roles("NaCl")  # Composition objects too
    assert parse_composition("Na0.5Cl0.5").reduced_formula == "NaCl"
    assert parse_composition("Sr0.2Ti0.2O0.6").reduced_formula == "SrTiO3"


def test_roles_other_fractional_amounts_kept():
    r = roles("Fe0.137Ni0.863")
    assert r.elements == ("Fe", "Ni")
    assert r.amounts == pytest.approx((0.137, 0.863))


def test_roles_of_empty_composition_raises():
    with pytest.raises(CompositionError):
        roles(Composition({}))


def test_roles_properties():
    r = roles("Ti2Sr2O6")
    assert r.reduced_formula == "SrTiO3"
    assert r.anonymous_formula == "ABC3"


@pytest.mark.parametrize(
    ("formula", "groups"),
    [
        ("NaCl", [[0, 1]]),
        ("SrTiO3", [[0, 1], [2]]),
        ("Li3PS4", [[0], [1], [2]]),
        ("LiFePO4", [[0, 1, 2], [3]]),
        ("Fe2O3", [[0], [1]]),
        ("Fe", [[0]]),
    ],
)
def test_tie_groups(formula, groups):
    assert roles(formula).tie_groups() == groups


def test_permutations_swap_only_within_tie_groups():
    perms = roles("SrTiO3").permutations()
    assert perms == [(0, 1, 2), (1, 0, 2)]
    assert roles("Li3PS4").permutations() == [(0, 1, 2)]


def test_permutations_identity_first_and_limit():
    r = roles("LiFePO4")
    perms = r.permutations()
    assert perms[0] == (0, 1, 2, 3)
    assert len(perms) == 6 == len(set(perms))
    assert all(p[3] == 3 for p in perms)  # O (amount 4) never moves
    assert sorted(p[:3] for p in perms) == sorted([(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    limited = r.permutations(limit=4)
    assert len(limited) == 4
    assert limited == perms[:4]


def test_permutations_across_two_tie_groups():
    # A1 B1 C2 D2: two tie groups of two roles each
    r = Roles(("Na", "K", "Cl", "Br"), (1.0, 1.0, 2.0, 2.0))
    perms = r.permutations()
    assert sorted(perms) == [(0, 1, 2, 3), (0, 1, 3, 2), (1, 0, 2, 3), (1, 0, 3, 2)]


# ---------------------------------------------------------------- anonymous formula


@pytest.mark.parametrize(
    "formula",
    [
        "NaCl",
        "SrTiO3",
        "Li3PS4",
        "Fe2O3",
        "LiFePO4",
        "Ba2YCu3O7",
        "Mg3(PO4)2",
        "K2PtCl6",
        "H2O2",
        "Li2O2",
        "Na4Cl4",
        "O2",
        "Fe",
        "Fe0.137O0.5",
        "Al2(SO4)3",
        "CaMg(CO3)2",
    ],
)
def test_anonymous_formula_matches_pymatgen(formula):
    assert anonymous_formula(formula) == Composition(formula).anonymized_formula


def test_anonymous_formula_of_composition_objects():
    comp = Composition({"Fe": 0.137, "O": 0.5})
    assert anonymous_formula(comp) == comp.anonymized_formula
    assert anonymous_formula(Composition({"Fe": 1 / 3, "O": 2 / 3})) == "AB2"
    assert anonymous_formula(Composition("Sr3Ti3O9")) == "ABC3"


@pytest.mark.parametrize(
    ("amounts", "expected"),
    [((1.0, 1.0, 3.0), "ABC3"), ((3.0, 1.0), "AB3"), ((0.5, 1.5), "A0.5B1.5"), ((2.0, 2.0), "A2B2")],
)
def test_anonymous_formula_from_amounts(amounts, expected):
    assert anonymous_formula_from_amounts(amounts) == expected


def test_permutations_fewest_swaps_first():
    r = roles("LiFePO4")
    inversions = [sum(a > b for i, a in enumerate(p) for b in p[i + 1 :]) for p in r.permutations()]
    assert inversions == sorted(inversions) == [0, 1, 1, 2, 2, 3]


def test_permutations_lazy_and_capped_for_many_tied_elements():
    # 12 elements in equal amounts: 479 million assignments, only the cap is ever built
    r = Roles(tuple(["Na", "K", "Rb", "Cs", "Li", "Mg", "Ca", "Sr", "Ba", "Zn", "Cd", "Hg"]), (1.0,) * 12)
    perms = r.permutations()
    assert len(perms) == MAX_ASSIGNMENTS == len(set(perms))
    assert perms[0] == tuple(range(12))
    assert all(sorted(p) == list(range(12)) for p in perms)
    assert len(r.permutations(limit=5)) == 5


def test_every_assignment_of_five_tied_elements_within_the_cap():
    r = roles("KNaRbCsLi")  # ABCDE: 120 assignments
    assert len(set(r.permutations())) == 120
