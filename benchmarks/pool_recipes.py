"""The recipes that make the scale benchmark's generated templates from parent documents (see
:mod:`benchmarks.pools`): ordered supercells, mixed anions, ordered vacancies and same-family relabellings,
each deterministic for a seed and the parent's id."""

from __future__ import annotations

import hashlib
import itertools
import math
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pymatgen.core import Element, Lattice, Structure

from cspml_flows.core.composition import roles
from cspml_flows.core.errors import CSPMLError
from cspml_flows.core.prototype import preload_label_data
from cspml_flows.templates.geometry import structure_digest
from cspml_flows.templates.schema import TemplateDoc, check_template_structure, template_doc_from_structure

GENERATED_AT = datetime(2026, 1, 1, tzinfo=UTC)
ID_SEPARATOR = "~"  # generated id: <parent id>~<ordinal>
RELABELS_PER_NEW = 3  # relabelled copies per new structure in a parent's recipe list
MAX_RELABELS = 48  # relabellings per parent
MAX_PARENT_SITES = 26  # parents larger than this get no supercell recipes (the result stays within 52 sites)

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


def anion_recipes(
    anion: str, species: list[str], frac: np.ndarray, present: list[str], axes: list[int], small: bool
) -> list[Recipe]:
    """Mixed-anion recipes: part of the anion's sites (the first along each axis) taken by each neighbouring
    anion of its family, or (one anion site, small parents) a 2x supercell with the upper half replaced."""
    out: list[Recipe] = []
    sites = [i for i, e in enumerate(species) if e == anion]
    for b in similar(anion, set(present), reach=1):
        if len(sites) >= 2:
            chosen = set()
            for a in axes:  # the sites first along the axis (then the others), rounded against noise
                key = np.round(frac[sites][:, [a, (a + 1) % 3, (a + 2) % 3]] % 1.0, 4)
                ordered = [sites[i] for i in np.lexsort(key.T[::-1])]
                for k in sorted({1, len(sites) // 2}):
                    chosen.add(tuple(sorted(ordered[:k])))
            out += [("anion", anion, b, sel) for sel in sorted(chosen)]
        elif small:
            out += [("anion2", anion, b, a) for a in axes]
    return out


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
        new += anion_recipes(anion, species, frac, present, axes, small)
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
    """The id of a parent's generated template number ``ordinal``."""
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


def kind_of(recipe: Recipe) -> str:
    """The recipe's kind as the pool record counts it (``anion2`` counts as ``anion``)."""
    return "anion" if recipe[0] == "anion2" else recipe[0]


def planned_recipes(parents: Sequence[dict], n_gen: int, seed: int) -> list[Recipe]:
    """The recipes of the first ``n_gen`` generated slots, in slot order."""
    recipes = [parent_recipes(p, seed) for p in parents]
    return [recipes[p][o] for p, o in plan([len(r) for r in recipes], 0, n_gen)]


def planned_kinds(parents: Sequence[dict], n_gen: int, seed: int) -> dict[str, int]:
    """Generated slots per recipe kind, sorted by kind."""
    return dict(sorted(Counter(kind_of(r) for r in planned_recipes(parents, n_gen, seed)).items()))
