"""Baselines run beside the learned ranking on the same queries and exclusions.

- ``random``: random templates of the query's anonymous formula.
- ``nearest``: nearest templates by the unlearned standardised Magpie distance (no learning, no clustering).
- ``pymatgen_substitution``: templates ranked by pymatgen's data-mined substitution probabilities
  (Hautier et al. lambda table, ``SubstitutionProbability.cond_prob_list``) for the role-by-role ion
  mapping, one candidate per prototype cluster as pymatgen's Substitutor deduplicates its output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cspml_flows.core.composition import Roles
from cspml_flows.learning.substitution import log_cond_prob, oxidation_species
from cspml_flows.predict.retrieve import Ranked, allowed_rows
from cspml_flows.templates.index import TemplateIndex


def random_rank(
    index: TemplateIndex,
    queries: Sequence[Roles],
    top: int,
    exclude_ids: Sequence[set[str]],
    strict: bool,
    seed: int = 0,
) -> list[list[Ranked]]:
    """``top`` random allowed templates of each query's anonymous formula, identity assignment."""
    rng = np.random.default_rng(seed)
    out = []
    for q, ex in zip(queries, exclude_ids, strict=True):
        members = index.by_anon.get(q.anonymous_formula, np.zeros(0, dtype=int))
        cand = members[allowed_rows(index, q, ex, strict)(members)]
        pick = rng.choice(cand, size=min(top, len(cand)), replace=False) if len(cand) else cand
        ident = tuple(range(len(q.elements)))
        out.append([Ranked(int(t), ident, 0.0, int(index.cluster[t])) for t in pick])
    return out


def pymatgen_rank(
    index: TemplateIndex, queries: Sequence[Roles], top: int, exclude_ids: Sequence[set[str]], strict: bool
) -> list[list[Ranked]]:
    """Allowed templates of each query's anonymous formula ranked by pymatgen's substitution probability of
    the best role assignment (the six fewest-swap ones), one per (cluster, assignment), best ``top``."""
    out = []
    for q, ex in zip(queries, exclude_ids, strict=True):
        members = index.by_anon.get(q.anonymous_formula, np.zeros(0, dtype=int))
        cand = members[allowed_rows(index, q, ex, strict)(members)]
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
