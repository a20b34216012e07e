"""Inverse design: which compositions crystallise in a given structure.

Element substitutions consistent with the structure's anonymous formula are enumerated (each role of the
prototype takes one element of the user's list, distinct elements), compositions that SMACT cannot charge
balance are dropped, and the rest are ranked by the hetero model's inverse score: CSPML's logit, the tower,
pymatgen's substitution probability (a chemistry prior) and the logit normalised over the pool's other
prototypes (``log p(structure | composition)``: a composition that fits many prototypes well is less telling
than one that fits only this one), with weights chosen on held-out formulas. Each answer carries the
substituted, volume-rescaled structure from the core engine.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Composition, Element, Structure
from scipy.special import logsumexp

from cspml_flows.core.composition import Roles, roles
from cspml_flows.core.descriptors import role_properties
from cspml_flows.core.errors import CompositionError, CSPMLError, StoreError
from cspml_flows.learning.features import Standardizer, unlearned_distance
from cspml_flows.learning.hetero.encoders import geometry_features
from cspml_flows.learning.hetero.model import Bank, HeteroModel, core_logit
from cspml_flows.learning.model import QueryBatch
from cspml_flows.learning.substitution import log_cond_prob, oxidation_species
from cspml_flows.predict.substitute import substitute
from cspml_flows.predict.user_templates import user_index
from cspml_flows.predict.validity import MIN_DISTANCE, smact_valid
from cspml_flows.templates.index import TemplateIndex

logger = logging.getLogger(__name__)

MAX_ENUMERATED = 500_000
N_PARTS = 4  # inverse score components: CSPML logit, tower, log substitution prior, normalised logit


class NoCompositionError(CSPMLError):
    """No composition from the given elements fits the structure (or passes the charge-balance filter)."""


@dataclass
class InverseCandidate:
    """One composition proposed for a structure, with its substituted structure."""

    rank: int
    formula: str
    score: float
    assignment: dict[str, str]  # template element -> candidate element
    smact_valid: bool
    structure: Structure | None = None
    min_distance: float = float("nan")

    def summary(self) -> dict:
        """JSON-ready fields (the structure left out)."""
        return {
            "rank": self.rank,
            "formula": self.formula,
            "score": round(self.score, 4),
            "assignment": self.assignment,
            "smact_valid": self.smact_valid,
            "min_distance": round(self.min_distance, 3),
        }


@dataclass
class InverseResult:
    """The ranked compositions for one structure, and how many were enumerated and kept."""

    template_formula: str
    anonymous_formula: str
    n_enumerated: int
    n_charge_balanced: int
    candidates: list[InverseCandidate] = field(default_factory=list)


def check_elements(elements: Sequence[str]) -> list[str]:
    """Distinct valid element symbols in the given order; raise CompositionError on an empty or bad list."""
    if not elements:
        raise CompositionError("empty element list: give the elements to substitute (e.g. --elements Li Na K O S)")
    out: list[str] = []
    for e in elements:
        sym = str(e).strip()
        if not Element.is_valid_symbol(sym):
            raise CompositionError(f"unknown element {sym!r} in the element list")
        if sym not in out:
            out.append(sym)
    return out


def enumerate_assignments(template: Roles, elements: Sequence[str]) -> list[tuple[str, ...]]:
    """Element tuples in the template's role order: distinct elements, one per role."""
    n = len(template.elements)
    if len(elements) < n:
        raise NoCompositionError(
            f"no valid composition: the structure has {n} distinct site roles ({template.anonymous_formula}) "
            f"but only {len(elements)} distinct element(s) were given"
        )
    count = int(np.prod(range(len(elements) - n + 1, len(elements) + 1)))
    if count > MAX_ENUMERATED:
        raise CSPMLError(f"{count} element assignments to enumerate (limit {MAX_ENUMERATED}): give fewer elements")
    return list(itertools.permutations(elements, n))


def _query(template: Roles, assigned: tuple[str, ...]) -> tuple[Roles, tuple[int, ...]]:
    comp = Composition(dict(zip(assigned, template.amounts, strict=True)))
    q = roles(comp)
    perm = tuple(q.elements.index(e) for e in assigned)
    return q, perm


def _queries(index: TemplateIndex, t: int, assignments: Sequence[tuple[str, ...]]):
    tr = index.roles[t]
    qs, perms = zip(*(_query(tr, a) for a in assignments), strict=True) if assignments else ((), ())
    return list(qs), list(perms)


def _pair_inputs(index: TemplateIndex, t: int, assignments: Sequence[tuple[str, ...]]):
    """Queries of element assignments onto template row ``t``: (roles, permutations, their QueryBatch, their
    role properties in the template's role order, one row per assignment)."""
    qs, perms = _queries(index, t, assignments)
    q_role = np.concatenate([role_properties([q], [p]) for q, p in zip(qs, perms, strict=True)])
    return qs, perms, QueryBatch.from_roles(qs), q_role


def formula_assignments(formulas: Sequence[str], limit: int = 6) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Every role assignment (up to ``limit`` per formula) of candidate formulas in a template's role order,
    and the formula position owning each."""
    assignments, owner = [], []
    for fi, f in enumerate(formulas):
        r = roles(f)
        for p in r.permutations(limit=limit):
            assignments.append(tuple(r.elements[j] for j in p))
            owner.append(fi)
    return assignments, np.asarray(owner, dtype=int)


def substitution_prior(template: Roles, qs: Sequence[Roles], perms: Sequence[tuple[int, ...]]) -> np.ndarray:
    """log of pymatgen's substitution probability of each assignment from the template's ionic species."""
    t_species = tuple(str(x) for x in oxidation_species(template))
    scores = []
    for q, p in zip(qs, perms, strict=True):
        sp = [str(x) for x in oxidation_species(q)]
        scores.append(log_cond_prob(t_species, tuple(sp[j] for j in p)))
    return np.array(scores, dtype=float)


def core_logits(core, index: TemplateIndex, rows: np.ndarray, assignments: Sequence[tuple[str, ...]]) -> np.ndarray:
    """CSPML logits of every element assignment onto every template row (``(n_assignments, n_rows)``); the
    rows share one anonymous formula, the assignments are in its role order."""
    if not len(assignments) or not len(rows):
        return np.full((len(assignments), len(rows)), -np.inf)
    qs, _, qb, q_role = _pair_inputs(index, int(rows[0]), assignments)
    qi = np.tile(np.arange(len(qs)), len(rows))
    ti = np.repeat(np.asarray(rows, dtype=int), len(qs))
    return core_logit(core, qb, qi, q_role, index, ti, role_rows=qi).reshape(len(rows), len(qs)).T


def representatives(index: TemplateIndex, anon: str, exclude_cluster: int | None = None) -> np.ndarray:
    """One template per prototype cluster of an anonymous formula (the member with the lowest e_above_hull)."""
    rows = index.by_anon.get(anon)
    if rows is None or not len(rows):
        return np.zeros(0, dtype=int)
    rows = rows[index.cluster[rows] != exclude_cluster] if exclude_cluster is not None else rows
    e = np.nan_to_num(index.e_above_hull[rows], nan=0.0)
    order = rows[np.lexsort((e, index.cluster[rows]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = index.cluster[order][1:] != index.cluster[order][:-1]
    return np.sort(order[first])


class PoolNormaliser:
    """``log sum exp`` over the pool's prototypes (one representative each, the query's own cluster left out) of
    a formula's best-assignment CSPML logit; logits are cached per (formula, template) across queries.

    A representative of the formula itself is left out of that formula's sum: its logit against its own
    structure only says that the pool knows the composition, which would rank every composition the pool
    does not know (in an evaluation: exactly those whose only structure is the held-out prototype) first."""

    def __init__(self, core, pool: TemplateIndex):
        self.core, self.pool = core, pool
        self._logit: dict[tuple[str, int], float] = {}

    def lse(self, formulas: Sequence[str], anon: str, exclude_cluster: int | None = None) -> np.ndarray:
        """``log sum exp`` of each formula's best CSPML logit over the pool's prototypes of ``anon``.

        One representative per prototype, ``exclude_cluster`` and the formula's own prototypes left out.
        """
        reps = representatives(self.pool, anon, exclude_cluster)
        if not len(reps) or not len(formulas):
            return np.full(len(formulas), -np.inf)
        need = sorted({f for f in formulas for r in reps if (f, int(r)) not in self._logit})
        if need:
            assignments, owner = formula_assignments(need)
            lg = core_logits(self.core, self.pool, reps, assignments)
            best = np.full((len(need), len(reps)), -np.inf)
            np.maximum.at(best, owner, lg)
            for i, f in enumerate(need):
                for j, r in enumerate(reps):
                    self._logit[(f, int(r))] = float(best[i, j])
        table = np.array([[self._logit[(f, int(r))] for r in reps] for f in formulas])
        own = np.asarray(formulas, dtype=object)[:, None] == self.pool.formulas[reps].astype(object)[None, :]
        return logsumexp(np.where(own, -np.inf, table), axis=1)


def normalised(
    logit: np.ndarray, formulas: Sequence[str], normaliser: PoolNormaliser | None, anon: str, exclude: int | None
) -> np.ndarray:
    """``logit - log(exp(logit) + sum over the pool's other prototypes)`` per assignment (0 without a pool)."""
    if normaliser is None or not len(logit):
        return np.zeros(len(logit))
    uniq = sorted(set(formulas))
    lse = dict(zip(uniq, normaliser.lse(uniq, anon, exclude), strict=True))
    return logit - np.logaddexp(logit, np.array([lse[f] for f in formulas]))


def assignment_parts(
    model: HeteroModel,
    bank: Bank,
    t: int,
    assignments: Sequence[tuple[str, ...]],
    core,
    normaliser: PoolNormaliser | None = None,
    exclude_cluster: int | None = None,
) -> tuple[list[Roles], list[tuple[int, ...]], np.ndarray]:
    """Per assignment onto template row ``t``: (CSPML logit or 0 without ``core``, tower score, log
    substitution prior, logit normalised over the pool's other prototypes or 0) as an (n, 4) array."""
    if not assignments:
        return [], [], np.zeros((0, N_PARTS))
    qs, perms, qb, q_role = _pair_inputs(bank.index, t, assignments)
    logit, tower, _ = model.components(bank, qb, np.arange(len(qs)), q_role, np.full(len(qs), t), core)
    prior = substitution_prior(bank.index.roles[t], qs, perms)
    anon = bank.index.roles[t].anonymous_formula
    formulas = [q.reduced_formula for q in qs]
    norm = normalised(logit, formulas, normaliser if core is not None else None, anon, exclude_cluster)
    return qs, perms, np.column_stack([logit, tower, prior, norm])


def score_assignments(
    model: HeteroModel | None,
    bank: Bank,
    t: int,
    assignments: Sequence[tuple[str, ...]],
    method: str = "hetero",
    normaliser: PoolNormaliser | None = None,
    exclude_cluster: int | None = None,
) -> tuple[list[Roles], list[tuple[int, ...]], np.ndarray]:
    """Scores of element assignments onto template row ``t`` (higher is better).

    ``method``: ``hetero`` (the model's inverse weights over CSPML logit, tower, substitution prior and the
    logit normalised over ``normaliser``'s pool), ``tower`` (the tower alone), ``descriptor`` (minus the
    unlearned Magpie distance to the template's composition), ``pymatgen`` (log substitution probability).
    """
    index = bank.index
    qs, perms = _queries(index, t, assignments)
    if not qs:
        return [], [], np.zeros(0)
    if method == "pymatgen":
        return qs, perms, substitution_prior(index.roles[t], qs, perms)
    if method == "descriptor":
        std = model.std if model is not None else Standardizer(index.stats, index.role_props)
        return qs, perms, -unlearned_distance(QueryBatch.from_roles(qs).stats, index.stats[[t]], std)
    if model is None:
        raise CSPMLError(f"method {method!r} needs a hetero model")
    core = model.core if model.use_core and method == "hetero" else None
    norm = normaliser if core is not None and model.inv[3] != 0 else None
    _, _, parts = assignment_parts(model, bank, t, assignments, core, norm, exclude_cluster)
    if method == "tower":
        return qs, perms, parts[:, 1]
    inv = model.inv if core is not None else np.array([0.0, 1.0, 0.0, 0.0])
    return qs, perms, model.fuse_inverse(parts, inv)


def inverse_design(
    model: HeteroModel,
    bank: Bank,
    t: int,
    elements: Sequence[str],
    top: int = 20,
    charge_balance: bool = True,
    build: bool = True,
    method: str = "hetero",
    pool: TemplateIndex | None = None,
) -> InverseResult:
    """Rank compositions from ``elements`` for template row ``t`` of ``bank.index``; ``pool`` (default
    ``bank.index``, where ``t``'s own prototype cluster is left out) holds the prototypes that the normalised
    logit competes with."""
    elements = check_elements(elements)
    index: TemplateIndex = bank.index
    tr = index.roles[t]
    assignments = enumerate_assignments(tr, elements)
    comps = [Composition(dict(zip(a, tr.amounts, strict=True))) for a in assignments]
    ok = [smact_valid(c) for c in comps] if charge_balance else [True] * len(comps)
    kept = [a for a, good in zip(assignments, ok, strict=True) if good]
    result = InverseResult(tr.reduced_formula, tr.anonymous_formula, len(assignments), len(kept))
    if not kept:
        raise NoCompositionError(
            f"no valid composition: none of the {len(assignments)} substitutions of {', '.join(elements)} into "
            f"{tr.anonymous_formula} ({tr.reduced_formula}) is charge-balanced by SMACT"
        )
    exclude = None if pool is not None else int(index.cluster[t])
    pool = index if pool is None else pool
    normaliser = PoolNormaliser(model.core, pool) if model.core is not None and len(pool) else None
    qs, perms, scores = score_assignments(model, bank, t, kept, method, normaliser, exclude)
    best: dict[str, int] = {}
    for k, q in enumerate(qs):  # one answer per composition: its best assignment
        f = q.reduced_formula
        if f not in best or scores[k] > scores[best[f]]:
            best[f] = k
    order = sorted(best.values(), key=lambda k: -scores[k])
    rank = 0
    for k in order:
        if rank >= top:
            break
        cand = InverseCandidate(
            rank=rank + 1,
            formula=qs[k].reduced_formula,
            score=float(scores[k]),
            assignment={tr.elements[r]: kept[k][r] for r in range(len(tr.elements))},
            smact_valid=smact_valid(qs[k].reduced_formula),
        )
        if build:
            s, dmin = substitute(index, t, qs[k], perms[k], model.core.volumes if model.core is not None else None)
            if dmin < MIN_DISTANCE:
                continue
            cand.structure, cand.min_distance = s, dmin
        result.candidates.append(cand)
        rank += 1
    return result


def inverse_from_structure(
    model: HeteroModel,
    structure: Structure,
    elements: Sequence[str],
    top: int = 20,
    name: str = "user",
    pool: TemplateIndex | None = None,
) -> InverseResult:
    """Inverse design for a pymatgen Structure (e.g. read from a user CIF); ``pool``: the template database
    whose prototypes the normalised logit competes with (without it that component is 0; where the pool
    holds the structure's own prototype, that one competes too, which lowers every answer alike in kind)."""
    ui = user_index({name: structure})
    geom = geometry_features(list(ui.ids), ui.structures, ui.roles, list(ui.spacegroup), list(ui.nprim), 1, False)
    bank = model.bank(ui, geom, emb=model.embeddings(ui, cache=False))
    return inverse_design(model, bank, 0, elements, top=top, pool=pool)


def inverse_pool(model: HeteroModel, store: str | None, workers: int = 1) -> TemplateIndex | None:
    """The template database the normalised logit needs.

    None where the model gives that component no weight, so that nothing is loaded for nothing. A store named
    by the user that cannot be read is a StoreError; where none is named and the default embedded store is
    missing or empty, the component is left out with one warning (the other components still rank the
    compositions).
    """
    if model.core is None or not model.use_core or float(model.inv[3]) == 0.0:
        return None
    try:
        return TemplateIndex.open(store, workers=workers)
    except StoreError as exc:
        if store is not None:
            raise
        logger.warning("note: %s; the score leaves out the logit normalised over the pool's prototypes", exc)
        return None
