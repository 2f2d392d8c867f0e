"""Model-card numbers of a checkpoint trained on mlcalc's EMT data set: held-out MAEs and relaxations vs EMT.

    ./run python checkpoints/evaluate.py checkpoints/gemnet_oc-emt.pt --data data/emt-full.db [--relax 24]

Prints markdown tables (the ones in checkpoints/README.md): energy MAE (meV/atom) and force MAE (eV/Å) on the
``test`` split (whole systems never seen in training), then BFGS relaxations (fmax 0.05 eV/Å) of the held-out
adsorbate+slab systems with the model and with EMT from the same starting structures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ase.calculators.emt import EMT

from mlcalc import load_calculator
from mlcalc.train.data import load_split
from mlcalc.train.evaluate import heldout_errors, relaxation_benchmark, relaxation_starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="data/emt-full.db")
    parser.add_argument("--split", default="test")
    parser.add_argument("--relax", type=int, default=None, help="relax at most this many systems (default all)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    calc = load_calculator(args.checkpoint, device="cpu", dtype=args.dtype)
    t0 = time.perf_counter()
    err = heldout_errors(calc, load_split(args.data, args.split))
    print("| split | frames | atoms | energy MAE (meV/atom) | energy MAE (eV) | force MAE (eV/Å) | time (s) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.split} | {err['n_structures']} | {err['n_atoms']} | {1000 * err['energy_per_atom_mae']:.2f} | "
          f"{err['energy_mae']:.4f} | {err['forces_mae']:.4f} | {time.perf_counter() - t0:.0f} |")

    starts = relaxation_starts(args.data, args.split)[: args.relax]
    results = relaxation_benchmark(calc, starts, EMT, fmax=0.05, steps=300)
    print()
    print("| system | atoms | model steps | EMT steps | E_model - E_EMT (eV) | EMT(model structure) - E_EMT (eV) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        name = f"{r.name} (placement {starts[results.index(r)].info.get('placement', 0)})"
        print(f"| {name} | {r.n_atoms} | {r.model_steps}{'' if r.model_converged else '*'} | {r.reference_steps} | "
              f"{r.energy_error:+.4f} | {r.structure_error:+.4f} |")
    e = np.array([abs(r.energy_error) for r in results])
    s = np.array([r.structure_error for r in results])
    print()
    print(f"{len(results)} relaxations: |E_model - E_EMT| <= 0.05 eV for {np.mean(e <= 0.05):.0%} "
          f"(median {np.median(e):.3f} eV); EMT energy of the model's structure within 0.05 eV of EMT's minimum "
          f"for {np.mean(s <= 0.05):.0%} (median {np.median(s):.3f} eV); * = not converged in 300 steps")


if __name__ == "__main__":
    main()
