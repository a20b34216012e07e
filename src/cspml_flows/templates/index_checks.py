"""Checks of the arrays an index is read from: layouts, value ranges, roles and role permutations.

Every check raises ValueError naming what does not fit; an index that fails one is never used (the update
rebuilds it).
"""

from __future__ import annotations

import numpy as np

from cspml_flows.core.composition import MAX_ELEMENTS
from cspml_flows.core.descriptors import MAGPIE_PROPERTIES, MAGPIE_STATS, MAX_ROLES, ROLE_PROPERTIES

STATS_WIDTH = len(MAGPIE_PROPERTIES) * len(MAGPIE_STATS)
TEXT_COLUMNS = ("ids", "formulas", "anon", "prototype")


def role_counts(role_el: np.ndarray) -> np.ndarray:
    """Roles per row of a ``role_el`` array (elements first, empty text after)."""
    return (np.asarray(role_el) != "").sum(axis=1)


def check_roles(role_el: np.ndarray, role_amt: np.ndarray) -> np.ndarray:
    """Role counts of ``role_el``/``role_amt`` (elements then empty text; positive finite amounts on the roles,
    NaN after); ValueError otherwise."""
    counts = role_counts(role_el)
    on = np.arange(MAX_ELEMENTS)[None, :] < counts[:, None]
    if not (counts > 0).all() or not ((role_el != "") == on).all():
        raise ValueError("'role_el' does not hold the roles' elements")
    amt = np.asarray(role_amt)
    if not (np.isfinite(amt[on]).all() and (amt[on] > 0).all() and np.isnan(amt[~on]).all()):
        raise ValueError("'role_amt' does not hold positive amounts on the roles")
    return counts


def check_permutations(table: np.ndarray, start: np.ndarray, end: np.ndarray, n_roles: np.ndarray) -> bool:
    """Whether rows ``start[i]:end[i]`` of the permutation ``table`` (-1 padded) are permutations of the
    ``n_roles[i]`` roles of row ``i``."""
    table = np.asarray(table)
    k = (table >= 0).sum(axis=1)
    ranked = np.sort(np.where(table >= 0, table, MAX_ELEMENTS), axis=1)
    valid = ranked == np.where(np.arange(MAX_ELEMENTS)[None, :] < k[:, None], np.arange(MAX_ELEMENTS), MAX_ELEMENTS)
    valid = valid.all(axis=1) & (k > 0)
    lens = end - start
    rows = np.repeat(start - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(int(lens.sum()))
    owner_roles = np.repeat(n_roles, lens)
    return bool(valid[rows].all() and (k[rows] == owner_roles).all())


def check_index_arrays(arrays: dict[str, np.ndarray], n_roles: list[int] | np.ndarray) -> None:
    """Raise ValueError unless ``arrays`` have the layout of an index over templates with ``n_roles`` roles
    each: text arrays of length n; integer counts, space groups and cluster ids in range; ``stats``
    (n, STATS_WIDTH), ``role_props`` (n, MAX_ROLES, len(ROLE_PROPERTIES)) and ``role_fracs`` (n, MAX_ROLES)
    floats with values exactly on each template's roles (NaN padding after them); ``e_above_hull`` floats
    (NaN: unknown) and the optional ``min_dist`` finite and positive."""
    n = len(n_roles)
    _check_shapes(arrays, n)
    ids = arrays["ids"]
    if n > 1 and not (ids[1:] > ids[:-1]).all() and len(set(ids.tolist())) != n:
        raise ValueError("'ids' repeats an id")
    if n == 0:
        return
    _check_ranges(arrays, n)
    on_role = np.arange(MAX_ROLES)[None, :] < np.minimum(np.asarray(n_roles), MAX_ROLES)[:, None]
    fracs, props = arrays["role_fracs"], arrays["role_props"]
    if not (np.isfinite(fracs[on_role]).all() and (fracs[on_role] > 0).all() and np.isnan(fracs[~on_role]).all()):
        raise ValueError("'role_fracs' does not match the templates' roles")
    if np.isinf(props).any() or not np.isnan(props[~on_role]).all():
        raise ValueError("'role_props' does not match the templates' roles")


def _check_shapes(arrays: dict[str, np.ndarray], n: int) -> None:
    """Each array of the layout present (``min_dist`` optional), of its dtype kind and shape."""
    shapes = {
        "nprim": ((n,), "iu"),
        "spacegroup": ((n,), "iu"),
        "cluster": ((n,), "iu"),
        "e_above_hull": ((n,), "f"),
        "stats": ((n, STATS_WIDTH), "f"),
        "role_props": ((n, MAX_ROLES, len(ROLE_PROPERTIES)), "f"),
        "role_fracs": ((n, MAX_ROLES), "f"),
        "min_dist": ((n,), "f"),
    } | {k: ((n,), "U") for k in TEXT_COLUMNS}
    for name, (shape, kinds) in shapes.items():
        if name not in arrays:
            if name == "min_dist":
                continue
            raise ValueError(f"no '{name}' array")
        a = arrays[name]
        if a.dtype.kind not in kinds:
            raise ValueError(f"'{name}' has dtype {a.dtype}, not {'text' if kinds == 'U' else 'numbers'}")
        if a.shape != shape:
            raise ValueError(f"'{name}' has shape {a.shape}, not {shape}")


def _check_ranges(arrays: dict[str, np.ndarray], n: int) -> None:
    """Counts, space groups and cluster ids in range; no infinite values; distances finite and positive."""
    if arrays["nprim"].min() < 1 or arrays["spacegroup"].min() < 0 or arrays["spacegroup"].max() > 230:
        raise ValueError("'nprim' or 'spacegroup' out of range")
    if arrays["cluster"].min() < 0 or arrays["cluster"].max() >= n:
        raise ValueError("'cluster' out of range")
    if np.isinf(arrays["e_above_hull"]).any():
        raise ValueError("'e_above_hull' is infinite")
    if np.isinf(arrays["stats"]).any():
        raise ValueError("'stats' holds infinite values")  # an element property that is missing is NaN
    if "min_dist" in arrays and not (np.isfinite(arrays["min_dist"]).all() and (arrays["min_dist"] > 0).all()):
        raise ValueError("'min_dist' is not finite and positive")
