"""The two benchmark protocols of ``shared/data/README.md``: queries, template pool, exclusion rules."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition, Structure

from cspml_flows.core.composition import roles
from cspml_flows.core.config import data_dir, home_dir
from cspml_flows.core.errors import ConfigError
from cspml_flows.core.safeio import read_json_gz, write_json_gz
from cspml_flows.templates.importers import import_csv
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.readers import structure_from_cif_string
from cspml_flows.templates.store import TemplateStore

logger = logging.getLogger(__name__)

PROTOCOLS = {
    "mp20bt": {
        "queries": "mp_20_biternary/test.csv.gz",
        "pool": ["mp_20_biternary/val.csv.gz", "mpts_52/val.csv.gz", "mpts_52/test.csv.gz"],
    },
    "mpts52": {"queries": "mpts_52/test.csv.gz", "pool": ["mpts_52/val.csv.gz"]},
}
SETTINGS = ("standard", "strict")
SLICES = ("all", "tie-heavy")  # tie-heavy: a group of at least three elements in equal amounts (>= 6 assignments)


@dataclass
class Queries:
    """Query rows of a protocol: ids and CIF texts, in file order."""

    material_ids: list[str]
    cifs: list[str]

    def __len__(self) -> int:
        return len(self.material_ids)


def _check(protocol: str) -> dict:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def formula_from_cif(cif: str) -> str:
    """Reduced formula from a CIF's ``_chemical_formula_sum`` line (no structure parsing)."""
    for line in cif.splitlines():
        if line.startswith("_chemical_formula_sum"):
            return Composition(line.split(None, 1)[1].strip().strip("'\"")).reduced_formula
    return structure_from_cif_string(cif).composition.reduced_formula


def is_tie_heavy(formula: str) -> bool:
    """At least three elements share one amount (ABX3 with mixed anions, ABCDE): six or more assignments."""
    return max(len(g) for g in roles(formula).tie_groups()) >= 3


def load_queries(
    protocol: str, limit: int | None = None, seed: int = 0, root: Path | None = None, subset: str = "all"
) -> Queries:
    """Query rows of a protocol; ``subset='tie-heavy'`` keeps those of :func:`is_tie_heavy`; ``limit`` then
    draws a fixed-seed sample (sorted by position in the file)."""
    spec = _check(protocol)
    if subset not in SLICES:
        raise ConfigError(f"unknown query slice {subset!r}; choose one of {', '.join(SLICES)}")
    df = pd.read_csv((root or data_dir()) / spec["queries"], usecols=["material_id", "cif"])
    if subset == "tie-heavy":
        df = df[[is_tie_heavy(formula_from_cif(c)) for c in df["cif"]]]
    if limit is not None and limit < len(df):
        idx = np.sort(np.random.default_rng(seed).choice(len(df), size=limit, replace=False))
        df = df.iloc[idx]
    return Queries(df["material_id"].astype(str).tolist(), df["cif"].tolist())


def pool_store(protocol: str, workers: int = 2, progress=None, root: Path | None = None) -> TemplateStore:
    """The protocol's template pool imported into an embedded store under ``$CSPML_HOME`` (resumable).

    Files are imported in the README's order; ``material_id`` deduplicates the union.
    """
    spec = _check(protocol)
    root = root or data_dir()
    folder = home_dir() / "benchmark" / f"pool-{protocol}"
    store = TemplateStore.open(folder)
    marker = folder / "IMPORTED.json"
    stamp = {rel: (root / rel).stat().st_size for rel in spec["pool"]}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return store  # a finished import of these very files: skip the id scan of ~20k documents
    for rel in spec["pool"]:
        import_csv(store, root / rel, source=rel, workers=workers, progress=progress)
    marker.write_text(json.dumps(stamp))
    return store


def pool_index(protocol: str, workers: int = 2, store: TemplateStore | None = None) -> TemplateIndex:
    """The protocol's pool index without any query of the protocol (the pool every benchmark predicts from).

    ``store``: another template store to index instead of :func:`pool_store` (closed here as well).
    """
    store = store if store is not None else pool_store(protocol, workers=workers)
    index = TemplateIndex.from_store(store, workers=workers)
    store.close()
    return without_queries(index, protocol)


def without_queries(index: TemplateIndex, protocol: str) -> TemplateIndex:
    """``index`` without the templates whose ids are queries of the protocol."""
    return index.subset(~np.isin(index.ids, load_queries(protocol).material_ids))


def parse_query(args: tuple[str, str]) -> Structure:
    """The structure of one ``(material_id, cif)`` query row."""
    return structure_from_cif_string(args[1], args[0])


def cached_structures(path: Path, build: Callable[[], list[Structure]]) -> list[Structure]:
    """Structures from a gzipped-JSON cache (``Structure.as_dict``; never unpickled), else ``build()`` written
    there atomically; an unreadable cache is rebuilt."""
    if path.is_file():
        try:
            return [Structure.from_dict(d) for d in read_json_gz(path)]
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
            logger.warning("unreadable query cache %s: rebuilding it", path, exc_info=True)
    value = build()
    write_json_gz(path, [s.as_dict() for s in value])
    return value


def query_structures(protocol: str, ids: list[str], cifs: list[str], workers: int) -> list[Structure]:
    """The queries' structures, parsed in ``workers`` processes and cached under ``$CSPML_HOME/benchmark``."""
    key = hashlib.sha1("|".join(ids).encode()).hexdigest()[:12]

    def build() -> list[Structure]:
        if workers > 1 and len(ids) > 50:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(parse_query, zip(ids, cifs, strict=True), chunksize=64))
        return [parse_query(a) for a in zip(ids, cifs, strict=True)]

    return cached_structures(home_dir() / "benchmark" / f"queries-{protocol}-{key}.json.gz", build)
