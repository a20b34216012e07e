"""Second-stage ranker: which (prototype cluster, element assignment) candidate is the crystal.

The pair model says whether a query and a template share a prototype; the ranker orders a query's
candidates as ``predict`` produces them, learned from CSP outcomes on the template pool itself: pool
compositions are held out one formula at a time (leave-one-formula-out), their candidates built from the
rest of the pool and labelled by ``StructureMatcher`` against the held-out structure
(:mod:`cspml_flows.training.outcomes`). The objective is LightGBM's lambdarank grouped by query: it
optimises the order within a query (NDCG), which is what top-1 and top-k measure, where a pointwise
classifier would spend its capacity on calibrating easy negatives across queries.

Features a chemist would use: the pair model's cluster score and member statistics, how common the
prototype is for the anonymous formula, the template's stability, and the chemistry of the assignment
(pymatgen's data-mined substitution probability of the ion mapping, oxidation-state signs, the
electronegativity order of the sites, Mendeleev-number and radius differences, role-wise property
distance).
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pymatgen.core.structure_prediction as sp_module
from pymatgen.core import Element

from cspml_flows.core import progress
from cspml_flows.core.composition import Roles
from cspml_flows.core.descriptors import MAGPIE_PROPERTIES, MAX_ROLES, ROLE_PROPERTIES, element_table
from cspml_flows.core.errors import ModelError
from cspml_flows.learning import checks
from cspml_flows.learning.features import Standardizer, role_distance, unlearned_distance
from cspml_flows.templates.index import TemplateIndex

RANKER_FORMAT = 3  # 3: a ranker reads the subset of FEATURES its meta lists
READABLE_FORMATS = (2, 3)  # 2: the DEFAULT_FEATURES, lambda-table species spelling
CANDIDATES = 40  # candidates per query (the pair ranking's best) that the ranker orders
DEFAULT_FEATURES = (
    "pair_score",
    "best_prob",
    "mean_prob",
    "log_members",
    "pair_rank",
    "score_gap",
    "log_candidates",
    "cluster_share",
    "log_cluster_size",
    "e_above_hull",
    "log_nprim",
    "identity_assignment",
    "substitution_logprob",
    "substitution_logprob_min",
    "electronegativity_order",
    "electronegativity_maxdiff",
    "mendeleev_diff",
    "radius_logratio_max",
    "oxidation_sign_mismatch",
    "role_distance",
    "magpie_distance",
)
# The columns candidate_features fills, in order; a ranker reads all of them or a subset (its meta lists which).
FEATURES = DEFAULT_FEATURES
RANKER_PARAMS: dict[str, Any] = {  # LightGBM lambdarank settings of every ranker fit (the seed is per fit)
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [1, 5],
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "lambda_l2": 1.0,
    "feature_fraction": 0.9,
    "lambdarank_truncation_level": 20,
    "num_threads": 0,
    "verbosity": -1,
}
_COL = {name: MAGPIE_PROPERTIES.index(name) for name in ("Electronegativity", "MendeleevNumber", "CovalentRadius")}


@lru_cache(maxsize=1)
def _element_columns() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = element_table()
    return tuple(table[:, _COL[c]] for c in ("Electronegativity", "MendeleevNumber", "CovalentRadius"))


@cache
def _z(symbol: str) -> int:
    """Atomic number of an element symbol."""
    return Element(symbol).Z


@cache
def _common_states(symbol: str) -> tuple[int, ...]:
    """pymatgen's common oxidation states of an element (0 where it lists none)."""
    return tuple(Element(symbol).common_oxidation_states) or (0,)


@lru_cache(maxsize=200000)
def oxidation_guess(r: Roles) -> tuple[int, ...]:
    """Oxidation state per role: the first charge-neutral combination of each element's common states
    (pymatgen's order, at most 4,096 tried), else each element's first common state. Cheap enough for
    every query, unlike a full bond-valence or ICSD-statistics guess."""
    options = [_common_states(e) for e in r.elements]
    for combo in itertools.islice(itertools.product(*options), 4096):
        if abs(sum(o * a for o, a in zip(combo, r.amounts, strict=True))) < 1e-6:
            return tuple(combo)
    return tuple(o[0] for o in options)


@lru_cache(maxsize=1)
def _lambda_matrix(alpha: float = -5.0) -> tuple[dict[str, int], np.ndarray]:
    """pymatgen's data-mined substitution table (Hautier et al. 2011, ``lambda.json``) as a dense matrix over
    its species, plus one row/column for species it has never seen: ``M[a, b]`` = lambda(a, b) - log p(b),
    the log of ``SubstitutionProbability.cond_prob`` up to a constant. Read straight from the JSON file
    instead of through ``SubstitutionProbability``, which hashes a Species per lookup."""
    rows = json.loads((Path(sp_module.__file__).parent / "data" / "lambda.json").read_text())
    rows = [r for r in rows if "D1+" not in r]
    species = sorted({r[0] for r in rows} | {r[1] for r in rows})
    ids = {name: k for k, name in enumerate(species)}
    lam = np.full((len(species), len(species)), alpha)
    for a, b, value in rows:
        lam[ids[a], ids[b]] = lam[ids[b], ids[a]] = float(value)
    log_px = np.log(np.exp(lam).sum(axis=1))
    m = np.full((len(species) + 1, len(species) + 1), alpha)
    m[: len(species), : len(species)] = lam
    return ids, m - np.append(log_px, 0.0)[None, :]


def _species_id(symbol: str, ox: int) -> int:
    ids, _ = _lambda_matrix()
    name = f"{symbol}{abs(ox)}{'+' if ox > 0 else '-'}"  # the table's spelling: Na1+, O2-
    return ids.get(name, len(ids))


@lru_cache(maxsize=200000)
def _role_arrays(r: Roles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atomic numbers, oxidation-state guesses and lambda-table species ids per role (padded to MAX_ROLES)."""
    z = np.zeros(MAX_ROLES, dtype=np.int64)
    ox = np.zeros(MAX_ROLES, dtype=np.int64)
    sp = np.full(MAX_ROLES, len(_lambda_matrix()[0]), dtype=np.int64)
    guess = oxidation_guess(r)
    for k, el in enumerate(r.elements[:MAX_ROLES]):
        z[k], ox[k], sp[k] = _z(el), guess[k], _species_id(el, guess[k])
    return z, ox, sp


@dataclass
class CandidateRows:
    """Every candidate of a batch as aligned arrays: its query, template, pair statistics and per-role data.

    Per-role arrays (atomic number ``z``, oxidation guess ``ox``, lambda-table species ``sp``) are padded to
    ``MAX_ROLES``; the query's are permuted by each candidate's assignment. ``real`` marks the roles compared.
    Rows are in the order of :func:`candidate_features`, so further columns of the same candidates can be
    computed from them.
    """

    sizes: np.ndarray
    q_row: np.ndarray
    t_row: np.ndarray
    score: np.ndarray
    stats: np.ndarray
    perm: np.ndarray
    real: np.ndarray
    qz: np.ndarray
    q_ox: np.ndarray
    q_sp: np.ndarray
    tz: np.ndarray
    t_ox: np.ndarray
    t_sp: np.ndarray

    @classmethod
    def build(
        cls, index: TemplateIndex, queries: Sequence[Roles], candidates: Sequence[Sequence[Any]]
    ) -> CandidateRows:
        """The rows of ``candidates[i]`` (query ``i``'s Ranked list), in order."""
        sizes = np.array([len(c) for c in candidates], dtype=np.int64)
        n = int(sizes.sum())
        q_row = np.repeat(np.arange(len(candidates)), sizes)
        flat = [c for cands in candidates for c in cands]
        t_row = np.fromiter((c.template for c in flat), dtype=np.int64, count=n)
        score = np.fromiter((c.score for c in flat), dtype=float, count=n)
        stats = np.array([c.stats if c.stats else (c.score, c.score, 1.0) for c in flat], dtype=float)
        perm = np.zeros((n, MAX_ROLES), dtype=np.int64)
        n_roles = np.zeros(n, dtype=np.int64)
        for k, c in enumerate(flat):
            m = min(len(c.perm), MAX_ROLES)
            perm[k, :m] = c.perm[:m]
            n_roles[k] = m
        beyond = perm >= MAX_ROLES  # a query role past the compared ones (formulas of more than MAX_ROLES elements)
        perm[beyond] = 0
        real = (np.arange(MAX_ROLES)[None, :] < n_roles[:, None]) & ~beyond
        # per-role arrays of queries (then permuted by each assignment) and of templates
        q_arr = [_role_arrays(q) for q in queries]
        take = np.take_along_axis
        qz, q_ox, q_sp = (take(np.stack([a[j] for a in q_arr])[q_row], perm, axis=1) for j in range(3))
        t_arr = [_role_arrays(index.roles[t]) for t in t_row.tolist()]
        tz, t_ox, t_sp = (np.stack([a[j] for a in t_arr]) for j in range(3))
        real &= (qz > 0) & (tz > 0)
        return cls(sizes, q_row, t_row, score, stats, perm, real, qz, q_ox, q_sp, tz, t_ox, t_sp)


_F = {name: k for k, name in enumerate(FEATURES)}


def candidate_features(
    index: TemplateIndex,
    queries: Sequence[Roles],
    candidates: Sequence[Sequence[Any]],
    std: Standardizer,
    q_stats: np.ndarray,
) -> np.ndarray:
    """Feature matrix (sum of candidates, len(FEATURES)) for each query's candidate list, in order.

    ``candidates[i]``: the query's :class:`~cspml_flows.predict.retrieve.Ranked` list (with ``stats``);
    ``q_stats``: Magpie statistics of the queries (for the unlearned distance). Vectorised over all
    candidates: per candidate only its template, assignment and pair statistics are read in Python.
    """
    n = sum(len(c) for c in candidates)
    x = np.zeros((n, len(FEATURES)))
    if n == 0:
        return x
    c = CandidateRows.build(index, queries, candidates)
    _pair_columns(x, index, c)
    _assignment_columns(x, c)
    table = element_table()[:, [MAGPIE_PROPERTIES.index(p) for p in ROLE_PROPERTIES]]
    q_props = np.where((c.qz > 0)[:, :, None], table[c.qz], np.nan)
    x[:, _F["role_distance"]] = role_distance(q_props, index.role_props[c.t_row], std)
    x[:, _F["magpie_distance"]] = unlearned_distance(q_stats[c.q_row], index.stats[c.t_row], std)
    return x


def _pair_columns(x: np.ndarray, index: TemplateIndex, c: CandidateRows) -> None:
    """The pair model's scores, the candidate's place in its list, and the template's prototype facts."""
    sizes, t_row, score, stats = c.sizes, c.t_row, c.score, c.stats
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos = np.arange(len(t_row)) - np.repeat(first, sizes)
    n_anon = {k: len(v) for k, v in index.by_anon.items()}
    anon_size = np.array([n_anon.get(a, 1) for a in index.anon[t_row]], dtype=float)
    x[:, _F["pair_score"]] = score
    x[:, _F["best_prob"]] = stats[:, 0]
    x[:, _F["mean_prob"]] = stats[:, 1]
    x[:, _F["log_members"]] = np.log1p(stats[:, 2])
    x[:, _F["pair_rank"]] = pos
    x[:, _F["score_gap"]] = score[np.repeat(first, sizes)] - score
    x[:, _F["log_candidates"]] = np.log1p(np.repeat(sizes, sizes))
    x[:, _F["cluster_share"]] = index.cluster_size[t_row] / anon_size
    x[:, _F["log_cluster_size"]] = np.log1p(index.cluster_size[t_row])
    x[:, _F["e_above_hull"]] = index.e_above_hull[t_row]
    x[:, _F["log_nprim"]] = np.log(np.maximum(index.nprim[t_row], 1))


def _assignment_columns(x: np.ndarray, c: CandidateRows) -> None:
    """The chemistry of each assignment: substitution probabilities, oxidation signs, element orders."""
    x_col, m_col, r_col = _element_columns()
    real, qz, tz, q_ox, t_ox = c.real, c.qz, c.tz, c.q_ox, c.t_ox
    _, lam = _lambda_matrix()
    sub = np.where(real, lam[c.t_sp, c.q_sp], np.nan)
    ident = np.all(np.where(real, c.perm == np.arange(MAX_ROLES)[None, :], True), axis=1)
    signed = real & (q_ox != 0) & (t_ox != 0)
    x[:, _F["identity_assignment"]] = ident
    x[:, _F["oxidation_sign_mismatch"]] = np.sum(signed & ((q_ox > 0) != (t_ox > 0)), axis=1)
    xq, xt = x_col[qz], x_col[tz]
    # share of role pairs whose electronegativity order the assignment keeps (anion sites stay anion sites)
    dq = np.sign(xq[:, :, None] - xq[:, None, :])
    dt = np.sign(xt[:, :, None] - xt[:, None, :])
    pair = real[:, :, None] & real[:, None, :] & (dq != 0) & (dt != 0) & np.isfinite(dq) & np.isfinite(dt)
    agree = np.where(pair, dq == dt, False).sum(axis=(1, 2))
    n_pairs = pair.sum(axis=(1, 2))
    x[:, _F["electronegativity_order"]] = np.where(n_pairs > 0, agree / np.maximum(n_pairs, 1), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (no comparable role): NaN feature
        x[:, _F["substitution_logprob"]] = np.nanmean(sub, axis=1)
        x[:, _F["substitution_logprob_min"]] = np.nanmin(sub, axis=1)
        x[:, _F["electronegativity_maxdiff"]] = np.nanmax(np.where(real, np.abs(xq - xt), np.nan), 1)
        x[:, _F["mendeleev_diff"]] = np.nanmean(np.where(real, np.abs(m_col[qz] - m_col[tz]), np.nan), 1)
        ratio = np.where(real, np.abs(np.log(r_col[qz] / r_col[tz])), np.nan)
        x[:, _F["radius_logratio_max"]] = np.nanmax(ratio, 1)


class CandidateRanker:
    """LightGBM lambdarank model over :data:`FEATURES` or a subset of them (``meta["features"]``, in order)."""

    def __init__(self, booster: lgb.Booster | None = None, meta: dict | None = None):
        self.booster = booster
        self.meta = meta or {}

    @property
    def features(self) -> list[str]:
        """The features the booster reads, in its column order."""
        return list(self.meta.get("features") or DEFAULT_FEATURES)

    def scores(self, x: np.ndarray, threads: int = 0) -> np.ndarray:
        """Ranking score of each row of :data:`FEATURES` (higher first)."""
        if self.booster is None:
            raise ModelError("ranker is not trained")
        cols = [_F[f] for f in self.features]
        return self.booster.predict(x[:, cols], num_threads=threads) if len(x) else np.zeros(0)

    def rerank(
        self,
        index: TemplateIndex,
        queries: Sequence[Roles],
        candidates: Sequence[list[Any]],
        std: Standardizer,
        q_stats: np.ndarray,
        threads: int = 0,
    ) -> list[list[Any]]:
        """Each query's candidates reordered by the ranker's score (stable for ties), which replaces the pair
        score as the candidates' ``score`` (higher is better; not a probability)."""
        x = candidate_features(index, queries, candidates, std, q_stats)
        s = self.scores(x, threads)
        out, k = [], 0
        for cands in candidates:
            part = s[k : k + len(cands)]
            k += len(cands)
            out.append([replace(cands[j], score=float(part[j])) for j in np.argsort(-part, kind="stable")])
        return out

    @classmethod
    def train(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        groups: np.ndarray,
        valid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        max_iter: int = 300,
        seed: int = 0,
        features: Sequence[str] = DEFAULT_FEATURES,
    ) -> CandidateRanker:
        """Fit on rows ``x`` (all of :data:`FEATURES`) with 0/1 labels ``y`` reading only ``features``;
        ``groups``: rows per query, in order."""
        unknown = sorted(set(features) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown ranker features: {', '.join(unknown)}")
        cols = [_F[f] for f in features]
        params = {**RANKER_PARAMS, "seed": seed}
        train = lgb.Dataset(x[:, cols], y, group=groups, feature_name=list(features), free_raw_data=True)
        sets, callbacks = [], []
        if valid is not None and len(valid[2]):
            sets = [lgb.Dataset(valid[0][:, cols], valid[1], group=valid[2], reference=train)]
            callbacks.append(lgb.early_stopping(30, first_metric_only=True, verbose=False))
        with progress.bar(max_iter, "ranker rounds", unit="round") as shown:
            booster = lgb.train(
                params,
                train,
                num_boost_round=max_iter,
                valid_sets=sets,
                callbacks=[*callbacks, lambda _env: shown.update(1)],
            )
        return cls(booster, {"format": RANKER_FORMAT, "features": list(features)})

    def to_blob(self) -> dict[str, Any]:
        """What a model file holds of the ranker: JSON types only."""
        if self.booster is None:
            raise ModelError("ranker is not trained")
        return {"meta": self.meta, "booster": self.booster.model_to_string()}

    @classmethod
    def from_blob(cls, blob: Any, where: str = "ranker.") -> CandidateRanker:
        """Inverse of :meth:`to_blob`: ModelError for a ranker of another version, SchemaError (naming the field)
        for a damaged one, e.g. a booster that does not read exactly its listed subset of :data:`FEATURES`."""
        meta = checks.field(blob, "meta", dict, where)
        features = meta.get("features")
        if (
            meta.get("format") not in READABLE_FORMATS
            or not isinstance(features, list)
            or not features
            or not set(features) <= set(FEATURES)
        ):
            raise ModelError("the ranker in this model file was made by another version: retrain it")
        checks.field(meta, "report", dict, f"{where}meta.", optional=True)
        booster = checks.booster(f"{where}booster", checks.field(blob, "booster", str, where), len(features))
        return cls(booster, meta)
