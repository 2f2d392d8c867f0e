"""Turn a training run's exported model into a shipped checkpoint: fit per-element energy references, save.

    ./run python checkpoints/finalize.py runs/gemnet_oc-emt/best_model.pt checkpoints/gemnet_oc-emt.pt \
        --data data/emt-full.db

The references (atomic number -> eV, least squares of the training-split energy residuals against composition,
``mlcalc.train.evaluate.fit_element_references``) are stored in the checkpoint and added by the calculator after
denormalisation; forces and stress do not change.
"""

from __future__ import annotations

import argparse
import json

import torch

from mlcalc import MLCalculator, load_model, save_model
from mlcalc.train.data import load_split
from mlcalc.train.evaluate import fit_element_references


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_model")
    parser.add_argument("output")
    parser.add_argument("--data", default="data/emt-full.db")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.run_model)
    calc = MLCalculator(model, device="cpu", dtype="float64")
    refs = fit_element_references(calc, load_split(args.data, "train"))
    model.element_references = refs
    meta = dict(model.metadata)
    meta["element_references"] = "least squares on the training-split energy residuals (checkpoints/finalize.py)"
    model.metadata = {}
    save_model(model, args.output, **meta)
    print(json.dumps({"element_references_eV": refs}, indent=2))


if __name__ == "__main__":
    main()
