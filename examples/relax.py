"""The main job: relax CO on Pt(111) with the shipped GemNet-OC checkpoint, next to EMT's answer.

The checkpoint ``checkpoints/gemnet_oc-emt.pt`` is a small GemNet-OC trained on mlcalc's OC20-style data set
labelled with ASE's EMT (see checkpoints/README.md), so EMT is the reference it should reproduce: both start from
the same structure (a 3x3x4 Pt(111) slab, bottom two layers fixed, CO on a top site, OC20 tags 0/1/2) and BFGS
relaxes each to fmax. With ``--checkpoint FILE`` any other GemNet-OC / eSCN / SCN / SphereNet file (fairchem v1 or
mlcalc) relaxes the same structure; fairchem OC20 checkpoints predict adsorption energies, so only the EMT
relaxation of the shipped checkpoint is a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from mlcalc import load_calculator

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE.parent / "checkpoints" / "gemnet_oc-emt.pt"


def co_on_pt111() -> Atoms:
    """3x3x4 Pt(111) + CO on top, 10 Å vacuum; tags as OC20 (0 subsurface, 1 surface, 2 adsorbate)."""
    slab = fcc111("Pt", (3, 3, 4), vacuum=10.0)
    layer = slab.get_tags()  # ase numbers layers from the top (1) down
    co = molecule("CO")  # O above C
    add_adsorbate(slab, co, 1.9, "ontop", mol_index=1)  # C 1.9 Å above a top-layer Pt
    n_slab = len(layer)
    tags = np.concatenate([np.where(layer <= 2, 1, 0), np.full(len(slab) - n_slab, 2)])
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(indices=np.where(layer >= 3)[0]))
    slab.rattle(0.02, seed=1)
    return slab


def relax(atoms: Atoms, fmax: float, steps: int) -> tuple[float, int, bool, float]:
    """BFGS to fmax; returns (energy, steps, converged, seconds)."""
    t0 = time.perf_counter()
    opt = BFGS(atoms, logfile=None)
    converged = opt.run(fmax=fmax, steps=steps)
    return atoms.get_potential_energy(), opt.nsteps, bool(converged), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="checkpoint file (default: the shipped one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    calc = load_calculator(args.checkpoint, device=args.device, dtype=args.dtype)
    start = co_on_pt111()
    ml = start.copy()
    ml.calc = calc
    e_ml, n_ml, ok_ml, t_ml = relax(ml, args.fmax, args.steps)
    print(f"{type(calc).__name__} ({Path(args.checkpoint).name}, {calc.info['dtype']}, {calc.info['device']}): "
          f"CO/Pt(111), {len(ml)} atoms")
    print(f"  model: E = {e_ml:10.4f} eV after {n_ml:3d} BFGS steps ({t_ml:.1f} s), converged: {ok_ml}")
    out = {"model_energy": e_ml, "model_steps": n_ml, "model_converged": ok_ml}
    trained_on = str(getattr(calc.model, "metadata", {}).get("training_data", ""))
    if "emt" in trained_on.lower():  # an EMT-trained checkpoint (the shipped one): EMT is its reference
        ref = start.copy()
        ref.calc = EMT()
        e_emt, n_emt, ok_emt, _ = relax(ref, args.fmax, args.steps)
        ml.calc = EMT()  # the model's relaxed structure, evaluated by the reference
        e_cross = ml.get_potential_energy()
        height = lambda a: a.positions[-1, 2] - a.positions[:36, 2].max()  # noqa: E731 - C above the top layer
        print(f"  EMT:   E = {e_emt:10.4f} eV after {n_emt:3d} BFGS steps, converged: {ok_emt}")
        print(f"  model - EMT relaxed energy: {e_ml - e_emt:+.4f} eV; EMT energy of the model's structure minus "
              f"EMT's minimum: {e_cross - e_emt:+.4f} eV")
        print(f"  C height above the top Pt layer: model {height(ml):.3f} Å, EMT {height(ref):.3f} Å")
        out.update(emt_energy=e_emt, emt_converged=ok_emt, emt_of_model_structure=e_cross,
                   model_height=height(ml), emt_height=height(ref))
    return out


if __name__ == "__main__":
    main()
