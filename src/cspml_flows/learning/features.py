"""Features of a (query composition, template) pair that share an anonymous formula.

The query is described by its canonical roles (optionally permuted within tie groups), the template by
the arrays of a :class:`~cspml_flows.templates.index.TemplateIndex`. All functions are vectorised over
pairs.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

import numpy as np

from cspml_flows.core.descriptors import MAGPIE_PROPERTIES, MAGPIE_STATS, MAX_ROLES, ROLE_PROPERTIES
from cspml_flows.learning.checks import field, numbers

# Magpie statistics whose query-template differences enter the pair features (mean and avg_dev).
STAT_COLS = np.array(
    [i * len(MAGPIE_STATS) + MAGPIE_STATS.index(s) for i in range(len(MAGPIE_PROPERTIES)) for s in ("mean", "avg_dev")]
)


class Standardizer:
    """Column-wise mean/std scaling fitted on template descriptors (NaN-aware)."""

    def __init__(self, stats: np.ndarray, role_props: np.ndarray):
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: mean 0, scale 1
            flat = role_props.reshape(-1, role_props.shape[-1])
            self.stats_mu, self.stats_sd = _mu_sd(stats)
            self.role_mu, self.role_sd = _mu_sd(flat)

    def stats(self, x: np.ndarray) -> np.ndarray:
        """Standardised Magpie statistics (NaN as the mean)."""
        return np.nan_to_num((x - self.stats_mu) / self.stats_sd)

    _ARRAYS = ("stats_mu", "stats_sd", "role_mu", "role_sd")

    def to_dict(self) -> dict[str, list[float]]:
        """The fitted arrays as JSON lists."""
        return {k: getattr(self, k).tolist() for k in self._ARRAYS}

    @classmethod
    def from_dict(cls, d: Any, where: str = "std.") -> Standardizer:
        """Inverse of :meth:`to_dict`. SchemaError (naming the field ``where`` + array) unless every array is a
        list of finite numbers of this version's length (one per Magpie statistic or role property) and every
        scale is above zero."""
        new = cls.__new__(cls)
        n_stats, n_roles = len(MAGPIE_PROPERTIES) * len(MAGPIE_STATS), len(ROLE_PROPERTIES)
        for k in cls._ARRAYS:
            value = field(d, k, list, where)
            n = n_stats if k.startswith("stats") else n_roles
            setattr(new, k, numbers(f"{where}{k}", value, (n,), positive=k.endswith("_sd")))
        return new

    def roles(self, x: np.ndarray) -> np.ndarray:
        """Standardised role-wise element properties (NaN kept)."""
        return (x - self.role_mu) / self.role_sd


def _mu_sd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware column mean and standard deviation; constant or empty columns get scale 1."""
    mu = np.nan_to_num(np.nanmean(x, axis=0))
    sd = np.nan_to_num(np.nanstd(x, axis=0))
    return mu, np.where(sd < 1e-6, 1.0, sd)


def unlearned_distance(q_stats: np.ndarray, t_stats: np.ndarray, std: Standardizer) -> np.ndarray:
    """Euclidean distance of standardised Magpie statistics (the ``nearest`` baseline's metric)."""
    return np.linalg.norm(std.stats(q_stats) - std.stats(t_stats), axis=-1)


def role_distance(q_role: np.ndarray, t_role: np.ndarray, std: Standardizer) -> np.ndarray:
    """Euclidean distance of standardised element properties compared role by role (NaN roles ignored)."""
    d = std.roles(q_role) - std.roles(t_role)
    return np.sqrt(np.nansum(d * d, axis=(-1, -2)))


def pair_features(
    q_role: np.ndarray,
    q_frac: np.ndarray,
    q_stats: np.ndarray,
    t_role: np.ndarray,
    t_stats: np.ndarray,
    t_cluster_size: np.ndarray,
    t_ehull: np.ndarray,
    t_nprim: np.ndarray,
    std: Standardizer,
) -> np.ndarray:
    """Feature matrix (m, F) for m pairs; inputs are row-aligned arrays (query rows already repeated)."""
    return standardized_pair_features(
        std.roles(q_role),
        q_frac,
        std.stats(q_stats),
        std.roles(t_role),
        std.stats(t_stats),
        t_cluster_size,
        t_ehull,
        t_nprim,
    )


@cache
def n_pair_features() -> int:
    """Columns of :func:`standardized_pair_features` (what a pair model must read)."""
    qr = np.zeros((1, MAX_ROLES, len(ROLE_PROPERTIES)))
    st = np.zeros((1, len(MAGPIE_PROPERTIES) * len(MAGPIE_STATS)))
    one = np.ones(1)
    return standardized_pair_features(qr, np.zeros((1, MAX_ROLES)), st, qr, st, one, one, one).shape[1]


def standardized_pair_features(
    qr: np.ndarray,
    q_frac: np.ndarray,
    sq: np.ndarray,
    tr: np.ndarray,
    st: np.ndarray,
    t_cluster_size: np.ndarray,
    t_ehull: np.ndarray,
    t_nprim: np.ndarray,
) -> np.ndarray:
    """:func:`pair_features` from already standardised role properties (``qr``, ``tr``) and Magpie statistics
    (``sq``, ``st``): prediction standardises each template and query once and gathers rows."""
    m = len(qr)
    d_role = np.abs(qr - tr).reshape(m, -1)
    d_stats = np.abs(sq - st)[:, STAT_COLS]
    dist_stats = np.linalg.norm(sq - st, axis=1, keepdims=True)
    diff = qr - tr
    dist_role = np.sqrt(np.nansum(diff * diff, axis=(1, 2)))[:, None]
    max_role = np.nanmax(np.abs(diff).reshape(m, -1), axis=1, initial=0.0)[:, None]
    same = (dist_stats < 1e-6).astype(float)
    return np.hstack(
        [
            d_role,
            qr.reshape(m, -1),
            q_frac,
            d_stats,
            dist_stats,
            dist_role,
            max_role,
            same,
            np.log1p(t_cluster_size)[:, None],
            t_ehull[:, None],
            np.log(t_nprim)[:, None],
        ]
    ).astype(np.float32)
