"""Raw inputs of the two towers.

- Structure side (:func:`geometry_features`): element-agnostic geometry of a template, per site role in
  canonical role order: first-shell coordination counted by role pair (a role x role matrix), coordination
  within a looser shell, share of like-role nearest neighbours, nearest-neighbour distance over
  ``(V/N)^(1/3)``; plus crystal system, space group, primitive size, Niggli cell shape and the volume per
  atom over the elemental volumes. Cached per ``material_id`` under ``$CSPML_HOME/hetero`` in an ``.npz``
  (ids and vectors, read with ``allow_pickle=False`` and checked: text ids, finite vectors of the right
  width; a damaged file is recomputed, with one log line).
- Site chemistry of a template and the composition side share one block layout
  (:func:`chemistry_block`): standardised element properties per role, role fractions, role mask and the
  Magpie mean / average-deviation statistics.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.composition import Roles
from cspml_flows.core.config import home_dir
from cspml_flows.core.descriptors import MAX_ROLES, element_volume
from cspml_flows.core.safeio import load_npz, save_npz
from cspml_flows.learning import checks
from cspml_flows.learning.features import STAT_COLS, Standardizer

logger = logging.getLogger(__name__)
GEOMETRY_VERSION = "geom-v1"
SHELL = 1.2  # first shell: neighbours within SHELL x the site's nearest-neighbour distance
LOOSE = 1.45
_SYSTEMS = (2, 15, 74, 142, 167, 194, 230)  # last space-group number of each crystal system
N_GLOBAL = len(_SYSTEMS) + 8
N_GEOMETRY = MAX_ROLES * MAX_ROLES + 3 * MAX_ROLES + N_GLOBAL


def _crystal_system(number: int) -> int:
    for k, last in enumerate(_SYSTEMS):
        if number <= last:
            return k
    return 0


def geometry_from_structure(structure: Structure, site_roles: np.ndarray, spacegroup: int, nprim: int) -> np.ndarray:
    """Geometry vector (N_GEOMETRY,) of one structure; ``site_roles[i]`` is the role index of site i."""
    n = len(structure)
    out = np.zeros(N_GEOMETRY)
    radius = 4.0
    while True:
        centers, points, _images, dist = structure.get_neighbor_list(radius)
        keep = dist > 1e-6
        centers, points, dist = centers[keep], points[keep], dist[keep]
        dnn = np.full(n, np.inf)
        np.minimum.at(dnn, centers, dist)
        if (np.all(np.isfinite(dnn)) and LOOSE * dnn.max() <= radius) or radius > 30:
            break
        radius = max(radius * 1.6, LOOSE * float(dnn[np.isfinite(dnn)].max(initial=radius)) + 0.1)
    dnn[~np.isfinite(dnn)] = radius
    first = dist <= SHELL * dnn[centers]
    loose = dist <= LOOSE * dnn[centers]
    nearest = dist <= dnn[centers] * 1.02
    roles_c, roles_p = site_roles[centers], site_roles[points]
    scale = (structure.volume / n) ** (1 / 3)
    n_roles = int(site_roles.max()) + 1
    cn_pair = np.zeros((MAX_ROLES, MAX_ROLES))
    per_role = np.zeros((3, MAX_ROLES))
    for r in range(min(n_roles, MAX_ROLES)):
        sites = np.flatnonzero(site_roles == r)
        if len(sites) == 0:
            continue
        sel = np.isin(centers, sites)
        for r2 in range(min(n_roles, MAX_ROLES)):
            cn_pair[r, r2] = np.sum(sel & first & (roles_p == r2)) / len(sites)
        per_role[0, r] = np.sum(sel & loose) / len(sites)
        nn_sel = sel & nearest
        per_role[1, r] = np.mean(roles_p[nn_sel] == roles_c[nn_sel]) if nn_sel.any() else 0.0
        per_role[2, r] = np.mean(dnn[sites]) / scale
    try:
        lat = structure.lattice.get_niggli_reduced_lattice()
    except (ValueError, np.linalg.LinAlgError):  # pymatgen cannot Niggli-reduce a degenerate lattice: as given
        lat = structure.lattice
    abc = np.sort(np.asarray(lat.abc))
    cos = np.sort(np.abs(np.cos(np.radians(lat.angles))))
    elements = [site.specie.symbol for site in structure]
    vol_el = element_volume(elements)
    vol_ratio = structure.volume / np.nansum(vol_el) if np.all(np.isfinite(vol_el)) else 1.0
    system = np.zeros(len(_SYSTEMS))
    system[_crystal_system(int(spacegroup or 1))] = 1.0
    glob = np.concatenate(
        [system, [np.log(max(nprim, 1)), (spacegroup or 1) / 230, abc[1] / abc[0], abc[2] / abc[0], *cos]]
    )
    glob = np.append(glob, np.log(max(vol_ratio, 1e-3)))
    out[:] = np.concatenate([cn_pair.ravel(), per_role.ravel(), glob])
    return out


def _geometry_task(args: tuple[dict, list[str], int, int]) -> np.ndarray:
    d, elements, spacegroup, nprim = args
    s = Structure.from_dict(d)
    role_of = {el: k for k, el in enumerate(elements)}
    site_roles = np.array([role_of[site.specie.symbol] for site in s])
    try:
        return geometry_from_structure(s, site_roles, spacegroup, nprim)
    except Exception:  # a degenerate cell fails in assorted ways: geometry unknown, chemistry still used
        logger.debug("no geometry for a %d-site structure", len(s), exc_info=True)
        return np.zeros(N_GEOMETRY)


def geometry_features(
    ids: Sequence[str],
    structures: Sequence[dict],
    role_list: Sequence[Roles],
    spacegroups: Sequence[int],
    nprims: Sequence[int],
    workers: int = 2,
    cache: bool | Path = True,
) -> np.ndarray:
    """Geometry vectors (n, N_GEOMETRY); cached by ``material_id`` (pass ``cache=False`` for user files)."""
    path = None
    known: dict[str, np.ndarray] = {}
    if cache:
        path = Path(cache) if isinstance(cache, Path) else home_dir() / "hetero" / f"{GEOMETRY_VERSION}.npz"
        if path.is_file():
            known = _read_geometry_cache(path)
    todo = [i for i, mid in enumerate(ids) if str(mid) not in known or not cache]
    if todo:
        tasks = [(structures[i], list(role_list[i].elements), int(spacegroups[i] or 1), int(nprims[i])) for i in todo]
        workers = max(1, min(workers, os.cpu_count() or 1))
        if workers > 1 and len(tasks) > 200:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                vecs = list(pool.map(_geometry_task, tasks, chunksize=64))
        else:
            vecs = [_geometry_task(t) for t in tasks]
        computed = {str(ids[i]): v for i, v in zip(todo, vecs, strict=True)}
        if path is not None:
            known.update(computed)
            keys = list(known)
            vectors = np.array([known[k] for k in keys]).reshape(len(keys), N_GEOMETRY)
            save_npz(path, {"ids": np.array(keys, dtype=str), "vectors": vectors}, {"version": GEOMETRY_VERSION})
        else:
            known = {**known, **computed}
    return np.array([known[str(mid)] for mid in ids]).reshape(len(ids), N_GEOMETRY)


def _read_geometry_cache(path: Path) -> dict[str, np.ndarray]:
    """Geometry vectors by id; empty (so rebuilt, with one log line) unless the file is this version's, with
    one text id per row and finite vectors of width :data:`N_GEOMETRY`."""
    try:
        arrays, meta = load_npz(path)
        if meta.get("version") != GEOMETRY_VERSION:
            raise ValueError("another geometry version")
        ids = checks.texts("ids", arrays.get("ids"))
        vectors = checks.numbers("vectors", arrays.get("vectors"), (len(ids), N_GEOMETRY))
        return {str(k): v for k, v in zip(ids.tolist(), vectors, strict=True)}
    except Exception as exc:  # whatever is wrong with a cache file, it is only rebuilt
        logger.warning("geometry cache %s is unreadable (%s): recomputing it", path, checks.first_line(exc))
        return {}


def structure_geometry(structure: Structure, r: Roles, spacegroup: int, nprim: int) -> np.ndarray:
    """Geometry vector of one pymatgen Structure (no cache)."""
    return _geometry_task((structure.as_dict(), list(r.elements), spacegroup, nprim))


def chemistry_block(std: Standardizer, role_props: np.ndarray, role_fracs: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """Composition / site-chemistry features (n, 12*MAX_ROLES + 2*MAX_ROLES + 44), NaN-free."""
    rp = np.nan_to_num(std.roles(role_props)).reshape(len(role_props), -1)
    frac = np.nan_to_num(role_fracs)
    mask = np.isfinite(role_fracs).astype(float)
    st = std.stats(stats)[:, STAT_COLS]
    return np.hstack([rp, frac, mask, st])


def digest(*parts: object) -> str:
    """Short hash of the parts' text."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]
