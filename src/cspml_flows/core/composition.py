"""Formula parsing with clear errors, and the canonical site-role order shared by queries and templates.

A composition's *roles* are its elements ordered by reduced amount (ascending, as in pymatgen's anonymous
formula ``ABC3``), then by Pauling electronegativity, then by atomic number. Two compositions with the same
anonymous formula are compared role by role; elements whose amounts tie form a *tie group* whose members
may be permuted when substituting onto a template.

Formulas are read with ASCII digits only, at most ``MAX_ELEMENTS`` elements and ``MAX_AMOUNT`` atoms of an
element; decimal amounts that are simple fractions are scaled to integers (``Na0.5Cl0.5`` is NaCl). An amount
of zero (``Na0Cl``) and the isotope symbols ``D`` and ``T`` (which pymatgen reads as H) are errors.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache

from pymatgen.core import Composition, Element

from cspml_flows.core.config import excerpt, excerpt_text
from cspml_flows.core.errors import CompositionError
from cspml_flows.core.quiet import cache_electronegativities
from cspml_flows.core.structure_checks import ISOTOPES

MAX_ASSIGNMENTS = 120  # element-to-site assignments per composition: all of five tied elements (ABCDE)
MAX_ELEMENTS = 12  # distinct elements in a formula
MAX_AMOUNT = 10_000  # atoms of one element in a formula
MIN_AMOUNT = 1e-3  # smaller amounts would vanish in pymatgen's tolerances
MAX_DENOMINATOR = 100  # decimal amounts are scaled to integers by at most this factor (Na0.5Cl0.5 -> NaCl)
_TOKEN = re.compile(r"([A-Z][a-z]?)|([0-9]+(?:\.[0-9]+)?)|(\()|(\))|(\s+)", re.ASCII)


def _check_tokens(formula: str) -> None:
    pos, depth = 0, 0
    while pos < len(formula):
        m = _TOKEN.match(formula, pos)
        if not m:
            char = formula[pos]
            hint = " (element symbols start with a capital letter, e.g. 'NaCl')" if char.islower() else ""
            raise CompositionError(f"malformed formula {excerpt(formula)}: unexpected {char!r} at position {pos}{hint}")
        sym, num, opening, closing, _ws = m.groups()
        if sym in ISOTOPES:
            raise CompositionError(
                f"isotope {sym!r} in formula {excerpt(formula)}: write the element (H); "
                "structures do not tell isotopes apart"
            )
        if sym and not Element.is_valid_symbol(sym):
            raise CompositionError(f"unknown element {sym!r} in formula {excerpt(formula)}")
        if num is not None and float(num) == 0:
            raise CompositionError(f"malformed formula {excerpt(formula)}: amount 0 at position {pos}")
        depth += 1 if opening else -1 if closing else 0
        if depth < 0:
            raise CompositionError(f"malformed formula {excerpt(formula)}: unbalanced parentheses")
        pos = m.end()
    if depth:
        raise CompositionError(f"malformed formula {excerpt(formula)}: unbalanced parentheses")


@lru_cache(maxsize=65536)
def parse_composition(formula: str) -> Composition:
    """Parse a formula such as ``SrTiO3`` or ``Li3PS4``; raise :class:`CompositionError` on bad input."""
    if not isinstance(formula, str):
        raise CompositionError(f"formula must be a string, got {type(formula).__name__}")
    if not formula.strip():
        raise CompositionError("empty formula")
    _quiet_electronegativities()
    formula = formula.strip()
    _check_tokens(formula)
    try:
        comp = Composition(formula)
    except Exception as exc:  # pymatgen raises several types
        raise CompositionError(f"malformed formula {excerpt(formula)}: {excerpt_text(exc)}") from None
    if any(not isinstance(el, Element) for el in comp):
        raise CompositionError(f"formula {excerpt(formula)} has no real elements")
    if len(comp) > MAX_ELEMENTS:
        raise CompositionError(
            f"formula {excerpt(formula)} has {len(comp)} elements; at most {MAX_ELEMENTS} are supported"
        )
    for el, amt in comp.items():
        if not math.isfinite(amt) or amt > MAX_AMOUNT:
            raise CompositionError(f"amount of {el} in formula {excerpt(formula)} is too large (at most {MAX_AMOUNT})")
        if amt < MIN_AMOUNT:
            raise CompositionError(f"amount of {el} in formula {excerpt(formula)} is below {MIN_AMOUNT:g}")
    missing = set(re.findall(r"[A-Z][a-z]?", formula)) - {el.symbol for el in comp}
    if missing:
        raise CompositionError(
            f"formula {excerpt(formula)}: amount of {', '.join(sorted(missing))} is zero or below {MIN_AMOUNT:g}"
        )
    if comp.num_atoms <= 0:
        raise CompositionError(f"formula {excerpt(formula)} has no real elements")
    scale = integer_scale([amt for _, amt in comp.items()])
    return Composition({el: round(amt * scale) for el, amt in comp.items()}) if scale > 1 else comp


def integer_scale(amounts: list[float]) -> int:
    """The smallest factor up to ``MAX_DENOMINATOR`` that makes every amount a whole number (``0.5`` -> 2,
    ``0.95`` and ``0.05`` -> 20), else 1 (amounts such as ``0.333`` stay fractional)."""
    if all(abs(a - round(a)) < 1e-8 for a in amounts):
        return 1
    for k in range(2, MAX_DENOMINATOR + 1):
        if all(round(a * k) >= 1 and abs(a * k - round(a * k)) < 1e-6 for a in amounts):
            return k
    return 1


def as_composition(value: str | Composition) -> Composition:
    """Accept a formula string or a Composition."""
    return value if isinstance(value, Composition) else parse_composition(value)


@dataclass(frozen=True)
class Roles:
    """Elements of a reduced composition in canonical role order."""

    elements: tuple[str, ...]
    amounts: tuple[float, ...]

    @property
    def anonymous_formula(self) -> str:
        """pymatgen's anonymized formula of these amounts (``AB2C4``)."""
        return anonymous_formula_from_amounts(self.amounts)

    @property
    def reduced_formula(self) -> str:
        """The reduced formula of the elements and amounts."""
        return Composition(dict(zip(self.elements, self.amounts, strict=True))).reduced_formula

    def tie_groups(self) -> list[list[int]]:
        """Indices of roles grouped by equal amounts (in role order)."""
        groups: list[list[int]] = []
        for i, amt in enumerate(self.amounts):
            if groups and abs(self.amounts[groups[-1][0]] - amt) < 1e-8:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def permutations(self, limit: int = MAX_ASSIGNMENTS) -> list[tuple[int, ...]]:
        """Role permutations that only swap elements within tie groups, at most ``limit`` of them.

        Enumerated lazily in order of the number of swapped pairs (inversions against the canonical,
        electronegativity-sorted order), identity first, ties broken lexicographically by Lehmer code: the
        chemically closest assignments come first, and 12 elements in equal amounts (479 million
        permutations) cost no more than ``limit`` of them.
        """
        return list(itertools.islice(assignments(self.tie_groups()), max(int(limit), 1)))


def _bounded_vectors(bounds: tuple[int, ...], total: int) -> Iterator[tuple[int, ...]]:
    """Integer vectors ``v`` with ``0 <= v[i] <= bounds[i]`` and ``sum(v) == total``, lexicographic."""
    if not bounds:
        if total == 0:
            yield ()
        return
    rest = sum(bounds[1:])
    for first in range(max(0, total - rest), min(bounds[0], total) + 1):
        for tail in _bounded_vectors(bounds[1:], total - first):
            yield (first, *tail)


def assignments(groups: list[list[int]]) -> Iterator[tuple[int, ...]]:
    """Every within-group permutation of the concatenated ``groups``, by increasing inversion count.

    A permutation of a group of size ``k`` is its Lehmer code (digit ``j`` in ``0..k-1-j``; the digit sum is
    the number of inversions), so the codes of all groups together are bounded integer vectors enumerated
    by their sum: nothing is built before it is asked for.
    """
    bounds = tuple(len(g) - 1 - j for g in groups for j in range(len(g)))
    for total in range(sum(bounds) + 1):
        for code in _bounded_vectors(bounds, total):
            perm: list[int] = []
            pos = 0
            for g in groups:
                remaining = list(g)
                for digit in code[pos : pos + len(g)]:
                    perm.append(remaining.pop(digit))
                pos += len(g)
            yield tuple(perm)


def _electronegativity(symbol: str) -> float:
    x = float(Element(symbol).X)
    return 4.0 if math.isnan(x) else x  # noble gases without a Pauling value go last


def _amount_str(amt: float) -> str:
    """An amount as pymatgen's anonymized formula writes it: '' for 1, '2' for 2.0, '0.5' for 0.5."""
    if amt == 1:
        return ""
    if abs(amt % 1) < 1e-8:
        return str(int(amt))
    return str(amt)


def anonymous_formula_from_amounts(amounts: tuple[float, ...]) -> str:
    """pymatgen's anonymized formula of a set of amounts: letters in increasing amount."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for i, amt in enumerate(sorted(amounts)):
        label = letters[i] if i < 26 else f"Z{i}"
        out.append(label + _amount_str(float(amt)))
    return "".join(out)


@cache
def _quiet_electronegativities() -> None:
    """Read every element's electronegativity once, quietly (see :func:`cache_electronegativities`)."""
    cache_electronegativities()


@lru_cache(maxsize=65536)
def _roles_cached(items: tuple[tuple[str, float], ...]) -> Roles:
    _quiet_electronegativities()
    ordered = sorted(items, key=lambda t: (round(t[1], 8), _electronegativity(t[0]), Element(t[0]).Z))
    return Roles(tuple(e for e, _ in ordered), tuple(a for _, a in ordered))


def roles(comp: str | Composition) -> Roles:
    """Canonical roles of a composition (reduced).

    Integer compositions are divided by the greatest common divisor of their amounts (``H2O2`` has the
    roles of ``HO``, as in pymatgen's anonymized formula); fractional ones are first scaled to integers when
    they are simple fractions (:func:`integer_scale`), else kept as they are.
    Oxidation-state decorated species count as their element.
    """
    comp = as_composition(comp).element_composition
    amounts = [(el.symbol, float(amt)) for el, amt in comp.items() if amt > Composition.amount_tolerance]
    if not amounts:
        raise CompositionError(f"composition {comp.formula!r} has no atoms")
    scale = integer_scale([a for _, a in amounts])
    if scale > 1:
        amounts = [(sym, round(a * scale)) for sym, a in amounts]
    if all(abs(a - round(a)) < 1e-8 for _, a in amounts):
        ints = [round(a) for _, a in amounts]
        div = math.gcd(*ints)
        amounts = [(sym, float(n // div)) for (sym, _), n in zip(amounts, ints, strict=True)]
    return _roles_cached(tuple(sorted(amounts)))


def reduced_formula(comp: str | Composition) -> str:
    """The reduced formula of a formula or Composition."""
    return as_composition(comp).reduced_formula


def anonymous_formula(comp: str | Composition) -> str:
    """The anonymized formula of a formula or Composition (``SrTiO3`` -> ``ABC3``)."""
    return roles(comp).anonymous_formula


def check_formulas(formulas: list[str]) -> list[str]:
    """Pydantic-validator helper: every formula parses, else ``ValueError`` with the parser's message."""
    for f in formulas:
        try:
            parse_composition(f)
        except CompositionError as exc:
            raise ValueError(str(exc)) from None
    return formulas
