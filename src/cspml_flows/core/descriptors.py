"""Composition descriptors from matminer's Magpie element data, vectorised with numpy.

Two descriptors, both built on one element-property table:

- :func:`magpie_stats`: the Magpie ``ElementProperty`` statistics (22 properties x min, max, range, mean,
  avg_dev, mode = 132 numbers), identical to ``matminer.featurizers.composition.ElementProperty
  .from_preset("magpie")`` (whose default replaces unknown element properties by the mean over all
  elements) but computed for thousands of compositions at once.
- :func:`role_properties`: the properties of each element in canonical role order (see
  :mod:`cspml_flows.core.composition`), padded with NaN, for role-by-role comparison of compositions that share
  an anonymous formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from matminer.utils.data import MagpieData
from pymatgen.core import Composition, Element

from cspml_flows.core.composition import Roles, roles

DESCRIPTOR_VERSION = "magpie-v2"  # v2: magpie_stats imputes missing element properties like matminer
MAGPIE_PROPERTIES = (
    "Number",
    "MendeleevNumber",
    "AtomicWeight",
    "MeltingT",
    "Column",
    "Row",
    "CovalentRadius",
    "Electronegativity",
    "NsValence",
    "NpValence",
    "NdValence",
    "NfValence",
    "NValence",
    "NsUnfilled",
    "NpUnfilled",
    "NdUnfilled",
    "NfUnfilled",
    "NUnfilled",
    "GSvolume_pa",
    "GSbandgap",
    "GSmagmom",
    "SpaceGroupNumber",
)
MAGPIE_STATS = ("minimum", "maximum", "range", "mean", "avg_dev", "mode")
# Properties compared site role by site role (chemically meaningful, few missing values).
ROLE_PROPERTIES = (
    "Number",
    "MendeleevNumber",
    "AtomicWeight",
    "Column",
    "Row",
    "CovalentRadius",
    "Electronegativity",
    "NValence",
    "NsValence",
    "NpValence",
    "NdValence",
    "GSvolume_pa",
)
MAX_ROLES = 6
N_ELEMENTS = 119


@lru_cache(maxsize=2)
def element_table(impute_nan: bool = False) -> np.ndarray:
    """Array [Z, property] of the Magpie element properties (row 0 unused and NaN).

    A property an element lacks is NaN, or with ``impute_nan`` (matminer's ``ElementProperty`` default,
    used by :func:`magpie_stats`) the mean of that property over the elements that have it.
    """
    data = MagpieData(impute_nan=impute_nan).all_elemental_props
    table = np.full((N_ELEMENTS, len(MAGPIE_PROPERTIES)), np.nan)
    for j, prop in enumerate(MAGPIE_PROPERTIES):
        for sym, value in data[prop].items():
            try:
                z = Element(sym).Z
            except ValueError:
                continue
            if z < N_ELEMENTS and value is not None:
                table[z, j] = float(value)
    return table


def _role_prop_index() -> np.ndarray:
    return np.array([MAGPIE_PROPERTIES.index(p) for p in ROLE_PROPERTIES])


def _padded(comps: Sequence[Composition | str]) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers (n, E) and fractions (n, E) in role order, padded with Z=0 and fraction 0."""
    rs = [roles(c) for c in comps]
    width = max((len(r.elements) for r in rs), default=1)
    zs = np.zeros((len(rs), width), dtype=np.int64)
    fr = np.zeros((len(rs), width))
    for i, r in enumerate(rs):
        amounts = np.asarray(r.amounts)
        zs[i, : len(r.elements)] = [Element(e).Z for e in r.elements]
        fr[i, : len(r.elements)] = amounts / amounts.sum()
    return zs, fr


def magpie_stats(comps: Sequence[Composition | str]) -> np.ndarray:
    """Magpie ElementProperty statistics for many compositions: array (n, 132), matminer's column order."""
    table = element_table(impute_nan=True)
    zs, fr = _padded(comps)
    props = table[zs]  # (n, E, P)
    mask = (fr > 0)[:, :, None]
    w = fr[:, :, None]
    with np.errstate(invalid="ignore"):
        # padding columns (Z=0) contribute nothing; a NaN property of a real element makes the stat NaN
        real = np.where(mask, props, 0.0)
        mean = np.sum(w * real, axis=1)
        avg_dev = np.sum(w * np.where(mask, np.abs(props - mean[:, None, :]), 0.0), axis=1)
        minimum = np.min(np.where(mask, props, np.inf), axis=1)
        maximum = np.max(np.where(mask, props, -np.inf), axis=1)
        # matminer's mode: property of the most abundant element (np.isclose), smallest value on ties
        top = np.isclose(fr, fr.max(axis=1, keepdims=True)) & (fr > 0)
        mode = np.min(np.where(top[:, :, None], props, np.inf), axis=1)
    stats = {
        "minimum": minimum,
        "maximum": maximum,
        "range": maximum - minimum,
        "mean": mean,
        "avg_dev": avg_dev,
        "mode": mode,
    }
    out = np.stack([stats[s] for s in MAGPIE_STATS], axis=2)  # (n, P, S): matminer orders prop-major
    out = out.reshape(len(zs), len(MAGPIE_PROPERTIES) * len(MAGPIE_STATS))
    out[np.isinf(out)] = np.nan
    return out


def magpie_feature_labels() -> list[str]:
    """matminer's names of the Magpie statistics, in the order of :func:`magpie_stats`' columns."""
    return [f"MagpieData {s} {p}" for p in MAGPIE_PROPERTIES for s in MAGPIE_STATS]


def role_properties(role_list: Sequence[Roles], perms: Sequence[tuple[int, ...]] | None = None) -> np.ndarray:
    """Element properties per role: array (n, MAX_ROLES, len(ROLE_PROPERTIES)), NaN-padded.

    ``perms[i]`` reorders the roles of ``role_list[i]`` (a within-tie-group permutation).
    """
    table = element_table()[:, _role_prop_index()]
    zs = np.zeros((len(role_list), MAX_ROLES), dtype=np.int64)
    for i, r in enumerate(role_list):
        order = perms[i] if perms is not None else range(len(r.elements))
        els = [r.elements[j] for j in order][:MAX_ROLES]
        zs[i, : len(els)] = [Element(e).Z for e in els]
    out = table[zs]
    out[zs == 0] = np.nan
    return out


def role_fractions(role_list: Sequence[Roles]) -> np.ndarray:
    """Atomic fractions per role (n, MAX_ROLES), NaN-padded."""
    out = np.full((len(role_list), MAX_ROLES), np.nan)
    for i, r in enumerate(role_list):
        a = np.asarray(r.amounts[:MAX_ROLES])
        out[i, : len(a)] = a / sum(r.amounts)
    return out


@lru_cache(maxsize=1)
def elemental_volumes() -> np.ndarray:
    """DFT ground-state volume per atom of each pure element by atomic number (Magpie GSvolume_pa; NaN where
    unknown)."""
    return element_table()[:, MAGPIE_PROPERTIES.index("GSvolume_pa")].copy()


def element_volume(symbols: list[str] | tuple[str, ...]) -> np.ndarray:
    """DFT ground-state volume per atom of each element (Magpie GSvolume_pa)."""
    return elemental_volumes()[[Element(s).Z for s in symbols]]
