"""Energy as a ranking feature (issue 10, item 4): does a machine-learned-potential energy of the candidates
improve the engine's first choice?

On a fixed sample, each query's top candidates (the current engine: pair model + ranker, deduplicated, as
``predict`` returns them) get a SevenNet-0 energy per atom: a single point of the unrelaxed substituted
candidate, and for the best ``relax_top`` a short relaxation through the flows' own relaxation code
(:func:`cspml_flows.flows.relax.relax_one` with :func:`cspml_flows.flows.calculators.relax_maker`). The
feature is the energy per atom relative to the query's lowest candidate. Orders of the same candidates
are compared: the ranker's, energy only, a blend (ranker score minus ``w`` x energy, both taken relative
to the query's best candidate and divided by their spread over the pool sample) and a logistic second
stage on the two. Every weight is fitted on held-out POOL queries (the ranker's training outcomes, with a
ranker refitted without them so their scores are out of sample), never on the protocol's queries.

Energies are cached on disk (JSON, keyed by structure fingerprint and calculator settings), so a rerun
only scores. Relaxations are spent only on queries whose top ``relax_top`` holds both a match and a
non-match: for every other query each order of those candidates has the same top-1 and top-k, so the
reported rates are exact for the whole sample while the cost per composition is measured per structure.

Run: ``python -m benchmarks.energy --out out/bench/energy`` (see ``--help``); pin threads
(``OMP_NUM_THREADS=1``), the module also limits torch and BLAS to one thread.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.engines import structure_fingerprint
from cspml_flows.flows.calculators import CalculatorSettings

SP_TAG = "single-point"


# ----------------------------------------------------------------------------------------------- cache
class EnergyCache:
    """Energies on disk: one JSON object ``{key: record}``; key = ``fingerprint:calculator``.

    A record holds at least ``energy_per_atom`` (None where the calculator failed) and ``seconds`` (the
    compute time when it was first made, so reruns still report the cost)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, dict[str, Any]] = {}
        self._dirty = 0
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.data = {}  # unreadable: start again (it is only a cache)

    @staticmethod
    def key(structure: Structure, calculator: str) -> str:
        return f"{structure_fingerprint(structure)}:{calculator}"

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, record: dict[str, Any], flush_every: int = 25) -> None:
        self.data[key] = record
        self._dirty += 1
        if self._dirty >= flush_every:
            self.flush()

    def flush(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, separators=(",", ":")))
        tmp.replace(self.path)
        self._dirty = 0

    def __len__(self) -> int:
        return len(self.data)


def sevennet_settings(steps: int = 20, fmax: float = 0.05) -> CalculatorSettings:
    """The flows' SevenNet-0 relaxation settings of this experiment (FIRE, cell filter)."""
    return CalculatorSettings(name="sevennet", steps=steps, fmax=fmax, relax_cell=True, optimizer="FIRE")


def single_point_tag(settings: CalculatorSettings) -> str:
    from cspml_flows.core.engines import SEVENNET_MODEL

    return f"{settings.name}/{SEVENNET_MODEL if settings.name == 'sevennet' else ''}/{SP_TAG}"


def single_points(structures: Sequence[Structure], calculator, tag: str, cache: EnergyCache) -> list[dict]:
    """Energy per atom of each structure as given (no relaxation), from the cache where it is there."""
    from pymatgen.io.ase import AseAtomsAdaptor

    out = []
    for s in structures:
        key = cache.key(s, tag)
        rec = cache.get(key)
        if rec is None:
            t, cpu = time.perf_counter(), time.process_time()
            try:
                atoms = AseAtomsAdaptor.get_atoms(s)
                atoms.calc = calculator()
                e = float(atoms.get_potential_energy()) / len(atoms)
                e = e if math.isfinite(e) else None
            except Exception:
                e = None
            rec = {
                "energy_per_atom": e,
                "seconds": time.perf_counter() - t,
                "cpu_seconds": time.process_time() - cpu,
                "nsites": len(s),
            }
            cache.put(key, rec)
        out.append(rec)
    return out


def cache_id(settings: CalculatorSettings) -> str:
    """Energy-cache id of relaxation settings (a hash of the settings, stable across Maker versions)."""
    digest = hashlib.sha1(json.dumps(settings.key_settings(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{settings.name}/{digest}"


def relaxed(structures: Sequence[Structure], maker, settings: CalculatorSettings, cache: EnergyCache) -> list[dict]:
    """Energy per atom after the flows' relaxation (:func:`cspml_flows.flows.relax.relax_one`); a relaxation
    that stops unconverged at ``settings.steps`` keeps its last energy (that is the short relaxation)."""
    from cspml_flows.core.engines import relax_key
    from cspml_flows.flows.relax import RelaxationMaker, relax_one

    relaxation = RelaxationMaker(relax_maker=maker)
    cid = cache_id(settings)
    out = []
    for s in structures:
        key = relax_key(structure_fingerprint(s), cid)
        rec = cache.get(key)
        if rec is None:
            cpu = time.process_time()
            r = relax_one(relaxation, {"structure": s})
            rec = {
                "energy_per_atom": r.energy_per_atom,
                "seconds": r.elapsed_s,
                "cpu_seconds": time.process_time() - cpu,
                "n_steps": r.n_steps,
                "converged": r.converged,
                "status": r.status,
                "nsites": len(s),
            }
            cache.put(key, rec, flush_every=5)
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------- blend math
ENERGY_FLOOR = -15.0  # eV/atom: below every element and compound in PBE (W, the lowest, -13.0): an artefact
ENERGY_CAP = 1.0  # eV/atom above the query's lowest: beyond it a candidate is as bad as it gets for ranking


def relative_energy(e: np.ndarray, floor: float = ENERGY_FLOOR, cap: float = ENERGY_CAP) -> np.ndarray:
    """Energy per atom minus the query's lowest, clipped to ``[0, cap]``. Missing energies (NaN) and
    unphysical ones (below ``floor``: a potential extrapolating on a bad candidate, e.g. -110 eV/atom) count
    as the query's highest."""
    e = np.asarray(e, dtype=float)
    ok = np.isfinite(e) & (e >= floor)
    if not ok.any():
        return np.zeros_like(e)
    rel = np.minimum(e - e[ok].min(), cap)
    rel[~ok] = rel[ok].max()
    return rel


def relative_score(s: np.ndarray) -> np.ndarray:
    """Ranker score minus the query's best (<= 0): only differences within a query carry meaning."""
    s = np.asarray(s, dtype=float)
    return s - s.max() if len(s) else s


def spread(parts: Sequence[np.ndarray]) -> float:
    """Standard deviation over all candidates of all queries (1 where it is zero or undefined)."""
    flat = np.concatenate([np.asarray(p, dtype=float) for p in parts]) if parts else np.zeros(0)
    sd = float(np.std(flat)) if len(flat) > 1 else 0.0
    return sd if sd > 0 and math.isfinite(sd) else 1.0


def blend(s_rel: np.ndarray, e_rel: np.ndarray, w: float, s_scale: float = 1.0, e_scale: float = 1.0) -> np.ndarray:
    """``s_rel / s_scale - w * e_rel / e_scale``: higher is better."""
    return np.asarray(s_rel, dtype=float) / s_scale - w * np.asarray(e_rel, dtype=float) / e_scale


def order(score: np.ndarray) -> np.ndarray:
    """Candidate positions best first (higher score first; ties keep the incoming order)."""
    return np.argsort(-np.asarray(score, dtype=float), kind="stable")


def hits_at(hits: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int = 1) -> np.ndarray:
    """Per query: whether one of the ``k`` best-scored candidates matches (no candidates: miss)."""
    return np.array(
        [
            bool(len(h)) and bool(np.asarray(h, dtype=bool)[order(s)[:k]].any())
            for h, s in zip(hits, scores, strict=True)
        ]
    )


def reciprocal_rank(hits: Sequence[np.ndarray], scores: Sequence[np.ndarray]) -> float:
    """Mean over queries of 1 / (position of the first match), 0 without a match."""
    rr = []
    for h, s in zip(hits, scores, strict=True):
        pos = np.flatnonzero(np.asarray(h, dtype=bool)[order(s)]) if len(h) else []
        rr.append(1.0 / (pos[0] + 1) if len(pos) else 0.0)
    return float(np.mean(rr)) if rr else float("nan")


DEFAULT_GRID = tuple(float(w) for w in np.round(np.concatenate([[0.0], np.geomspace(0.01, 30.0, 70)]), 4))


def fit_weight(
    s_rel: Sequence[np.ndarray],
    e_rel: Sequence[np.ndarray],
    hits: Sequence[np.ndarray],
    s_scale: float = 1.0,
    e_scale: float = 1.0,
    grid: Sequence[float] = DEFAULT_GRID,
) -> tuple[float, list[dict[str, float]]]:
    """The blend weight with the best top-1 on these queries (ties: best mean reciprocal rank, then the
    smallest weight, so ``w = 0``, the ranker's own order, wins unless energy helps). Returns the weight and
    the curve (w, top-1, MRR)."""
    curve = []
    for w in grid:
        sc = [blend(s, e, w, s_scale, e_scale) for s, e in zip(s_rel, e_rel, strict=True)]
        curve.append({"w": float(w), "top1": float(hits_at(hits, sc, 1).mean()), "mrr": reciprocal_rank(hits, sc)})
    best = max(curve, key=lambda c: (round(c["top1"], 12), round(c["mrr"], 12), -c["w"]))
    return best["w"], curve


def fit_logistic(features: Sequence[np.ndarray], hits: Sequence[np.ndarray], seed: int = 0):
    """A pointwise logistic second stage on per-candidate feature rows (standardised inside); returns a
    scorer ``f(rows) -> scores``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pairs = [(f, h) for f, h in zip(features, hits, strict=True) if len(h)]  # queries without candidates: none
    if not pairs:
        return lambda rows: np.zeros(len(rows))
    x = np.concatenate([np.asarray(f, dtype=float).reshape(len(h), -1) for f, h in pairs])
    y = np.concatenate([np.asarray(h, dtype=int) for _, h in pairs])
    if len(set(y.tolist())) < 2:
        return lambda rows: np.zeros(len(rows))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, random_state=seed)).fit(x, y)
    return lambda rows: clf.decision_function(np.asarray(rows, dtype=float)) if len(rows) else np.zeros(0)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Rate of ``a`` with its standard error sqrt(p(1-p)/n), and the paired difference ``a - b`` with the
    standard error of the mean difference; wins/losses count queries where only one of them hits."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(a)
    p = float(a.mean()) if n else float("nan")
    d = a - b
    return {
        "n": n,
        "rate": p,
        "se": math.sqrt(p * (1 - p) / n) if n else float("nan"),
        "diff": float(d.mean()) if n else float("nan"),
        "diff_se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
    }


# ----------------------------------------------------------------------------------------- experiment
@dataclass
class QuerySet:
    """Candidates of a set of queries: per query its structures, ranker scores and match flags."""

    name: str
    formulas: list[str] = field(default_factory=list)
    structures: list[list[Structure]] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    hits: list[np.ndarray] = field(default_factory=list)

    def informative(self, k: int) -> list[int]:
        """Queries whose first ``k`` candidates hold a match and a non-match: only there can a reorder of
        those candidates change a top-j rate."""
        return [i for i, h in enumerate(self.hits) if 0 < int(np.asarray(h[:k], dtype=bool).sum()) < len(h[:k])]


@dataclass
class EnergyConfig:
    protocol: str = "mp20bt"
    queries: int = 200  # protocol queries (load_queries(limit, seed))
    pool_queries: int = 200  # held-out pool formulas from the ranker's outcome cache (weights fitted here)
    top: int = 5  # candidates per query re-ordered with single-point energies
    relax_top: int = 3  # the best candidates per query that are also relaxed
    steps: int = 20  # FIRE steps of the short relaxation (cell filter)
    fmax: float = 0.05
    relax: bool = True
    relax_budget_s: float = 2700.0  # no new relaxation after this much CPU time (one thread), recorded costs
    cost_probe: int = 20  # protocol queries whose single points are timed again without the cache
    seed: int = 0
    model: str | None = None  # default: the benchmark's cached model with ranker for this pool
    outcomes: list[str] | None = None  # outcome cache files (default: those of the benchmark's ranker)
    cache: str | None = None  # default: $CSPML_HOME/benchmark/energy/energies-sevennet.json
    out: str | None = "out/bench/energy"


def limit_threads() -> None:
    """One thread for torch, BLAS and OpenMP (LightGBM) in this process."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    os.environ.setdefault("CSPML_TORCH_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def _default_model(index, protocol: str) -> Path:
    from cspml_flows.core.config import home_dir
    from cspml_flows.learning.model import training_hash

    folder = home_dir() / "benchmark"
    path = folder / f"model-v3-{protocol}-standard-{training_hash(index)}-ranker2000.json.gz"
    if not path.is_file():
        found = sorted(folder.glob(f"model-v3-{protocol}-standard-*-ranker*.json.gz"))
        if len(found) != 1:
            from cspml_flows.core.errors import ConfigError

            raise ConfigError(f"no benchmark model with a ranker at {path}: run `cspml benchmark {protocol}` first")
        path = found[0]
    return path


def outcome_files(index, folder: Path, n_queries: int = 2000, folds: int = 2, seed: int = 0) -> list[Path]:
    """The outcome cache files ``cspml benchmark`` trains its ranker on for this index (the keys of
    :func:`cspml_flows.training.outcomes.fold_outcomes`, default arguments)."""
    from cspml_flows.core.composition import MAX_ASSIGNMENTS
    from cspml_flows.learning.model import training_hash
    from cspml_flows.learning.ranker import CANDIDATES
    from cspml_flows.training.outcomes import outcome_key

    h = training_hash(index)
    keys = [outcome_key(h, seed, folds, f, CANDIDATES, n_queries, [], MAX_ASSIGNMENTS) for f in range(folds)]
    return [folder / f"outcomes-{k}.json.gz" for k in keys]


def load_outcomes(paths: Sequence[Path]):
    """Outcomes of these cache files, concatenated; each held-out index row must occur once."""
    from cspml_flows.core.errors import ConfigError
    from cspml_flows.training.outcomes import Outcomes

    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing or not paths:
        raise ConfigError(
            f"no ranker outcome cache {', '.join(missing) or '(none given)'}: run `cspml benchmark` with a ranker "
            "for this pool first, or name the files with --outcomes"
        )
    out = Outcomes()
    for p in paths:
        with gzip.open(p, "rt", encoding="utf-8") as fh:
            out.extend(Outcomes.from_json(json.load(fh)))
    if len(set(out.rows)) != len(out.rows):
        raise ConfigError("the outcome files repeat held-out rows: they come from different ranker trainings")
    return out


def _hits(rms: list[list[float | None]], n: int) -> np.ndarray:
    return np.array([r is not None and not (isinstance(r, float) and math.isnan(r)) for r in rms[:n]], dtype=bool)


def scored_set(name: str, preds, gts) -> QuerySet:
    """The predictions' candidates, ranker scores and match flags (protocol matcher and gate) as a QuerySet."""
    from benchmarks.scoring import rms_table

    structs = [[c.structure for c in p.candidates] for p in preds]
    rms = rms_table(gts, structs, workers=1)
    qs = QuerySet(name)
    for p, st, r in zip(preds, structs, rms, strict=True):
        qs.formulas.append(p.formula)
        qs.structures.append(st)
        qs.scores.append(np.array([c.score for c in p.candidates], dtype=float))
        qs.hits.append(_hits(r, len(st)))
    return qs


def protocol_set(cfg: EnergyConfig, index, model, log: Callable[[str], None]) -> QuerySet:
    """The engine's top candidates for the protocol sample (standard setting, own id excluded), scored."""
    from benchmarks.protocols import load_queries
    from benchmarks.runner import query_structures
    from cspml_flows.predict.predictor import CSPPredictor

    q = load_queries(cfg.protocol, limit=cfg.queries, seed=cfg.seed)
    gts = query_structures(cfg.protocol, q.material_ids, q.cifs, 1)
    predictor = CSPPredictor(index, model, workers=1)
    t = time.perf_counter()
    preds = predictor.predict([g.composition for g in gts], top=cfg.top, exclude_ids=[{m} for m in q.material_ids])
    log(f"protocol: {len(preds)} queries predicted in {time.perf_counter() - t:.1f} s")
    return scored_set("protocol", preds, gts)


def pool_set(cfg: EnergyConfig, index, model, log: Callable[[str], None]) -> tuple[QuerySet, dict[str, Any]]:
    """Held-out pool formulas from the ranker's outcome cache: a ranker refitted without them (same rounds
    as the shipped one) orders their candidates; the top ones are built as ``predict`` builds them and
    scored against the held-out structure exactly as protocol queries are."""
    from dataclasses import replace

    from pymatgen.core import Composition

    from cspml_flows.core.composition import roles
    from cspml_flows.core.config import home_dir
    from cspml_flows.learning.ranker import CandidateRanker, candidate_features
    from cspml_flows.predict.predictor import CSPPredictor

    if cfg.outcomes:
        files = [Path(p) for p in cfg.outcomes]
    else:
        files = outcome_files(index, home_dir() / "benchmark" / "outcomes")
    out = load_outcomes(files)
    files = [p.name for p in files]
    n_all = len(out.rows)
    pick = np.sort(np.random.default_rng(cfg.seed).choice(n_all, size=min(cfg.pool_queries, n_all), replace=False))
    held = np.zeros(n_all, dtype=bool)
    held[pick] = True
    rows = np.array(out.rows, dtype=int)
    queries = [index.roles[i] for i in rows]
    x = candidate_features(index, queries, out.candidates, model.std, index.stats[rows])
    y = np.concatenate(out.labels)
    groups = np.array([len(c) for c in out.candidates])
    held_rows = np.repeat(held, groups)
    rounds = int((model.ranker.meta.get("report") or {}).get("rounds") or model.ranker.booster.num_trees())
    t = time.perf_counter()
    ranker = CandidateRanker.train(x[~held_rows], y[~held_rows], groups[~held], max_iter=rounds, seed=cfg.seed)
    log(
        f"pool: ranker refitted without the {held.sum()} chosen formulas "
        f"({rounds} rounds, {time.perf_counter() - t:.0f} s)"
    )
    sel = [int(i) for i in np.flatnonzero(held)]
    s_all = ranker.scores(x[held_rows], threads=1)
    reranked, k = [], 0
    for i in sel:
        part = s_all[k : k + groups[i]]
        k += groups[i]
        cands = out.candidates[i]
        reranked.append([replace(cands[j], score=float(part[j])) for j in np.argsort(-part, kind="stable")])
    # the query's composition exactly as its roles (the candidates' assignments index these roles)
    comps = [Composition(dict(zip(r.elements, r.amounts, strict=True))) for r in (index.roles[rows[i]] for i in sel)]
    if any(roles(c) != index.roles[rows[i]] for c, i in zip(comps, sel, strict=True)):
        raise RuntimeError("pool query roles do not round-trip: the outcome cache belongs to another index")
    preds = CSPPredictor(index, model, workers=1).realize(comps, reranked, cfg.top, dedup=True)
    gts = [index.structure(int(rows[i])) for i in sel]
    qs = scored_set("pool", preds, gts)
    info = {"outcome_files": files, "outcome_queries": n_all, "chosen": len(sel), "ranker_rounds": rounds}
    return qs, info


def _energies(
    qs: QuerySet, which: Sequence[int], k: int, fn: Callable[[list[Structure]], list[dict]]
) -> tuple[list[np.ndarray], list[float], list[int]]:
    """Energy arrays (NaN where missing) for queries ``which`` (first ``k`` candidates), per-query CPU
    seconds (one thread) and the queries of each failed or unphysical energy."""
    energies: list[np.ndarray] = [np.full(len(s), np.nan) for s in qs.structures]
    seconds, failed = [], []
    for i in which:
        recs = fn(qs.structures[i][:k])
        energies[i][: len(recs)] = _energy_array(recs)
        seconds.append(_cpu(recs))
        failed += [i] * _n_bad(energies[i][: len(recs)])
    return energies, seconds, failed


def _energy_array(recs: Sequence[dict]) -> np.ndarray:
    return np.array([np.nan if r["energy_per_atom"] is None else r["energy_per_atom"] for r in recs], dtype=float)


def _cpu(recs: Sequence[dict]) -> float:
    """CPU seconds of these records (wall seconds for records made before CPU time was kept)."""
    return float(sum(r.get("cpu_seconds", r.get("seconds")) or 0.0 for r in recs))


def _n_bad(e: np.ndarray) -> int:
    return int((~np.isfinite(e) | (e < ENERGY_FLOOR)).sum())


def _rows(
    name: str,
    qs: QuerySet,
    orders: dict[str, list[np.ndarray]],
    base: str,
    ks: Sequence[int],
) -> list[dict[str, Any]]:
    out = []
    ref = hits_at(qs.hits, orders[base], 1)
    for label, sc in orders.items():
        h1 = hits_at(qs.hits, sc, 1)
        row = {"set": name, "order": label, **paired(h1, ref)}
        for kk in ks:
            row[f"top{kk}"] = float(hits_at(qs.hits, sc, kk).mean())
        out.append(row)
    return out


def run_energy(cfg: EnergyConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The experiment; returns a JSON-ready result (tables, fitted weights, costs)."""
    from benchmarks.protocols import load_queries, pool_store
    from cspml_flows.core.config import home_dir
    from cspml_flows.flows.calculators import relax_maker
    from cspml_flows.learning.model import SimilarityModel
    from cspml_flows.templates.index import TemplateIndex

    limit_threads()
    t_all = time.perf_counter()
    store = pool_store(cfg.protocol, workers=1)
    index = TemplateIndex.from_store(store, workers=1)
    store.close()
    index = index.subset(~np.isin(index.ids, load_queries(cfg.protocol).material_ids))
    model_file = Path(cfg.model) if cfg.model else _default_model(index, cfg.protocol)
    model = SimilarityModel.load(model_file)
    log(f"pool {len(index)} templates; model {model_file.name}")

    prot = protocol_set(cfg, index, model, log)
    pool, pool_info = pool_set(cfg, index, model, log)
    sets = {"pool": pool, "protocol": prot}

    settings = sevennet_settings(cfg.steps, cfg.fmax)
    cache = EnergyCache(cfg.cache or home_dir() / "benchmark" / "energy" / "energies-sevennet.json")
    t = time.perf_counter()
    maker = relax_maker(settings)
    _ = maker.calculator  # load once
    load_s = time.perf_counter() - t
    log(f"SevenNet-0 loaded in {load_s:.1f} s; energy cache {len(cache)} records")
    tag = single_point_tag(settings)
    sp: dict[str, list[np.ndarray]] = {}
    sp_cost: dict[str, list[float]] = {}
    sp_failed: dict[str, int] = {}
    try:
        for name, qs in sets.items():
            t = time.perf_counter()
            sp[name], sp_cost[name], failed = _energies(
                qs,
                range(len(qs.structures)),
                cfg.top,
                lambda ss: single_points(ss, lambda: maker.calculator, tag, cache),
            )
            sp_failed[name] = len(failed)
            log(f"{name}: single points in {time.perf_counter() - t:.0f} s (wall, with cache)")
        cache.flush()
        # cost probe: single points of the first protocol queries again, without the cache, CPU time
        probe: list[float] = []
        scratch = EnergyCache(None)
        for ss in prot.structures[: cfg.cost_probe]:
            probe.append(_cpu(single_points(ss[: cfg.top], lambda: maker.calculator, tag, scratch)))
        rx: dict[str, list[np.ndarray]] = {}
        rx_cost: dict[str, list[float]] = {}
        rx_done: dict[str, list[int]] = {name: [] for name in sets}
        rx_failed: dict[str, int] = {name: 0 for name in sets}
        if cfg.relax:
            # alternate pool and protocol queries so that a budget stop leaves both sets evenly covered
            todo = {name: qs.informative(cfg.relax_top) for name, qs in sets.items()}
            for name, qs in sets.items():
                rx[name] = [np.full(len(s), np.nan) for s in qs.structures]
                rx_cost[name] = []
            spent, j = 0.0, 0
            longest = max((len(v) for v in todo.values()), default=0)
            while j < longest and spent < cfg.relax_budget_s:
                for name in sets:
                    if j >= len(todo[name]) or spent >= cfg.relax_budget_s:
                        continue
                    i = todo[name][j]
                    recs = relaxed(sets[name].structures[i][: cfg.relax_top], maker, settings, cache)
                    e = _energy_array(recs)
                    rx[name][i][: len(e)] = e
                    sec = _cpu(recs)  # the recorded cost, cached or not: a rerun relaxes the same subset
                    rx_cost[name].append(sec)
                    spent += sec
                    rx_done[name].append(i)
                    rx_failed[name] += _n_bad(e)
                j += 1
                if j % 10 == 0:
                    log(f"relaxed {j}/{longest} rounds, {spent:.0f} CPU s")
            cache.flush()
    finally:
        cache.flush()

    # ------------------------------------------------------------------ features and weights (pool only)
    def rel(name: str, energies: list[np.ndarray], k: int | None = None):
        qs = sets[name]
        s_rel = [relative_score(s[:k]) for s in qs.scores]
        e_rel = [relative_energy(e[:k]) for e in energies]
        return s_rel, e_rel, [h[:k] for h in qs.hits]

    s_p, e_p, h_p = rel("pool", sp["pool"])
    s_scale, e_scale = spread(s_p), spread(e_p)
    w_sp, curve_sp = fit_weight(s_p, e_p, h_p, s_scale, e_scale)
    logit = fit_logistic([np.column_stack([s, e]) for s, e in zip(s_p, e_p, strict=True)], h_p, cfg.seed)
    # for the record only (never used to choose): the best weight in hindsight on the protocol's queries
    s_q, e_q, h_q = rel("protocol", sp["protocol"])
    w_q, curve_q = fit_weight(s_q, e_q, h_q, s_scale, e_scale)
    weights: dict[str, Any] = {
        "single_point": {
            "w": w_sp,
            "score_scale": s_scale,
            "energy_scale_ev_per_atom": e_scale,
            "curve": curve_sp,
            "protocol_hindsight": {"w": w_q, "top1": max(c["top1"] for c in curve_q), "curve": curve_q},
        }
    }
    tables: dict[str, list[dict[str, Any]]] = {}
    for name in sets:
        s_rel, e_rel, _ = rel(name, sp[name])
        orders = {
            "ranker (engine order)": [np.asarray(s) for s in sets[name].scores],
            "single-point energy only": [-e for e in e_rel],
            f"blend, single point (w={w_sp:g})": [
                blend(s, e, w_sp, s_scale, e_scale) for s, e in zip(s_rel, e_rel, strict=True)
            ],
            "logistic on (score, single-point energy)": [
                logit(np.column_stack([s, e])) if len(s) else np.zeros(0) for s, e in zip(s_rel, e_rel, strict=True)
            ],
        }
        tables[name] = _rows(name, sets[name], orders, "ranker (engine order)", (3,))

    if cfg.relax:
        k = cfg.relax_top
        done_p = set(rx_done["pool"])
        keep = [i for i in range(len(pool.structures)) if i in done_p or i not in set(pool.informative(k))]
        s_p3, e_p3, h_p3 = rel("pool", rx["pool"], k)
        s3, e3 = spread([s_p3[i] for i in rx_done["pool"]]), spread([e_p3[i] for i in rx_done["pool"]])
        w_rx, curve_rx = fit_weight([s_p3[i] for i in keep], [e_p3[i] for i in keep], [h_p3[i] for i in keep], s3, e3)
        weights["relaxed"] = {"w": w_rx, "score_scale": s3, "energy_scale_ev_per_atom": e3, "curve": curve_rx}
        s_q3, e_q3, h_q3 = rel("protocol", rx["protocol"], k)
        cov_q = [
            i for i in range(len(prot.structures)) if i not in set(prot.informative(k)) or i in set(rx_done["protocol"])
        ]
        w_q3, curve_q3 = fit_weight(
            [s_q3[i] for i in cov_q], [e_q3[i] for i in cov_q], [h_q3[i] for i in cov_q], s3, e3
        )
        weights["relaxed"]["protocol_hindsight"] = {
            "w": w_q3,
            "top1": max(c["top1"] for c in curve_q3),
            "curve": curve_q3,
        }
        for name, qs in sets.items():
            informative = set(qs.informative(k))
            covered = [i for i in range(len(qs.structures)) if i not in informative or i in set(rx_done[name])]
            sub = QuerySet(
                name,
                [qs.formulas[i] for i in covered],
                [qs.structures[i] for i in covered],
                [qs.scores[i] for i in covered],
                [qs.hits[i] for i in covered],
            )
            s_rel, e_rel, _ = rel(name, rx[name], k)

            def tail(i: int, head: np.ndarray, qs: QuerySet = qs) -> np.ndarray:
                # the first k re-ordered by ``head``; the rest keep the engine's order below them
                n = len(qs.scores[i])
                rest = np.arange(n - min(k, n), 0, -1, dtype=float) - 1e6
                return np.concatenate([np.asarray(head, dtype=float), rest])

            orders = {
                "ranker (engine order)": [qs.scores[i] for i in covered],
                f"relaxed energy only, top-{k} re-ordered": [tail(i, -e_rel[i]) for i in covered],
                f"blend, relaxed, top-{k} (w={w_rx:g})": [
                    tail(i, blend(s_rel[i], e_rel[i], w_rx, s3, e3)) for i in covered
                ],
            }
            tables[f"{name}, relaxed"] = _rows(name, sub, orders, "ranker (engine order)", (3,))

    n_probe = sum(min(len(s), cfg.top) for s in prot.structures[: cfg.cost_probe])
    all_sp = [c for name in sets for c in sp_cost[name]]
    cost = {
        "sevennet_load_seconds": load_s,
        "single_point_cpu_seconds_per_composition": float(np.mean(probe)) if probe else float("nan"),
        "single_point_cpu_seconds_per_structure": sum(probe) / max(n_probe, 1),
        "single_point_probe_queries": len(probe),
        "single_point_recorded_seconds_per_composition": float(np.mean(all_sp)) if all_sp else float("nan"),
        "candidates_per_composition": cfg.top,
    }
    if cfg.relax:
        all_rx = [c for name in sets for c in rx_cost[name]]
        cost |= {
            "relax_cpu_seconds_per_composition": float(np.mean(all_rx)) if all_rx else float("nan"),
            "relax_cpu_seconds_per_structure": float(np.mean(all_rx)) / cfg.relax_top if all_rx else float("nan"),
            "relaxed_per_composition": cfg.relax_top,
            "relax_steps": cfg.steps,
            "relaxed_queries": {name: len(v) for name, v in rx_done.items()},
            "relax_failures": rx_failed,
        }
    protocol_blend = next(r for r in tables["protocol"] if r["order"].startswith("blend"))
    result = {
        "config": asdict(cfg),
        "model": model_file.name,
        "calculator": {"single_point": tag, "relax": cache_id(settings), "settings": settings.key_settings()},
        "pool": pool_info,
        "n": {name: len(qs.structures) for name, qs in sets.items()},
        "informative_top5": {name: len(qs.informative(cfg.top)) for name, qs in sets.items()},
        "informative_top_relax": {name: len(qs.informative(cfg.relax_top)) for name, qs in sets.items()},
        "single_point_failures": sp_failed,
        "weights": weights,
        "tables": tables,
        "cost": cost,
        "decision": {
            "blend_top1_lift": protocol_blend["diff"],
            "blend_top1_se": protocol_blend["se"],
            # issue 10's rule: an energy stage only if the blend lifts top-1 by more than its standard error
            # on the fixed 200-query sample (a smaller sample decides nothing)
            "keep_rerank_stage": bool(protocol_blend["diff"] > protocol_blend["se"] and protocol_blend["n"] >= 200),
        },
        "seconds": time.perf_counter() - t_all,
    }
    return result


def markdown(result: dict[str, Any]) -> str:
    """The result as Markdown tables (protocol first)."""
    lines = []
    for name in ("protocol", "protocol, relaxed", "pool", "pool, relaxed"):
        rows = result["tables"].get(name)
        if not rows:
            continue
        fit = " (weights fitted here: in-sample)" if name.startswith("pool") else ""
        lines += [
            "",
            f"{name}: {rows[0]['n']} queries{fit}",
            "",
            "| order | top-1 | SE | vs ranker (paired) | wins / losses | top-3 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['order']} | {r['rate']:.1%} | {r['se']:.1%} | {r['diff']:+.1%} ± {r['diff_se']:.1%} "
                f"| {r['wins']} / {r['losses']} | {r['top3']:.1%} |"
            )
    c = result["cost"]
    lines += [
        "",
        f"cost, CPU time of one thread: single point {c['single_point_cpu_seconds_per_composition']:.2f} s per "
        f"composition ({c['candidates_per_composition']} candidates, "
        f"{c['single_point_cpu_seconds_per_structure'] * 1000:.0f} ms each)"
        + (
            f"; {c['relax_steps']}-step relaxation {c['relax_cpu_seconds_per_composition']:.1f} s per composition "
            f"({c['relaxed_per_composition']} candidates, {c['relax_cpu_seconds_per_structure']:.1f} s each)"
            if "relax_cpu_seconds_per_composition" in c
            else ""
        )
        + f"; model load {c['sevennet_load_seconds']:.1f} s (wall)",
    ]
    for kind, wt in result["weights"].items():
        h = wt.get("protocol_hindsight")
        if h:
            lines.append(
                f"{kind.replace('_', ' ')} blend: w = {wt['w']:g} fitted on the pool; for the record only, the best "
                f"w in hindsight on the protocol queries, {h['w']:g}, would give top-1 {h['top1']:.1%}"
            )
    d = result["decision"]
    lines.append(
        f"decision: blend lift {d['blend_top1_lift']:+.1%} vs SE {d['blend_top1_se']:.1%} -> "
        + ("keep the --rerank energy stage" if d["keep_rerank_stage"] else "no --rerank stage")
        + ("" if result["n"]["protocol"] >= 200 else " (fewer than 200 protocol queries: no decision)")
    )
    return "\n".join(lines).lstrip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    d = EnergyConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.energy", description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", default=d.protocol, choices=["mp20bt", "mpts52"])
    p.add_argument("--queries", type=int, default=d.queries, help="protocol queries (fixed-seed sample)")
    p.add_argument("--pool-queries", type=int, default=d.pool_queries, help="held-out pool formulas (weights)")
    p.add_argument("--top", type=int, default=d.top, help="candidates re-ordered per query")
    p.add_argument("--relax-top", type=int, default=d.relax_top, help="candidates relaxed per query")
    p.add_argument("--steps", type=int, default=d.steps, help="FIRE steps of the short relaxation")
    p.add_argument("--fmax", type=float, default=d.fmax)
    p.add_argument("--no-relax", dest="relax", action="store_false", help="single points only")
    p.add_argument("--relax-budget", type=float, default=d.relax_budget_s, help="relaxation compute, seconds")
    p.add_argument("--cost-probe", type=int, default=d.cost_probe, help="queries timed again without the cache")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", help="benchmark model file with a ranker (default: the cached one)")
    p.add_argument("--outcomes", nargs="+", help="the ranker's outcome cache files (default: the benchmark's)")
    p.add_argument("--cache", help="energy cache JSON file")
    p.add_argument("--out", default=d.out, help="folder for energy.json and energy.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = EnergyConfig(
        protocol=args.protocol,
        queries=args.queries,
        pool_queries=args.pool_queries,
        top=args.top,
        relax_top=args.relax_top,
        steps=args.steps,
        fmax=args.fmax,
        relax=args.relax,
        relax_budget_s=args.relax_budget,
        cost_probe=args.cost_probe,
        seed=args.seed,
        model=args.model,
        outcomes=args.outcomes,
        cache=args.cache,
        out=args.out,
    )
    result = run_energy(cfg, log=lambda m: print(m, flush=True))
    text = markdown(result)
    print(text)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "energy.json").write_text(json.dumps(result, indent=2, default=float))
        (out / "energy.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
