"""Site-environment features: the wrong assignment of SrTiO3 onto a perovskite reads as the wrong chemistry."""

from __future__ import annotations

import numpy as np
import pytest
from benchmarks.environment_features import ElementEnvironments, bond_valence_r0, ecn_bins, volume_scales
from benchmarks.lever_columns import LEVER_FEATURES, lever_columns, training_held_out
from benchmarks.site_environments import template_environments
from pymatgen.core import Lattice, Structure

from cspml_flows.core.composition import roles
from cspml_flows.core.descriptors import magpie_stats
from cspml_flows.predict.retrieve import Ranked
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.schema import template_doc_from_structure

PEROVSKITE = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
POOL = {"BaTiO3": 4.00, "CaTiO3": 3.84, "SrZrO3": 4.10, "BaZrO3": 4.19, "SrHfO3": 4.07, "PbTiO3": 3.97}


def perovskite(formula: str, a: float) -> Structure:
    r = roles(formula)
    big, small = r.elements[0], r.elements[1]
    return Structure(Lattice.cubic(a), [big, small, "O", "O", "O"], PEROVSKITE)


@pytest.fixture(scope="module")
def pool() -> TemplateIndex:
    docs = [
        template_doc_from_structure(perovskite(f, a), f"hand-{f}", source="hand-built").model_dump(mode="json")
        for f, a in POOL.items()
    ]
    return TemplateIndex.from_docs(docs, workers=1)


def features_of(index: TemplateIndex, query: str, template: str, perms: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    t = int(np.flatnonzero(index.formulas == template)[0])
    cands = [Ranked(t, p, 0.5, int(index.cluster[t]), (), (0.5, 0.5, 1.0)) for p in perms]
    x = lever_columns(index, [roles(query)], [cands], magpie_stats([query]))
    return {f: x[:, k] for k, f in enumerate(LEVER_FEATURES)}


def test_the_right_sites_for_sr_and_ti(pool):
    r = roles("SrTiO3")
    t_roles = roles("BaTiO3")
    assert (r.elements[:2], t_roles.elements[:2]) == (("Sr", "Ti"), ("Ba", "Ti"))
    right, swapped = (0, 1, 2), (1, 0, 2)  # Sr on the Ba site / Ti on the Ba site
    f = features_of(pool, "SrTiO3", "BaTiO3", [right, swapped])
    assert f["env_logp_mean"][0] > f["env_logp_mean"][1]
    assert f["env_logp_gain"][0] > f["env_logp_gain"][1]
    assert f["bond_strain_spread"][0] < f["bond_strain_spread"][1]
    assert f["bvs_deviation_max"][0] < f["bvs_deviation_max"][1]
    assert f["bvs_deviation_max"][0] < 0.5  # Sr2+ and Ti4+ near their valences in a rescaled BaTiO3 cell


def test_held_out_rows_leave_the_pool_statistics(pool):
    stats = ElementEnvironments.from_index(pool)
    rows = np.flatnonzero(pool.formulas == "BaTiO3")
    fewer = stats.without(rows)
    assert stats.counts.sum() - fewer.sum() == 3  # Ba, Ti and O of BaTiO3
    ba = 56
    assert stats.counts[ba].sum() == 2 and fewer[ba].sum() == 1
    z = np.array([[ba]])
    bins = ecn_bins(template_environments(pool).ecn[rows[:1], :1])  # the Ba site's own ECoN bin
    alone = stats.logp(z, bins, np.array([0]), None)
    held = stats.logp(z, bins, np.array([0]), [rows])
    assert held[0, 0] < alone[0, 0]  # one Ba site fewer seen at ECoN 12


def test_lever_columns_leave_a_held_out_query_out_of_the_pool_statistics(pool):
    t = int(np.flatnonzero(pool.formulas == "BaTiO3")[0])
    q = pool.roles[t]
    cands = [Ranked(t, (0, 1, 2), 0.5, int(pool.cluster[t]), (), (0.5, 0.5, 1.0))]
    strict, standard = training_held_out(pool, [t], True), training_held_out(pool, [t], False)
    assert strict[0].tolist() == pool.rows_of_formula(q).tolist() and standard[0].tolist() == [t]
    q_stats = pool.stats[[t]]
    seen, held = (lever_columns(pool, [q], [cands], q_stats, h) for h in (None, strict))
    logp = LEVER_FEATURES.index("env_logp_mean")
    assert held[0, logp] < seen[0, logp]  # its own sites no longer in the element distributions
    others = [k for k, f in enumerate(LEVER_FEATURES) if not f.startswith("env_logp")]
    np.testing.assert_array_equal(held[0, others], seen[0, others])


def test_bond_valence_r0_as_pymatgen():
    """O'Keeffe-Brese R0 of Ti-O is near the tabulated 1.815 A."""
    assert bond_valence_r0(np.array([22]), np.array([8]))[0] == pytest.approx(1.815, abs=0.05)


def test_volume_scales_equal_the_substitution_rescaling():
    from pymatgen.core import Element

    from cspml_flows.core.descriptors import MAX_ROLES, role_fractions
    from cspml_flows.predict.substitute import volume_scale

    q, t = roles("Li3PS4"), roles("Na3AsO4")
    perm = tuple(range(len(q.elements)))
    qz, tz = np.zeros((1, MAX_ROLES), dtype=int), np.zeros((1, MAX_ROLES), dtype=int)
    qz[0, :3] = [Element(q.elements[j]).Z for j in perm]
    tz[0, :3] = [Element(e).Z for e in t.elements]
    real = np.arange(MAX_ROLES)[None, :] < 3
    expected = volume_scale(q, t, perm) ** (1 / 3)
    assert volume_scales(qz, tz, role_fractions([t]), real)[0] == pytest.approx(expected, rel=1e-12)


def test_volume_fit_of_the_member(pool):
    """The member's volume residual against the pool's mixing rule, and the rescaling substitution needs: none
    for a template's own formula, the same for both assignments of one element pair."""
    from benchmarks.lever_columns import template_volume_residuals

    volumes, residual = template_volume_residuals(pool)
    t = int(np.flatnonzero(pool.formulas == "BaTiO3")[0])
    own = features_of(pool, "BaTiO3", "BaTiO3", [(0, 1, 2)])
    assert own["volume_rescale"][0] == pytest.approx(0.0, abs=1e-12)
    assert own["volume_residual"][0] == pytest.approx(residual[t])
    mix = (volumes[56] + volumes[22] + 3 * volumes[8]) / 5
    assert np.exp(residual[t]) == pytest.approx(4.00**3 / 5 / mix)
    f = features_of(pool, "SrTiO3", "BaTiO3", [(0, 1, 2), (1, 0, 2)])
    assert f["volume_rescale"][0] > 0 and np.all(f["volume_residual"] == residual[t])
