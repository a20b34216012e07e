"""The heterogeneous model: a composition tower and a structure tower mapped into one space.

``tower(c, s) = -||A phi(c) - B psi(s)||^2 + w . psi(s)``: ``phi`` is the composition's chemistry block
(element properties in the role order of the candidate assignment, fractions, Magpie statistics), ``psi``
the template's site chemistry in the same layout plus its element-agnostic geometry
(:mod:`cspml_flows.hetero.encoders`), its e_above_hull and prototype-cluster size. A and B are trained
contrastively (listwise InfoNCE, numpy + Adam): each training composition is pulled towards the templates of
the prototypes it takes and pushed from the other same-anonymous-formula templates; the positives' target
weights fall with the composition's e_above_hull in each prototype (``exp(-E/tau)``), so ground states are
ranked above metastable polymorphs.

The final score fuses the tower with the core CSPML similarity (composition-composition) and the template's
e_above_hull: ``z = logit(p_cspml) + lam * tower + mu * e_above_hull``. ``lam`` and ``mu`` are chosen on
held-out formulas (the core model used there is trained without them), so the fusion only departs from
CSPML when the tower helps on unseen compositions.

Model files are gzipped JSON (format 2): the arrays as number lists, the embedded core model as its own
JSON blob (LightGBM text model), the optional stacker as LightGBM's text model, and the metadata. Reading
one never unpickles anything; a pickle (the format-1 ``hetero.joblib`` files) or a file of another format
or version gets a one-line ModelError.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from cspml_flows.config import home_dir
from cspml_flows.descriptors import DESCRIPTOR_VERSION
from cspml_flows.errors import ModelError
from cspml_flows.hetero.encoders import GEOMETRY_VERSION, N_GEOMETRY, chemistry_block, geometry_features
from cspml_flows.learning.features import Standardizer, role_distance
from cspml_flows.learning.model import QueryBatch, SimilarityModel, training_hash
from cspml_flows.safeio import read_json_gz, write_json_gz
from cspml_flows.templates.index import TemplateIndex

HETERO_FORMAT = 2  # 2: gzipped JSON with LightGBM text models (format 1 was a joblib pickle)
TAU = 0.05  # eV/atom: target weight exp(-E_hull / TAU) of a positive prototype


def default_hetero_path() -> Path:
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
    std: Standardizer
    geo_mu: np.ndarray
    geo_sd: np.ndarray
    A: np.ndarray
    B: np.ndarray
    w: np.ndarray
    core: SimilarityModel | None = None
    lam: float = 1.0
    mu: float = 0.0
    use_core: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    stacker: Stacker | None = None  # optional second stage (gradient boosting) fitted on held-out formulas

    # ---- encoders -------------------------------------------------------------------------------------
    def phi(self, role_props: np.ndarray, role_fracs: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """Composition tower input (n, Dc): role properties already in the template's role order."""
        block = chemistry_block(self.std, role_props, role_fracs, stats)
        return np.hstack([block, np.ones((len(block), 1))])

    def psi(self, index: TemplateIndex, geom: np.ndarray) -> np.ndarray:
        """Structure tower input (n, Ds) of every template of ``index``."""
        block = chemistry_block(self.std, index.role_props, index.role_fracs, index.stats)
        g = (geom - self.geo_mu) / self.geo_sd
        e = index.e_above_hull
        known = np.isfinite(e)
        extra = np.column_stack(
            [np.where(known, np.clip(e, 0, 1), 0.0), known.astype(float), np.log1p(index.cluster_size.astype(float))]
        )
        return np.hstack([block, g, extra, np.ones((len(index), 1))])

    def bank(self, index: TemplateIndex, geom: np.ndarray | None = None, workers: int = 2) -> Bank:
        if geom is None:
            geom = index_geometry(index, workers)
        return Bank(index, self.psi(index, geom))

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
        logit = np.zeros(len(qi))
        for s in range(0, len(qi), 100000):
            sl = slice(s, s + 100000)
            phi = self.phi(q_role[sl], q.role_fracs[qi[sl]], q.stats[qi[sl]])
            tower[sl] = self.tower(phi, bank.psi[ti[sl]])
            if core is not None:
                p = core.predict_proba(core.features(q, qi[sl], q_role[sl], idx, ti[sl]))
                p = np.clip(p, 1e-6, 1 - 1e-6)
                logit[sl] = np.log(p / (1 - p))
        ehull = np.nan_to_num(idx.e_above_hull[ti], nan=0.0)
        return logit, tower, ehull

    def fuse(self, logit: np.ndarray, tower: np.ndarray, ehull: np.ndarray, lam=None, mu=None, use_core=None):
        lam = self.lam if lam is None else lam
        mu = self.mu if mu is None else mu
        use_core = self.use_core if use_core is None else use_core
        return (logit if use_core else 0.0) + lam * tower + mu * np.clip(ehull, 0, 1)

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
    def stacked(cls, bank: Bank, qi, ti, logit, tower, stacker) -> np.ndarray:
        if len(qi) == 0:
            return np.zeros(0)
        p = stacker.predict_proba(cls.stack_features(bank, qi, ti, logit, tower))[:, 1]
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    # ---- training -------------------------------------------------------------------------------------
    @classmethod
    def init(cls, index: TemplateIndex, geom: np.ndarray, dim: int = 32, seed: int = 0) -> HeteroModel:
        std = Standardizer(index.stats, index.role_props)
        mu = geom.mean(axis=0)
        sd = geom.std(axis=0)
        sd = np.where(sd < 1e-6, 1.0, sd)
        m = cls(std, mu, sd, np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0))
        dc = m.phi(index.role_props[:1], index.role_fracs[:1], index.stats[:1]).shape[1]
        ds = m.psi(index.subset(np.arange(len(index)) < 1), geom[:1]).shape[1]
        rng = np.random.default_rng(seed)
        proj = rng.normal(0, 1 / np.sqrt(dc), size=(dim, dc - 1))
        m.A = np.hstack([proj, np.zeros((dim, 1))])
        m.B = np.zeros((dim, ds))
        m.B[:, : dc - 1] = proj  # start as a random projection of the chemistry difference
        m.w = np.zeros(ds)
        return m

    def fit_towers(
        self,
        bank: Bank,
        anchors: TrainingGroups,
        epochs: int = 40,
        lr: float = 0.01,
        l2: float = 1e-4,
        batch: int = 256,
        seed: int = 0,
    ) -> list[float]:
        """Listwise InfoNCE with Adam on precomputed candidate groups; returns the loss per epoch."""
        rng = np.random.default_rng(seed)
        params = [self.A, self.B, self.w]
        m1 = [np.zeros_like(p) for p in params]
        m2 = [np.zeros_like(p) for p in params]
        b1, b2, eps = 0.9, 0.999, 1e-8
        step = 0
        losses = []
        n = len(anchors.phi)
        for _ in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for s in range(0, n, batch):
                sel = order[s : s + batch]
                loss, grads = self.loss_and_grads(bank, anchors, sel, l2)
                total += loss * len(sel)
                step += 1
                for k, (param, grad) in enumerate(zip(params, grads, strict=True)):
                    m1[k] = b1 * m1[k] + (1 - b1) * grad
                    m2[k] = b2 * m2[k] + (1 - b2) * grad * grad
                    param -= lr * (m1[k] / (1 - b1**step)) / (np.sqrt(m2[k] / (1 - b2**step)) + eps)
            losses.append(total / n)
        return losses

    def loss_and_grads(
        self, bank: Bank, anchors: TrainingGroups, sel: np.ndarray, l2: float = 0.0
    ) -> tuple[float, list[np.ndarray]]:
        """Mean listwise InfoNCE (cross-entropy to the target weights) of groups ``sel``, and its gradient
        with respect to A, B and w (plus the L2 term's gradient)."""
        cand, y, valid = anchors.cand[sel], anchors.y[sel], anchors.valid[sel]
        phi = anchors.phi[sel]  # (b, Dc)
        psi = bank.psi[np.where(valid, cand, 0)]  # (b, M, Ds)
        u = phi @ self.A.T  # (b, d)
        v = psi @ self.B.T  # (b, M, d)
        diff = u[:, None, :] - v
        s_ = -np.sum(diff * diff, axis=2) + psi @ self.w
        s_ = np.where(valid, s_, -1e9)
        s_ -= s_.max(axis=1, keepdims=True)
        p = np.exp(s_) * valid
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.sum(y * np.log(p + 1e-300)) / len(sel))
        g = (p - y) / len(sel)  # dL/ds
        gu = np.einsum("bm,bmd->bd", g, -2 * diff)
        gv = (g[:, :, None] * 2 * diff).reshape(-1, diff.shape[2])
        grads = [
            gu.T @ phi + l2 * self.A,
            gv.T @ psi.reshape(-1, psi.shape[2]) + l2 * self.B,
            np.einsum("bm,bmk->k", g, psi) + l2 * self.w,
        ]
        return loss, grads

    @classmethod
    def train(
        cls,
        index: TemplateIndex,
        core: SimilarityModel | None = None,
        geom: np.ndarray | None = None,
        val_fraction: float = 0.15,
        seed: int = 0,
        epochs: int = 40,
        dim: int = 32,
        workers: int = 2,
        reuse_val_core: bool = False,
        core_kwargs: dict[str, Any] | None = None,
        log=print,
    ) -> tuple[HeteroModel, dict[str, Any]]:
        """Train the towers, choose the fusion on held-out formulas, refit on everything.

        ``core``: the CSPML model trained on this same index (trained here when None). A second core model,
        trained without the held-out formulas, scores them while the fusion weights are chosen;
        ``reuse_val_core`` keeps that one as the final core model instead of training another on everything.
        """
        from cspml_flows.hetero.evaluate import fusion_grid

        t0 = time.perf_counter()
        if len(index) < 10:
            raise ModelError(f"need at least 10 templates to train, the store has {len(index)}")
        if geom is None:
            geom = index_geometry(index, workers)
        rng = np.random.default_rng(seed)
        formulas = np.unique(index.formulas)
        val_formulas = set(rng.choice(formulas, size=max(1, int(len(formulas) * val_fraction)), replace=False))
        is_val = np.isin(index.formulas, list(val_formulas))
        model = cls.init(index, geom, dim=dim, seed=seed)
        bank = model.bank(index, geom)
        train_rows = np.flatnonzero(~is_val)
        groups = TrainingGroups.build(model, index, train_rows, train_rows, seed=seed)
        log(f"hetero: {len(groups.phi)} training compositions, {groups.valid.sum()} candidate pairs")
        losses = model.fit_towers(bank, groups, epochs=epochs, seed=seed)
        log(f"hetero: tower loss {losses[0]:.3f} -> {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
        core_tr = None
        if np.any(~is_val):
            sub = index.subset(~is_val)
            if len(sub) >= 10:
                try:
                    kw = {"refit_all": False, "check_labels": 0, "seed": seed, **(core_kwargs or {})}
                    core_tr, _ = SimilarityModel.train(sub, log=log, **kw)
                except ModelError:
                    core_tr = None
        report = fusion_grid(model, bank, index, np.flatnonzero(is_val), core_tr)
        model.lam, model.mu, model.use_core = report["chosen"]["lam"], report["chosen"]["mu"], core_tr is not None
        stacker = report.pop("stacker", None)
        log(f"hetero: fusion lam={model.lam} mu={model.mu} on {report['n_val_queries']} held-out formulas")
        # refit the towers on all formulas with the same settings
        all_rows = np.arange(len(index))
        groups = TrainingGroups.build(model, index, all_rows, all_rows, seed=seed + 1)
        final = cls.init(index, geom, dim=dim, seed=seed)
        final.fit_towers(final.bank(index, geom), groups, epochs=epochs, seed=seed)
        final.lam, final.mu, final.use_core = model.lam, model.mu, model.use_core
        final.stacker = stacker
        if final.use_core and core is None:
            if reuse_val_core:
                core = core_tr
            else:
                core, _ = SimilarityModel.train(index, seed=seed, check_labels=0, log=log, **(core_kwargs or {}))
        final.core = core if final.use_core else None
        report["train_seconds"] = time.perf_counter() - t0
        report["tower_loss"] = [round(x, 4) for x in losses]
        final.meta = {
            "format": HETERO_FORMAT,
            "descriptor_version": DESCRIPTOR_VERSION,
            "geometry_version": GEOMETRY_VERSION,
            "training_hash": training_hash(index),
            "n_templates": len(index),
            "created": datetime.now(UTC).isoformat(),
            "report": report,
        }
        return final, report

    # ---- persistence ----------------------------------------------------------------------------------
    _ARRAYS = ("geo_mu", "geo_sd", "A", "B", "w")

    def to_blob(self) -> dict[str, Any]:
        """What a model file holds: JSON types only."""
        blob: dict[str, Any] = {k: np.asarray(getattr(self, k), dtype=float).tolist() for k in self._ARRAYS}
        blob |= {"lam": float(self.lam), "mu": float(self.mu), "use_core": bool(self.use_core)}
        blob["std"] = self.std.to_dict()
        blob["stacker"] = self.stacker.to_string() if self.stacker is not None else None
        blob["core"] = self.core.to_blob() if self.core is not None else None
        blob["meta"] = self.meta
        return blob

    def save(self, path: str | Path) -> Path:
        """Write the gzipped JSON model file atomically (temporary file, then rename)."""
        return write_json_gz(path, self.to_blob())

    @classmethod
    def load(cls, path: str | Path) -> HeteroModel:
        """Read a model file written by :meth:`save`; every problem is one ModelError naming the file."""
        p = Path(path)
        blob = read_hetero_file(p)
        try:
            arrays = {k: np.asarray(blob[k], dtype=float) for k in cls._ARRAYS}
            a, b, w = arrays["A"], arrays["B"], arrays["w"]
            if a.ndim != 2 or b.ndim != 2 or w.ndim != 1 or a.shape[0] != b.shape[0] or b.shape[1] != len(w):
                raise ValueError("tower matrices of inconsistent shapes")
            if arrays["geo_mu"].shape != (N_GEOMETRY,) or arrays["geo_sd"].shape != (N_GEOMETRY,):
                raise ValueError("geometry scaling of the wrong length")
            std = Standardizer.from_dict(blob["std"])
            stacker = Stacker.from_string(blob["stacker"]) if blob.get("stacker") is not None else None
            scalars = {"lam": float(blob["lam"]), "mu": float(blob["mu"]), "use_core": bool(blob["use_core"])}
        except ModelError:
            raise
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"hetero model file {p} is damaged: {reason}") from None
        core = SimilarityModel.from_blob(blob["core"]) if isinstance(blob.get("core"), dict) else None
        return cls(std, **arrays, **scalars, core=core, meta=blob["meta"], stacker=stacker)


def read_hetero_file(path: Path) -> dict[str, Any]:
    """The checked content of a hetero model file: gzipped JSON (never unpickled), a mapping with the tower
    matrices, whose ``meta`` carries this version's format, descriptor and geometry versions."""
    hint = "train one with 'cspml train --hetero'"
    if not path.is_file():
        raise ModelError(f"hetero model file not found: {path} ({hint})")
    try:
        blob = read_json_gz(path)
    except Exception:
        raise ModelError(
            f"cannot read hetero model file {path}: not a gzipped-JSON cspml-flows hetero model (hetero models "
            f"made before format {HETERO_FORMAT} were pickles and are never loaded: {hint})"
        ) from None
    if not isinstance(blob, dict) or "A" not in blob or not isinstance(blob.get("meta"), dict):
        raise ModelError(f"{path} is not a cspml-flows hetero model file ({hint})")
    versions = {"format": HETERO_FORMAT, "descriptor_version": DESCRIPTOR_VERSION, "geometry_version": GEOMETRY_VERSION}
    got = {k: blob["meta"].get(k) for k in versions}
    if got != versions:
        raise ModelError(f"hetero model {path} was made with {got}; this version needs {versions}: retrain it")
    return blob


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
        threads = int(os.environ.get("CSPML_THREADS", "0") or 0)
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
        if self.booster is None:
            raise ModelError("stacker is not trained")
        return self.booster.model_to_string()

    @classmethod
    def from_string(cls, text: str) -> Stacker:
        if not isinstance(text, str):
            raise ValueError("stacker model is not text")
        return cls(lgb.Booster(model_str=text))


@dataclass
class TrainingGroups:
    """Per training composition: its tower input and a padded candidate group with target weights."""

    phi: np.ndarray  # (n, Dc)
    cand: np.ndarray  # (n, M) template rows, -1 padding
    y: np.ndarray  # (n, M) target distribution over candidates
    valid: np.ndarray  # (n, M) bool

    @classmethod
    def build(
        cls,
        model: HeteroModel,
        index: TemplateIndex,
        anchor_rows: np.ndarray,
        allowed_rows: np.ndarray,
        max_pos: int = 16,
        n_near: int = 32,
        n_random: int = 16,
        seed: int = 0,
    ) -> TrainingGroups:
        """One group per reduced formula among ``anchor_rows`` that has a positive among ``allowed_rows`` of
        other formulas. Positives: templates of the prototypes the formula takes, weighted by
        ``exp(-E_hull / TAU)`` of the formula in that prototype (spread over the prototype's members)."""
        rng = np.random.default_rng(seed)
        allowed = np.zeros(len(index), dtype=bool)
        allowed[allowed_rows] = True
        by_formula: dict[str, list[int]] = {}
        for i in anchor_rows:
            by_formula.setdefault(str(index.formulas[i]), []).append(int(i))
        size = max_pos + n_near + n_random
        phis, cands, ys = [], [], []
        for rows in by_formula.values():
            a = rows[0]
            members = index.by_anon.get(str(index.anon[a]))
            cand = members[allowed[members] & (index.formulas[members] != index.formulas[a])]
            if len(cand) < 2:
                continue
            energy: dict[int, float] = {}
            for r in rows:
                e = index.e_above_hull[r]
                e = 0.0 if not np.isfinite(e) else max(float(e), 0.0)
                c = int(index.cluster[r])
                energy[c] = min(energy.get(c, np.inf), e)
            is_pos = np.isin(index.cluster[cand], list(energy))
            pos, neg = cand[is_pos], cand[~is_pos]
            if len(pos) == 0 or (len(neg) == 0 and len(np.unique(index.cluster[pos])) < 2):
                continue  # nothing to learn: no positive, or only positives of one prototype
            if len(pos) > max_pos:
                pos = rng.choice(pos, max_pos, replace=False)
            d = role_distance(index.role_props[a][None], index.role_props[neg], model.std) if len(neg) else neg
            near = neg[np.argsort(d, kind="stable")[:n_near]]
            rest = np.setdiff1d(neg, near, assume_unique=True)
            rand = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else rest
            group = np.concatenate([pos, near, rand])
            y = np.zeros(size)
            cl = index.cluster[pos]
            wk = {c: np.exp(-energy[c] / TAU) for c in np.unique(cl)}
            counts = {c: np.sum(cl == c) for c in wk}
            y[: len(pos)] = [wk[c] / counts[c] for c in cl]
            y /= y.sum()
            padded = np.full(size, -1)
            padded[: len(group)] = group
            cands.append(padded)
            ys.append(y)
            phis.append(a)
        if not cands:
            raise ModelError("no training composition shares a prototype with another formula: need more templates")
        arows = np.asarray(phis)
        phi = model.phi(index.role_props[arows], index.role_fracs[arows], index.stats[arows])
        cand = np.vstack(cands)
        return cls(phi, cand, np.vstack(ys), cand >= 0)
