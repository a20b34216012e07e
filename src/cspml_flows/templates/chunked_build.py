"""A full index build split into chunks that separate processes can run (one jobflow job each).

The plan fixes the store's position and cuts its sorted template ids into ranges; each chunk turns the
documents of its range into index segments in a staging folder beside the index; the assembly moves them
into the index folder, merges, clusters and commits them exactly as a one-process build does, then applies
the store's changes since the plan's position (an incremental update). The result equals
``sync_index(store, rebuild=True)``. Chunks need the index folder on a filesystem every worker sees (the
``CSPML_HOME`` of a cluster's shared home or scratch).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cspml_flows.core.config import max_template_atoms
from cspml_flows.templates.index import sync_index
from cspml_flows.templates.index_rows import id_ranges, warn_left_out, write_row_segments
from cspml_flows.templates.index_update import IndexReport, IndexUpdater, base_signature, index_dir
from cspml_flows.templates.manifest import remove_unreferenced, update_lock
from cspml_flows.templates.segments import new_token
from cspml_flows.templates.store import TemplateStore


@dataclass
class IndexPlan:
    """Where a chunked build starts: the store's position and the id ranges ``[bounds[k], bounds[k+1])``
    (the last range is open above), and the staging folder the chunks write to."""

    position: str
    bounds: list[str]
    staging: str
    signature: str

    @property
    def n_chunks(self) -> int:
        """How many chunks the plan has."""
        return len(self.bounds)


@dataclass
class ChunkResult:
    """The segments one chunk wrote (names inside the plan's staging folder) and the ids it left out."""

    segments: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def plan_build(store: TemplateStore, chunk_size: int) -> IndexPlan:
    """Cut the store's ids into ranges of ``chunk_size`` templates; the store's position is taken first,
    so that what changes while the chunks run is applied after the assembly."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    store.require_nonempty()
    position = store.position()
    bounds = [ids[0] for ids in id_ranges(store.ids(), chunk_size)]
    root = index_dir(store)
    staging = root / f"chunks-{new_token()}"  # inside the index folder: chunks are moved in by renaming
    staging.mkdir(parents=True)
    return IndexPlan(position, bounds, str(staging), base_signature(store))


def _chunk_ids(store: TemplateStore, plan: IndexPlan, k: int) -> list[str]:
    lo = plan.bounds[k]
    hi = plan.bounds[k + 1] if k + 1 < plan.n_chunks else None
    return sorted(i for i in store.ids() if lo <= i and (hi is None or i < hi))


def build_chunk(store: TemplateStore, plan: IndexPlan, k: int, workers: int = 1) -> ChunkResult:
    """Index segments of the templates in the plan's ``k``-th id range, written to the staging folder."""
    if not 0 <= k < plan.n_chunks:
        raise ValueError(f"chunk {k} is not one of the plan's {plan.n_chunks}")
    staging = Path(plan.staging) / f"chunk-{k}"
    shutil.rmtree(staging, ignore_errors=True)  # a chunk that ran before and was killed
    staging.mkdir(parents=True)
    rows = store.rows(_chunk_ids(store, plan, k))
    names, skipped = write_row_segments(staging, rows, workers, max_template_atoms())
    return ChunkResult([f"chunk-{k}/{n}" for n in names], skipped)


def assemble(store: TemplateStore, plan: IndexPlan, parts: list[ChunkResult], workers: int = 1) -> IndexReport:
    """Commit the chunks' segments as the store's index, then bring it up to the store's current position."""
    if len(parts) != plan.n_chunks:
        raise ValueError(f"{len(parts)} chunk results for a plan of {plan.n_chunks} chunks")
    if base_signature(store) != plan.signature:
        raise ValueError("the index version or settings changed since the plan: plan the build again")
    root = index_dir(store)
    staging = Path(plan.staging)
    skipped = [i for p in parts for i in p.skipped]
    with update_lock(root):
        remove_unreferenced(root, None)
        names = []
        for p in parts:
            for rel in p.segments:
                name = Path(rel).name
                os.replace(staging / rel, root / name)
                names.append(name)
        updater = IndexUpdater(root, store, workers, plan.signature)
        updater.assemble(names, skipped, plan.position)
    shutil.rmtree(staging, ignore_errors=True)
    warn_left_out(len(skipped), store, max_template_atoms())
    _, report = sync_index(store, workers=workers, load=False)
    return report
