"""Baselines run beside the learned ranking on the same queries and exclusions.

- ``random``: random templates of the query's anonymous formula.
- ``nearest``: nearest templates by the unlearned standardised Magpie distance (no learning, no clustering).
- ``pymatgen_substitution``: templates ranked by pymatgen's data-mined substitution probabilities
  (Hautier et al. lambda table, ``SubstitutionProbability.cond_prob_list``) for the role-by-role ion
  mapping, one candidate per prototype cluster as pymatgen's Substitutor deduplicates its output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from pymatgen.core import Species

from cspml_flows.composition import Roles
from cspml_flows.predict.retrieve import Ranked, _exclusion_mask
from cspml_flows.templates.index import TemplateIndex


def random_rank(
    index: TemplateIndex,
    queries: Sequence[Roles],
    top: int,
    exclude_ids: Sequence[set[str]],
    strict: bool,
    seed: int = 0,
) -> list[list[Ranked]]:
    rng = np.random.default_rng(seed)
    out = []
    for q, ex in zip(queries, exclude_ids, strict=True):
        members = index.by_anon.get(q.anonymous_formula, np.zeros(0, dtype=int))
        cand = members[_exclusion_mask(index, members, q, ex, strict)]
        pick = rng.choice(cand, size=min(top, len(cand)), replace=False) if len(cand) else cand
        ident = tuple(range(len(q.elements)))
        out.append([Ranked(int(t), ident, 0.0, int(index.cluster[t])) for t in pick])
    return out


@lru_cache(maxsize=1)
def _lambda_tables() -> tuple[dict[frozenset, float], dict[str, float], float]:
    """pymatgen's lambda table and species priors keyed by species strings (Species hashing is slow)."""
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability

    sp = SubstitutionProbability()
    lam = {frozenset(str(s) for s in key): value for key, value in sp._l.items()}
    log_px = {str(key): math.log(value) for key, value in sp._px.items() if value > 0}
    return lam, log_px, sp.alpha


@lru_cache(maxsize=200000)
def oxidation_species(r: Roles) -> tuple[Species, ...]:
    """Most likely ionic species per role: first charge-neutral assignment of pymatgen's ICSD-ranked guesses."""
    from pymatgen.core import Composition

    comp = Composition(dict(zip(r.elements, r.amounts, strict=True)))
    guess: dict = {}
    try:
        guesses = comp.oxi_state_guesses(max_sites=-20)
        guess = guesses[0] if guesses else {}
    except Exception:
        guess = {}
    out = []
    for el in r.elements:
        ox = guess.get(el)
        if ox is None:
            from pymatgen.core import Element

            common = Element(el).common_oxidation_states
            ox = common[0] if common else 0
        out.append(Species(el, round(float(ox))))
    return tuple(out)


def log_cond_prob(t_species: tuple[str, ...], q_species: tuple[str, ...]) -> float:
    """log of ``SubstitutionProbability.cond_prob_list(t_species, q_species)``; unseen species get alpha."""
    lam, log_px, alpha = _lambda_tables()
    total = 0.0
    for a, b in zip(t_species, q_species, strict=True):
        key = frozenset((a, b)) if a != b else frozenset((a,))
        total += lam.get(key, alpha) - log_px.get(b, 0.0)
    return total


def pymatgen_rank(
    index: TemplateIndex, queries: Sequence[Roles], top: int, exclude_ids: Sequence[set[str]], strict: bool
) -> list[list[Ranked]]:
    out = []
    for q, ex in zip(queries, exclude_ids, strict=True):
        members = index.by_anon.get(q.anonymous_formula, np.zeros(0, dtype=int))
        cand = members[_exclusion_mask(index, members, q, ex, strict)]
        q_species = tuple(str(x) for x in oxidation_species(q))
        ranked: dict[tuple[int, tuple[int, ...]], Ranked] = {}
        cache: dict[tuple[str, tuple[int, ...]], float] = {}
        for t in cand:
            t_species = tuple(str(x) for x in oxidation_species(index.roles[t]))
            for p in q.permutations(limit=6):
                key = (str(index.formulas[t]), p)
                if key not in cache:
                    cache[key] = log_cond_prob(t_species, tuple(q_species[j] for j in p))
                score = cache[key] - 1e-3 * (0 if np.isnan(index.e_above_hull[t]) else index.e_above_hull[t])
                ck = (int(index.cluster[t]), p)
                if ck not in ranked or score > ranked[ck].score:
                    ranked[ck] = Ranked(int(t), p, float(score), int(index.cluster[t]))
        out.append(sorted(ranked.values(), key=lambda r: -r.score)[:top])
    return out
