"""Command-line handlers of the hetero features (called from :mod:`cspml_flows.cli.main`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pymatgen.core import Composition


def train_hetero(args: argparse.Namespace) -> int:
    """``cspml train --hetero``: train the hetero model (with a core model) on the store."""
    from cspml_flows.core.config import model_path
    from cspml_flows.core.errors import ModelError
    from cspml_flows.learning.hetero.model import default_hetero_path
    from cspml_flows.learning.model import SimilarityModel, training_hash
    from cspml_flows.templates.index import TemplateIndex
    from cspml_flows.training.hetero import train_hetero as train

    index = TemplateIndex.open(args.store, workers=args.workers)
    core = None
    core_path = model_path(getattr(args, "core_model", None))
    if core_path.is_file():
        try:
            core = SimilarityModel.load(core_path)
            if core.meta.get("training_hash") != training_hash(index):
                print(f"core model {core_path} was trained on other templates: training a new one", file=sys.stderr)
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


def predictions(args: argparse.Namespace, comps: list[Composition]):
    """``cspml predict`` with ``--polymorphs K`` (hetero ranking) and/or ``--templates DIR`` (user files)."""
    from cspml_flows.predict.hetero_rank import HeteroPredictor
    from cspml_flows.predict.user_templates import read_user_structures

    user = read_user_structures(args.templates) if getattr(args, "templates", None) else None  # fail fast
    if getattr(args, "polymorphs", None):
        hp = HeteroPredictor.from_paths(args.store, getattr(args, "hetero_model", None), user, args.workers)
        return hp.predict(comps, polymorphs=args.polymorphs, strict=args.exclude_same_formula)
    from cspml_flows.core.config import model_path
    from cspml_flows.learning.model import SimilarityModel
    from cspml_flows.predict.predictor import CSPPredictor
    from cspml_flows.predict.user_templates import add_user_templates
    from cspml_flows.templates.index import TemplateIndex

    sim = SimilarityModel.load(model_path(args.model))
    index = TemplateIndex.open(args.store, workers=args.workers)
    index, _ = add_user_templates(index, user)
    return CSPPredictor(index, sim).predict(comps, top=args.top, strict=args.exclude_same_formula)


def inverse(args: argparse.Namespace) -> int:
    """``cspml inverse prototype.cif --elements ... --top N``."""
    from cspml_flows.cli.main import check_out
    from cspml_flows.learning.hetero.model import HeteroModel, default_hetero_path
    from cspml_flows.predict.dedup import symmetrize, to_cif
    from cspml_flows.predict.inverse import check_elements, inverse_from_structure, inverse_pool
    from cspml_flows.templates.importers import read_structure

    elements = check_elements(args.elements or [])  # bad input fails before any loading
    check_out(args.out)
    structure = read_structure(args.structure)
    model = HeteroModel.load(args.model or default_hetero_path())
    pool = inverse_pool(model, args.store, args.workers, log=lambda m: print(m, file=sys.stderr))
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


def add_hetero_parsers(sub) -> None:
    """Subcommand ``inverse`` (metastable and inverse campaigns run with ``cspml campaign run``)."""
    from cspml_flows.cli.main import positive

    s = sub.add_parser("inverse", help="rank compositions that crystallise in a given structure (hetero model)")
    s.add_argument("structure", help="CIF or POSCAR file of the structure (prototype)")
    s.add_argument("--elements", nargs="*", help="elements to substitute onto the structure's sites")
    s.add_argument("--top", type=positive, default=20)
    s.add_argument("--model", help="hetero model file (default $CSPML_HOME/models/hetero.json.gz)")
    s.add_argument("--store", help="template store whose prototypes the normalised score competes with")
    s.add_argument("--workers", type=positive, default=2)
    s.add_argument("--out", help="folder for CIF files and inverse.json")
    s.set_defaults(func=inverse)
