"""The main job: a relaxation with a shipped checkpoint.

Default: Lennard-Jones argon (checkpoints/lj_argon.pt), a rattled fcc crystal relaxed with positions and cell
(FrechetCellFilter + BFGS). With ``--checkpoint some_gemnet_oc.pt`` (any fairchem v1 GemNet-OC/eSCN/SCN file or
mlcalc file) it relaxes an O atom on a Cu(111) slab instead, with the bottom layer fixed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase.build import add_adsorbate, bulk, fcc111
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from mlcalc import MLCalculator

HERE = Path(__file__).resolve().parent


def argon_crystal():
    atoms = bulk("Ar", "fcc", a=5.6, cubic=True) * (2, 2, 2)
    atoms.rattle(0.1, seed=0)
    return atoms


def o_on_cu111():
    slab = fcc111("Cu", (3, 3, 4), a=3.61, vacuum=8.0)
    add_adsorbate(slab, "O", 1.3, "fcc")
    tags = slab.get_tags()
    # ase numbers layers from the top (1) down; OC20 tags: 0 subsurface, 1 surface, 2 adsorbate
    slab.set_tags(np.where(slab.numbers == 8, 2, np.where(tags <= 2, 1, 0)))
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 0]))
    slab.rattle(0.03, seed=1)
    return slab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(HERE.parent / "checkpoints" / "lj_argon.pt"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fmax", type=float, default=0.02)
    args = parser.parse_args()

    calc = MLCalculator(args.checkpoint, device=args.device, dtype=args.dtype)
    argon = calc.model.registry_name == "lennard_jones"
    atoms = argon_crystal() if argon else o_on_cu111()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if argon and "stress" in calc.implemented_properties else atoms
    e0 = atoms.get_potential_energy()
    t0 = time.perf_counter()
    opt = BFGS(target, logfile=None)
    converged = opt.run(fmax=args.fmax, steps=500)
    dt = time.perf_counter() - t0
    fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
    print(f"model {calc.info['model']} ({args.checkpoint}), {len(atoms)} atoms, {calc.info['device']}, {args.dtype}")
    print(f"E: {e0:.5f} -> {atoms.get_potential_energy():.5f} eV in {opt.nsteps} BFGS steps ({dt:.2f} s), "
          f"max|F| = {fmax:.4f} eV/Å, converged: {converged}")
    if argon:
        a = atoms.cell.cellpar()[0] / 2
        print(f"relaxed fcc lattice constant {a:.4f} Å (experiment, 4 K: 5.26 Å)")


if __name__ == "__main__":
    main()
