"""Batched relaxations (``mlcalc.optimize.relax``) against ASE's optimizers run one structure at a time.

Run: ``OMP_NUM_THREADS=1 python benchmarks/relax_batched.py`` (options: --structures, --batch-size, --fmax, --steps,
--optimizers, --dtype, --checkpoint). The structures are small OC20-style slabs: Pt, Cu and Ni fcc(111) 2x2x3 with
O, H or CO in an fcc hollow, OC20 tags, FixAtoms on the bottom layer, rattled by 0.1 Å (13-14 atoms). Both columns
use the same calculator (the shipped GemNet-OC, ``checkpoints/gemnet_oc-emt.pt``) and the same optimizer algorithm
with ASE's defaults; the only difference is one model call per structure and step (ASE) or one batched model call
per step for up to --batch-size structures with in-flight refill (mlcalc). torch runs on one thread. Besides the
throughput the script prints how far the two routes' relaxed structures and step counts are apart.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.constraints import FixAtoms
from ase.optimize import BFGS, FIRE, LBFGS

import mlcalc
from mlcalc.optimize import relax

ROOT = Path(__file__).resolve().parents[1]
ASE_OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}


def oc20_style_slabs(n: int, seed: int = 0) -> list[Atoms]:
    """``n`` tagged, constrained, rattled metal(111) 2x2x3 slabs with an O, H or CO adsorbate."""
    metals, adsorbates = ("Pt", "Cu", "Ni"), ("O", "H", "CO")
    out = []
    for k in range(n):
        slab = fcc111(metals[k % 3], (2, 2, 3), vacuum=7.0)
        ads = adsorbates[(k // 3) % 3]
        add_adsorbate(slab, molecule(ads) if len(ads) > 1 else ads, 1.2 if ads == "H" else 1.8, "fcc")
        mlcalc.tag_adsorbate_slab(slab)
        slab.rattle(0.1, seed=seed + k)
        slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
        out.append(slab)
    return out


def run_ase(structures: list[Atoms], calc, name: str, fmax: float, steps: int) -> tuple[float, list[Atoms], list[int]]:
    t0 = time.perf_counter()
    results, nsteps = [], []
    for s in structures:
        atoms = s.copy()
        atoms.calc = calc
        opt = ASE_OPTIMIZERS[name](atoms, logfile=None)
        opt.run(fmax=fmax, steps=steps)
        results.append(atoms)
        nsteps.append(opt.nsteps)
    return time.perf_counter() - t0, results, nsteps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizers", default="BFGS,FIRE")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "gemnet_oc-emt.pt"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    calc = mlcalc.load_calculator(args.checkpoint, device="cpu", dtype=args.dtype)
    structures = oc20_style_slabs(args.structures)
    calc.predict(structures[:2])  # warm-up
    atoms_range = f"{min(map(len, structures))}-{max(map(len, structures))}"
    print(f"{len(structures)} slabs ({atoms_range} atoms), {calc.info['model']} {args.dtype}, fmax {args.fmax}, "
          f"torch threads {torch.get_num_threads()}, batch_size {args.batch_size}")
    header = (f"{'optimizer':9} | {'ASE one by one':>16} | {'mlcalc batched':>16} | {'speed-up':>8} | "
              f"{'steps ASE / mlcalc':>18} | {'converged':>9} | {'max |dx| (Å)':>12}")
    print(header)
    print("-" * len(header))
    for name in [o.strip().upper() for o in args.optimizers.split(",") if o.strip()]:
        t_ase, ase_out, ase_steps = run_ase(structures, calc, name, args.fmax, args.steps)
        t0 = time.perf_counter()
        out = relax(structures, calc, optimizer=name, fmax=args.fmax, steps=args.steps,
                    batch_size=args.batch_size, progress=False)
        t_ml = time.perf_counter() - t0
        steps_ml = [a.info["relax_steps"] for a in out]
        dx = max(float(np.abs(a.positions - b.positions).max()) for a, b in zip(out, ase_out, strict=True))
        conv = sum(bool(a.info["relax_converged"]) for a in out)
        n = len(structures)
        print(f"{name:9} | {n / t_ase:10.2f} str/s | {n / t_ml:10.2f} str/s | {t_ase / t_ml:7.2f}x | "
              f"{sum(ase_steps):>8} / {sum(steps_ml):<7} | {conv:>4}/{n:<4} | {dx:12.1e}")


if __name__ == "__main__":
    main()
