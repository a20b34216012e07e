"""Element volumes learned from the pool: recovered from a pool that follows a mixing rule, used by substitution."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Element, Lattice, Structure

from cspml_flows.core.composition import roles
from cspml_flows.core.descriptors import elemental_volumes
from cspml_flows.predict.substitute import substitute, volume_scale
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.schema import template_doc_from_structure
from cspml_flows.templates.volumes import fit_element_volumes, volume_mapping, volume_table

# made-up volumes per atom (Å^3), far from the pure elements' for the alkali metals
TRUE = {"Li": 6.0, "Na": 11.0, "K": 19.0, "Rb": 24.0, "F": 12.0, "Cl": 21.0, "Br": 25.0, "I": 31.0}


def _rocksalt(a_el: str, x_el: str) -> Structure:
    """Rock salt whose volume per atom is the mean of the two elements' volumes in ``TRUE``."""
    a = (4 * (TRUE[a_el] + TRUE[x_el])) ** (1 / 3)  # the conventional cell holds 4 + 4 atoms
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [a_el, x_el], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _bcc(el: str) -> Structure:
    """A pure element at its volume in ``TRUE`` (two atoms in the cubic cell)."""
    return Structure(Lattice.cubic((2 * TRUE[el]) ** (1 / 3)), [el, el], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def pool() -> TemplateIndex:
    """Every alkali halide of ``TRUE`` but KBr, and every element alone (which fixes the cation/anion split
    that 1:1 compounds leave open)."""
    pairs = [(a, x) for a in ("Li", "Na", "K", "Rb") for x in ("F", "Cl", "Br", "I") if (a, x) != ("K", "Br")]
    structures = {f"rs-{a}{x}": _rocksalt(a, x) for a, x in pairs} | {f"bcc-{el}": _bcc(el) for el in TRUE}
    return TemplateIndex.from_docs(
        [template_doc_from_structure(s, mid).model_dump(mode="json") for mid, s in structures.items()]
    )


def test_fit_recovers_the_volumes_of_a_mixing_rule(pool):
    v = fit_element_volumes(pool, prior_weight=1e-6)
    for el, value in TRUE.items():
        assert v[Element(el).Z] == pytest.approx(value, rel=1e-3)
    # an element the pool does not hold keeps its pure element's volume
    assert v[Element("Cs").Z] == pytest.approx(elemental_volumes()[Element("Cs").Z])


def test_fit_reads_at_most_max_rows(pool):
    v = fit_element_volumes(pool, max_rows=2, prior_weight=1e-6)  # the first and the last template
    fitted = [el for el in TRUE if abs(v[Element(el).Z] - TRUE[el]) < 1e-3 * TRUE[el]]
    assert 0 < len(fitted) < len(TRUE)


def test_substitution_rescales_by_the_learned_volumes(pool):
    """KBr on the NaCl template: the cell takes the volume the pool's mixing rule gives, closer than the
    pure elements' ratio."""
    t = int(np.flatnonzero(pool.ids == "rs-NaCl")[0])
    s, _ = substitute(pool, t, roles("KBr"), (0, 1), fit_element_volumes(pool))
    truth = (TRUE["K"] + TRUE["Br"]) / 2
    assert s.volume / len(s) == pytest.approx(truth, rel=0.1)
    by_elements = volume_scale(roles("KBr"), pool.roles[t], (0, 1)) * (TRUE["Na"] + TRUE["Cl"]) / 2
    assert abs(np.log(s.volume / len(s) / truth)) < abs(np.log(by_elements / truth))


def test_volume_mapping_round_trips(pool):
    v = fit_element_volumes(pool)
    back = volume_table(volume_mapping(v))
    assert np.allclose(back, v, rtol=1e-4, equal_nan=True)
    assert set(volume_mapping(v)) >= set(TRUE)
