"""The towers of the heterogeneous model and their contrastive training.

The towers are trained contrastively (listwise InfoNCE, numpy + Adam): each training composition is pulled
towards the templates of the prototypes it takes and pushed from the other same-anonymous-formula templates;
the positives' target weights fall with the composition's e_above_hull in each prototype (``exp(-E/tau)``).
Part of each target can come from the CSPML model's softmax over the same candidates (knowledge
distillation, :meth:`TrainingGroups.distill`; the teacher never saw the held-out formulas).
"""

from __future__ import annotations

import numpy as np

from cspml_flows.core.errors import ModelError
from cspml_flows.learning.features import Standardizer, role_distance
from cspml_flows.learning.hetero.model import TAU, Bank, HeteroModel, core_logit
from cspml_flows.learning.model import QueryBatch, SimilarityModel
from cspml_flows.templates.index import TemplateIndex


def init_model(
    index: TemplateIndex, geom: np.ndarray, emb: np.ndarray | None = None, variant: str = "none", dim=32, seed=0
) -> HeteroModel:
    """Untrained towers: A and B start as one random projection of the chemistry difference."""
    std = Standardizer(index.stats, index.role_props)

    def scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sd = x.std(axis=0)
        return x.mean(axis=0), np.where(sd < 1e-6, 1.0, sd)

    mu, sd = scale(geom)
    m = HeteroModel(std, mu, sd, np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0), variant=variant)
    if variant != "none":
        if emb is None:
            raise ModelError(f"variant {variant!r} needs the templates' embeddings")
        m.emb_mu, m.emb_sd = scale(emb)
    dc = m.phi(index.role_props[:1], index.role_fracs[:1], index.stats[:1]).shape[1]
    first = np.arange(len(index)) < 1
    ds = m.psi(index.subset(first), geom[:1], None if emb is None else emb[:1]).shape[1]
    rng = np.random.default_rng(seed)
    proj = rng.normal(0, 1 / np.sqrt(dc), size=(dim, dc - 1))
    m.A = np.hstack([proj, np.zeros((dim, 1))])
    m.B = np.zeros((dim, ds))
    m.B[:, : dc - 1] = proj
    m.w = np.zeros(ds)
    return m


def loss_and_grads(model: HeteroModel, bank: Bank, groups: TrainingGroups, sel: np.ndarray, l2: float = 0.0):
    """Mean listwise InfoNCE (cross-entropy to the target weights) of groups ``sel`` and its gradient with
    respect to A, B and w (plus the L2 term's gradient)."""
    cand, y, valid = groups.cand[sel], groups.y[sel], groups.valid[sel]
    phi = groups.phi[sel]
    psi = bank.psi[np.where(valid, cand, 0)]
    u = phi @ model.A.T
    v = psi @ model.B.T
    diff = u[:, None, :] - v
    s_ = -np.sum(diff * diff, axis=2) + psi @ model.w
    s_ = np.where(valid, s_, -1e9)
    s_ -= s_.max(axis=1, keepdims=True)
    p = np.exp(s_) * valid
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.sum(y * np.log(p + 1e-300)) / len(sel))
    g = (p - y) / len(sel)
    gu = np.einsum("bm,bmd->bd", g, -2 * diff)
    gv = (g[:, :, None] * 2 * diff).reshape(-1, diff.shape[2])
    grads = [
        gu.T @ phi + l2 * model.A,
        gv.T @ psi.reshape(-1, psi.shape[2]) + l2 * model.B,
        np.einsum("bm,bmk->k", g, psi) + l2 * model.w,
    ]
    return loss, grads


def fit_towers(
    model: HeteroModel, bank: Bank, groups: TrainingGroups, epochs=40, lr=0.01, l2=1e-4, batch=256, seed=0
) -> list[float]:
    """Listwise InfoNCE with Adam on precomputed candidate groups; returns the loss per epoch."""
    rng = np.random.default_rng(seed)
    params = [model.A, model.B, model.w]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    losses = []
    n = len(groups.phi)
    for _ in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for s in range(0, n, batch):
            sel = order[s : s + batch]
            loss, grads = loss_and_grads(model, bank, groups, sel, l2)
            total += loss * len(sel)
            step += 1
            for k, (param, grad) in enumerate(zip(params, grads, strict=True)):
                m1[k] = b1 * m1[k] + (1 - b1) * grad
                m2[k] = b2 * m2[k] + (1 - b2) * grad * grad
                param -= lr * (m1[k] / (1 - b1**step)) / (np.sqrt(m2[k] / (1 - b2**step)) + eps)
        losses.append(total / n)
    return losses


class TrainingGroups:
    """Per training composition: its tower input and a padded candidate group with target weights."""

    def __init__(
        self, phi: np.ndarray, cand: np.ndarray, y: np.ndarray, valid: np.ndarray, anchors: np.ndarray | None = None
    ):
        self.phi, self.cand, self.y, self.valid = phi, cand, y, valid
        self.anchors = anchors  # index row of each group's composition

    def distill(self, core: SimilarityModel, index: TemplateIndex, alpha: float, temp: float = 1.0) -> TrainingGroups:
        """Targets mixed with the CSPML model's softmax over each candidate group (knowledge distillation).

        ``(1 - alpha) * y + alpha * softmax(logit / temp)``; the teacher must not have seen held-out formulas.
        """
        if alpha <= 0 or self.anchors is None:
            return self
        b, m = self.cand.shape
        qb = QueryBatch.from_roles([index.roles[i] for i in self.anchors])
        qi = np.repeat(np.arange(b), m)
        ti = np.where(self.valid, self.cand, 0).reshape(-1)
        logit = core_logit(core, qb, qi, index.role_props[self.anchors], index, ti, role_rows=qi)
        z = np.where(self.valid, logit.reshape(b, m) / temp, -1e9)
        z -= z.max(axis=1, keepdims=True)
        q = np.exp(z) * self.valid
        q /= q.sum(axis=1, keepdims=True)
        return TrainingGroups(self.phi, self.cand, (1 - alpha) * self.y + alpha * q, self.valid, self.anchors)

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
        """One group per reduced formula among ``anchor_rows`` that has a positive among ``allowed_rows``.

        Candidates are the same-anonymous-formula templates of other formulas. Positives: templates of the
        prototypes the formula takes, weighted by ``exp(-E_hull / TAU)`` of the formula in that prototype
        (spread over the prototype's members).
        """
        rng = np.random.default_rng(seed)
        allowed = np.zeros(len(index), dtype=bool)
        allowed[allowed_rows] = True
        by_formula: dict[str, list[int]] = {}
        for i in anchor_rows:
            by_formula.setdefault(str(index.formulas[i]), []).append(int(i))
        sizes = (max_pos, n_near, n_random)
        anchors, cands, ys = [], [], []
        for rows in by_formula.values():
            group = _formula_group(model, index, rows, allowed, sizes, rng)
            if group is not None:
                cands.append(group[0])
                ys.append(group[1])
                anchors.append(rows[0])
        if not cands:
            raise ModelError("no training composition shares a prototype with another formula: need more templates")
        arows = np.asarray(anchors)
        phi = model.phi(index.role_props[arows], index.role_fracs[arows], index.stats[arows])
        cand = np.vstack(cands)
        return cls(phi, cand, np.vstack(ys), cand >= 0, arows)


def _formula_group(
    model: HeteroModel,
    index: TemplateIndex,
    rows: list[int],
    allowed: np.ndarray,
    sizes: tuple[int, int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Padded candidate rows and target weights of one formula's group (``None``: nothing to learn)."""
    max_pos, n_near, n_random = sizes
    a = rows[0]
    members = index.by_anon.get(str(index.anon[a]))
    cand = members[allowed[members] & (index.formulas[members] != index.formulas[a])]
    if len(cand) < 2:
        return None
    energy: dict[int, float] = {}
    for r in rows:
        e = index.e_above_hull[r]
        e = 0.0 if not np.isfinite(e) else max(float(e), 0.0)
        c = int(index.cluster[r])
        energy[c] = min(energy.get(c, np.inf), e)
    is_pos = np.isin(index.cluster[cand], list(energy))
    pos, neg = cand[is_pos], cand[~is_pos]
    if len(pos) == 0 or (len(neg) == 0 and len(np.unique(index.cluster[pos])) < 2):
        return None  # nothing to learn: no positive, or only positives of one prototype
    if len(pos) > max_pos:
        pos = rng.choice(pos, max_pos, replace=False)
    d = role_distance(index.role_props[a][None], index.role_props[neg], model.std) if len(neg) else neg
    near = neg[np.argsort(d, kind="stable")[:n_near]]
    rest = np.setdiff1d(neg, near, assume_unique=True)
    rand = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else rest
    group = np.concatenate([pos, near, rand])
    size = max_pos + n_near + n_random
    y = np.zeros(size)
    cl = index.cluster[pos]
    wk = {c: np.exp(-energy[c] / TAU) for c in np.unique(cl)}
    counts = {c: np.sum(cl == c) for c in wk}
    y[: len(pos)] = [wk[c] / counts[c] for c in cl]
    y /= y.sum()
    padded = np.full(size, -1)
    padded[: len(group)] = group
    return padded, y
