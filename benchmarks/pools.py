"""Deterministic template pools for the scale benchmark, built from the shared benchmark data.

Pools (:func:`pool_spec`):

- ``12k``: the demo pool, ``mp_20_biternary/val`` and ``mpts_52/val`` imported as ``make demo`` imports them;
- ``27k``: the union of the four shared files, deduplicated by ``material_id``;
- any larger size (``150k``, ``1M``, ``46k``, ``150000``): the union plus generated templates up to that size.

The shared files are read in place through :func:`cspml_flows.core.config.data_dir`. Generated templates come from
the union's structures (the *parents*) by four recipes:

- ``order``: a 2x supercell along one axis in which the sites of one element in the upper half of the cell
  are taken by a chemically similar element (same family, :data:`FAMILIES`): a new anonymous formula and a
  new prototype (a layered ordering);
- ``anion``: an ordered part of the anion sites (the parent's most electronegative element, if it is an
  anion) replaced by a neighbouring anion of its family, in the cell or in a 2x supercell;
- ``vacancy``: a 2x supercell without the sites of one element in its upper half (ordered vacancies);
- ``relabel``: the parent with some elements replaced by same-family elements, each by a different element
  not in the parent. A relabelling moves no atom and keeps every site's orbit, so the structure has the
  parent's symmetry exactly: its document reuses the parent's space group, prototype label and primitive
  cell size instead of running spglib again, which keeps a million documents affordable.

Documents of the first three are built by :func:`template_doc_from_structure` (spglib symmetry, prototype
label). Every generated structure passes :func:`check_template_structure`. A generated document copies its
parent's ``e_above_hull``, names it in ``parent_id``, has source ``generated:<recipe>`` and the fixed
``last_updated`` :data:`GENERATED_AT`, so the same call gives byte-identical documents.

Which documents a pool holds: each parent has a list of recipes (:func:`parent_recipes`: one new structure
per three relabellings, each kind shuffled by a generator seeded with the seed and the parent's id); a pool
takes recipe 0 of every parent (parents in ``material_id`` order), then recipe 1 of every parent that has
one, and so on (:func:`plan`). A smaller pool is a prefix of a larger one of the same seed, and the generated
id ``<parent id>~<ordinal>`` names the same document in every pool.

``python -m benchmarks.pools --size 150k`` writes a pool into ``<root>/<size>/store`` (default root
``/tmp/cspml-scale``), resumably: a rerun adds only the documents the store lacks. ``<root>/<size>/pool.json``
records the counts and the time spent generating and adding.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Element, Lattice, Structure

from cspml_flows.core.composition import roles
from cspml_flows.core.errors import CSPMLError
from cspml_flows.templates.schema import TemplateDoc, check_template_structure, template_doc_from_structure
from cspml_flows.templates.store import TemplateStore

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/tmp/cspml-scale")
DEMO_FILES = ("mp_20_biternary/val.csv.gz", "mpts_52/val.csv.gz")
ALL_FILES = (*DEMO_FILES, "mp_20_biternary/test.csv.gz", "mpts_52/test.csv.gz")
REAL_POOLS = {"12k": DEMO_FILES, "27k": ALL_FILES}
UNION = "27k"  # the real pool every generated pool starts from
GENERATED_AT = datetime(2026, 1, 1, tzinfo=UTC)
ID_SEPARATOR = "~"  # generated id: <parent id>~<ordinal>
RELABELS_PER_NEW = 3  # relabelled copies per new structure in a parent's recipe list
MAX_RELABELS = 48  # relabellings per parent
MAX_PARENT_SITES = 26  # parents larger than this get no supercell recipes (the result stays within 52 sites)
CHUNK = 2000  # documents per store write while generating

# Chemically similar elements, in order of atomic number: substitutions stay within a family.
FAMILIES: tuple[tuple[str, ...], ...] = (
    ("Li", "Na", "K", "Rb", "Cs"),
    ("Be", "Mg", "Ca", "Sr", "Ba"),
    ("Sc", "Y", "La", "Ce", "Pr", "Nd", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu"),
    ("Th", "U", "Np", "Pu"),
    ("Ti", "Zr", "Hf"),
    ("V", "Nb", "Ta"),
    ("Cr", "Mo", "W"),
    ("Mn", "Re"),
    ("Fe", "Ru", "Os"),
    ("Co", "Rh", "Ir"),
    ("Ni", "Pd", "Pt"),
    ("Cu", "Ag", "Au"),
    ("Zn", "Cd", "Hg"),
    ("B", "Al", "Ga", "In", "Tl"),
    ("C", "Si", "Ge", "Sn", "Pb"),
    ("N", "P", "As", "Sb", "Bi"),
    ("O", "S", "Se", "Te"),
    ("F", "Cl", "Br", "I"),
)
ANIONS = frozenset({"N", "P", "As", "O", "S", "Se", "Te", "F", "Cl", "Br", "I"})
_FAMILY_OF = {el: (fam, i) for fam in FAMILIES for i, el in enumerate(fam)}

Recipe = tuple  # ("relabel", ((a, b), ...)) | ("order", x, y, axis) | ("vacancy", v, axis)
#               | ("anion", a, b, (site indices)) | ("anion2", a, b, axis)


class PoolError(CSPMLError):
    """A pool that cannot be built: unknown size, missing union store, a store that is not a pool's."""


# ---------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class PoolSpec:
    """A pool: its label, the shared files it imports (real pools) or its target size (generated pools)."""

    label: str
    files: tuple[str, ...] = ()
    size: int | None = None

    @property
    def generated(self) -> bool:
        return self.size is not None


def parse_count(text: str) -> int:
    """``150k`` -> 150000, ``1M`` -> 1000000, ``46000`` -> 46000; PoolError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise PoolError(f"pool size {text!r} is not a number such as 150k, 1M or 46000")
    factor = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
    return round(float(m.group(1)) * factor)


def pool_spec(label: str) -> PoolSpec:
    """The pool a size label names: ``12k`` and ``27k`` are the real pools, any other size a generated one
    (at least as large as the union)."""
    if label in REAL_POOLS:
        return PoolSpec(label, files=REAL_POOLS[label])
    n = parse_count(label)
    return PoolSpec(label, size=n)


# ---------------------------------------------------------------------------------------------- recipes
def similar(el: str, exclude: set[str] | frozenset[str], reach: int = 2) -> list[str]:
    """Members of ``el``'s family at most ``reach`` places from it, nearest first (ties: lighter first),
    leaving out ``exclude``."""
    if el not in _FAMILY_OF:
        return []
    fam, i = _FAMILY_OF[el]
    out = []
    for d in range(1, reach + 1):
        out += [fam[j] for j in (i - d, i + d) if 0 <= j < len(fam) and fam[j] not in exclude]
    return out


def _seed_of(seed: int, material_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{material_id}".encode()).digest()[:8], "little")


def _site_arrays(structure: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Lattice matrix, fractional coordinates and element of each site of a structure dict."""
    sites = structure["sites"]
    matrix = np.asarray(structure["lattice"]["matrix"], dtype=float)
    frac = np.asarray([s["abc"] for s in sites], dtype=float)
    return matrix, frac, [s["species"][0]["element"] for s in sites]


def _distinct_axes(matrix: np.ndarray) -> list[int]:
    """One axis per distinct axis length (two axes of equal length give equivalent supercells of a cubic or
    tetragonal cell)."""
    seen: dict[float, int] = {}
    for a, length in enumerate(np.linalg.norm(matrix, axis=1)):
        seen.setdefault(round(float(length), 2), a)
    return sorted(seen.values())


def _anion(present: set[str]) -> str | None:
    """The most electronegative element of a compound if it is an anion (:data:`ANIONS`)."""
    if len(present) < 2:
        return None
    best = max(present, key=lambda e: (Element(e).X if not math.isnan(Element(e).X) else -1.0, Element(e).Z))
    return best if best in ANIONS else None


def _relabellings(present: list[str], rng: np.random.Generator) -> list[Recipe]:
    """Up to :data:`MAX_RELABELS` distinct relabellings: each element kept or replaced by a family member not
    in the compound, replacements all different, at least one element replaced; shuffled by ``rng``."""
    options = [[None, *similar(e, set(present))] for e in present]
    total = math.prod(len(o) for o in options)
    if total <= 4096:
        combos = list(itertools.product(*options))
    else:  # many elements with many options: a sample, drawn in a fixed order
        combos = list(dict.fromkeys(tuple(o[rng.integers(len(o))] for o in options) for _ in range(4 * MAX_RELABELS)))
    found = []
    for combo in combos:
        targets = [t for t in combo if t is not None]
        if targets and len(set(targets)) == len(targets):
            found.append(("relabel", tuple((e, t) for e, t in zip(present, combo, strict=True) if t is not None)))
    order = rng.permutation(len(found))
    return [found[i] for i in order[:MAX_RELABELS]]


def parent_recipes(parent: dict, seed: int = 0) -> list[Recipe]:
    """The recipes of a parent document, in the order a pool uses them: one new structure (``order``,
    ``anion``, ``anion2``, ``vacancy``) then :data:`RELABELS_PER_NEW` relabellings, repeated while both
    last, then the rest of the longer list. Deterministic in ``seed`` and the parent's ``material_id``."""
    rng = np.random.default_rng(_seed_of(seed, str(parent["material_id"])))
    matrix, frac, species = _site_arrays(parent["structure"])
    counts = Counter(species)
    present = sorted(counts)
    relabels = _relabellings(present, rng)
    axes = _distinct_axes(matrix)
    small = len(species) <= MAX_PARENT_SITES
    new: list[Recipe] = []
    if small:
        for x in present:
            for y in similar(x, set(present), reach=1) or similar(x, set(present))[:1]:
                new += [("order", x, y, a) for a in axes]
        if len(present) >= 2:
            new += [("vacancy", v, a) for v in present for a in axes]
    anion = _anion(set(present))
    if anion is not None:
        sites = [i for i, e in enumerate(species) if e == anion]
        for b in similar(anion, set(present), reach=1):
            if len(sites) >= 2:
                chosen = set()
                for a in axes:  # the sites first along the axis (then the others), rounded against noise
                    key = np.round(frac[sites][:, [a, (a + 1) % 3, (a + 2) % 3]] % 1.0, 4)
                    ordered = [sites[i] for i in np.lexsort(key.T[::-1])]
                    for k in sorted({1, len(sites) // 2}):
                        chosen.add(tuple(sorted(ordered[:k])))
                new += [("anion", anion, b, sel) for sel in sorted(chosen)]
            elif small:
                new += [("anion2", anion, b, a) for a in axes]
    new = [new[i] for i in rng.permutation(len(new))]
    out: list[Recipe] = []
    while new or relabels:
        if new:
            out.append(new.pop(0))
        out += relabels[:RELABELS_PER_NEW]
        relabels = relabels[RELABELS_PER_NEW:]
    return out


def plan(recipe_counts: Sequence[int], start: int, count: int) -> list[tuple[int, int]]:
    """Slots ``start`` to ``start + count`` of the round-robin order: (parent position, recipe ordinal) for
    ordinal 0 of every parent, then ordinal 1 of every parent that has one, and so on."""
    c = np.asarray(recipe_counts)
    out: list[tuple[int, int]] = []
    pos = 0
    for r in range(int(c.max()) if len(c) else 0):
        members = np.flatnonzero(c > r)
        if pos + len(members) > start:
            lo = max(0, start - pos)
            hi = min(len(members), start + count - pos)
            out += [(int(p), r) for p in members[lo:hi]]
            if len(out) >= count:
                break
        pos += len(members)
    return out


def generated_id(parent_id: str, ordinal: int) -> str:
    return f"{parent_id}{ID_SEPARATOR}{ordinal:02d}"


# ---------------------------------------------------------------------------------------------- documents
def variant_structure(parent: dict, recipe: Recipe) -> Structure:
    """The structure a recipe makes from a parent document (see the module docstring)."""
    matrix, frac, species = _site_arrays(parent["structure"])
    kind = recipe[0]
    if kind == "relabel":
        mapping = dict(recipe[1])
        species = [mapping.get(e, e) for e in species]
    elif kind == "anion":
        _, _, b, sel = recipe
        species = [b if i in sel else e for i, e in enumerate(species)]
    else:  # a 2x supercell along the recipe's axis; sites n..2n-1 are its upper half
        axis = recipe[-1]
        n = len(species)
        matrix = matrix.copy()
        matrix[axis] *= 2
        lower, upper = frac.copy(), frac.copy()
        lower[:, axis] = (frac[:, axis] % 1.0) / 2
        upper[:, axis] = lower[:, axis] + 0.5
        frac = np.vstack([lower, upper])
        if kind == "order":
            _, x, y, _ = recipe
            species = species + [y if e == x else e for e in species]
        elif kind == "anion2":
            _, a, b, _ = recipe
            species = species + [b if e == a else e for e in species]
        elif kind == "vacancy":
            v = recipe[1]
            keep = list(range(n)) + [n + i for i, e in enumerate(species) if e != v]
            species = [(species + species)[i] for i in keep]
            frac = frac[keep]
        else:
            raise PoolError(f"unknown recipe {kind!r}")
    return Structure(Lattice(matrix), species, frac)


def _relabelled_role_syms(parent: dict, mapping: dict[str, str], new_formula: str) -> list[list[int]] | None:
    """The parent's role symmetries (``role_syms``: permutations g of its roles, identity first) in the role
    order of the relabelled formula: g' = s g s^-1, where s sends a parent role to the role of its relabelled
    element. A relabelling keeps the amounts, so s only reorders roles within a tie of amounts."""
    syms = parent.get("role_syms")
    if not isinstance(syms, list):
        return None
    old = roles(parent["formula"]).elements
    new = roles(new_formula).elements
    s = [new.index(mapping.get(e, e)) for e in old]
    inverse = [0] * len(s)
    for i, j in enumerate(s):
        inverse[j] = i
    return sorted([s[g[inverse[k]]] for k in range(len(s))] for g in syms)


def variant_doc(parent: dict, recipe: Recipe, material_id: str) -> dict[str, Any]:
    """The template document (JSON form) of a recipe applied to a parent document.

    A relabelled copy keeps every field of the parent's document that depends on the geometry alone (space
    group, prototype label, primitive cell size, and what else the schema stores, such as the shortest
    distance), because a same-family relabelling moves no atom and keeps the symmetry; the formula fields are
    its own, the role symmetries are re-indexed to its role order and the digest naming the structure its
    geometry is of is its structure's. Any other recipe is analysed by spglib through
    :func:`template_doc_from_structure`."""
    s = variant_structure(parent, recipe)
    kind = "anion" if recipe[0] == "anion2" else recipe[0]
    props = {"e_above_hull": parent.get("e_above_hull")}
    if recipe[0] == "relabel":
        check_template_structure(s, f"structure {material_id}")
        comp = s.composition
        r = roles(comp)
        fields = {k: v for k, v in parent.items() if k in TemplateDoc.model_fields and k != "_id"}
        fields |= {
            "material_id": material_id,
            "structure": s.as_dict(),
            "formula": comp.reduced_formula,
            "anonymous_formula": r.anonymous_formula,
            "chemsys": comp.chemical_system,
            "elements": list(r.elements),
            "nelements": len(r.elements),
            "nsites": len(s),
            "volume_per_atom": s.volume / len(s),
            "source": f"generated:{kind}",
            "formation_energy_per_atom": None,
            "energy_per_atom": None,
            **props,
        }
        for name in ("round", "calculator", "relaxation_key", "last_updated"):
            fields.pop(name, None)
        if "role_syms" in TemplateDoc.model_fields:
            fields["role_syms"] = _relabelled_role_syms(parent, dict(recipe[1]), comp.reduced_formula)
        if fields.get("geometry_of"):  # the stored geometry names the structure it is of: now this one
            from cspml_flows.templates.geometry import structure_digest

            fields["geometry_of"] = structure_digest(fields["structure"])
        doc = TemplateDoc(**fields)
    else:
        doc = template_doc_from_structure(s, material_id, source=f"generated:{kind}", **props)
    doc.parent_id = str(parent["material_id"])
    doc.last_updated = GENERATED_AT
    return doc.model_dump(mode="json")


_WORK: tuple[list[dict], int] | None = None  # (parents, seed) that forked workers inherit


def _make_batch(tasks: list[tuple[int, int, Recipe]]) -> tuple[list[dict | tuple[str, str]], float]:
    """Worker side of :func:`generated_docs`: documents (or (id, reason) for a failed recipe) and CPU seconds."""
    assert _WORK is not None
    parents, _ = _WORK
    t = time.process_time()
    out: list[dict | tuple[str, str]] = []
    for p, ordinal, recipe in tasks:
        mid = generated_id(str(parents[p]["material_id"]), ordinal)
        try:
            out.append(variant_doc(parents[p], recipe, mid))
        except Exception as exc:  # reported by the caller; a recipe that fails is a generator bug to look at
            out.append((mid, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    return out, time.process_time() - t


def iter_generated(
    parents: Sequence[dict],
    start: int,
    count: int,
    seed: int = 0,
    workers: int = 1,
    skip: set[str] | frozenset[str] = frozenset(),
    batch: int = 100,
) -> Iterator[tuple[list[dict | tuple[str, str]], float]]:
    """Slots ``start`` to ``start + count`` of the pool's generated part, in slot order, as (documents,
    worker CPU seconds) per batch of ``batch`` slots; ids in ``skip`` are not built. Failed recipes come as
    (id, reason). ``workers`` > 1: forked processes."""
    global _WORK
    parents = list(parents)
    recipes = [parent_recipes(p, seed) for p in parents]
    slots = plan([len(r) for r in recipes], start, count)
    tasks = [(p, o, recipes[p][o]) for p, o in slots if generated_id(str(parents[p]["material_id"]), o) not in skip]
    batches = [tasks[i : i + batch] for i in range(0, len(tasks), batch)]
    _WORK = (parents, seed)
    try:
        if workers > 1 and len(batches) > 1 and "fork" in mp.get_all_start_methods():
            from cspml_flows.core.prototype import preload_label_data

            preload_label_data()  # forked workers inherit the prototype library instead of each loading it
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                yield from pool.map(_make_batch, batches)
        else:
            for b in batches:
                yield _make_batch(b)
    finally:
        _WORK = None


def generated_docs(parents: Sequence[dict], start: int, count: int, seed: int = 0, workers: int = 1) -> list[dict]:
    """The generated documents of slots ``start`` to ``start + count`` (see :func:`plan`); PoolError names the
    first recipe that fails."""
    out: list[dict] = []
    for docs, _ in iter_generated(parents, start, count, seed, workers):
        for d in docs:
            if not isinstance(d, dict):
                raise PoolError(f"generated template {d[0]} failed: {d[1]}")
            out.append(d)
    return out


def recipe_capacity(parents: Sequence[dict], seed: int = 0) -> int:
    """How many generated documents the parents' recipes allow in all."""
    return sum(len(parent_recipes(p, seed)) for p in parents)


# ---------------------------------------------------------------------------------------------- pools
def pool_dir(label: str, root: Path = DEFAULT_ROOT) -> Path:
    return Path(root) / label


def store_path(label: str, root: Path = DEFAULT_ROOT) -> Path:
    return pool_dir(label, root) / "store"


def read_manifest(label: str, root: Path = DEFAULT_ROOT) -> dict[str, Any] | None:
    path = pool_dir(label, root) / "pool.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(label: str, root: Path, manifest: dict[str, Any]) -> None:
    from cspml_flows.core.safeio import atomic_open

    path = pool_dir(label, root) / "pool.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        json.dump(manifest, fh, indent=1)


def union_parents(root: Path = DEFAULT_ROOT) -> list[dict]:
    """The union pool's documents (the parents), in ``material_id`` order; PoolError if it is not built or was
    imported with another template schema (its documents would lack what this code stores with a template)."""
    path = store_path(UNION, root)
    manifest = read_manifest(UNION, root)
    if manifest is None or not manifest.get("complete"):
        raise PoolError(f"the union pool {path} is not built: run python -m benchmarks.pools --size {UNION}")
    with TemplateStore.open(path, create=False) as ts:
        docs = list(ts.docs())
    docs.sort(key=lambda d: str(d["material_id"]))
    stale = sum(not schema_current(d) for d in docs)
    if stale:
        raise PoolError(
            f"{stale} documents of the union pool {path} were imported with another template schema than this "
            f"code writes: remove {pool_dir(UNION, root)} and build it again"
        )
    return docs


def schema_current(doc: dict) -> bool:
    """Whether a stored document has the schema version and every field this code's TemplateDoc writes."""
    fields = TemplateDoc.model_fields
    return doc.get("schema_version") == fields["schema_version"].default and all(k in doc for k in fields)


def schema_record() -> dict[str, Any]:
    """The template schema this code writes: its version and fields (kept in a pool's record)."""
    return {
        "schema_version": TemplateDoc.model_fields["schema_version"].default,
        "fields": sorted(TemplateDoc.model_fields),
    }


def check_pool_schema(label: str, root: Path = DEFAULT_ROOT) -> None:
    """PoolError when the pool's record says its documents were written with another template schema than
    this code writes (a pool made before a schema change must be built again)."""
    if (read_manifest(label, root) or {}).get("schema") != schema_record():
        raise PoolError(
            f"pool {label} was written with another template schema than this code writes: remove "
            f"{pool_dir(label, root)} and build it again (python -m benchmarks.pools --size {label})"
        )


def import_real_pool(
    label: str, store: Path, workers: int = 2, log_fn: Callable[[str], None] = print
) -> dict[str, Any]:
    """Import a real pool's shared files into ``store`` with ``cspml import shared`` semantics (resumable);
    returns the count, wall seconds and structures per second of this call."""
    from cspml_flows.api import import_structures

    files = list(REAL_POOLS[label])
    t = time.perf_counter()
    reports, count, _ = import_structures("shared", files, store=store, workers=workers)
    seconds = time.perf_counter() - t
    added = sum(r.added for r in reports)
    failed = sum(len(r.failed) for r in reports)
    log_fn(f"{label}: imported {added} structures ({failed} refused) in {seconds:.0f} s; {count} in the store")
    return {"count": count, "added": added, "refused": failed, "seconds": seconds, "per_s": added / seconds}


def _copy_store(source: Path, target: Path) -> None:
    """Copy a store folder (no writer may hold it): into a temporary folder, then renamed."""
    tmp = target.with_name(target.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.lock"))
    tmp.rename(target)


def _base_pool(size: int, seed: int, root: Path) -> str:
    """The complete pool to start a generated pool from: the largest smaller generated pool of the same seed
    (its documents are a prefix of this one's), else the union."""
    best, best_size = UNION, 0
    for folder in Path(root).iterdir() if Path(root).is_dir() else []:
        m = read_manifest(folder.name, root)
        if m and m.get("complete") and m.get("seed") == seed and m.get("generated") and best_size < m["size"] < size:
            best, best_size = folder.name, m["size"]
    return best


def build_pool(
    label: str,
    root: Path = DEFAULT_ROOT,
    seed: int = 0,
    workers: int = 2,
    log_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build (or finish) the pool ``label`` in ``<root>/<label>/store`` and return its manifest.

    A real pool is imported from the shared files. A generated pool starts as a copy of the union (or of the
    largest complete smaller pool of the same seed), then gets the generated documents it lacks, written in
    batches of :data:`CHUNK` with :meth:`TemplateStore.add`; a killed run keeps every batch written."""
    spec = pool_spec(label)
    store = store_path(label, root)
    if not spec.generated:
        done = read_manifest(label, root)
        if done and done.get("complete"):
            return done
        t = time.perf_counter()
        info = import_real_pool(label, store, workers, log_fn)
        manifest = {
            "label": label,
            "generated": False,
            "files": list(spec.files),
            "size": info["count"],
            "n_real": info["count"],
            "n_generated": 0,
            "import": info,
            "seconds": time.perf_counter() - t,
            "complete": True,
            "schema": schema_record(),
        } | label_groups(store)
        _write_manifest(label, root, manifest)
        return manifest
    parents = union_parents(root)
    n_union = len(parents)
    if spec.size < n_union:
        raise PoolError(f"pool size {label} is smaller than the union of the shared files ({n_union})")
    n_gen = spec.size - n_union
    capacity = recipe_capacity(parents, seed)
    if n_gen > capacity:
        raise PoolError(f"pool size {label}: the recipes allow at most {n_union + capacity} templates")
    manifest = read_manifest(label, root) or {}
    if manifest and (manifest.get("seed") != seed or manifest.get("size") != spec.size):
        raise PoolError(f"{pool_dir(label, root)} holds a pool of another seed or size: remove it first")
    if not store.exists():
        base = _base_pool(spec.size, seed, root)
        t = time.perf_counter()
        _copy_store(store_path(base, root), store)
        log_fn(f"{label}: started from a copy of pool {base} ({time.perf_counter() - t:.0f} s)")
        inherited = ("worker_cpu_seconds", "add_seconds", "wall_seconds")  # the copied documents' cost
        manifest = {"copied_from": base} | {
            k: v for k, v in (read_manifest(base, root) or {}).items() if k in inherited
        }
    manifest |= {"label": label, "generated": True, "seed": seed, "size": spec.size, "n_real": n_union}
    manifest["schema"] = schema_record()
    manifest.setdefault("worker_cpu_seconds", 0.0)
    manifest.setdefault("add_seconds", 0.0)
    manifest.setdefault("wall_seconds", 0.0)
    manifest["complete"] = False
    with TemplateStore.open(store) as ts:
        existing = {i for i in ts.ids() if ID_SEPARATOR in i}
        todo = n_gen - len(existing)
        log_fn(f"{label}: {len(existing)} of {n_gen} generated templates present, {todo} to build")
        t0 = time.perf_counter()
        pending: list[dict] = []
        failed: list[tuple[str, str]] = list(map(tuple, manifest.get("failed", [])))
        done = 0

        def flush() -> None:
            nonlocal pending
            t = time.perf_counter()
            ts.add(pending, assume_new=True)
            manifest["add_seconds"] += time.perf_counter() - t
            pending = []

        for docs, cpu in iter_generated(parents, 0, n_gen, seed, workers, skip=existing):
            manifest["worker_cpu_seconds"] += cpu
            for d in docs:
                if isinstance(d, dict):
                    pending.append(d)
                else:
                    failed.append(d)
            done += len(docs)
            if len(pending) >= CHUNK:
                flush()
                wall = time.perf_counter() - t0
                manifest["failed"] = failed[:50]
                _write_manifest(label, root, manifest | {"wall_seconds": manifest["wall_seconds"] + wall})
                log_fn(f"{label}: {done}/{todo} built, {done / wall:.0f}/s")
        if pending:
            flush()
        manifest["wall_seconds"] += time.perf_counter() - t0
        count = ts.count()
    kinds = Counter(_kind_of(r) for r in _planned_recipes(parents, n_gen, seed))
    manifest |= {
        "n_generated": count - n_union,
        "by_recipe": dict(sorted(kinds.items())),
        "n_failed": len(failed),
        "failed": failed[:50],
        "complete": count == spec.size,
    }
    if manifest["wall_seconds"] > 0:
        manifest["generated_per_s"] = manifest["n_generated"] / manifest["wall_seconds"]
    if manifest["complete"] and "label_groups" not in manifest:
        manifest |= label_groups(store)
    _write_manifest(label, root, manifest)
    log_fn(f"{label}: {count} templates ({manifest['n_generated']} generated, {len(failed)} failed)")
    return manifest


def label_groups(store: Path) -> dict[str, int]:
    """Distinct (anonymous formula, primitive cell size, prototype label) of a store's templates: an upper
    bound on its prototype clusters (the index merges groups whose structures match), and the anonymous
    formulas. A template without a label counts as a group of its own."""
    groups: set[tuple] = set()
    anon: set[str] = set()
    unlabelled = 0
    with TemplateStore.open(store, create=False) as ts:
        for row in ts.rows():  # streamed: a query through montydb would hold every document at once
            d = row.doc()
            anon.add(d["anonymous_formula"])
            if d.get("prototype"):
                groups.add((d["anonymous_formula"], d.get("nsites_primitive"), d["prototype"]))
            else:
                unlabelled += 1
    return {"label_groups": len(groups) + unlabelled, "anonymous_formulas": len(anon)}


def _kind_of(recipe: Recipe) -> str:
    return "anion" if recipe[0] == "anion2" else recipe[0]


def _planned_recipes(parents: Sequence[dict], n_gen: int, seed: int) -> list[Recipe]:
    recipes = [parent_recipes(p, seed) for p in parents]
    return [recipes[p][o] for p, o in plan([len(r) for r in recipes], 0, n_gen)]


def reserve_docs(label: str, count: int, root: Path = DEFAULT_ROOT, seed: int = 0, workers: int = 2) -> list[dict]:
    """``count`` generated documents that pool ``label`` does not hold (the slots after its own), to add to it:
    the same for every call."""
    spec = pool_spec(label)
    parents = union_parents(root)
    start = spec.size - len(parents) if spec.generated else 0
    return generated_docs(parents, start, count, seed, workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pools", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", action="append", required=True, help="12k, 27k, 150k, 1M or another size; repeatable")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="pools go to <root>/<size>/store")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    root = args.root.expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if root == repo or repo in root.parents:
        print(f"error: pools are not written inside the repository ({root})", file=sys.stderr)
        return 2
    os.environ.setdefault("CSPML_HOME", str(root / "home"))  # caches of the import stay beside the pools
    try:
        for label in args.size:
            if pool_spec(label).generated and not (read_manifest(UNION, root) or {}).get("complete"):
                build_pool(UNION, root, args.seed, args.workers)
            build_pool(label, root, args.seed, args.workers)
    except CSPMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
