"""Predict structures for compositions with the Python API (the same calls the CLI makes).

    python workflows/predict_compositions.py SrTiO3 Li3PS4 --top 3 --out out/predict

Needs a filled template store and a trained model: run ``cspml demo`` (or ``cspml import`` + ``cspml train``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cspml_flows.predict.dedup import symmetrize, to_cif
from cspml_flows.predict.predictor import CSPPredictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compositions", nargs="+")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--out", default="out/predict")
    args = parser.parse_args()
    predictor = CSPPredictor.from_paths()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for pred in predictor.predict(args.compositions, top=args.top):
        print(pred.formula, pred.message or "")
        for cand in pred.candidates:
            refined, number, symbol = symmetrize(cand.structure)
            path = out / f"{pred.formula}_{cand.rank}.cif"
            path.write_text(to_cif(refined))
            print(f"  {cand.rank}  {cand.score:.3f}  {symbol} ({number})  from {cand.template_id}  -> {path}")


if __name__ == "__main__":
    main()
