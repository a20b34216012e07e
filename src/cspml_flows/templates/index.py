"""An in-memory, array-based view of a template store for fast retrieval.

Built once from the store (one full read) and cached on disk under ``$CSPML_HOME/cache``, one file per store
location (:attr:`TemplateStore.identity`); rebuilt when the store's content digest
(:meth:`TemplateStore.fingerprint`) changes. Structures stay as dicts until a prediction needs them.

The cache file is an uncompressed numpy ``.npz`` read with ``allow_pickle=False``: numeric and text arrays,
the structures as one JSON text, and JSON metadata with the cache format and the store signature. Nothing in
it can run code. Every array is checked against the layout an index has (:func:`check_index_arrays`: dtype
kind, shape and widths, lengths, finite values where an index has them); a file of another format or
signature, or one that fails a check, is rebuilt (one log line).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from cspml_flows import progress
from cspml_flows.composition import Roles, roles
from cspml_flows.config import home_dir, max_template_atoms
from cspml_flows.descriptors import (
    DESCRIPTOR_VERSION,
    MAGPIE_PROPERTIES,
    MAGPIE_STATS,
    MAX_ROLES,
    ROLE_PROPERTIES,
    magpie_stats,
    role_fractions,
    role_properties,
)
from cspml_flows.prototype import cluster_prototypes
from cspml_flows.safeio import load_npz, save_npz
from cspml_flows.structure_checks import geometry_problem, min_periodic_distance
from cspml_flows.templates.store import TemplateStore

log = logging.getLogger(__name__)
INDEX_VERSION = 3  # 3: per-template minimum distance and role symmetries
CACHE_FORMAT = "cspml-index-npz/1"  # the on-disk layout of the cache file (see save_index_cache)
_FIELDS = [
    "material_id",
    "structure",
    "formula",
    "anonymous_formula",
    "nsites_primitive",
    "prototype",
    "e_above_hull",
    "volume_per_atom",
    "spacegroup_number",
    "round",
    "source",
]


@dataclass
class TemplateIndex:
    """Arrays over all templates of a store."""

    ids: np.ndarray
    formulas: np.ndarray
    anon: np.ndarray
    roles: list[Roles]
    nprim: np.ndarray
    prototype: np.ndarray
    e_above_hull: np.ndarray
    spacegroup: np.ndarray
    structures: list[dict]
    cluster: np.ndarray
    stats: np.ndarray
    role_props: np.ndarray
    role_fracs: np.ndarray
    signature: str = ""
    min_dist: np.ndarray | None = None  # shortest interatomic distance per template (None: computed on use)
    role_syms: list[list[tuple[int, ...]]] | None = None  # see role_symmetry_perms (None: computed on use)
    by_anon: dict[str, np.ndarray] = field(default_factory=dict)
    _cells: dict[int, tuple] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.by_anon and len(self.anon):
            order = np.argsort(self.anon, kind="stable")
            keys, starts = np.unique(self.anon[order], return_index=True)
            bounds = [*starts[1:], len(order)]
            self.by_anon = {k: order[s:e] for k, s, e in zip(keys, starts, bounds, strict=True)}
        self.cluster_size = np.bincount(self.cluster)[self.cluster] if len(self.cluster) else self.cluster

    def __len__(self) -> int:
        return len(self.ids)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_docs(cls, docs: list[dict], workers: int = 1, signature: str = "") -> TemplateIndex:
        if not docs:
            return cls.empty()
        rl = [roles(d["formula"]) for d in docs]
        anon = np.array([r.anonymous_formula for r in rl])
        nprim = np.array([int(d.get("nsites_primitive") or len(d["structure"]["sites"])) for d in docs])
        proto = np.array([d.get("prototype") or "" for d in docs], dtype=object)
        structures = [d["structure"] for d in docs]
        cluster = np.asarray(
            cluster_prototypes(list(anon), list(nprim), [p or None for p in proto], structures, workers=workers)
        )
        ehull = np.array([np.nan if d.get("e_above_hull") is None else d["e_above_hull"] for d in docs])
        min_dist, role_syms = template_geometry(structures, rl, workers=workers)
        return cls(
            ids=np.array([str(d["material_id"]) for d in docs]),
            formulas=np.array([d["formula"] for d in docs]),
            anon=anon,
            roles=rl,
            nprim=nprim,
            prototype=proto,
            e_above_hull=ehull,
            spacegroup=np.array([d.get("spacegroup_number") or 0 for d in docs]),
            structures=structures,
            cluster=cluster,
            stats=magpie_stats([r.reduced_formula for r in rl]),
            role_props=role_properties(rl),
            role_fracs=role_fractions(rl),
            signature=signature,
            min_dist=min_dist,
            role_syms=role_syms,
        )

    @classmethod
    def empty(cls) -> TemplateIndex:
        z = np.zeros(0)
        return cls(
            np.array([], dtype=str),
            np.array([], dtype=str),
            np.array([], dtype=str),
            [],
            z.astype(int),
            np.array([], dtype=object),
            z,
            z.astype(int),
            [],
            z.astype(int),
            np.zeros((0, STATS_WIDTH)),
            np.zeros((0, MAX_ROLES, len(ROLE_PROPERTIES))),
            np.zeros((0, MAX_ROLES)),
        )

    @classmethod
    def open(cls, store: str | Path | None = None, workers: int = 2) -> TemplateIndex:
        """The index of an existing template store (default: the embedded one); the store is closed after."""
        ts = TemplateStore.open(store, create=False)
        try:
            return cls.from_store(ts, workers=workers)
        finally:
            ts.close()

    @classmethod
    def from_store(cls, store: TemplateStore, workers: int = 2, cache: bool | Path = True) -> TemplateIndex:
        """Build (or load from cache) the index of a store; raises StoreError when the store is empty.

        Templates that imports now refuse but an older store may hold (partial occupancies, more sites than
        ``max_template_atoms``) are left out, with one log line."""
        store.require_nonempty()
        limit = max_template_atoms()
        signature = f"{INDEX_VERSION}|{DESCRIPTOR_VERSION}|{store.identity}|{store.fingerprint()}|{limit}"
        path = None
        if cache:
            path = Path(cache) if isinstance(cache, Path) else index_cache_path(store)
            if path.is_file():
                idx = load_index_cache(path, signature)
                if idx is not None:
                    return idx
        docs = [d for d in store.docs(properties=_FIELDS) if usable_template(d["structure"], limit)]
        skipped = store.count() - len(docs)
        if skipped > 0:
            log.warning(
                "%d templates of %s left out: partial occupancies, more than %d sites (max_template_atoms) or a cell "
                "no crystal has",
                skipped,
                store.name,
                limit,
            )
        docs.sort(key=lambda d: str(d["material_id"]))
        idx = cls.from_docs(docs, workers=workers, signature=signature)
        if path is not None:
            try:
                save_index_cache(idx, path)
                path.with_suffix(".pkl").unlink(missing_ok=True)  # the pickle cache of earlier versions: never read
            except OSError as exc:
                log.warning("index cache %s cannot be written (%s): the index is used without it", path, exc)
        return idx

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cells"] = {}
        return state

    # ---- access ---------------------------------------------------------------------------------------
    def structure(self, i: int) -> Structure:
        return Structure.from_dict(self.structures[i])

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Lattice matrix, fractional coordinates, role index per site, and minimum interatomic distance."""
        if i not in self._cells:
            matrix, frac, site_roles = cell_arrays(self.structures[i], self.roles[i])
            dmin = self.min_dist[i] if self.min_dist is not None else min_periodic_distance(matrix, frac)
            self._cells[i] = (matrix, frac, site_roles, float(dmin))
        return self._cells[i]

    def role_symmetries(self, i: int) -> list[tuple[int, ...]]:
        """Permutations of tied roles that a symmetry of the template maps onto itself (identity included);
        see :func:`role_symmetry_perms`. Precomputed when the index is built, else computed once here."""
        if self.role_syms is not None:
            return self.role_syms[i]
        key = ("sym", i)
        if key not in self._cells:
            matrix, frac, site_roles, _ = self.cell(i)
            self._cells[key] = role_symmetry_perms(matrix, frac, site_roles, self.roles[i])
        return self._cells[key]

    def subset(self, mask: np.ndarray) -> TemplateIndex:
        """A new index over the templates where ``mask`` is True (cluster ids kept)."""
        sel = np.flatnonzero(mask)
        return TemplateIndex(
            ids=self.ids[sel],
            formulas=self.formulas[sel],
            anon=self.anon[sel],
            roles=[self.roles[i] for i in sel],
            nprim=self.nprim[sel],
            prototype=self.prototype[sel],
            e_above_hull=self.e_above_hull[sel],
            spacegroup=self.spacegroup[sel],
            structures=[self.structures[i] for i in sel],
            cluster=self.cluster[sel],
            stats=self.stats[sel],
            role_props=self.role_props[sel],
            role_fracs=self.role_fracs[sel],
            signature=self.signature + f"|subset{hashlib.sha1(sel.tobytes()).hexdigest()[:8]}",
            min_dist=None if self.min_dist is None else self.min_dist[sel],
            role_syms=None if self.role_syms is None else [self.role_syms[i] for i in sel],
        )


STATS_WIDTH = len(MAGPIE_PROPERTIES) * len(MAGPIE_STATS)  # columns of TemplateIndex.stats
_TEXT = ("ids", "formulas", "anon", "prototype")
_NUMERIC = ("nprim", "e_above_hull", "spacegroup", "cluster", "stats", "role_props", "role_fracs", "min_dist")


def index_cache_path(store: TemplateStore) -> Path:
    """The index cache file of a store: one per store location (:attr:`TemplateStore.identity`)."""
    digest = hashlib.sha1(store.identity.encode()).hexdigest()[:16]
    return home_dir() / "cache" / f"index-{digest}.npz"


def _json_bytes(obj: object) -> np.ndarray:
    try:
        import orjson  # maggma's JSON library: several times faster than json on structure dicts

        data = orjson.dumps(obj)
    except ImportError:
        data = json.dumps(obj).encode()
    return np.frombuffer(data, dtype=np.uint8)


def _json_loads(arr: np.ndarray) -> object:
    try:
        import orjson

        return orjson.loads(arr.tobytes())
    except ImportError:
        return json.loads(arr.tobytes())


def save_index_cache(idx: TemplateIndex, path: Path) -> Path:
    """Write the index to an ``.npz`` cache file (atomically; see the module docstring for the layout)."""
    arrays: dict[str, np.ndarray] = {k: np.asarray(getattr(idx, k)).astype(str) for k in _TEXT}
    arrays |= {k: np.asarray(getattr(idx, k)) for k in _NUMERIC if getattr(idx, k) is not None}
    arrays["structures"] = _json_bytes(idx.structures)
    arrays["roles"] = _json_bytes([[list(r.elements), list(r.amounts)] for r in idx.roles])
    if idx.role_syms is not None:
        arrays["role_syms"] = _json_bytes([[list(p) for p in perms] for perms in idx.role_syms])
    meta = {"format": CACHE_FORMAT, "signature": idx.signature, "n": len(idx)}
    return save_npz(path, arrays, meta)


def load_index_cache(path: Path, signature: str) -> TemplateIndex | None:
    """The cached index of ``path`` if it is a cache file of this format for ``signature``, else None (a file
    of another format, store state or version, or a damaged file, is logged in one line and rebuilt).
    Read with ``allow_pickle=False``: nothing in the file is executed."""
    try:
        with _gc_paused():  # millions of small objects: the collector would triple the load time
            return _read_index_cache(path, signature)
    except Exception as exc:  # a damaged, truncated or foreign file: rebuild, never trust it
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("index cache %s is unreadable (%s): rebuilding it", path, reason)
        return None


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_index_cache(path: Path, signature: str) -> TemplateIndex | None:
    """:func:`load_index_cache` without the error handling."""
    arrays, meta = load_npz(path)
    if meta.get("format") != CACHE_FORMAT or meta.get("signature") != signature:
        log.info("index cache %s is for another store state or version: rebuilding", path)
        return None
    n = meta.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError("no template count in the metadata")
    for name in ("roles", "structures"):
        if name not in arrays:
            raise ValueError(f"no '{name}' array")
    role_list = _check_roles(_json_member(arrays.pop("roles"), "roles"), n)
    structures = _json_member(arrays.pop("structures"), "structures")
    if not isinstance(structures, list) or len(structures) != n:
        raise ValueError(f"'structures' does not hold {n} structures")
    if not all(isinstance(d, dict) and isinstance(d.get("sites"), list) and "lattice" in d for d in structures):
        raise ValueError("'structures' holds an entry that is not a structure")
    syms = None
    if "role_syms" in arrays:
        syms = _check_role_syms(_json_member(arrays.pop("role_syms"), "role_syms"), role_list)
    unknown = set(arrays) - set(_TEXT + _NUMERIC)
    if unknown:
        raise ValueError(f"unknown arrays {sorted(unknown)}")
    check_index_arrays(arrays, [len(r.elements) for r in role_list])
    fields = {k: arrays[k] for k in _TEXT + _NUMERIC if k in arrays}
    fields["prototype"] = fields["prototype"].astype(object)
    return TemplateIndex(**fields, roles=role_list, structures=structures, signature=signature, role_syms=syms)


def _json_member(arr: np.ndarray, name: str) -> object:
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"'{name}' is not a JSON text")
    return _json_loads(arr)


def _check_roles(raw: object, n: int) -> list[Roles]:
    """The roles of ``n`` templates from their JSON form ``[[elements], [amounts]]``; ValueError otherwise."""
    if not isinstance(raw, list) or len(raw) != n:
        raise ValueError(f"'roles' does not hold {n} entries")
    out = []
    for entry in raw:
        ok = isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, list) for x in entry)
        els, amts = entry if ok else ([], [])
        if not (
            ok
            and 0 < len(els) == len(amts)
            and all(isinstance(e, str) for e in els)
            and all(isinstance(a, int | float) and not isinstance(a, bool) and 0 < a < float("inf") for a in amts)
        ):
            raise ValueError(f"'roles' holds a malformed entry {str(entry)[:60]}")
        out.append(Roles(tuple(els), tuple(float(a) for a in amts)))
    return out


def _check_role_syms(raw: object, role_list: list[Roles]) -> list[list[tuple[int, ...]]]:
    """Role permutations per template from their JSON form; each a permutation of the template's roles."""
    if not isinstance(raw, list) or len(raw) != len(role_list):
        raise ValueError(f"'role_syms' does not hold {len(role_list)} entries")
    out = []
    for perms, r in zip(raw, role_list, strict=True):
        ident = list(range(len(r.elements)))
        if not isinstance(perms, list) or not perms:
            raise ValueError("'role_syms' holds an empty or malformed entry")
        for p in perms:
            if not isinstance(p, list) or sorted(x if isinstance(x, int) else -1 for x in p) != ident:
                raise ValueError(f"'role_syms' holds {str(p)[:40]}, not a permutation of {len(ident)} roles")
        out.append([tuple(p) for p in perms])
    return out


def check_index_arrays(arrays: dict[str, np.ndarray], n_roles: list[int]) -> None:
    """Raise ValueError unless ``arrays`` have the layout of an index over templates with ``n_roles`` roles
    each: text arrays of length n; integer counts, space groups and cluster ids in range; ``stats``
    (n, STATS_WIDTH), ``role_props`` (n, MAX_ROLES, len(ROLE_PROPERTIES)) and ``role_fracs`` (n, MAX_ROLES)
    floats with values exactly on each template's roles (NaN padding after them); ``e_above_hull`` floats
    (NaN: unknown) and the optional ``min_dist`` finite and positive."""
    n = len(n_roles)
    shapes = {
        "nprim": ((n,), "iu"),
        "spacegroup": ((n,), "iu"),
        "cluster": ((n,), "iu"),
        "e_above_hull": ((n,), "f"),
        "stats": ((n, STATS_WIDTH), "f"),
        "role_props": ((n, MAX_ROLES, len(ROLE_PROPERTIES)), "f"),
        "role_fracs": ((n, MAX_ROLES), "f"),
        "min_dist": ((n,), "f"),
    } | {k: ((n,), "U") for k in _TEXT}
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
    if len(set(arrays["ids"].tolist())) != n:
        raise ValueError("'ids' repeats an id")
    if n == 0:
        return
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
    on_role = np.arange(MAX_ROLES)[None, :] < np.minimum(np.asarray(n_roles), MAX_ROLES)[:, None]
    fracs, props = arrays["role_fracs"], arrays["role_props"]
    if not (np.isfinite(fracs[on_role]).all() and (fracs[on_role] > 0).all() and np.isnan(fracs[~on_role]).all()):
        raise ValueError("'role_fracs' does not match the templates' roles")
    if np.isinf(props).any() or not np.isnan(props[~on_role]).all():
        raise ValueError("'role_props' does not match the templates' roles")


def usable_template(d: dict, max_atoms: int) -> bool:
    """Whether a structure dict is ordered (one species of occupancy 1 per site), has at most ``max_atoms``
    sites and a sane cell and geometry (see :func:`cspml_flows.templates.schema.check_template_structure`)."""
    sites = d.get("sites") or []
    if not 0 < len(sites) <= max_atoms:
        return False
    if not all(len(s["species"]) == 1 and abs(float(s["species"][0].get("occu", 1.0)) - 1.0) < 1e-6 for s in sites):
        return False
    try:
        frac = np.asarray([s["abc"] for s in sites], dtype=float)
        return geometry_problem(np.asarray(d["lattice"]["matrix"], dtype=float), frac) is None
    except (KeyError, TypeError, ValueError):
        return False


def cell_arrays(d: dict, r: Roles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice matrix, fractional coordinates and role index per site of a structure dict."""
    matrix = np.asarray(d["lattice"]["matrix"], dtype=float)
    frac = np.asarray([site["abc"] for site in d["sites"]], dtype=float)
    role_of = {el: k for k, el in enumerate(r.elements)}
    site_roles = np.array([role_of[site["species"][0]["element"]] for site in d["sites"]])
    return matrix, frac, site_roles


def _geometry_chunk(args: tuple[list[dict], list[Roles]]) -> list[tuple[float, list[tuple[int, ...]]]]:
    out = []
    for d, r in zip(*args, strict=True):
        matrix, frac, site_roles = cell_arrays(d, r)
        out.append((min_periodic_distance(matrix, frac), role_symmetry_perms(matrix, frac, site_roles, r)))
    return out


def template_geometry(
    structures: list[dict], role_list: list[Roles], workers: int = 1, chunk: int = 200
) -> tuple[np.ndarray, list[list[tuple[int, ...]]]]:
    """Shortest interatomic distance and role symmetries of every template, computed once when an index is
    built (in ``workers`` processes) so that predictions only look them up."""
    tasks = [(structures[s : s + chunk], role_list[s : s + chunk]) for s in range(0, len(structures), chunk)]
    results: list[tuple[float, list[tuple[int, ...]]]] = []
    with progress.bar(len(structures), "template geometry", unit="template") as shown:
        if workers > 1 and len(tasks) > 1:
            from concurrent.futures import ProcessPoolExecutor

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
        import spglib

        ds = spglib.get_symmetry((matrix, frac, merged + 1), symprec=0.1)
    except Exception:
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
