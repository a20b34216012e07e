"""Candidate prefilter: exact numpy path, per-group nearest-neighbour graph, updates, files, and rank()."""

from __future__ import annotations

import numpy as np
import pytest

from cspml_flows.core.composition import roles
from cspml_flows.core.config import PACKAGED_MODEL
from cspml_flows.core.descriptors import role_properties
from cspml_flows.learning.features import Standardizer, role_distance
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.predict.prefilter import GroupMatrix, Prefilter, attach, nearest_rows, prefilter_for
from cspml_flows.predict.prefilter_graph import GroupPrefilter, PrefilterFileError
from cspml_flows.predict.retrieve import rank

# elements with every role property (no NaN), and the ones without an electronegativity or covalent radius
ELEMENTS = (
    "Li",
    "Be",
    "Na",
    "Mg",
    "Al",
    "Si",
    "K",
    "Ca",
    "Sc",
    "Ti",
    "V",
    "Cr",
    "Mn",
    "Fe",
    "Co",
    "Ni",
    "Cu",
    "Zn",
    "Ga",
    "Ge",
    "Rb",
    "Sr",
    "Y",
    "Zr",
    "Nb",
    "Mo",
    "Ru",
    "Rh",
    "Pd",
    "Ag",
    "Cd",
    "In",
    "Sn",
    "Sb",
    "Cs",
    "Ba",
    "La",
    "Ce",
    "Pr",
    "Nd",
    "Sm",
    "Eu",
    "Gd",
    "Tb",
    "Dy",
    "Ho",
    "Er",
    "Tm",
    "Yb",
    "Lu",
    "Hf",
    "Ta",
    "W",
    "Re",
    "Os",
    "Ir",
    "Pt",
    "Au",
    "Hg",
    "Tl",
    "Pb",
    "Bi",
    "Th",
    "U",
    "Np",
    "Pu",
)
ANIONS = ("O", "S", "Se", "Te", "F", "Cl", "Br", "I", "N", "P", "As")
NAN_ELEMENTS = ("Ar", "Cf")


@pytest.fixture(scope="module")
def shipped_model() -> SimilarityModel:
    return SimilarityModel.load(PACKAGED_MODEL)


def _reference(q: np.ndarray, rows: np.ndarray, role_props: np.ndarray, std, need: int) -> np.ndarray:
    """The exhaustive prefilter: stable sort of role_distance over the (ascending) allowed rows."""
    d = role_distance(q[None], role_props[rows], std)
    return rows[np.argsort(d, kind="stable")[:need]]


def _abx3_pool(n: int, seed: int, nan_share: float = 0.0) -> tuple[list[str], np.ndarray]:
    """Formulas A B X3 of random real elements (repeats included: several templates per formula)."""
    rng = np.random.default_rng(seed)
    distinct = []
    for _ in range(n // 2):
        a, b = rng.choice(ELEMENTS, 2, replace=False)
        if rng.random() < nan_share:
            a = rng.choice(NAN_ELEMENTS)
        distinct.append(f"{a}{b}{rng.choice(ANIONS)}3")
    formulas = [distinct[i] for i in rng.integers(0, len(distinct), n)]
    return formulas, role_properties([roles(f) for f in formulas])


def _std(role_props: np.ndarray) -> Standardizer:
    return Standardizer(np.zeros((len(role_props), 1)), role_props)


def test_graph_search_equals_exhaustive_on_a_large_group():
    """A 3,000-template group: the graph's fetch plus exact re-rank returns the exhaustive 48 (ties by row)
    for at least 99 % of queries, and the 8 nearest of further assignments too."""
    formulas, props = _abx3_pool(3000, seed=1)
    std = _std(props)
    rows = np.arange(len(props))
    g = GroupPrefilter.build(rows, props, std, n_roles=3)
    assert len(g) == len(props) and len(g.graph) < len(props)  # repeated formulas share one graph point
    q_formulas, q_props = _abx3_pool(200, seed=2)
    order = [_reference(q, rows, props, std, 48) for q in q_props]
    for need in (48, 8):
        found = g.search(q_props, need, props)
        same = [np.array_equal(f, o[:need]) for f, o in zip(found, order, strict=True)]
        assert np.mean(same) >= 0.99, (need, np.mean(same))
    # exclusions (own formula, as the strict setting does) are applied to fetched rows only
    fa = np.array(formulas)
    for qf, q in zip(q_formulas[:20], q_props[:20], strict=True):
        allowed = fa != qf
        got = g.search(q[None], 48, props, lambda r, qf=qf: fa[r] != qf)[0]
        assert np.array_equal(got, _reference(q, rows[allowed], props, std, 48))


def test_nan_rows_and_nan_queries_are_exact():
    """Rows with a NaN property (Ar: no electronegativity, Cf: no covalent radius) stay out of the graph
    and are re-ranked with every query; role_distance ignores the NaN entry on both paths."""
    _, props = _abx3_pool(600, seed=3, nan_share=0.1)
    std = _std(props)
    rows = np.arange(len(props))
    g = GroupPrefilter.build(rows, props, std, n_roles=3)
    nan_rows = np.flatnonzero(np.isnan(props[:, :3]).any(axis=(1, 2)))
    assert len(nan_rows) > 0 and np.array_equal(g.nan_rows, nan_rows)
    assert np.array_equal(g.rows(), rows)
    q = role_properties([roles(f) for f in ("ArTiO3", "CfFeS3", "SrTiO3", "KNbO3")])
    for qi in q:  # NaN rows at small role distance are still found; NaN queries are compared with every row
        assert np.array_equal(g.search(qi[None], 48, props)[0], _reference(qi, rows, props, std, 48))


def test_updates_match_a_fresh_build():
    """Adding and removing rows, removed rows added back in random order (ties re-keyed when their smallest
    row goes or comes back), gives the rows, points and results of a graph built from the held rows."""
    _, props = _abx3_pool(1200, seed=4, nan_share=0.05)
    std = _std(props)
    rows = np.arange(len(props))
    g = GroupPrefilter.build(rows[:700], props[:700], std, n_roles=3)
    g.add(rows[700:], props[700:])
    rng = np.random.default_rng(5)
    for round_ in range(2):
        gone = rng.choice(len(props), 300, replace=False)
        g.remove(gone)
        back = rng.choice(gone, 150, replace=False)
        g.add(back, props[back])
        held = np.setdiff1d(rows, np.setdiff1d(gone, back))
        assert np.array_equal(g.rows(), held)
        fresh = GroupPrefilter.build(held, props[held], std, n_roles=3)
        assert sorted(fresh.graph.keys) == sorted(g.graph.keys), round_
        assert fresh.extra == g.extra and fresh.owner == g.owner and np.array_equal(fresh.nan_rows, g.nan_rows)
        _, q = _abx3_pool(40, seed=6 + round_)
        for a, qi in zip(g.search(q, 48, props), q, strict=True):
            assert np.array_equal(a, _reference(qi, held, props, std, 48))
        g.add(np.setdiff1d(rows, held), props[np.setdiff1d(rows, held)])


def test_files_round_trip_and_refuse_damage(tmp_path):
    _, props = _abx3_pool(800, seed=7, nan_share=0.05)
    std = _std(props)
    rows = np.arange(len(props))
    g = GroupPrefilter.build(rows, props, std, n_roles=3)
    g.save(tmp_path / "g")
    again = GroupPrefilter.build(rows, props, std, n_roles=3)  # one thread, fixed seed: the same graph
    again.save(tmp_path / "h")
    assert (tmp_path / "g.usearch").read_bytes() == (tmp_path / "h.usearch").read_bytes()
    loaded = GroupPrefilter.load(tmp_path / "g", std)
    _, q = _abx3_pool(40, seed=8)
    for a, b in zip(g.search(q, 48, props), loaded.search(q, 48, props), strict=True):
        assert np.array_equal(a, b)
    loaded.remove(rows[:10])  # a memory-mapped graph is copied before it changes
    assert np.array_equal(loaded.rows(), rows[10:])
    other = _std(props * 2.0)
    with pytest.raises(PrefilterFileError, match="another version or standardiser"):
        GroupPrefilter.load(tmp_path / "g", other)
    (tmp_path / "g.npz").write_bytes(b"not a table")
    with pytest.raises(PrefilterFileError, match="cannot be read"):
        GroupPrefilter.load(tmp_path / "g", std)
    with pytest.raises(PrefilterFileError, match="cannot be read"):
        GroupPrefilter.load(tmp_path / "missing", std)


def test_index_prefilter_syncs_with_by_anon_and_persists(template_index, shipped_model, tmp_path):
    """The process cache builds a group's graph on first use, follows a changed ``by_anon`` array by adding
    and removing rows, and a saved and attached prefilter answers as the built one."""
    index = template_index.subset(np.ones(len(template_index), dtype=bool))  # a private copy to change
    std = shipped_model.std
    anon = max(index.by_anon, key=lambda a: len(index.by_anon[a]))
    members = index.by_anon[anon]
    q = index.role_props[members[:5]]
    found = nearest_rows(index, anon, members, q, 10, std, threshold=0, build_after=0)
    exact = nearest_rows(index, anon, members, q, 10, std, threshold=None)
    assert all(np.array_equal(a, b) for a, b in zip(found, exact, strict=True))
    pf = prefilter_for(index, std)
    assert prefilter_for(index, std) is pf and anon in pf.groups
    index.by_anon[anon] = members[::2].copy()  # an update that drops every other template of the group
    found = nearest_rows(index, anon, index.by_anon[anon], q, 10, std, threshold=0, build_after=0)
    assert np.array_equal(pf.groups[anon].rows(), members[::2])
    exact = nearest_rows(index, anon, index.by_anon[anon], q, 10, std, threshold=None)
    assert all(np.array_equal(a, b) for a, b in zip(found, exact, strict=True))
    pf.save(tmp_path / "pf")
    loaded = Prefilter.load(tmp_path / "pf", index, std)
    attach(index, std, loaded)
    assert prefilter_for(index, std) is loaded
    again = nearest_rows(index, anon, index.by_anon[anon], q, 10, std, threshold=0, build_after=0)
    assert all(np.array_equal(a, b) for a, b in zip(found, again, strict=True))


def test_exact_path_is_the_stable_sort_of_role_distance(template_index, shipped_model):
    """``threshold=None``: for every group and an excluded row per query, the stable sort of role_distance
    over the allowed rows; ``few_in_row_order`` returns a group of at most ``need`` rows in row order."""
    index, std = template_index, shipped_model.std
    for anon, members in index.by_anon.items():
        q = index.role_props[members]
        for need in (3, 48):
            got = nearest_rows(index, anon, members, q, need, std, lambda r, m=members: r != m[0], None)
            want_rows = members[members != members[0]]
            for g, qi in zip(got, q, strict=True):
                assert np.array_equal(g, _reference(qi, want_rows, index.role_props, std, need))
        few = nearest_rows(index, anon, members, q[:1], len(members), std, None, None, few_in_row_order=True)[0]
        assert np.array_equal(few, members)


@pytest.mark.parametrize("strict", [False, True])
def test_rank_through_graphs_equals_exhaustive_rank(template_index, shipped_model, strict):
    """rank() with every group forced through its graph (threshold 0) gives the exhaustive top-5 for at least
    99 % of 200 leave-one-out queries (each template of the pool, its own id excluded)."""
    index = template_index
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(index), 200, replace=False))
    queries = [index.roles[r] for r in rows]
    exclude = [{str(index.ids[r])} for r in rows]
    kwargs = {"top": 5, "exclude_ids": exclude, "strict": strict}
    graph = rank(shipped_model, index, queries, ann_threshold=0, **kwargs)
    exact = rank(shipped_model, index, queries, ann_threshold=None, **kwargs)
    key = [[(c.template, c.perm, c.cluster) for c in cands] for cands in exact]
    same = [[(c.template, c.perm, c.cluster) for c in cands] == k for cands, k in zip(graph, key, strict=True)]
    assert sum(len(k) > 0 for k in key) > 150
    assert np.mean(same) >= 0.99


def test_graph_built_only_after_enough_exact_answers(template_index, shipped_model):
    """Without a loaded graph, a group answers ``build_after`` query vectors exactly before its graph is
    built; from then on the graph answers (with the exact results here)."""
    index = template_index.subset(np.ones(len(template_index), dtype=bool))
    std = shipped_model.std
    anon = max(index.by_anon, key=lambda a: len(index.by_anon[a]))
    members = index.by_anon[anon]
    q = index.role_props[members[:2]]
    exact = nearest_rows(index, anon, members, q, 5, std, threshold=None)
    pf = prefilter_for(index, std)
    for call in range(3):
        got = nearest_rows(index, anon, members, q, 5, std, threshold=1, build_after=3)
        assert all(np.array_equal(a, b) for a, b in zip(got, exact, strict=True))
        assert (anon in pf.groups) == (call == 2)


def test_matrix_path_equals_exhaustive_for_every_query():
    """A 3,000-template group with repeated formulas (ties) and rows with NaN: the matrix candidates,
    re-ranked exactly, are the exhaustive 48 and 8 for every query, with and without an exclusion; a NaN
    query is left to the exhaustive path."""
    formulas, props = _abx3_pool(3000, seed=5, nan_share=0.05)
    std = _std(props)
    rows = np.arange(len(props))
    gm = GroupMatrix(rows, props, std, n_roles=3)
    fa = np.array(formulas)
    _, q_props = _abx3_pool(200, seed=6)
    for qf, q in zip(formulas[:100] + [None] * 100, np.concatenate([props[:100], q_props[:100]]), strict=True):
        mask = None if qf is None else fa != qf
        allowed = rows if mask is None else rows[mask]
        for need in (48, 8):
            cand = gm.candidates(q, need, mask)
            if cand is None:
                assert np.isnan(q[:3]).any()
                continue
            d = role_distance(q[None], props[cand], std)
            assert np.array_equal(cand[np.lexsort((cand, d))[:need]], _reference(q, allowed, props, std, need))
    nan_query = role_properties([roles("ArTiO3")])[0]
    assert gm.candidates(nan_query, 48, None) is None


def test_nearest_rows_through_matrices_equals_exact_path(template_index, shipped_model):
    """Every group of the session index through its matrix (no graph) gives the exact path's rows."""
    index, std = template_index.subset(np.ones(len(template_index), dtype=bool)), shipped_model.std
    for anon, members in index.by_anon.items():
        q = index.role_props[members[:20]]
        for need in (3, 48):
            exclude = lambda r, m=members: r != m[0]  # noqa: E731
            want = nearest_rows(index, anon, members, q, need, std, exclude, None)
            got = nearest_rows(index, anon, members, q, need, std, exclude, 1, build_after=10**9)
            assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), anon
    assert prefilter_for(index, std).matrices and not prefilter_for(index, std).groups
