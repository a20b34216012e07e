"""CSP outcomes on the template pool: the ranker's training data.

Pool compositions are held out one formula at a time: the query is a template's composition, its
ground truth that template's structure, and its candidates come from the rest of the pool without any
template of its reduced formula (leave-one-formula-out, as the strict benchmark setting), or, for a ranker
of the standard setting, without the template itself only. The pair model
that scores them was trained without the query's formula (cross-fitting over formula folds), so the
features the ranker learns from look like those of a new composition. Each candidate is substituted
exactly as ``predict`` does it (template, then alternates under the 0.5 A rule) and labelled 1 when
``StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)`` matches it to the held-out structure.

Labels are cached on disk (gzipped JSON keyed by the index, the fold models and the queries).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core import progress
from cspml_flows.core.composition import MAX_ASSIGNMENTS, Roles
from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.safeio import read_json_gz, write_json_gz
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.predict.retrieve import Ranked, rank
from cspml_flows.predict.substitute import substitute
from cspml_flows.predict.validity import MIN_DISTANCE
from cspml_flows.templates.index import TemplateIndex

logger = logging.getLogger(__name__)

OUTCOMES_VERSION = 1


@dataclass
class Outcomes:
    """Per held-out query: its index row, its candidates (pair-model order) and their 0/1 match labels."""

    rows: list[int] = field(default_factory=list)
    candidates: list[list[Ranked]] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def extend(self, other: Outcomes) -> None:
        """Append ``other``'s queries."""
        self.rows += other.rows
        self.candidates += other.candidates
        self.labels += other.labels

    def to_json(self) -> dict[str, Any]:
        """The cache file's content: JSON types only."""
        return {
            "version": OUTCOMES_VERSION,
            "rows": self.rows,
            "candidates": [
                [[c.template, list(c.perm), c.score, c.cluster, list(c.alternates), list(c.stats)] for c in cands]
                for cands in self.candidates
            ],
            "labels": [lab.astype(int).tolist() for lab in self.labels],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Outcomes:
        """Inverse of :meth:`to_json`; ValueError for a cache of another version."""
        if d.get("version") != OUTCOMES_VERSION:
            raise ValueError("outcome cache of another version")
        cands = [
            [Ranked(int(t), tuple(p), float(s), int(c), tuple(a), tuple(st)) for t, p, s, c, a, st in row]
            for row in d["candidates"]
        ]
        return cls(list(d["rows"]), cands, [np.asarray(lab, dtype=np.int8) for lab in d["labels"]])


_FORKED: tuple[TemplateIndex, dict[int, list[Ranked]], np.ndarray | None] | None = None


def _label_chunk(rows: list[int]) -> list[np.ndarray]:
    """Worker: match every candidate of each held-out row against that row's own structure."""
    assert _FORKED is not None
    index, cands_of, volumes = _FORKED
    matcher = Matcher()
    out = []
    for i in rows:
        gt = matcher.reduce(index.structure(i))
        q = index.roles[i]
        out.append(np.array([candidate_matches(matcher, index, c, q, gt, volumes) for c in cands_of[i]], dtype=np.int8))
    return out


def candidate_matches(
    matcher: Matcher,
    index: TemplateIndex,
    c: Ranked,
    q: Roles,
    gt_reduced: Structure | None,
    volumes: np.ndarray | None = None,
) -> bool:
    """Whether candidate ``c`` of query roles ``q``, substituted as ``predict`` does it (template, then
    alternates under the 0.5 A rule), matches the reduced answer; a candidate predict drops never does."""
    for t in (c.template, *c.alternates):
        s, dmin = substitute(index, t, q, c.perm, volumes)
        if dmin >= MIN_DISTANCE:
            return matcher.rms(s, gt_reduced, first=True) is not None
    return False


def map_chunks_forked(fn, chunks: list[list[int]], workers: int, total: int) -> list:
    """``fn`` over ``chunks`` (concatenated results, in order) in ``workers`` forked processes where there are
    several chunks and fork exists, else here; ``fn`` reads its inputs from a module global set before."""
    out: list = []
    with progress.bar(total, "label candidates", unit="query") as shown:
        if workers > 1 and len(chunks) > 1 and "fork" in mp.get_all_start_methods():
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                for part in pool.map(fn, chunks):
                    out += part
                    shown.update(len(part))
        else:
            for ch in chunks:
                out += fn(ch)
                shown.update(len(ch))
    return out


def label_outcomes(
    index: TemplateIndex, model, rows: np.ndarray, k: int, workers: int = 2, chunk: int = 20, strict: bool = True
) -> Outcomes:
    """Candidates of the held-out ``rows`` (scored by ``model``, which must not have seen their formulas)
    and their match labels. ``strict``: no template of a query's formula is a candidate (else only the
    query's own template is left out, as in the standard benchmark setting)."""
    rows = [int(i) for i in rows]
    queries = [index.roles[i] for i in rows]
    exclude = [{str(index.ids[i])} for i in rows]
    ranked = rank(model, index, queries, top=k, exclude_ids=exclude, strict=strict, threads=workers)
    cands_of = dict(zip(rows, ranked, strict=True))
    global _FORKED
    _FORKED = (index, cands_of, model.volumes)
    chunks = [rows[s : s + chunk] for s in range(0, len(rows), chunk)]
    try:
        labels = map_chunks_forked(_label_chunk, chunks, workers, len(rows))
    finally:
        _FORKED = None
    return Outcomes(rows, ranked, labels)


def cached_outcomes(path: Path | None, build) -> tuple[Outcomes, bool]:
    """Outcomes from ``path`` if it holds a readable cache, else ``build()`` written there; (outcomes,
    whether the cache was used)."""
    if path is not None and path.is_file():
        try:
            return Outcomes.from_json(read_json_gz(path)), True
        except (OSError, EOFError, ValueError, KeyError, TypeError, zlib.error):
            logger.info("outcome cache %s is unreadable or of another version: rebuilt", path)
    out = build()
    if path is not None:
        write_json_gz(path, out.to_json())
    return out, False


def outcome_key(*parts: object) -> str:
    """Short hash of the parts' text (names a cache file)."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def fold_outcomes(
    index: TemplateIndex,
    n_queries: int,
    k: int,
    folds: int = 2,
    seed: int = 0,
    workers: int = 2,
    cache_dir: Path | None = None,
    pair_kwargs: dict | None = None,
    strict: bool = True,
) -> tuple[Outcomes, dict[str, float]]:
    """Outcomes for ``n_queries`` pool templates (one per reduced formula, at random), cross-fitted over
    ``folds`` formula folds: the queries of a fold are scored by a pair model trained on the other folds.
    ``strict``: see :func:`label_outcomes`. Returns the outcomes and timings."""
    rng = np.random.default_rng(seed)
    formulas = np.unique(index.formulas)
    pick = rng.permutation(len(formulas))[: min(n_queries, len(formulas))]
    chosen = formulas[pick]
    fold_of_formula = {f: i % folds for i, f in enumerate(chosen)}
    rows = []
    for f in chosen:
        members = np.flatnonzero(index.formulas == f)
        rows.append(int(rng.choice(members)))
    rows_arr = np.array(rows)
    fold = np.array([fold_of_formula[index.formulas[i]] for i in rows_arr])
    timings = {"pair_models_seconds": 0.0, "labels_seconds": 0.0}
    out = Outcomes()
    for f in range(folds):
        held = {formula for formula, fd in fold_of_formula.items() if fd == f}
        parts = [training_hash(index), seed, folds, f, k, n_queries, sorted(pair_kwargs or {}), MAX_ASSIGNMENTS]
        key = outcome_key(*parts, *([] if strict else ["standard"]))
        path = cache_dir / f"outcomes-{key}.json.gz" if cache_dir is not None else None

        def build(held=held, f=f) -> Outcomes:
            t = time.perf_counter()
            train = index.subset(~np.isin(index.formulas, list(held)))
            model, _ = SimilarityModel.train(train, seed=seed + f, check_labels=0, **(pair_kwargs or {}))
            timings["pair_models_seconds"] += time.perf_counter() - t
            t = time.perf_counter()
            res = label_outcomes(index, model, rows_arr[fold == f], k, workers, strict=strict)
            timings["labels_seconds"] += time.perf_counter() - t
            return res

        part, cached = cached_outcomes(path, build)
        note = " (label cache)" if cached else ""
        logger.info("fold %d/%d: %d held-out formulas%s", f + 1, folds, len(part.rows), note)
        out.extend(part)
    return out, timings
