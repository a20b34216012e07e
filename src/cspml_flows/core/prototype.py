"""Symmetry and prototype labels (spglib through pymatgen) and prototype clustering by StructureMatcher."""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from cspml_flows.core import progress
from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.quiet import library_warnings

logger = logging.getLogger(__name__)

_CENTERING = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "F": 4, "R": 3, "S": 2}


@dataclass(frozen=True)
class PrototypeInfo:
    """A structure's AFLOW prototype label, space group and primitive cell size."""

    label: str | None
    spacegroup_number: int | None
    spacegroup_symbol: str | None
    nsites_primitive: int


@lru_cache(maxsize=1)
def _label_functions():
    """pymatgen's prototype-label helpers, imported on first use.

    Importing ``pymatgen.analysis.prototypes`` decodes its whole AFLOW prototype library (about 6 s), which
    every ``import cspml_flows`` would otherwise pay even when no label is computed.
    """
    from pymatgen.analysis.prototypes import (
        get_protostructure_label_from_spg_analyzer,
        get_prototype_from_protostructure,
    )

    return get_protostructure_label_from_spg_analyzer, get_prototype_from_protostructure


def preload_label_data() -> None:
    """Import the label helpers now (before forking worker processes, so that each need not)."""
    _label_functions()


def prototype_label(sga: SpacegroupAnalyzer) -> str | None:
    """Element-independent AFLOW-style prototype label: ``ABC3_cP5_221_a_b_c`` for every cubic perovskite.

    The plain AFLOW label orders elements alphabetically, so SrTiO3 (``A3BC_cP5_221_c_a_b``) and BaZrO3
    (``AB3C_cP5_221_a_c_b``) would differ; pymatgen's canonical prototype orders by amount and picks the
    smallest equivalent Wyckoff assignment. ``None`` where spglib's Wyckoff positions are inconsistent.
    """
    protostructure_label, canonical_prototype = _label_functions()
    with library_warnings():  # pymatgen's own 'gcd is deprecated' notice on every call
        full = protostructure_label(sga)
    if full.startswith("Invalid"):
        return None
    with library_warnings():
        return canonical_prototype(full)


class _DatasetSGA(SpacegroupAnalyzer):
    """SpacegroupAnalyzer that takes its symmetry operations from the spglib dataset it already holds.

    pymatgen calls ``spglib.get_symmetry`` again for the operations (as costly as the dataset itself);
    the dataset's rotations and translations are the same operations in the same basis.
    """

    def _get_symmetry(self):
        data = self._space_group_data
        trans = np.round(np.asarray(data.translations) * 1000) / 1000
        trans[np.abs(trans) == 1] = 0
        return np.asarray(data.rotations), trans


def prototype_info(structure: Structure, symprec: float = 0.1) -> PrototypeInfo:
    """Prototype label (see :func:`prototype_label`), space group and primitive-cell size."""
    try:
        sga = _DatasetSGA(structure, symprec=symprec, angle_tolerance=5)
        number, symbol = sga.get_space_group_number(), sga.get_space_group_symbol()
        try:
            label = prototype_label(sga)
        except Exception:  # a label failure should not lose the space group
            label = None
        pearson = sga.get_pearson_symbol()
        n_conv = int(pearson[2:])
        nprim = n_conv // _CENTERING.get(pearson[1], 1)
        return PrototypeInfo(label, number, symbol, nprim)
    except Exception:  # spglib can fail on odd cells; fall back to the cell as given
        return PrototypeInfo(None, None, None, len(structure))


def partition_pairs(labels: list[str | None], max_groups: int = 60) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, of a partition's groups whose representatives are compared, the groups
    listed in representative-id order with their prototype labels: every pair, or in a partition of more
    than ``max_groups`` groups only pairs with the same space-group number (from the label), to bound the
    quadratic cost."""
    n = len(labels)
    if n < 2:
        return []
    if n > max_groups:
        by_sg: dict[str, list[int]] = {}
        for g, lab in enumerate(labels):
            lab = lab or ""
            by_sg.setdefault(lab.split("_")[2] if lab.count("_") >= 2 else "?", []).append(g)
        subsets = [s for s in by_sg.values() if len(s) > 1]
    else:
        subsets = [list(range(n))]
    return [(s[a], s[b]) for s in subsets for a in range(len(s)) for b in range(a + 1, len(s))]


def fit_pairs(args: tuple[list, list[tuple[int, int]]]) -> list[bool]:
    """Whether the structures of each pair ``(i, j)`` match under ``fit_anonymous`` (``i`` the first argument).
    A structure is a dict, or an object whose ``load()`` gives one (read where the fits run).

    Each structure's primitive Niggli cell is computed once (``fit_anonymous`` would recompute both cells for
    every pair, half of its cost) and the fits skip that reduction; the result is the same. A structure that
    cannot be reduced, or a matcher error, counts as no match.
    """
    structures, pairs = args
    matcher = Matcher()
    reduced: dict[int, Structure | None] = {}
    for i in sorted({i for p in pairs for i in p}):
        try:
            d = structures[i].load() if hasattr(structures[i], "load") else structures[i]
            s = Structure.from_dict(d)
        except (KeyError, TypeError, ValueError, OSError):  # an unreadable structure matches nothing
            logger.warning("structure %d of a fit task cannot be read", i, exc_info=True)
            reduced[i] = None
        else:
            reduced[i] = matcher.reduce(s)
    out = []
    for i, j in pairs:
        a, b = reduced[i], reduced[j]
        if a is None or b is None:
            out.append(False)
            continue
        out.append(matcher.lattices_can_match(a, b) and matcher.fit_anonymous(a, b, reduced=True))
    return out


def run_fits(tasks: list[tuple[list, list[tuple[int, int]]]], workers: int = 1) -> list[list[bool]]:
    """:func:`fit_pairs` of every task (in ``workers`` processes, largest tasks first), in task order."""
    order = sorted(range(len(tasks)), key=lambda t: -len(tasks[t][1]))
    results: list[list[bool]] = [[] for _ in tasks]
    with progress.bar(sum(len(t[1]) for t in tasks), "prototype clusters", unit="fit") as bar:
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for t, res in zip(order, pool.map(fit_pairs, [tasks[t] for t in order]), strict=True):
                    results[t] = res
                    bar.update(len(res))
        else:
            for t in order:
                results[t] = fit_pairs(tasks[t])
                bar.update(len(results[t]))
    return results


def merge_groups(n: int, pairs: list[tuple[int, int]], fits: list[bool]) -> list[int]:
    """The root of each of ``n`` groups after merging the matching pairs (union-find): the smallest group
    index of its component."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (a, b), ok in zip(pairs, fits, strict=True):
        if ok:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return [find(g) for g in range(n)]


def cluster_prototypes(
    anonymous_formulas: list[str],
    nsites_primitive: list[int],
    labels: list[str | None],
    structures: list[dict],
    workers: int = 1,
    max_groups_per_partition: int = 60,
) -> list[int]:
    """Prototype cluster id per structure (the structures in material-id order).

    Structures with the same anonymous formula, primitive-cell size and spglib prototype label start in
    one group, represented by its first member; groups of a partition (anonymous formula, primitive-cell
    size) whose representatives match under ``StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    .fit_anonymous`` are merged (union-find) over the pairs of :func:`partition_pairs`. Cluster ids number
    the clusters in order of their first member. The template index runs the same steps per partition
    (:mod:`cspml_flows.templates.index`), keeping the fit results, so that an update refits only new pairs.
    """
    n = len(labels)
    group_of: dict[tuple, int] = {}
    gid = np.empty(n, dtype=np.int64)
    first: list[int] = []
    for i in range(n):
        key = (anonymous_formulas[i], nsites_primitive[i], labels[i] if labels[i] else f"__none_{i}")
        if key not in group_of:
            group_of[key] = len(first)
            first.append(i)
        gid[i] = group_of[key]
    partitions: dict[tuple, list[int]] = {}
    for key, g in group_of.items():
        partitions.setdefault((key[0], key[1]), []).append(g)
    plans = []
    for groups in partitions.values():
        pairs = partition_pairs([labels[first[g]] for g in groups], max_groups_per_partition)
        if pairs:
            plans.append((groups, pairs))
    tasks = [([structures[first[g]] for g in groups], pairs) for groups, pairs in plans]
    roots = np.arange(len(first))
    for (groups, pairs), fits in zip(plans, run_fits(tasks, workers), strict=True):
        for g, r in zip(groups, merge_groups(len(groups), pairs, fits), strict=True):
            roots[g] = groups[r]
    _, cluster = np.unique(roots[gid], return_inverse=True)
    return cluster.tolist()
