"""The core install without any optional extra: a real import, index and prediction in a fresh interpreter
where torch, chgnet, sevenn, fireworks, jobflow-remote and mp-api cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cspml_flows.core.config import DATA_ENV

OPTIONAL = ("torch", "chgnet", "sevenn", "fireworks", "jobflow_remote", "mp_api")

SCRIPT = textwrap.dedent(
    """
    import json, sys

    OPTIONAL = set(sys.argv[2].split(","))

    class BlockOptional:
        \"\"\"Import finder that makes the optional extras look uninstalled.\"\"\"

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in OPTIONAL:
                raise ImportError(f"{name} is blocked (optional extra)")
            return None

    sys.meta_path.insert(0, BlockOptional())

    from pathlib import Path

    import pandas as pd
    from pymatgen.core import Structure

    from cspml_flows import api
    from cspml_flows.core.config import data_dir
    from cspml_flows.templates.index import sync_index
    from cspml_flows.templates.store import TemplateStore

    work = Path(sys.argv[1])
    rows = pd.read_csv(data_dir() / "mp_20_biternary" / "val.csv.gz", nrows=40)[["material_id", "cif"]]
    rows.to_csv(work / "few.csv", index=False)
    store = str(work / "store")
    _, count, _ = api.import_structures("csv", [work / "few.csv"], store=store, workers=1)
    ts = TemplateStore.open(store)
    try:
        sync_index(ts, workers=1, load=False)
    finally:
        ts.close()
    formula = Structure.from_str(rows["cif"].iloc[0], fmt="cif").composition.reduced_formula
    (prediction,) = api.predict([formula], top=1, store=store, workers=1)
    best = prediction.candidates[0].structure if prediction.candidates else None
    print(json.dumps({
        "count": count,
        "formula": formula,
        "predicted": best.composition.reduced_formula if best is not None else None,
        "sites": len(best) if best is not None else 0,
        "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in OPTIONAL),
    }))
    """
)


def test_core_prediction_without_optional_extras(tmp_path: Path, data_dir: Path):
    env = {**os.environ, DATA_ENV: str(data_dir), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), ",".join(OPTIONAL)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["count"] == 40
    assert result["predicted"] == result["formula"]
    assert result["sites"] > 0
    assert result["loaded"] == []
