"""Site-environment compatibility of a substituted candidate: chemistry the composition features do not carry.

From the template pool, each element's distribution of effective coordination numbers (the ECoN of
:mod:`benchmarks.site_environments`, rounded) over the roles it occupies: Zn tetrahedral, Mg octahedral,
Sr 8-12 coordinated. A candidate puts query element ``q[k]`` on template role ``k``; its features are

- ``env_logp_mean`` / ``env_logp_min``: log P(ECoN of role ``k`` | element ``q[k]``) over the roles;
- ``env_logp_gain``: the same minus log P(ECoN | the template's own element), averaged: how much worse the
  new elements fit the sites than the ones the template was observed with;
- ``bond_strain_max`` / ``bond_strain_spread``: per role, the log ratio of its shell distance after the
  volume rescaling of :func:`cspml_flows.predict.substitute.volume_scale` to the sum of covalent radii of
  the two elements, minus the template's own; the largest magnitude and the range over roles (a uniform
  strain is the volume model's error, a spread is a misfit of the assignment);
- ``bvs_deviation_max`` / ``bvs_deviation_mean``: bond-valence sums (O'Keeffe-Brese parameters, as
  pymatgen's ``calculate_bv_sum``) of the rescaled shells against the guessed oxidation state of each role.

A held-out training query must not see itself in the element distributions: :meth:`ElementEnvironments.logp`
takes the counts of the query's own formula out.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pymatgen.core as pmg_core
from monty.serialization import loadfn
from pymatgen.core import Element

from benchmarks.site_environments import template_environments
from cspml_flows.core.descriptors import MAGPIE_PROPERTIES, MAX_ROLES, N_ELEMENTS, element_table, elemental_volumes
from cspml_flows.templates.index import TemplateIndex

ENV_FEATURES = (
    "env_logp_mean",
    "env_logp_min",
    "env_logp_gain",
    "bond_strain_max",
    "bond_strain_spread",
    "bvs_deviation_max",
    "bvs_deviation_mean",
)
MAX_ECN = 16  # ECoN bins 0..MAX_ECN (rounded, larger ones in the last)
PRIOR = 2.0  # pseudo-counts of the pool-wide ECoN distribution added to each element's
BV_B = 0.31  # bond-valence softness (Å) of pymatgen's calculate_bv_sum
# the elements pymatgen's calculate_bv_sum counts as anions (its ELECTRONEG list)
BV_ANIONS = ["H", "B", "C", "Si", "N", "P", "As", "Sb", "O", "S", "Se", "Te", "F", "Cl", "Br", "I"]


def ecn_bins(ecn: np.ndarray) -> np.ndarray:
    """Histogram bin of each ECoN (rounded, clipped to 0..MAX_ECN; NaN to 0)."""
    return np.clip(np.rint(np.nan_to_num(ecn, nan=0.0)), 0, MAX_ECN).astype(np.int64)


def role_atomic_numbers(index: TemplateIndex, rows: np.ndarray) -> np.ndarray:
    """Atomic number of each role of each template row (0 past its roles)."""
    z = np.zeros((len(rows), MAX_ROLES), dtype=np.int64)
    for k, t in enumerate(rows.tolist()):
        els = index.roles[t].elements[:MAX_ROLES]
        z[k, : len(els)] = [Element(e).Z for e in els]
    return z


@dataclass
class ElementEnvironments:
    """Per element, the counts of each ECoN bin over the (template, role) pairs of the pool it occupies."""

    counts: np.ndarray  # (N_ELEMENTS, MAX_ECN + 1)
    role_z: np.ndarray  # (n templates, MAX_ROLES) atomic number per role
    role_bin: np.ndarray  # (n templates, MAX_ROLES) ECoN bin per role

    @classmethod
    def from_index(cls, index: TemplateIndex) -> ElementEnvironments:
        """The distributions of every template of ``index``."""
        env = template_environments(index)
        role_z = role_atomic_numbers(index, np.arange(len(index)))
        role_bin = ecn_bins(env.ecn)
        real = (role_z > 0) & np.isfinite(env.ecn)
        counts = np.zeros((N_ELEMENTS, MAX_ECN + 1))
        np.add.at(counts, (role_z[real], role_bin[real]), 1.0)
        return cls(counts, np.where(real, role_z, 0), role_bin)

    def without(self, rows: np.ndarray) -> np.ndarray:
        """The counts with the (template, role) pairs of ``rows`` taken out."""
        counts = self.counts.copy()
        z, b = self.role_z[rows], self.role_bin[rows]
        real = z > 0
        np.add.at(counts, (z[real], b[real]), -1.0)
        return counts

    @staticmethod
    def log_table(counts: np.ndarray) -> np.ndarray:
        """log P(bin | element) of ``counts``, smoothed towards the pool-wide distribution."""
        total = counts.sum(axis=0)
        prior = (total + 1.0) / (total.sum() + len(total))
        return np.log((counts + PRIOR * prior[None, :]) / (counts.sum(axis=1, keepdims=True) + PRIOR))

    def logp(self, z: np.ndarray, bins: np.ndarray, owner: np.ndarray, held_out: list[np.ndarray] | None) -> np.ndarray:
        """log P(bin | element) of each (candidate, role); ``owner``: the query of each candidate, whose
        ``held_out[query]`` template rows are left out of the counts (None: none left out)."""
        out = self.log_table(self.counts)[z, bins]
        if held_out:
            for q, rows in enumerate(held_out):
                if len(rows) == 0:
                    continue
                mine = owner == q
                out[mine] = self.log_table(self.without(rows))[z[mine], bins[mine]]
        return out


@lru_cache(maxsize=1)
def bond_valence_params() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """O'Keeffe-Brese ``r`` and ``c`` per atomic number (NaN where pymatgen has none) and the anion mask."""
    params = loadfn(str(Path(pmg_core.__file__).parent / "bvparam_1991.yaml"))
    r = np.full(N_ELEMENTS, np.nan)
    c = np.full(N_ELEMENTS, np.nan)
    for sym, p in params.items():
        z = Element(sym).Z
        r[z], c[z] = float(p["r"]), float(p["c"])
    anion = np.zeros(N_ELEMENTS, dtype=bool)
    anion[[Element(s).Z for s in BV_ANIONS]] = True
    return r, c, anion


def bond_valence_r0(z1: np.ndarray, z2: np.ndarray) -> np.ndarray:
    """Bond-valence parameter R0 of element pairs (O'Keeffe-Brese rule, as pymatgen)."""
    r, c, _ = bond_valence_params()
    r1, r2, c1, c2 = r[z1], r[z2], c[z1], c[z2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return r1 + r2 - r1 * r2 * (np.sqrt(c1) - np.sqrt(c2)) ** 2 / (c1 * r1 + c2 * r2)


def _column(name: str) -> np.ndarray:
    return element_table()[:, MAGPIE_PROPERTIES.index(name)]


def volume_scales(qz: np.ndarray, tz: np.ndarray, fractions: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Linear scale factor of each candidate's cell (cube root of the pure elements' volume ratio, the roles
    weighted by their atomic ``fractions``; 1 where unknown): :func:`cspml_flows.predict.substitute.volume_scale`
    with its default volumes, for many candidates at once."""
    vol = elemental_volumes()
    vq = np.where(real, vol[qz] * fractions, 0.0).sum(axis=1)
    vt = np.where(real, vol[tz] * fractions, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = vq / vt
    return np.where(np.isfinite(ratio) & (ratio > 0), np.cbrt(ratio), 1.0)


def environment_features(
    index: TemplateIndex,
    t_row: np.ndarray,
    qz: np.ndarray,
    tz: np.ndarray,
    q_ox: np.ndarray,
    real: np.ndarray,
    owner: np.ndarray,
    stats: ElementEnvironments,
    held_out: list[np.ndarray] | None = None,
) -> np.ndarray:
    """The :data:`ENV_FEATURES` of each candidate (rows aligned with ``t_row``; per-role arrays ``qz``, ``tz``,
    ``q_ox`` of the query's and template's elements on the template's roles)."""
    env = template_environments(index).take(t_row)
    n = len(t_row)
    x = np.full((n, len(ENV_FEATURES)), np.nan)
    if n == 0:
        return x
    bins = ecn_bins(env.ecn)
    ok = real & np.isfinite(env.ecn)
    lq = stats.logp(qz, bins, owner, held_out)
    lt = stats.logp(tz, bins, owner, held_out)
    scale = volume_scales(qz, tz, index.role_fracs[t_row], real)
    strain = _bond_strain(env.shell_n, env.shell_d, qz, tz, ok, scale)
    bvs = _bvs_deviation(env.shell_n, env.shell_d, qz, q_ox, ok, scale)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without a comparable role: NaN features
        x[:, 0] = np.nanmean(np.where(ok, lq, np.nan), axis=1)
        x[:, 1] = np.nanmin(np.where(ok, lq, np.nan), axis=1)
        x[:, 2] = np.nanmean(np.where(ok, lq - lt, np.nan), axis=1)
        x[:, 3] = np.nanmax(np.abs(strain), axis=1)
        x[:, 4] = np.nanmax(strain, axis=1) - np.nanmin(strain, axis=1)
        x[:, 5] = np.nanmax(bvs, axis=1)
        x[:, 6] = np.nanmean(bvs, axis=1)
    return x


def _bond_strain(
    shell_n: np.ndarray, shell_d: np.ndarray, qz: np.ndarray, tz: np.ndarray, ok: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Per role: log(scaled shell distance / radius sum of the new pair) - log(distance / the template's)."""
    radius = _column("CovalentRadius") / 100.0  # pm to Å
    weights = np.where(np.isfinite(shell_n), shell_n, -1.0)
    main = np.argmax(weights, axis=2)  # the role that weighs most in each role's shell
    take = np.take_along_axis
    d = take(shell_d, main[:, :, None], axis=2)[:, :, 0]
    rq = radius[qz] + take(radius[qz], main, axis=1)
    rt = radius[tz] + take(radius[tz], main, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        strain = np.log(d * scale[:, None] / rq) - np.log(d / rt)
    return np.where(ok & np.isfinite(strain), strain, np.nan)


def _bvs_deviation(
    shell_n: np.ndarray, shell_d: np.ndarray, qz: np.ndarray, q_ox: np.ndarray, ok: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Per cation role (guessed oxidation state > 0): |bond-valence sum - state| / state over its shell's
    anion neighbours after substitution and rescaling (NaN where it has none)."""
    _, _, anion = bond_valence_params()
    r0 = bond_valence_r0(qz[:, :, None], qz[:, None, :])  # (n, R, R)
    bonded = (
        ok[:, :, None]
        & ok[:, None, :]
        & anion[qz][:, None, :]
        & ~anion[qz][:, :, None]
        & (shell_n > 0)
        & np.isfinite(shell_d)
        & np.isfinite(r0)
    )
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.where(bonded, np.nan_to_num(shell_n) * np.exp((r0 - shell_d * scale[:, None, None]) / BV_B), 0.0)
        bvs = v.sum(axis=2)
        dev = np.abs(bvs - q_ox) / np.maximum(q_ox, 1)
    has = bonded.any(axis=2) & (q_ox > 0)
    return np.where(has, dev, np.nan)
