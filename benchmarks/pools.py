"""Deterministic template pools for the scale benchmark, built from the shared benchmark data.

Pools (:func:`pool_spec`):

- ``12k``: the demo pool, ``mp_20_biternary/val`` and ``mpts_52/val`` imported as ``make demo`` imports them;
- ``27k``: the union of the four shared files, deduplicated by ``material_id``;
- any larger size (``150k``, ``1M``, ``46k``, ``150000``): the union plus generated templates up to that size.

The shared files are read in place through :func:`cspml_flows.core.config.data_dir`. Generated templates come from
the union's structures (the *parents*) by four recipes:

- ``order``: a 2x supercell along one axis in which the sites of one element in the upper half of the cell
  are taken by a chemically similar element (same family, :data:`FAMILIES`): a new anonymous formula and a
  new prototype (a layered ordering);
- ``anion``: an ordered part of the anion sites (the parent's most electronegative element, if it is an
  anion) replaced by a neighbouring anion of its family, in the cell or in a 2x supercell;
- ``vacancy``: a 2x supercell without the sites of one element in its upper half (ordered vacancies);
- ``relabel``: the parent with some elements replaced by same-family elements, each by a different element
  not in the parent. A relabelling moves no atom and keeps every site's orbit, so the structure has the
  parent's symmetry exactly: its document reuses the parent's space group, prototype label and primitive
  cell size instead of running spglib again, which keeps a million documents affordable.

Documents of the first three are built by :func:`template_doc_from_structure` (spglib symmetry, prototype
label). Every generated structure passes :func:`check_template_structure`. A generated document copies its
parent's ``e_above_hull``, names it in ``parent_id``, has source ``generated:<recipe>`` and the fixed
``last_updated`` :data:`GENERATED_AT`, so the same call gives byte-identical documents.

Which documents a pool holds: each parent has a list of recipes (:func:`benchmarks.pool_recipes.parent_recipes`: one new
structure per three relabellings, each kind shuffled by a generator seeded with the seed and the parent's id); a pool
takes recipe 0 of every parent (parents in ``material_id`` order), then recipe 1 of every parent that has
one, and so on (:func:`plan`). A smaller pool is a prefix of a larger one of the same seed, and the generated
id ``<parent id>~<ordinal>`` names the same document in every pool.

``python -m benchmarks.pools --size 150k`` writes a pool into ``<root>/<size>/store`` (default root
``/tmp/cspml-scale``), resumably: a rerun adds only the documents the store lacks. ``<root>/<size>/pool.json``
records the counts and the time spent generating and adding.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.logs import configure_logging
from benchmarks.pool_recipes import (
    ID_SEPARATOR,
    PoolError,
    generated_docs,
    iter_generated,
    planned_kinds,
    recipe_capacity,
)
from cspml_flows.api import import_structures
from cspml_flows.core.errors import CSPMLError
from cspml_flows.core.safeio import atomic_open
from cspml_flows.templates.schema import TemplateDoc
from cspml_flows.templates.store import TemplateStore

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/tmp/cspml-scale")
DEMO_FILES = ("mp_20_biternary/val.csv.gz", "mpts_52/val.csv.gz")
ALL_FILES = (*DEMO_FILES, "mp_20_biternary/test.csv.gz", "mpts_52/test.csv.gz")
REAL_POOLS = {"12k": DEMO_FILES, "27k": ALL_FILES}
UNION = "27k"  # the real pool every generated pool starts from
CHUNK = 2000  # documents per store write while generating


@dataclass(frozen=True)
class PoolSpec:
    """A pool: its label, the shared files it imports (real pools) or its target size (generated pools)."""

    label: str
    files: tuple[str, ...] = ()
    size: int | None = None

    @property
    def generated(self) -> bool:
        """Whether the pool holds generated templates (it has a target size)."""
        return self.size is not None


def parse_count(text: str) -> int:
    """``150k`` -> 150000, ``1M`` -> 1000000, ``46000`` -> 46000; PoolError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise PoolError(f"pool size {text!r} is not a number such as 150k, 1M or 46000")
    factor = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
    return round(float(m.group(1)) * factor)


def pool_spec(label: str) -> PoolSpec:
    """The pool a size label names: ``12k`` and ``27k`` are the real pools, any other size a generated one
    (at least as large as the union)."""
    if label in REAL_POOLS:
        return PoolSpec(label, files=REAL_POOLS[label])
    n = parse_count(label)
    return PoolSpec(label, size=n)


def pool_dir(label: str, root: Path = DEFAULT_ROOT) -> Path:
    """The folder of pool ``label``: its store and record."""
    return Path(root) / label


def store_path(label: str, root: Path = DEFAULT_ROOT) -> Path:
    """The template store folder of pool ``label``."""
    return pool_dir(label, root) / "store"


def read_manifest(label: str, root: Path = DEFAULT_ROOT) -> dict[str, Any] | None:
    """The pool's record, None where it has none (or an unreadable one)."""
    path = pool_dir(label, root) / "pool.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_manifest(label: str, root: Path, manifest: dict[str, Any]) -> None:
    """Write the pool's record ``<root>/<label>/pool.json`` (atomically)."""
    path = pool_dir(label, root) / "pool.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        json.dump(manifest, fh, indent=1)


def union_parents(root: Path = DEFAULT_ROOT) -> list[dict]:
    """The union pool's documents (the parents), in ``material_id`` order; PoolError if it is not built or was
    imported with another template schema (its documents would lack what this code stores with a template)."""
    path = store_path(UNION, root)
    manifest = read_manifest(UNION, root)
    if manifest is None or not manifest.get("complete"):
        raise PoolError(f"the union pool {path} is not built: run python -m benchmarks.pools --size {UNION}")
    with TemplateStore.open(path, create=False) as ts:
        docs = list(ts.docs())
    docs.sort(key=lambda d: str(d["material_id"]))
    stale = sum(not schema_current(d) for d in docs)
    if stale:
        raise PoolError(
            f"{stale} documents of the union pool {path} were imported with another template schema than this "
            f"code writes: remove {pool_dir(UNION, root)} and build it again"
        )
    return docs


def schema_current(doc: dict) -> bool:
    """Whether a stored document has the schema version and every field this code's TemplateDoc writes."""
    fields = TemplateDoc.model_fields
    return doc.get("schema_version") == fields["schema_version"].default and all(k in doc for k in fields)


def schema_record() -> dict[str, Any]:
    """The template schema this code writes: its version and fields (kept in a pool's record)."""
    return {
        "schema_version": TemplateDoc.model_fields["schema_version"].default,
        "fields": sorted(TemplateDoc.model_fields),
    }


def check_pool_schema(label: str, root: Path = DEFAULT_ROOT) -> None:
    """PoolError when the pool's record says its documents were written with another template schema than
    this code writes (a pool made before a schema change must be built again)."""
    if (read_manifest(label, root) or {}).get("schema") != schema_record():
        raise PoolError(
            f"pool {label} was written with another template schema than this code writes: remove "
            f"{pool_dir(label, root)} and build it again (python -m benchmarks.pools --size {label})"
        )


def import_real_pool(label: str, store: Path, workers: int = 2) -> dict[str, Any]:
    """Import a real pool's shared files into ``store`` with ``cspml import shared`` semantics (resumable);
    returns the count, wall seconds and structures per second of this call."""
    files = list(REAL_POOLS[label])
    t = time.perf_counter()
    reports, count, _ = import_structures("shared", files, store=store, workers=workers)
    seconds = time.perf_counter() - t
    added = sum(r.added for r in reports)
    failed = sum(len(r.failed) for r in reports)
    logger.info(
        "%s: imported %d structures (%d refused) in %.0f s; %d in the store", label, added, failed, seconds, count
    )
    return {"count": count, "added": added, "refused": failed, "seconds": seconds, "per_s": added / seconds}


def copy_store(source: Path, target: Path) -> None:
    """Copy a store folder (no writer may hold it): into a temporary folder, then renamed."""
    tmp = target.with_name(target.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.lock"))
    tmp.rename(target)


def base_pool(size: int, seed: int, root: Path) -> str:
    """The complete pool to start a generated pool from: the largest smaller generated pool of the same seed
    (its documents are a prefix of this one's), else the union."""
    best, best_size = UNION, 0
    for folder in Path(root).iterdir() if Path(root).is_dir() else []:
        m = read_manifest(folder.name, root)
        if m and m.get("complete") and m.get("seed") == seed and m.get("generated") and best_size < m["size"] < size:
            best, best_size = folder.name, m["size"]
    return best


def build_real_pool(label: str, root: Path, workers: int) -> dict[str, Any]:
    """Import a real pool from the shared files (or return its finished manifest)."""
    done = read_manifest(label, root)
    if done and done.get("complete"):
        return done
    store = store_path(label, root)
    t = time.perf_counter()
    info = import_real_pool(label, store, workers)
    manifest = {
        "label": label,
        "generated": False,
        "files": list(pool_spec(label).files),
        "size": info["count"],
        "n_real": info["count"],
        "n_generated": 0,
        "import": info,
        "seconds": time.perf_counter() - t,
        "complete": True,
        "schema": schema_record(),
    } | label_groups(store)
    write_manifest(label, root, manifest)
    return manifest


def start_generated(label: str, size: int, root: Path, seed: int, n_union: int) -> dict[str, Any]:
    """The manifest a generated pool continues from; a new pool's store starts as a copy of the largest
    complete smaller pool (:func:`base_pool`)."""
    manifest = read_manifest(label, root) or {}
    if manifest and (manifest.get("seed") != seed or manifest.get("size") != size):
        raise PoolError(f"{pool_dir(label, root)} holds a pool of another seed or size: remove it first")
    store = store_path(label, root)
    if not store.exists():
        base = base_pool(size, seed, root)
        t = time.perf_counter()
        copy_store(store_path(base, root), store)
        logger.info("%s: started from a copy of pool %s (%.0f s)", label, base, time.perf_counter() - t)
        inherited = ("worker_cpu_seconds", "add_seconds", "wall_seconds")  # the copied documents' cost
        manifest = {"copied_from": base} | {
            k: v for k, v in (read_manifest(base, root) or {}).items() if k in inherited
        }
    manifest |= {"label": label, "generated": True, "seed": seed, "size": size, "n_real": n_union}
    manifest["schema"] = schema_record()
    manifest.setdefault("worker_cpu_seconds", 0.0)
    manifest.setdefault("add_seconds", 0.0)
    manifest.setdefault("wall_seconds", 0.0)
    manifest["complete"] = False
    return manifest


def add_generated(
    label: str, root: Path, manifest: dict[str, Any], parents: list[dict], n_gen: int, seed: int, workers: int
) -> tuple[int, list[tuple[str, str]]]:
    """Generate the documents the pool's store lacks and add them in batches of :data:`CHUNK` (the manifest
    rewritten after each); returns the store's count and the failed recipes."""
    with TemplateStore.open(store_path(label, root)) as ts:
        existing = {i for i in ts.ids() if ID_SEPARATOR in i}
        todo = n_gen - len(existing)
        logger.info("%s: %d of %d generated templates present, %d to build", label, len(existing), n_gen, todo)
        t0 = time.perf_counter()
        pending: list[dict] = []
        failed: list[tuple[str, str]] = list(map(tuple, manifest.get("failed", [])))
        done = 0

        def flush() -> None:
            nonlocal pending
            t = time.perf_counter()
            ts.add(pending, assume_new=True)
            manifest["add_seconds"] += time.perf_counter() - t
            pending = []

        for docs, cpu in iter_generated(parents, 0, n_gen, seed, workers, skip=existing):
            manifest["worker_cpu_seconds"] += cpu
            for d in docs:
                if isinstance(d, dict):
                    pending.append(d)
                else:
                    failed.append(d)
            done += len(docs)
            if len(pending) >= CHUNK:
                flush()
                wall = time.perf_counter() - t0
                manifest["failed"] = failed[:50]
                write_manifest(label, root, manifest | {"wall_seconds": manifest["wall_seconds"] + wall})
                logger.info("%s: %d/%d built, %.0f/s", label, done, todo, done / wall)
        if pending:
            flush()
        manifest["wall_seconds"] += time.perf_counter() - t0
        return ts.count(), failed


def build_pool(label: str, root: Path = DEFAULT_ROOT, seed: int = 0, workers: int = 2) -> dict[str, Any]:
    """Build (or finish) the pool ``label`` in ``<root>/<label>/store`` and return its manifest.

    A real pool is imported from the shared files. A generated pool starts as a copy of the union (or of the
    largest complete smaller pool of the same seed), then gets the generated documents it lacks, written in
    batches of :data:`CHUNK` with :meth:`TemplateStore.add`; a killed run keeps every batch written."""
    spec = pool_spec(label)
    if not spec.generated:
        return build_real_pool(label, root, workers)
    parents = union_parents(root)
    n_union = len(parents)
    if spec.size < n_union:
        raise PoolError(f"pool size {label} is smaller than the union of the shared files ({n_union})")
    n_gen = spec.size - n_union
    capacity = recipe_capacity(parents, seed)
    if n_gen > capacity:
        raise PoolError(f"pool size {label}: the recipes allow at most {n_union + capacity} templates")
    manifest = start_generated(label, spec.size, root, seed, n_union)
    count, failed = add_generated(label, root, manifest, parents, n_gen, seed, workers)
    manifest |= {
        "n_generated": count - n_union,
        "by_recipe": planned_kinds(parents, n_gen, seed),
        "n_failed": len(failed),
        "failed": failed[:50],
        "complete": count == spec.size,
    }
    if manifest["wall_seconds"] > 0:
        manifest["generated_per_s"] = manifest["n_generated"] / manifest["wall_seconds"]
    if manifest["complete"] and "label_groups" not in manifest:
        manifest |= label_groups(store_path(label, root))
    write_manifest(label, root, manifest)
    logger.info("%s: %d templates (%d generated, %d failed)", label, count, manifest["n_generated"], len(failed))
    return manifest


def label_groups(store: Path) -> dict[str, int]:
    """Distinct (anonymous formula, primitive cell size, prototype label) of a store's templates: an upper
    bound on its prototype clusters (the index merges groups whose structures match), and the anonymous
    formulas. A template without a label counts as a group of its own."""
    groups: set[tuple] = set()
    anon: set[str] = set()
    unlabelled = 0
    with TemplateStore.open(store, create=False) as ts:
        for row in ts.rows():  # streamed: a query through montydb would hold every document at once
            d = row.doc()
            anon.add(d["anonymous_formula"])
            if d.get("prototype"):
                groups.add((d["anonymous_formula"], d.get("nsites_primitive"), d["prototype"]))
            else:
                unlabelled += 1
    return {"label_groups": len(groups) + unlabelled, "anonymous_formulas": len(anon)}


def reserve_docs(label: str, count: int, root: Path = DEFAULT_ROOT, seed: int = 0, workers: int = 2) -> list[dict]:
    """``count`` generated documents that pool ``label`` does not hold (the slots after its own), to add to it:
    the same for every call."""
    spec = pool_spec(label)
    parents = union_parents(root)
    start = spec.size - len(parents) if spec.generated else 0
    return generated_docs(parents, start, count, seed, workers)


def main(argv: list[str] | None = None) -> int:
    """Build the pools named by ``--size`` (the union first where a generated pool needs it)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pools",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", action="append", required=True, help="12k, 27k, 150k, 1M or another size; repeatable")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="pools go to <root>/<size>/store")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    configure_logging()
    root = args.root.expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if root == repo or repo in root.parents:
        print(f"error: pools are not written inside the repository ({root})", file=sys.stderr)
        return 2
    os.environ.setdefault("CSPML_HOME", str(root / "home"))  # caches of the import stay beside the pools
    try:
        for label in args.size:
            if pool_spec(label).generated and not (read_manifest(UNION, root) or {}).get("complete"):
                build_pool(UNION, root, args.seed, args.workers)
            build_pool(label, root, args.seed, args.workers)
    except CSPMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
