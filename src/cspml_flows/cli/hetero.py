"""Command-line handlers of the hetero features: ``cspml train --hetero``, ``cspml predict --polymorphs`` or
``--templates``, ``cspml inverse``."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pymatgen.core import Composition

from cspml_flows.cli.options import check_out
from cspml_flows.core.config import model_path
from cspml_flows.core.errors import ModelError
from cspml_flows.learning.hetero.model import HeteroModel, default_hetero_path
from cspml_flows.learning.model import SimilarityModel, training_hash
from cspml_flows.predict.dedup import symmetrize, to_cif
from cspml_flows.predict.hetero_rank import HeteroPredictor
from cspml_flows.predict.inverse import check_elements, inverse_from_structure, inverse_pool
from cspml_flows.predict.predictor import CSPPredictor, Prediction, freeze_gc
from cspml_flows.predict.user_templates import add_user_templates, read_user_structures
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.readers import read_structure
from cspml_flows.training.hetero import train_hetero as train

logger = logging.getLogger(__name__)


def train_hetero(args: argparse.Namespace) -> int:
    """``cspml train --hetero``: train the hetero model (with a core model) on the store."""
    index = TemplateIndex.open(args.store, workers=args.workers)
    core = None
    core_path = model_path(args.core_model)
    if core_path.is_file():
        try:
            core = SimilarityModel.load(core_path)
            if core.meta.get("training_hash") != training_hash(index):
                logger.warning("core model %s was trained on other templates: training a new one", core_path)
                core = None
        except ModelError:
            core = None
    t = time.perf_counter()
    model, report = train(index, core=core, seed=args.seed, workers=args.workers)
    path = model.save(args.model or default_hetero_path())
    for name, m in (report.get("variants") or {}).items():
        print(
            f"held-out formulas, {name}: recall@1 {m['recall@1']:.3f} recall@5 {m['recall@5']:.3f} "
            f"MRR {m['mrr']:.3f} (n={m['n']})"
        )
    print(f"fusion lam={model.lam} mu={model.mu}; trained in {time.perf_counter() - t:.0f} s -> {path}")
    return 0


def predictions(args: argparse.Namespace, comps: list[Composition]) -> list[Prediction]:
    """``cspml predict`` with ``--polymorphs K`` (hetero ranking) and/or ``--templates DIR`` (user files)."""
    user = read_user_structures(args.templates) if args.templates else None  # fail fast
    if args.polymorphs:
        hp = HeteroPredictor.from_paths(args.store, args.hetero_model, user, args.workers)
        freeze_gc()  # this process owns the index: its objects leave the collector's generations
        return hp.predict(comps, polymorphs=args.polymorphs, strict=args.exclude_same_formula)

    sim = SimilarityModel.load(model_path(args.model))
    index = TemplateIndex.open(args.store, workers=args.workers)
    index, _ = add_user_templates(index, user)
    freeze_gc()
    return CSPPredictor(index, sim).predict(comps, top=args.top, strict=args.exclude_same_formula)


def inverse(args: argparse.Namespace) -> int:
    """``cspml inverse prototype.cif --elements ... --top N``."""
    elements = check_elements(args.elements or [])  # bad input fails before any loading
    check_out(args.out)
    structure = read_structure(args.structure)
    model = HeteroModel.load(args.model or default_hetero_path())
    pool = inverse_pool(model, args.store, args.workers)
    res = inverse_from_structure(model, structure, elements, top=args.top, name=Path(args.structure).name, pool=pool)
    print(
        f"{Path(args.structure).name}: {res.template_formula} ({res.anonymous_formula}); {res.n_enumerated} "
        f"substitutions, {res.n_charge_balanced} charge-balanced (SMACT)"
    )
    print(f"  {'rank':>4} {'score':>8}  {'formula':<16} assignment")
    out = Path(args.out) if args.out else None
    rows = []
    for c in res.candidates:
        assign = " ".join(f"{k}->{v}" for k, v in c.assignment.items())
        print(f"  {c.rank:>4} {c.score:>8.3f}  {c.formula:<16} {assign}")
        row = c.summary()
        if out and c.structure is not None:
            out.mkdir(parents=True, exist_ok=True)
            sym, _, symbol = symmetrize(c.structure)
            f = out / f"{c.rank:02d}_{c.formula}_{symbol.replace('/', '_')}.cif"
            f.write_text(to_cif(sym))
            row["cif"] = str(f)
        rows.append(row)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "inverse.json").write_text(json.dumps({"structure": str(args.structure), "candidates": rows}, indent=2))
        print(f"\nCIFs and inverse.json written to {out}")
    return 0
