"""Stored template documents turned into index rows, and rows written as index segments.

Documents that cannot be templates (see :func:`usable_template`) are left out and named; the others become
the :data:`~cspml_flows.templates.segments.COLUMNS` of a segment, :data:`CHUNK` documents at a time, in one
process or in forked processes over ranges of sorted ids (:func:`parallel_row_segments`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cspml_flows.core.composition import MAX_ELEMENTS, Roles, roles
from cspml_flows.core.descriptors import MAX_ROLES, ROLE_PROPERTIES, magpie_stats, role_fractions, role_properties
from cspml_flows.core.structure_checks import geometry_problem
from cspml_flows.templates.geometry import stored_geometry, structure_digest, structure_json, template_geometry
from cspml_flows.templates.index_checks import STATS_WIDTH, role_counts
from cspml_flows.templates.segments import Rows, write_segment
from cspml_flows.templates.store import TemplateStore
from cspml_flows.templates.store_rows import StoredRow, digest64

logger = logging.getLogger(__name__)

CHUNK = 10_000  # documents turned into index rows at a time
TEXT_KEYS = ("ids", "formulas", "anon", "prototype", "source")  # text columns of the rows

_FORKED_STORE: TemplateStore | None = None  # the store forked workers of parallel_row_segments read


def usable_template(d: dict, max_atoms: int, checked: bool = False) -> bool:
    """Whether a structure dict is ordered (one species of occupancy 1 per site), has at most ``max_atoms``
    sites and a sane cell and geometry (see :func:`cspml_flows.templates.schema.check_template_structure`).
    ``checked``: the structure passed that check when it was imported (its document's geometry is of this
    structure), so only the count and the occupancies are looked at."""
    sites = d.get("sites") or []
    if not 0 < len(sites) <= max_atoms:
        return False
    try:
        if not all(len(s["species"]) == 1 and abs(float(s["species"][0].get("occu", 1.0)) - 1.0) < 1e-6 for s in sites):
            return False
        if checked:
            return True
        frac = np.asarray([s["abc"] for s in sites], dtype=float)
        return geometry_problem(np.asarray(d["lattice"]["matrix"], dtype=float), frac) is None
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def partition_hash(anon: str, nprim: int) -> int:
    """The 64-bit key of a prototype partition (anonymous formula, primitive-cell size)."""
    return digest64(f"{anon}|{int(nprim)}".encode())


def id_hash(mid: str) -> int:
    """The 64-bit key of a material id (in the prototype-fit cache)."""
    return digest64(mid.encode())


def roles_of(cols: dict[str, np.ndarray]) -> list[tuple[tuple[str, ...], tuple[float, ...]]]:
    """The roles (elements, amounts) of each row of the ``role_el``/``role_amt`` columns."""
    counts = role_counts(cols["role_el"])
    return [
        (tuple(str(e) for e in el[:k]), tuple(float(a) for a in am[:k]))
        for el, am, k in zip(cols["role_el"], cols["role_amt"], counts, strict=True)
    ]


def doc_rows(docs: list[dict], digests: list[int], workers: int = 1, keep_dicts: bool = False) -> Rows:
    """Index rows of template documents (all usable; see :func:`usable_template`): the :data:`COLUMNS` of
    :mod:`cspml_flows.templates.segments`, the structures as JSON bytes (``keep_dicts``: the dicts) and the
    role permutations. The geometry stored in a document is used; documents without it (older stores) get
    it computed, in ``workers`` processes."""
    n = len(docs)
    rl, anon, reduced = _doc_roles(docs)
    structures = [d["structure"] for d in docs]
    blobs = [structure_json(s) for s in structures]
    geometry = _geometry(docs, rl, structures, blobs, workers)
    nprim = np.array([int(d.get("nsites_primitive") or len(d["structure"]["sites"])) for d in docs], dtype=np.int64)
    role_el = np.full((n, MAX_ELEMENTS), "", dtype="U3")
    role_amt = np.full((n, MAX_ELEMENTS), np.nan)
    for i, r in enumerate(rl):
        role_el[i, : len(r.elements)] = r.elements
        role_amt[i, : len(r.amounts)] = r.amounts
    cols = {
        "ids": np.array([str(d["material_id"]) for d in docs], dtype=str),
        "formulas": np.array([d["formula"] for d in docs], dtype=str),
        "anon": np.array(anon, dtype=str),
        "prototype": np.array([d.get("prototype") or "" for d in docs], dtype=str),
        "source": np.array([str(d.get("source") or "unknown") for d in docs], dtype=str),
        "nprim": nprim,
        "e_above_hull": np.array([np.nan if d.get("e_above_hull") is None else d["e_above_hull"] for d in docs], float),
        "spacegroup": np.array([d.get("spacegroup_number") or 0 for d in docs], dtype=np.int64),
        "round": np.array([int(d.get("round") or 0) for d in docs], dtype=np.int64),
        "stats": _stats(reduced),
        "role_props": role_properties(rl) if n else np.zeros((0, MAX_ROLES, len(ROLE_PROPERTIES))),
        "role_fracs": role_fractions(rl) if n else np.zeros((0, MAX_ROLES)),
        "min_dist": np.array([g[0] for g in geometry], dtype=float),
        "role_el": role_el,
        "role_amt": role_amt,
        "digest": np.array(digests, dtype=np.uint64),
        "part": np.array([partition_hash(a, p) for a, p in zip(anon, nprim, strict=True)], dtype=np.uint64),
    }
    if n:
        for key in TEXT_KEYS:
            if cols[key].dtype.kind != "U":
                cols[key] = cols[key].astype(str)
    return Rows(cols, structures if keep_dicts else blobs, [list(g[1]) for g in geometry])


def _doc_roles(docs: list[dict]) -> tuple[list[Roles], list[str], list[str]]:
    """The roles, anonymous formula and reduced formula of each document (each formula parsed once)."""
    role_cache: dict[str, tuple[Roles, str, str]] = {}
    rl: list[Roles] = []
    anon, reduced = [], []
    for d in docs:
        f = d["formula"]
        if f not in role_cache:
            r = roles(f)
            role_cache[f] = (r, r.anonymous_formula, r.reduced_formula)
        r, a, red = role_cache[f]
        rl.append(r)
        anon.append(a)
        reduced.append(red)
    return rl, anon, reduced


def _geometry(
    docs: list[dict], rl: list[Roles], structures: list[dict], blobs: list[bytes], workers: int
) -> list[tuple[float, list[tuple[int, ...]]]]:
    """The shortest distance and role symmetries of each document: stored ones, else computed."""
    geometry = [stored_geometry(d, r, b) for d, r, b in zip(docs, rl, blobs, strict=True)]
    missing = [i for i, g in enumerate(geometry) if g is None]
    if missing:
        dmin, syms = template_geometry([structures[i] for i in missing], [rl[i] for i in missing], workers=workers)
        for k, i in enumerate(missing):
            geometry[i] = (float(dmin[k]), syms[k])
    return geometry  # type: ignore[return-value]


def _stats(reduced: list[str]) -> np.ndarray:
    """Magpie statistics of each reduced formula (each distinct formula computed once)."""
    if not reduced:
        return np.zeros((0, STATS_WIDTH))
    stats_of: dict[str, int] = {}
    for red in reduced:
        stats_of.setdefault(red, len(stats_of))
    return magpie_stats(list(stats_of))[[stats_of[red] for red in reduced]]


def split_usable(rows: list, limit: int) -> tuple[list, list[str]]:
    """Stored rows whose structure can be a template (:func:`usable_template`, elements those of the formula),
    and the ids of those that cannot."""
    good, bad = [], []
    elements: dict[str, set[str] | None] = {}
    for r in rows:
        d = r.doc()
        f, s = d.get("formula"), d.get("structure")
        if isinstance(f, str) and f not in elements:
            try:
                elements[f] = set(roles(f).elements)
            except ValueError:  # CompositionError: a formula that does not parse
                elements[f] = None
        checked = isinstance(s, dict) and d.get("geometry_of") == structure_digest(s)
        ok = (
            isinstance(s, dict)
            and isinstance(f, str)
            and elements[f] is not None
            and usable_template(s, limit, checked)
        )
        try:
            ok = ok and {site["species"][0]["element"] for site in s["sites"]} == elements[f]
        except (KeyError, TypeError, IndexError):
            ok = False
        (good if ok else bad).append(r if ok else r.id)
    return good, bad


def warn_left_out(n: int, store: TemplateStore, limit: int) -> None:
    """One log line when ``n`` templates of ``store`` cannot be indexed."""
    if n > 0:
        logger.warning(
            "%d templates of %s left out: partial occupancies, more than %d sites (max_template_atoms) or a cell "
            "no crystal has",
            n,
            store.name,
            limit,
        )


def write_row_segments(root: Path, rows: Iterable[StoredRow], workers: int, limit: int) -> tuple[list[str], list[str]]:
    """Index rows of the stored documents ``rows`` (the first copy of an id), written as segments under
    ``root`` :data:`CHUNK` documents at a time; the segments' names and the ids that cannot be templates."""
    names: list[str] = []
    skipped: list[str] = []
    batch: list[StoredRow] = []

    def flush() -> None:
        good, bad = split_usable(batch, limit)
        skipped.extend(bad)
        if good:
            rows = doc_rows([r.doc() for r in good], [r.digest for r in good], workers)
            names.append(write_segment(root, rows))
        batch.clear()

    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            continue  # a second copy of an id (left by an older writer): the first is indexed
        seen.add(row.id)
        batch.append(row)
        if len(batch) >= CHUNK:
            flush()
    flush()
    return names, skipped


def id_ranges(ids: Iterable[str], size: int) -> list[list[str]]:
    """The ids sorted and cut into consecutive ranges of ``size`` (the last one may be shorter)."""
    ordered = sorted(ids)
    return [ordered[s : s + size] for s in range(0, len(ordered), size)]


def _range_segments(args: tuple[Path, list[str], int]) -> tuple[list[str], list[str]]:
    root, ids, limit = args
    assert _FORKED_STORE is not None
    return write_row_segments(root, _FORKED_STORE.rows(ids), 1, limit)


def parallel_row_segments(store: TemplateStore, root: Path, workers: int, limit: int) -> tuple[list[str], list[str]]:
    """:func:`write_row_segments` of an embedded store over ranges of :data:`CHUNK` sorted ids in ``workers``
    forked processes, each reading its own documents from sqlite."""
    global _FORKED_STORE
    tasks = [(root, ids, limit) for ids in id_ranges(store.ids(), CHUNK)]
    names: list[str] = []
    skipped: list[str] = []
    _FORKED_STORE = store
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for n, sk in pool.map(_range_segments, tasks):
                names += n
                skipped += sk
    finally:
        _FORKED_STORE = None
    return names, skipped
