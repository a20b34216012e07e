"""The two benchmark protocols of ``shared/data/README.md``: queries, template pool, exclusion rules."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cspml_flows.config import data_dir, home_dir
from cspml_flows.errors import ConfigError
from cspml_flows.templates.importers import import_csv
from cspml_flows.templates.store import TemplateStore

PROTOCOLS = {
    "mp20bt": {
        "queries": "mp_20_biternary/test.csv.gz",
        "pool": ["mp_20_biternary/val.csv.gz", "mpts_52/val.csv.gz", "mpts_52/test.csv.gz"],
    },
    "mpts52": {"queries": "mpts_52/test.csv.gz", "pool": ["mpts_52/val.csv.gz"]},
}
SETTINGS = ("standard", "strict")


@dataclass
class Queries:
    material_ids: list[str]
    cifs: list[str]

    def __len__(self) -> int:
        return len(self.material_ids)


def _check(protocol: str) -> dict:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def load_queries(protocol: str, limit: int | None = None, seed: int = 0, root: Path | None = None) -> Queries:
    """Query rows of a protocol; ``limit`` draws a fixed-seed sample (sorted by position in the file)."""
    spec = _check(protocol)
    df = pd.read_csv((root or data_dir()) / spec["queries"], usecols=["material_id", "cif"])
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
