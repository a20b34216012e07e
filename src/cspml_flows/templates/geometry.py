"""Per-template geometry computed once: the shortest interatomic distance and the role symmetries.

:func:`template_doc_from_structure` stores both in the template document at import
(:func:`doc_geometry`); the index reads them from there and computes them only for documents of older stores
(:func:`template_geometry`, in ``workers`` processes).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import orjson
import spglib

from cspml_flows.core import progress
from cspml_flows.core.composition import Roles
from cspml_flows.core.structure_checks import min_periodic_distance


def cell_arrays(d: dict, r: Roles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice matrix, fractional coordinates and role index per site of a structure dict."""
    matrix = np.asarray(d["lattice"]["matrix"], dtype=float)
    frac = np.asarray([site["abc"] for site in d["sites"]], dtype=float)
    role_of = {el: k for k, el in enumerate(r.elements)}
    site_roles = np.array([role_of[site["species"][0]["element"]] for site in d["sites"]])
    return matrix, frac, site_roles


def doc_geometry(d: dict, r: Roles) -> tuple[float, list[tuple[int, ...]]]:
    """Shortest interatomic distance and role symmetries (:func:`role_symmetry_perms`) of a structure dict."""
    matrix, frac, site_roles = cell_arrays(d, r)
    return min_periodic_distance(matrix, frac), role_symmetry_perms(matrix, frac, site_roles, r)


def structure_json(d: dict) -> bytes:
    """A structure dict as JSON bytes (orjson, keys in their order; numpy values as lists)."""
    return orjson.dumps(d, option=orjson.OPT_SERIALIZE_NUMPY, default=str)


def structure_digest(d: dict | bytes) -> str:
    """A digest of a structure dict as JSON (:func:`structure_json`): what the stored geometry of a template
    document was computed from (``geometry_of``)."""
    return hashlib.blake2b(d if isinstance(d, bytes) else structure_json(d), digest_size=8).hexdigest()


def stored_geometry(
    doc: dict, r: Roles, structure_json: bytes | None = None
) -> tuple[float, list[tuple[int, ...]]] | None:
    """The geometry a template document holds (``min_dist``, ``role_syms``), or None when it holds none, holds
    it for another structure (``geometry_of``, the digest of ``structure_json``, the document's structure as
    JSON), or holds values that do not fit its roles (a finite positive distance; permutations of the roles,
    identity first)."""
    dmin, syms = doc.get("min_dist"), doc.get("role_syms")
    if not isinstance(dmin, int | float) or isinstance(dmin, bool) or not 0 < dmin < float("inf"):
        return None
    if not isinstance(syms, list) or not syms:
        return None
    data = structure_json if structure_json is not None else doc.get("structure")
    if not isinstance(data, bytes | dict) or doc.get("geometry_of") != structure_digest(data):
        return None
    ident = list(range(len(r.elements)))
    out = []
    for p in syms:
        if not isinstance(p, list | tuple) or sorted(x if isinstance(x, int) else -1 for x in p) != ident:
            return None
        out.append(tuple(int(x) for x in p))
    if out[0] != tuple(ident):
        return None
    return float(dmin), out


def _geometry_chunk(args: tuple[list[dict], list[Roles]]) -> list[tuple[float, list[tuple[int, ...]]]]:
    return [doc_geometry(d, r) for d, r in zip(*args, strict=True)]


def template_geometry(
    structures: list[dict], role_list: list[Roles], workers: int = 1, chunk: int = 200
) -> tuple[np.ndarray, list[list[tuple[int, ...]]]]:
    """Shortest interatomic distance and role symmetries of every template (in ``workers`` processes)."""
    tasks = [(structures[s : s + chunk], role_list[s : s + chunk]) for s in range(0, len(structures), chunk)]
    results: list[tuple[float, list[tuple[int, ...]]]] = []
    with progress.bar(len(structures), "template geometry", unit="template") as shown:
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for part in pool.map(_geometry_chunk, tasks):
                    results.extend(part)
                    shown.update(len(part))
        else:
            for t in tasks:
                results.extend(_geometry_chunk(t))
                shown.update(len(t[0]))
    return np.array([r[0] for r in results], dtype=float), [r[1] for r in results]


def role_symmetry_perms(
    matrix: np.ndarray, frac: np.ndarray, site_roles: np.ndarray, r: Roles
) -> list[tuple[int, ...]]:
    """Permutations of tied roles that a symmetry of the template maps onto itself (identity included).

    Two element assignments p1, p2 onto this template give the same crystal when p2[g[r]] == p1[r] for
    every role r and some g here. Found from spglib operations of the template with tied roles merged
    (symprec 0.1), all operations tested at once with numpy.
    """
    ident = tuple(range(len(r.elements)))
    groups = r.tie_groups()
    if all(len(g) == 1 for g in groups):
        return [ident]
    group_of_role = np.empty(len(r.elements), dtype=int)
    for gi, g in enumerate(groups):
        group_of_role[g] = gi
    merged = group_of_role[site_roles]
    try:
        ds = spglib.get_symmetry((matrix, frac, merged + 1), symprec=0.1)
    except (spglib.SpglibError, ValueError, TypeError, RuntimeError):  # no symmetry found: identity only
        ds = None
    if ds is None:
        return [ident]
    found = {ident}
    rotations, translations = ds["rotations"], ds["translations"]
    same_kind = merged[:, None] == merged[None, :]
    first_site = np.array([int(np.flatnonzero(site_roles == k)[0]) for k in ident])
    step = max(1, 2_000_000 // len(frac) ** 2)  # operations per block: bounded memory on large cells
    for o in range(0, len(rotations), step):
        # a block of operations at once: (ops, sites, 3) images, then site-to-site closeness (ops, n, n)
        images = np.einsum("nj,okj->onk", frac, rotations[o : o + step]) + translations[o : o + step, None, :]
        diff = images[:, :, None, :] - frac[None, None, :, :]
        close = np.all(np.abs(diff - np.round(diff)) < 0.02, axis=3) & same_kind
        close = close[close.any(axis=2).all(axis=1)]  # operations that map the merged cell onto itself
        target = site_roles[close.argmax(axis=2)]  # (ops, sites): role of each site's image
        # an operation permutes roles when all sites of a role go to one role, a different one per role
        image = target[:, first_site]  # (ops, roles)
        consistent = np.all(target == image[:, site_roles], axis=1)
        for perm in image[consistent]:
            if len(set(perm.tolist())) == len(ident):
                found.add(tuple(int(x) for x in perm))
    return sorted(found)
