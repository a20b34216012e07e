"""pymatgen's data-mined substitution probabilities (Hautier et al. lambda table) between ionic species."""

from __future__ import annotations

import logging
import math
from functools import lru_cache

from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability
from pymatgen.core import Composition, Element, Species

from cspml_flows.core.composition import Roles

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _lambda_tables() -> tuple[dict[frozenset, float], dict[str, float], float]:
    """pymatgen's lambda table and species priors keyed by species strings (Species hashing is slow)."""
    sp = SubstitutionProbability()
    lam = {frozenset(str(s) for s in key): value for key, value in sp._l.items()}
    log_px = {str(key): math.log(value) for key, value in sp._px.items() if value > 0}
    return lam, log_px, sp.alpha


@lru_cache(maxsize=200000)
def oxidation_species(r: Roles) -> tuple[Species, ...]:
    """Most likely ionic species per role: first charge-neutral assignment of pymatgen's ICSD-ranked guesses."""
    comp = Composition(dict(zip(r.elements, r.amounts, strict=True)))
    guess: dict = {}
    try:
        guesses = comp.oxi_state_guesses(max_sites=-20)
        guess = guesses[0] if guesses else {}
    except Exception:  # pymatgen's guesser raises assorted errors on unusual formulas: common states instead
        logger.debug("no oxidation-state guess for %s", comp.reduced_formula, exc_info=True)
        guess = {}
    out = []
    for el in r.elements:
        ox = guess.get(el)
        if ox is None:
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
