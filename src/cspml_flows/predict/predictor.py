"""The prediction API: compositions in, ranked pymatgen Structures out."""

from __future__ import annotations

import gc
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydantic import ConfigDict, Field
from pymatgen.core import Composition, Structure

from cspml_flows.core import progress
from cspml_flows.core.composition import MAX_ASSIGNMENTS, Roles, as_composition, roles
from cspml_flows.core.config import model_path
from cspml_flows.core.descriptors import magpie_stats
from cspml_flows.core.equivalence import Matcher
from cspml_flows.core.schemas import QueryResult
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.learning.ranker import CANDIDATES
from cspml_flows.predict.retrieve import Ranked, overfetch, rank
from cspml_flows.predict.substitute import substitute
from cspml_flows.predict.validity import MIN_DISTANCE, smact_valid
from cspml_flows.templates.index import TemplateIndex


@dataclass
class Candidate:
    """One predicted structure."""

    rank: int
    structure: Structure
    score: float
    template_id: str
    template_formula: str
    prototype: str | None
    template_spacegroup: int
    min_distance: float
    assignment: dict[str, str]

    def summary(self) -> dict:
        """JSON-ready fields (the structure left out; score and distance rounded)."""
        return {
            "rank": self.rank,
            "score": round(self.score, 4),
            "template_id": self.template_id,
            "template_formula": self.template_formula,
            "prototype": self.prototype,
            "template_spacegroup": self.template_spacegroup,
            "min_distance": round(self.min_distance, 3),
            "assignment": self.assignment,
        }


class Prediction(QueryResult):
    """Ranked candidates for one composition. ``smact_valid`` flags charge neutrality (not a filter)."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    candidates: list[Candidate] = Field(default_factory=list, description="distinct structures, best first")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a batch (restored after).

    An index holds millions of small objects (structure dicts), and the full collections that building many
    candidate structures triggers walk all of them each time. The batch itself makes no reference cycles
    worth collecting; forked workers inherit the paused state.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def freeze_gc() -> None:
    """Move every object alive now out of the cyclic collector's generations (``gc.freeze``).

    Process-wide, so the library never does it: a program that owns its process (the command line, a
    benchmark) calls it once its index and model are loaded, after which the full collection that follows
    each prediction batch no longer walks the index's long-lived objects (it dominates small batches).
    """
    gc.freeze()


PARALLEL_MIN = 100  # compositions per process below which building structures stays in this process
CHUNK = 50  # compositions per task sent to a worker process
_FORKED: tuple[CSPPredictor, int, bool] | None = None  # what forked workers build with


def _build_chunk(jobs: list[tuple[Composition, list[Ranked]]]) -> list[Prediction]:
    """Worker side of :meth:`CSPPredictor.realize`: the predictor was inherited through fork."""
    assert _FORKED is not None
    predictor, top, dedup = _FORKED
    return [predictor._build(c, roles(c), cands, top, dedup) for c, cands in jobs]


class CSPPredictor:
    """Template retrieval with the learned similarity, element substitution, validity gate and dedup."""

    def __init__(
        self,
        index: TemplateIndex,
        model: SimilarityModel | None,
        prefilter: int = 48,
        workers: int = 1,
        max_assignments: int = MAX_ASSIGNMENTS,
        volumes: np.ndarray | None = None,
    ):
        self.index = index
        self.model = model
        # element volumes that rescale substituted cells (by atomic number; default the model's learned ones)
        self.volumes = model.volumes if volumes is None and model is not None else volumes
        self.prefilter = prefilter
        self.max_assignments = max_assignments  # element-to-site assignments per composition (fewest swaps first)
        self.workers = workers  # processes that build structures for large batches (forked; see realize)
        self._matcher = Matcher()
        self._reduced_cache: dict[tuple[int, tuple[int, ...]], Structure | None] = {}

    @classmethod
    def from_paths(
        cls,
        store: str | Path | None = None,
        model: str | Path | None = None,
        workers: int = 2,
        freeze: bool = False,
    ) -> CSPPredictor:
        """Open a template store (default: embedded) and a trained model (default: ``$CSPML_HOME``).

        ``freeze`` calls :func:`freeze_gc` once both are loaded (for a caller that owns its process).
        """
        sim = SimilarityModel.load(model_path(model))
        index = TemplateIndex.open(store, workers=workers)
        if freeze:
            freeze_gc()
        return cls(index, sim, workers=workers)

    def predict(
        self,
        compositions: Sequence[str | Composition],
        top: int = 5,
        exclude_ids: Sequence[set[str]] | None = None,
        strict: bool = False,
        metric: str = "learned",
        dedup: bool = True,
    ) -> list[Prediction]:
        """Predict ``top`` distinct structures for each composition (invalid formulas raise CompositionError)."""
        with gc_paused():
            return self._predict(compositions, top, exclude_ids, strict, metric, dedup)

    def _predict(self, compositions, top, exclude_ids, strict, metric, dedup) -> list[Prediction]:
        comps = [as_composition(c) for c in compositions]
        rl = [roles(c) for c in comps]
        ranker = self.model.ranker if self.model is not None and metric == "learned" else None
        wanted = overfetch(top) if dedup else top
        ranked = rank(
            self.model,
            self.index,
            rl,
            top=max(wanted, CANDIDATES) if ranker is not None else wanted,
            exclude_ids=exclude_ids,
            strict=strict,
            prefilter=self.prefilter,
            max_perms=self.max_assignments,
            metric=metric,
            threads=self.workers,
        )
        if ranker is not None:
            q_stats = magpie_stats([r.reduced_formula for r in rl])
            ranked = ranker.rerank(self.index, rl, ranked, self.model.std, q_stats, self.workers)
        return self.realize(comps, ranked, top, dedup)

    def realize(
        self, comps: Sequence[Composition], ranked: Sequence[list[Ranked]], top: int, dedup: bool = True
    ) -> list[Prediction]:
        """Turn ranked (template, assignment) lists into structures: substitute, gate, deduplicate.

        Batches of at least ``PARALLEL_MIN`` compositions are split over ``workers`` forked processes (pure
        Python and numpy work; the model is not called there); the result is the same.
        """
        jobs = list(zip(comps, ranked, strict=True))
        n_proc = min(self.workers, len(jobs) // PARALLEL_MIN)
        if n_proc > 1 and "fork" in mp.get_all_start_methods():
            global _FORKED
            _FORKED = (self, top, dedup)
            chunks = [jobs[i : i + CHUNK] for i in range(0, len(jobs), CHUNK)]
            out: list[Prediction] = []
            try:
                with (
                    progress.bar(len(jobs), "build structures", unit="composition") as shown,
                    ProcessPoolExecutor(n_proc, mp_context=mp.get_context("fork")) as pool,
                ):
                    for part in pool.map(_build_chunk, chunks):
                        out.extend(part)
                        shown.update(len(part))
            finally:
                _FORKED = None
            return out
        return [
            self._build(c, roles(c), cands, top, dedup)
            for c, cands in progress.track(jobs, len(jobs), "build structures", unit="composition")
        ]

    def _build(self, comp: Composition, r: Roles, cands: list[Ranked], top: int, dedup: bool) -> Prediction:
        pred = Prediction(
            formula=comp.reduced_formula, anonymous_formula=r.anonymous_formula, smact_valid=smact_valid(comp)
        )
        if not cands:
            n_anon = len(self.index.by_anon.get(r.anonymous_formula, []))
            pred.message = (
                f"no usable template with anonymous formula {r.anonymous_formula} for {comp.reduced_formula} "
                f"({n_anon} in the store before exclusions, {len(self.index)} templates in all)"
            )
            return pred
        kept: list[tuple[Ranked, Structure, float]] = []
        self._reduced_cache.clear()
        for c in cands:
            for t in (c.template, *c.alternates):
                s, dmin = substitute(self.index, t, r, c.perm, self.volumes)
                if dmin >= MIN_DISTANCE:
                    c = replace(c, template=t, alternates=())
                    break
            else:
                continue
            if dedup and any(self._equivalent(k, ks, c, s) for k, ks, _ in kept):
                continue
            kept.append((c, s, dmin))
            if len(kept) >= top:
                break
        for i, (c, s, dmin) in enumerate(kept):
            t_roles = self.index.roles[c.template]
            pred.candidates.append(
                Candidate(
                    rank=i + 1,
                    structure=s,
                    score=c.score,
                    template_id=str(self.index.ids[c.template]),
                    template_formula=str(self.index.formulas[c.template]),
                    prototype=self.index.prototype[c.template] or None,
                    template_spacegroup=int(self.index.spacegroup[c.template]),
                    min_distance=dmin,
                    assignment={t_roles.elements[k]: r.elements[j] for k, j in enumerate(c.perm)},
                )
            )
        if not pred.candidates:
            pred.message = f"every candidate for {comp.reduced_formula} failed the {MIN_DISTANCE} A distance rule"
        return pred

    def _equivalent(self, a: Ranked, sa: Structure, b: Ranked, sb: Structure) -> bool:
        """Whether two candidates are the same crystal: on one template, by the template's role symmetry;
        otherwise by StructureMatcher when the templates share primitive-cell size and either a prototype
        cluster or space group and element-independent prototype label (substitution and volume scaling can
        bring two templates of different clusters onto one structure)."""
        if a.template == b.template:
            return any(
                all(b.perm[g[r]] == a.perm[r] for r in range(len(g))) for g in self.index.role_symmetries(a.template)
            )
        ix, i, j = self.index, a.template, b.template
        if ix.nprim[i] != ix.nprim[j]:
            return False  # primitive cells of different size cannot give the same crystal
        same_label = ix.spacegroup[i] == ix.spacegroup[j] and ix.prototype[i] == ix.prototype[j]
        if ix.cluster[i] != ix.cluster[j] and not same_label:
            return False  # another prototype cluster with another space group or Wyckoff occupation
        return self._matcher.fit(self._reduced(a, sa), self._reduced(b, sb), reduced=True)

    def _reduced(self, c: Ranked, s: Structure) -> Structure | None:
        """Primitive Niggli cell of a candidate, computed once per prediction (the bulk of a fit's cost)."""
        key = (c.template, c.perm)
        if key not in self._reduced_cache:
            self._reduced_cache[key] = self._matcher.reduce(s)
        return self._reduced_cache[key]
