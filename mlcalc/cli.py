"""Command line: ``mlcalc info CKPT``, ``mlcalc relax CKPT STRUCTURE``, ``mlcalc md CKPT STRUCTURE``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np


def _calculator(args: argparse.Namespace):
    from mlcalc import MLCalculator

    return MLCalculator(args.checkpoint, device=args.device, dtype=args.dtype)


def cmd_info(args: argparse.Namespace) -> int:
    from mlcalc import read_checkpoint

    ck = read_checkpoint(args.checkpoint)
    calc = _calculator(args)
    info = dict(calc.info)
    info["hparams"] = ck.hparams
    info["n_parameters"] = sum(p.numel() for p in calc.model.parameters())
    info["metadata"] = ck.metadata
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_relax(args: argparse.Namespace) -> int:
    from ase.filters import FrechetCellFilter
    from ase.io import read, write
    from ase.optimize import BFGS

    atoms = read(args.structure)
    atoms.calc = _calculator(args)
    target = FrechetCellFilter(atoms) if args.cell else atoms
    e0 = atoms.get_potential_energy()
    converged = BFGS(target, logfile="-" if args.verbose else None).run(fmax=args.fmax, steps=args.steps)
    fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    print(f"E0 = {e0:.6f} eV  E = {atoms.get_potential_energy():.6f} eV  max|F| = {fmax:.4f} eV/Å  "
          f"converged = {bool(converged)}")
    if args.output:
        write(args.output, atoms)
    return 0 if converged else 1


def cmd_md(args: argparse.Namespace) -> int:
    from ase import units
    from ase.io import read
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = read(args.structure)
    atoms.calc = _calculator(args)
    rng = np.random.default_rng(args.seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=rng)
    dyn = Langevin(
        atoms, args.timestep * units.fs, temperature_K=args.temperature, friction=0.01, rng=rng, fixcm=False
    )
    for k in range(0, args.steps, args.every):
        dyn.run(min(args.every, args.steps - k))
        epot, temp = atoms.get_potential_energy(), atoms.get_temperature()
        print(f"step {k + args.every:6d}  Epot = {epot:.5f} eV  T = {temp:.1f} K")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlcalc", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("relax", help="BFGS relaxation of a structure file")
    p.add_argument("checkpoint")
    p.add_argument("structure")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--cell", action="store_true", help="relax the cell too (needs stress)")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_relax)
    p = sub.add_parser("md", help="Langevin MD of a structure file")
    p.add_argument("checkpoint")
    p.add_argument("structure")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_md)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
