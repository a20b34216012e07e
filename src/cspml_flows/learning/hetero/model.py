"""The heterogeneous model: a composition tower and a structure tower mapped into one space.

``tower(c, s) = -||A phi(c) - B psi(s)||^2 + w . psi(s)``: ``phi`` is the composition's chemistry block
(element properties in the role order of the candidate assignment, fractions, Magpie statistics), ``psi``
the template's site chemistry in the same layout, its element-agnostic geometry
(:mod:`cspml_flows.learning.hetero.encoders`), its pretrained CHGNet 0.3.0 representation
(:mod:`cspml_flows.learning.hetero.embeddings`: its pooled crystal feature, ``variant`` ``species`` or the
element-agnostic ``role``; ``none`` leaves it out; the per-role atom blocks are cached but not read: with them
the tower was slower to train and no better on held-out formulas), its e_above_hull and prototype-cluster size.
Training lives in :mod:`cspml_flows.training.hetero`, measurement in :mod:`benchmarks.hetero_evaluate`; this
module only scores.

Scores: composition -> structure ``z = logit(p_cspml) + lam * tower + mu * e_above_hull`` (or the optional
LightGBM second stage); structure -> composition (inverse) ``inv[0] * logit + inv[1] * tower + inv[2] *
log p_substitution + inv[3] * (logit - logsumexp over the pool's prototypes)`` (pymatgen's substitution
probabilities as the chemistry prior; the last term is ``log p(structure | composition)`` under CSPML).
Every weight is chosen on held-out formulas during training (:func:`cspml_flows.training.hetero.train_hetero`).

Model files are gzipped JSON: the arrays as number lists, the embedded core model as its own JSON blob
(LightGBM text model), the optional stacker as LightGBM's text model, and the metadata. Reading one never
unpickles anything; a pickle (the format-1 ``hetero.joblib`` files) or a file of another format or version
gets a one-line ModelError, and so does a damaged one: every field is checked at load
(:meth:`HeteroModel.from_blob`: types, shapes, finite values, positive scales, LightGBM feature counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from cspml_flows.core.config import home_dir
from cspml_flows.core.descriptors import DESCRIPTOR_VERSION, MAX_ROLES, ROLE_PROPERTIES
from cspml_flows.core.errors import ModelError
from cspml_flows.core.safeio import write_json_gz
from cspml_flows.learning import checks
from cspml_flows.learning.features import STAT_COLS, Standardizer
from cspml_flows.learning.hetero.embeddings import EMBED_VERSION, FEA, N_EMBED, VARIANTS, index_embeddings
from cspml_flows.learning.hetero.encoders import GEOMETRY_VERSION, N_GEOMETRY, chemistry_block, geometry_features
from cspml_flows.learning.model import QueryBatch, SimilarityModel, lightgbm_threads
from cspml_flows.templates.index import TemplateIndex

HETERO_FORMAT = 4  # 4: the tower reads CHGNet's crystal feature; 3: all embedding blocks; 2: gzipped JSON; 1: pickle
TAU = 0.05  # eV/atom: target weight exp(-E_hull / TAU) of a positive prototype


PAIR_CHUNK = 100_000  # pair rows scored at once (memory of the feature matrix)
N_STACK_FEATURES = 8  # columns of HeteroModel.stack_features (what a stacker reads)


def to_logit(p: np.ndarray) -> np.ndarray:
    """Logit of probabilities clipped to [1e-6, 1 - 1e-6]."""
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def core_logit(
    core: SimilarityModel,
    q: QueryBatch,
    qi: np.ndarray,
    q_role: np.ndarray,
    index: TemplateIndex,
    ti: np.ndarray,
    role_rows: np.ndarray | None = None,
) -> np.ndarray:
    """CSPML logits of pair rows (query ``qi``, template row ``ti``), scored in chunks. ``q_role`` holds one
    row per pair, or, with ``role_rows``, the rows that ``role_rows`` picks for each pair."""
    out = np.empty(len(qi))
    for s in range(0, len(qi), PAIR_CHUNK):
        sl = slice(s, s + PAIR_CHUNK)
        roles_ = q_role[sl] if role_rows is None else q_role[role_rows[sl]]
        out[sl] = to_logit(core.predict_proba(core.features(q, qi[sl], roles_, index, ti[sl])))
    return out


def default_hetero_path() -> Path:
    """Where ``cspml train --hetero`` saves the hetero model by default (under the home folder)."""
    return home_dir() / "models" / "hetero.json.gz"


def index_geometry(index: TemplateIndex, workers: int = 2, cache: bool | Path = True) -> np.ndarray:
    """Geometry vectors of every template of an index (cached by material_id)."""
    return geometry_features(
        list(index.ids), index.structures, index.roles, list(index.spacegroup), list(index.nprim), workers, cache
    )


@dataclass
class Bank:
    """Structure-tower inputs of every template of an index, row-aligned with it."""

    index: TemplateIndex
    psi: np.ndarray


@dataclass
class HeteroModel:
    """Two towers (composition ``A``, structure ``B`` and ``w``), their fusion with CSPML and inverse weights."""

    std: Standardizer
    geo_mu: np.ndarray
    geo_sd: np.ndarray
    A: np.ndarray
    B: np.ndarray
    w: np.ndarray
    variant: str = "none"  # CHGNet embedding block: "species", "role" (element-agnostic) or "none"
    emb_mu: np.ndarray = field(default_factory=lambda: np.zeros(0))
    emb_sd: np.ndarray = field(default_factory=lambda: np.zeros(0))
    core: SimilarityModel | None = None
    lam: float = 1.0
    mu: float = 0.0
    use_core: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    stacker: Stacker | None = None  # optional second stage (gradient boosting) fitted on held-out formulas
    # inverse weights: logit, tower, substitution prior, logit normalised over the pool's other prototypes
    inv: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0, 0.0]))

    # ---- encoders -------------------------------------------------------------------------------------
    def phi(self, role_props: np.ndarray, role_fracs: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """Composition tower input (n, Dc): role properties already in the template's role order."""
        block = chemistry_block(self.std, role_props, role_fracs, stats)
        return np.hstack([block, np.ones((len(block), 1))])

    def psi(self, index: TemplateIndex, geom: np.ndarray, emb: np.ndarray | None = None) -> np.ndarray:
        """Structure tower input (n, Ds) of every template of ``index`` (``emb``: its embedding rows)."""
        block = chemistry_block(self.std, index.role_props, index.role_fracs, index.stats)
        g = (geom - self.geo_mu) / self.geo_sd
        e = index.e_above_hull
        known = np.isfinite(e)
        extra = np.column_stack(
            [np.where(known, np.clip(e, 0, 1), 0.0), known.astype(float), np.log1p(index.cluster_size.astype(float))]
        )
        parts = [block, g]
        if self.variant != "none":
            if emb is None or emb.shape != (len(index), N_EMBED):
                raise ModelError(f"this hetero model needs the {self.variant!r} CHGNet embeddings of its templates")
            parts.append(((emb - self.emb_mu) / self.emb_sd)[:, :FEA])  # the pooled crystal feature (see module doc)
        return np.hstack([*parts, extra, np.ones((len(index), 1))])

    def embeddings(self, index: TemplateIndex, cache: bool = True) -> np.ndarray | None:
        """The CHGNet embedding rows this model needs for ``index`` (cached per template), or None."""
        return None if self.variant == "none" else index_embeddings(index, self.variant, cache=cache)

    def bank(
        self, index: TemplateIndex, geom: np.ndarray | None = None, workers: int = 2, emb: np.ndarray | None = None
    ) -> Bank:
        """The template side of ``index`` for this model (geometry and embeddings computed when not given)."""
        if geom is None:
            geom = index_geometry(index, workers)
        if emb is None and self.variant != "none":
            emb = self.embeddings(index)
        return Bank(index, self.psi(index, geom, emb))

    def tower(self, phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
        """Row-aligned tower scores of (composition, structure) pairs."""
        d = phi @ self.A.T - psi @ self.B.T
        return -np.sum(d * d, axis=1) + psi @ self.w

    # ---- pair scores ----------------------------------------------------------------------------------
    def components(
        self,
        bank: Bank,
        q: QueryBatch,
        qi: np.ndarray,
        q_role: np.ndarray,
        ti: np.ndarray,
        core: SimilarityModel | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(core logit or zeros, tower score, template e_above_hull) for pair rows."""
        idx = bank.index
        tower = np.empty(len(qi))
        for s in range(0, len(qi), PAIR_CHUNK):
            sl = slice(s, s + PAIR_CHUNK)
            phi = self.phi(q_role[sl], q.role_fracs[qi[sl]], q.stats[qi[sl]])
            tower[sl] = self.tower(phi, bank.psi[ti[sl]])
        logit = core_logit(core, q, qi, q_role, idx, ti) if core is not None else np.zeros(len(qi))
        ehull = np.nan_to_num(idx.e_above_hull[ti], nan=0.0)
        return logit, tower, ehull

    @property
    def fused(self) -> bool:
        """Whether the composition -> structure ranking departs from CSPML's (the tower kept)."""
        return not self.use_core or self.lam != 0 or self.mu != 0 or self.stacker is not None

    def fuse(
        self,
        logit: np.ndarray,
        tower: np.ndarray,
        ehull: np.ndarray,
        lam: float | None = None,
        mu: float | None = None,
        use_core: bool | None = None,
    ) -> np.ndarray:
        """Fused pair score from the CSPML logit, the tower and the template's e_above_hull.

        ``lam``, ``mu`` and ``use_core`` default to the model's own.
        """
        lam = self.lam if lam is None else lam
        mu = self.mu if mu is None else mu
        use_core = self.use_core if use_core is None else use_core
        return (logit if use_core else 0.0) + lam * tower + mu * np.clip(ehull, 0, 1)

    def fuse_inverse(self, parts: np.ndarray, inv=None) -> np.ndarray:
        """Structure -> composition score of (n, 4) components: weighted CSPML logit, tower, chemistry prior
        (log substitution probability) and the logit normalised over the pool's other prototypes."""
        w = np.asarray(self.inv if inv is None else inv, dtype=float)
        return np.asarray(parts, dtype=float) @ w

    def score(self, bank: Bank, q: QueryBatch, qi: np.ndarray, q_role: np.ndarray, ti: np.ndarray) -> np.ndarray:
        """Fused score of pair rows (higher: more likely the composition takes the structure)."""
        core = self.core if self.use_core else None
        if self.use_core and core is None:
            raise ModelError("this hetero model fuses the core CSPML model, but none is attached")
        logit, tower, ehull = self.components(bank, q, qi, q_role, ti, core)
        if self.stacker is not None and core is not None:
            return self.stacked(bank, qi, ti, logit, tower, self.stacker)
        return self.fuse(logit, tower, ehull)

    @staticmethod
    def stack_features(bank: Bank, qi: np.ndarray, ti: np.ndarray, logit: np.ndarray, tower: np.ndarray) -> np.ndarray:
        """Second-stage inputs of a pair: both scores, each relative to the query's best, the template's
        e_above_hull (and whether it is known), prototype-cluster size and primitive-cell size."""
        idx = bank.index

        def rel(x: np.ndarray) -> np.ndarray:
            best = np.full(int(qi.max()) + 1 if len(qi) else 0, -np.inf)
            np.maximum.at(best, qi, x)
            return x - best[qi]

        e = idx.e_above_hull[ti]
        known = np.isfinite(e)
        return np.column_stack(
            [
                logit,
                tower,
                rel(logit),
                rel(tower),
                np.where(known, np.clip(e, 0, 1), 0.0),
                known,
                np.log1p(idx.cluster_size[ti]),
                np.log(np.maximum(idx.nprim[ti], 1)),
            ]
        )

    @classmethod
    def stacked(
        cls, bank: Bank, qi: np.ndarray, ti: np.ndarray, logit: np.ndarray, tower: np.ndarray, stacker: Stacker
    ) -> np.ndarray:
        """The second stage's logit for pair rows (query rows ``qi``, template rows ``ti``)."""
        if len(qi) == 0:
            return np.zeros(0)
        return to_logit(stacker.predict_proba(cls.stack_features(bank, qi, ti, logit, tower))[:, 1])

    # ---- persistence ----------------------------------------------------------------------------------
    _ARRAYS = ("geo_mu", "geo_sd", "A", "B", "w", "emb_mu", "emb_sd", "inv")

    def to_blob(self) -> dict[str, Any]:
        """What a model file holds: JSON types only."""
        blob: dict[str, Any] = {k: np.asarray(getattr(self, k), dtype=float).tolist() for k in self._ARRAYS}
        blob |= {"lam": float(self.lam), "mu": float(self.mu), "use_core": bool(self.use_core), "variant": self.variant}
        blob["std"] = self.std.to_dict()
        blob["stacker"] = self.stacker.to_string() if self.stacker is not None else None
        blob["core"] = self.core.to_blob() if self.core is not None else None
        blob["meta"] = self.meta
        return blob

    def save(self, path: str | Path) -> Path:
        """Write the gzipped JSON model file atomically (temporary file, then rename)."""
        return write_json_gz(path, self.to_blob())

    @staticmethod
    def widths(variant: str) -> tuple[int, int]:
        """Columns of :meth:`phi` and :meth:`psi` (the widths of ``A`` and ``B``) for an embedding ``variant``."""
        chemistry = MAX_ROLES * len(ROLE_PROPERTIES) + 2 * MAX_ROLES + len(STAT_COLS)
        return chemistry + 1, chemistry + N_GEOMETRY + (0 if variant == "none" else FEA) + 4

    @classmethod
    def load(cls, path: str | Path) -> HeteroModel:
        """Read a model file written by :meth:`save`; every problem is one ModelError naming the file."""
        versions = {
            "format": HETERO_FORMAT,
            "descriptor_version": DESCRIPTOR_VERSION,
            "geometry_version": GEOMETRY_VERSION,
            "embedding_version": EMBED_VERSION,
        }
        hint = "train one with 'cspml train --hetero'"
        return checks.load_model_file(Path(path), "hetero model", "A", hint, versions, cls.from_blob)

    @classmethod
    def from_blob(cls, blob: dict[str, Any]) -> HeteroModel:
        """Inverse of :meth:`to_blob`, checked field by field (SchemaError naming the field): every array of
        the shape this version computes (tower widths from :meth:`widths`, geometry and embedding scaling of
        their vectors' lengths), every number finite, every scale above zero, the stacker a LightGBM model of
        :data:`N_STACK_FEATURES` features and the embedded core model checked as its own file is."""
        variant = checks.field(blob, "variant", str)
        if variant not in ("none", *VARIANTS):
            raise checks.SchemaError(f"field variant is {variant!r}, expected one of none, {', '.join(VARIANTS)}")
        dc, ds = cls.widths(variant)
        n_emb = 0 if variant == "none" else N_EMBED
        n_inv = len(checks.field(blob, "inv", list))
        if n_inv not in (3, 4):  # 3: written before the normalised logit, whose weight is then 0
            raise checks.SchemaError(f"field inv holds inverse weights of the wrong length ({n_inv}, expected 4)")
        schema: dict[str, tuple[tuple[int | None, ...], bool]] = {  # array: (shape, a scale that must be > 0)
            "geo_mu": ((N_GEOMETRY,), False),
            "geo_sd": ((N_GEOMETRY,), True),
            "A": ((None, dc), False),
            "B": ((None, ds), False),
            "w": ((ds,), False),
            "emb_mu": ((n_emb,), False),
            "emb_sd": ((n_emb,), True),
            "inv": ((n_inv,), False),
        }
        arrays = {k: checks.numbers(k, checks.field(blob, k, list), shape, pos) for k, (shape, pos) in schema.items()}
        if len(arrays["A"]) != len(arrays["B"]) or len(arrays["A"]) == 0:
            raise checks.SchemaError(f"fields A and B have {len(arrays['A'])} and {len(arrays['B'])} rows")
        if n_inv == 3:
            arrays["inv"] = np.append(arrays["inv"], 0.0)
        std = Standardizer.from_dict(checks.field(blob, "std", dict), "std.")
        text = checks.field(blob, "stacker", str, optional=True)
        stacker = None if text is None else Stacker.from_string(text)
        scalars = {k: checks.number(k, checks.field(blob, k, (int, float))) for k in ("lam", "mu")}
        use_core = checks.field(blob, "use_core", bool)
        core_blob = checks.field(blob, "core", dict, optional=True)
        core = None if core_blob is None else SimilarityModel.from_blob(core_blob, "core.")
        meta = checks.field(blob, "meta", dict)
        return cls(std, **arrays, **scalars, use_core=use_core, variant=variant, core=core, meta=meta, stacker=stacker)


class Stacker:
    """The optional second stage: a LightGBM binary classifier over :meth:`HeteroModel.stack_features`,
    saved as LightGBM's own text model (no pickle)."""

    PARAMS: dict[str, Any] = {  # noqa: RUF012
        "objective": "binary",
        "learning_rate": 0.1,
        "num_leaves": 15,
        "min_data_in_leaf": 50,
        "seed": 0,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }
    ROUNDS = 100

    def __init__(self, booster: lgb.Booster | None = None):
        self.booster = booster

    def fit(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> Stacker:
        """Train the boosted trees on feature rows ``x`` and 0/1 labels ``y``; returns itself."""
        threads = lightgbm_threads()
        data = lgb.Dataset(np.asarray(x, dtype=float), np.asarray(y, dtype=float), weight=sample_weight)
        self.booster = lgb.train({**self.PARAMS, "num_threads": threads}, data, num_boost_round=self.ROUNDS)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, 2) class probabilities, as scikit-learn classifiers give them."""
        if self.booster is None:
            raise ModelError("stacker is not trained")
        p = self.booster.predict(np.asarray(x, dtype=float))
        return np.column_stack([1 - p, p])

    def to_string(self) -> str:
        """LightGBM's text model (what a model file holds)."""
        if self.booster is None:
            raise ModelError("stacker is not trained")
        return self.booster.model_to_string()

    @classmethod
    def from_string(cls, text: str) -> Stacker:
        """A stacker from its LightGBM text model (SchemaError unless it reads :data:`N_STACK_FEATURES`)."""
        return cls(checks.booster("stacker", text, N_STACK_FEATURES))
