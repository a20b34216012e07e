"""Site environments of a template, per element role: what the sites of each role are coordinated by.

Each site's first coordination shell is weighted as in Hoppe's effective coordination number (ECoN): a
neighbour at distance ``d`` weighs ``exp(1 - (d / d_avg)^6)``, ``d_avg`` the weighted mean distance of the
shell, found by a few fixed-point steps from the nearest neighbour's distance. Per role ``k`` of the template
(the order of :class:`~cspml_flows.core.composition.Roles`), the arrays hold

- ``ecn[k]``: the mean ECoN of the role's sites;
- ``shell_n[k, l]``: the mean weight of role-``l`` neighbours in the shell of a role-``k`` site;
- ``shell_d[k, l]``: their weighted mean distance in Å (NaN where role ``l`` is not in the shell).

Substituting elements onto the roles keeps these (distances scale with the cell), so they say on which kind
of site each element of a query would sit. :func:`template_environments` computes them once per index (the
index's ``memo``); the ranking ablation's site-environment features (:mod:`benchmarks.environment_features`)
read them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pymatgen.optimization.neighbors import find_points_in_spheres

from cspml_flows.core import progress
from cspml_flows.core.descriptors import MAX_ROLES
from cspml_flows.templates.geometry import cell_arrays
from cspml_flows.templates.index import TemplateIndex

SEARCH_RADIUS = 5.0  # Å searched first; further for sites whose nearest neighbour is far
SHELL_FACTOR = 1.6  # neighbours beyond this multiple of a site's nearest distance weigh below exp(-15)
ECON_STEPS = 4  # fixed-point steps of the ECoN mean distance
MIN_SHELL_WEIGHT = 0.05  # a role's weight in a shell below which it is not counted as a neighbour


def _pairs(matrix: np.ndarray, cart: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (site, neighbour site, distance) within ``radius`` (periodic images included, no self pair)."""
    i, j, _, d = find_points_in_spheres(
        cart, cart, float(radius), np.array([1, 1, 1], dtype=np.int64), np.ascontiguousarray(matrix), tol=1e-8
    )
    keep = d > 1e-6
    return i[keep].astype(np.int64), j[keep].astype(np.int64), d[keep]


def role_environments(
    matrix: np.ndarray, frac: np.ndarray, site_roles: np.ndarray, n_roles: int = MAX_ROLES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ecn, shell_n, shell_d)`` of a cell (see the module docstring), padded to ``n_roles`` roles (NaN)."""
    matrix = np.asarray(matrix, dtype=float)
    cart = np.ascontiguousarray(np.asarray(frac, dtype=float).reshape(-1, 3) @ matrix)
    n = len(cart)
    radius = SEARCH_RADIUS
    i, j, d = _pairs(matrix, cart, radius)
    nearest = np.full(n, np.inf)
    np.minimum.at(nearest, i, d)
    needed = SHELL_FACTOR * float(nearest.max()) if n else 0.0
    if needed > radius:  # a sparse cell or a lone site: search as far as its shell reaches
        radius = min(needed + 0.1, 4 * SEARCH_RADIUS)
        i, j, d = _pairs(matrix, cart, radius)
        nearest = np.full(n, np.inf)
        np.minimum.at(nearest, i, d)
    shell = d <= SHELL_FACTOR * nearest[i]
    i, j, d = i[shell], j[shell], d[shell]
    d_avg = nearest.copy()
    w = np.zeros_like(d)
    for _ in range(ECON_STEPS):
        w = np.exp(1.0 - (d / d_avg[i]) ** 6)
        total = np.bincount(i, weights=w, minlength=n)
        d_avg = np.where(total > 0, np.bincount(i, weights=w * d, minlength=n) / np.maximum(total, 1e-12), nearest)
    site_roles = np.asarray(site_roles, dtype=np.int64)
    ecn = np.full(n_roles, np.nan)
    shell_n = np.full((n_roles, n_roles), np.nan)
    shell_d = np.full((n_roles, n_roles), np.nan)
    r = min(int(site_roles.max()) + 1 if n else 0, n_roles)
    per_site = np.bincount(i, weights=w, minlength=n)
    # weight and weighted distance of each (site, neighbour role)
    key = i * n_roles + np.minimum(site_roles[j], n_roles - 1)
    wn = np.bincount(key, weights=w, minlength=n * n_roles).reshape(n, n_roles)
    wd = np.bincount(key, weights=w * d, minlength=n * n_roles).reshape(n, n_roles)
    for k in range(r):
        sites = site_roles == k
        if not sites.any():
            continue
        ecn[k] = per_site[sites].mean()
        shell_n[k, :] = wn[sites].mean(axis=0)
        weight = wn[sites].sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_d = wd[sites].sum(axis=0) / weight
        shell_d[k, :] = np.where(shell_n[k, :] >= MIN_SHELL_WEIGHT, mean_d, np.nan)
    return ecn, shell_n, shell_d


@dataclass(frozen=True)
class RoleEnvironments:
    """:func:`role_environments` of many templates, stacked: ``ecn`` (n, R), ``shell_n`` and ``shell_d`` (n, R, R)."""

    ecn: np.ndarray
    shell_n: np.ndarray
    shell_d: np.ndarray

    def take(self, rows: np.ndarray) -> RoleEnvironments:
        """The environments of ``rows``."""
        return RoleEnvironments(self.ecn[rows], self.shell_n[rows], self.shell_d[rows])


def environment_arrays(cells: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> RoleEnvironments:
    """:func:`role_environments` of ``n`` cells (lattice matrix, fractional coordinates, role per site)."""
    ecn = np.full((n, MAX_ROLES), np.nan)
    shell_n = np.full((n, MAX_ROLES, MAX_ROLES), np.nan)
    shell_d = np.full((n, MAX_ROLES, MAX_ROLES), np.nan)
    for k, (matrix, frac, site_roles) in enumerate(progress.track(cells, n, "site environments", unit="template")):
        ecn[k], shell_n[k], shell_d[k] = role_environments(matrix, frac, site_roles)
    return RoleEnvironments(ecn, shell_n, shell_d)


def template_environments(index: TemplateIndex) -> RoleEnvironments:
    """The per-role site environments of every template of ``index``, computed once per index."""

    def compute() -> RoleEnvironments:
        cells = (cell_arrays(index.structures[i], index.roles[i]) for i in range(len(index)))
        return environment_arrays(cells, len(index))

    return index.memo("site_environments", compute)
