"""A single-prototype family where the member decides: a0a0c- perovskites whose tilt the chemistry sets.

Each ABO3 of the family is the same prototype (I4/mcm, octahedra rotated about c, alternating along c) with
its tilt angle set by the Goldschmidt tolerance factor of its Shannon radii, so under pymatgen's default
``StructureMatcher`` tolerances a prediction matches only when the template it was built on has a similar
tilt. Every composition is predicted from the others (leave one out); the learned engine's first structure
must match more often than the nearest-descriptor template's, with no worse RMSE.
"""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from cspml_flows.core.config import PACKAGED_MODEL
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.predict.predictor import CSPPredictor
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.schema import template_doc_from_structure

SHANNON = {  # ionic radii (A): A site XII-coordinated, B site VI, O II
    **{"Ca": 1.34, "Sr": 1.44, "Ba": 1.61, "Pb": 1.49, "Cd": 1.31, "Na": 1.39, "K": 1.64},
    **{"Ti": 0.605, "Zr": 0.72, "Hf": 0.71, "Sn": 0.69, "Ge": 0.53, "Ce": 0.87, "Mn": 0.53, "Nb": 0.64, "Ta": 0.64},
    "O": 1.40,
}
FAMILY = [(a, b) for a in ("Ca", "Sr", "Ba", "Pb", "Cd") for b in ("Ti", "Zr", "Hf", "Sn", "Ge", "Ce", "Mn")] + [
    (a, b) for a in ("Na", "K") for b in ("Nb", "Ta")
]


def tilt_degrees(a: str, b: str) -> float:
    """Octahedral tilt from the tolerance factor t: 3 degrees near t = 1, growing as t falls (at most 30)."""
    t = (SHANNON[a] + SHANNON["O"]) / (2**0.5 * (SHANNON[b] + SHANNON["O"]))
    return float(np.clip(3 + 200 * (1 - t), 3, 30))


def tilted_perovskite(a: str, b: str) -> Structure:
    """ABO3 in a 2x2x2 pseudo-cubic cell, rigid BO6 octahedra rotated about c by +-tilt (a0a0c-)."""
    phi = np.radians(tilt_degrees(a, b))
    bond = SHANNON[b] + SHANNON["O"]
    side = 4 * bond * np.cos(phi)
    shift = bond * np.sin(phi) / side
    species, coords = [], []
    for i, j, k in np.ndindex(2, 2, 2):
        s = (-1) ** (i + j + k)
        species += [b, a, "O", "O", "O"]
        coords += [
            [i / 2, j / 2, k / 2],
            [(i + 0.5) / 2, (j + 0.5) / 2, (k + 0.5) / 2],
            [(i + 0.5) / 2, j / 2 + s * shift, k / 2],
            [i / 2 - s * shift, (j + 0.5) / 2, k / 2],
            [i / 2, j / 2, (k + 0.5) / 2],
        ]
    return Structure(Lattice.tetragonal(side, 4 * bond), species, coords)


@pytest.fixture(scope="module")
def family_index() -> TemplateIndex:
    docs = [
        template_doc_from_structure(tilted_perovskite(a, b), f"hand-{a}{b}O3", source="hand-built").model_dump(
            mode="json"
        )
        for a, b in FAMILY
    ]
    return TemplateIndex.from_docs(docs, workers=1)


def test_the_family_is_one_prototype_whose_tilt_decides(family_index):
    assert len(set(family_index.cluster.tolist())) == 1
    sm = StructureMatcher()
    assert sm.fit_anonymous(tilted_perovskite("Ca", "Zr"), tilted_perovskite("Ca", "Sn"))  # 20 and 18 degrees
    assert not sm.fit_anonymous(tilted_perovskite("Ca", "Zr"), tilted_perovskite("Ba", "Sn"))  # 20 and 3 degrees


def test_learned_member_choice_beats_the_nearest_template(family_index):
    model = SimilarityModel.load(PACKAGED_MODEL)
    comps = [f"{a}{b}O3" for a, b in FAMILY]
    answers = [tilted_perovskite(a, b) for a, b in FAMILY]
    own = [{f"hand-{a}{b}O3"} for a, b in FAMILY]
    sm = StructureMatcher()

    def first_structures(**kwargs) -> list[Structure]:
        preds = CSPPredictor(family_index, model).predict(comps, top=1, exclude_ids=own, **kwargs)
        assert all(p.candidates for p in preds)
        return [p.candidates[0].structure for p in preds]

    def scores(firsts: list[Structure]) -> tuple[int, float]:
        rms = [sm.get_rms_dist(f, g) for f, g in zip(firsts, answers, strict=True)]
        return sum(r is not None for r in rms), float(np.mean([r[0] for r in rms if r is not None]))

    learned, learned_rmse = scores(first_structures())
    nearest, nearest_rmse = scores(first_structures(metric="nearest"))
    assert learned >= nearest + 4, (learned, nearest)
    assert learned_rmse <= nearest_rmse, (learned_rmse, nearest_rmse)
