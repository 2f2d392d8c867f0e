"""Throughput of 16 concurrent BFGS relaxations sharing one batched model (InferenceServer) vs one by one.

    ./run python benchmarks/inference_server.py [--checkpoint checkpoints/gemnet_oc-emt.pt] [--n 16]

OC20-style slabs (fcc111 2x2x3 of Pt/Cu/Ni/Pd with O, H, CO or N on top, bottom layer fixed, OC20 tags), rattled;
torch pinned to 1 thread. Both runs use the same calculator and end at the same structures (checked).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import add_adsorbate, fcc111, molecule
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from mlcalc import load_calculator, tag_adsorbate_slab
from mlcalc.batching import InferenceServer


def slabs(n: int) -> list:
    metals, adsorbates = ["Pt", "Cu", "Ni", "Pd"], ["O", "H", "CO", "N"]
    out = []
    for k in range(n):
        slab = fcc111(metals[k % 4], (2, 2, 3), vacuum=7.0)
        ads = adsorbates[(k // 4) % 4]
        add_adsorbate(slab, molecule(ads) if len(ads) > 1 else ads, 1.8, "ontop" if ads == "CO" else "fcc")
        tag_adsorbate_slab(slab)
        slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
        slab.rattle(0.05, seed=k)
        out.append(slab)
    return out


def relax(atoms, calc, fmax: float, steps: int) -> int:
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return opt.nsteps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "checkpoints" / "gemnet_oc-emt.pt"
    p.add_argument("--checkpoint", default=str(default))
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    calc = load_calculator(args.checkpoint, device="cpu")
    starts = slabs(args.n)

    one = [a.copy() for a in starts]
    t0 = time.perf_counter()
    steps_one = [relax(a, calc, args.fmax, args.steps) for a in one]
    t_one = time.perf_counter() - t0

    served = [a.copy() for a in starts]
    steps_served = [0] * args.n
    with InferenceServer(calc, max_batch=args.n, max_wait_ms=args.max_wait_ms) as server:
        def job(k: int) -> None:
            steps_served[k] = relax(served[k], server.calculator(), args.fmax, args.steps)

        threads = [threading.Thread(target=job, args=(k,)) for k in range(args.n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_served = time.perf_counter() - t0
    dpos = max(float(np.abs(a.positions - b.positions).max()) for a, b in zip(one, served, strict=True))
    print(f"{args.n} relaxations, {sum(steps_one)} BFGS steps one by one, {sum(steps_served)} served; "
          f"max |dpos| between the two {dpos:.1e} Å")
    print("| mode | wall s | relaxations/s | model calls | mean batch |")
    print("|---|---|---|---|---|")
    calls_one = sum(steps_one) + args.n
    print(f"| one by one (ASE BFGS) | {t_one:.2f} | {args.n / t_one:.2f} | {calls_one} | 1 |")
    st = server.stats
    print(f"| InferenceServer, {args.n} threads | {t_served:.2f} | {args.n / t_served:.2f} | {st['batches']} | "
          f"{st['structures'] / max(st['batches'], 1):.1f} |")
    print(f"speed-up: {t_one / t_served:.2f}x")


if __name__ == "__main__":
    main()
