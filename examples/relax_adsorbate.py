"""Relax an adsorbate on a metal (111) slab with the shipped GemNet-OC checkpoint and with EMT; plot energy vs step.

The checkpoint ``checkpoints/gemnet_oc-emt.pt`` is a small GemNet-OC trained on mlcalc's OC20-style data set
labelled with ASE's EMT (see checkpoints/README.md), so EMT is the reference it should reproduce. Both calculators
start from the same structure (by default O on the fcc site of a 3x3x4 Cu(111) slab; bottom layers fixed, OC20 tags
0 subsurface / 1 surface / 2 adsorbate) and BFGS relaxes each to ``--fmax``. The script prints a summary (energies,
steps, the EMT energy of the model's relaxed structure, the adsorbate height) and saves a PNG with the energy of
each BFGS step for both calculators (absolute, and relative to each relaxed energy).

    python examples/relax_adsorbate.py                                  # O on Cu(111), fcc site
    python examples/relax_adsorbate.py --metal Pt --adsorbate CO --site ontop --output co_pt.png

Needs matplotlib (``pip install mlcalc[plot]``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from mlcalc import load_calculator

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE.parent / "checkpoints" / "gemnet_oc-emt.pt"

METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")  # the fcc metals EMT describes (and the checkpoint was trained on)
ADSORBATES = ("H", "C", "N", "O", "OH", "CO", "CH", "NH")  # first atom binds to the surface
SITES = ("ontop", "bridge", "fcc", "hcp")
#: starting distance (Å) of the binding atom to its nearest surface atom, and bond length (Å) of diatomic adsorbates
ANCHOR_DISTANCE = {"H": 1.8, "C": 1.9, "N": 1.9, "O": 2.0}
BOND = {"OH": 0.98, "CO": 1.15, "CH": 1.10, "NH": 1.03}


def adsorbate_on_fcc111(
    metal: str, adsorbate: str, site: str, size: tuple[int, int, int] = (3, 3, 4), vacuum: float = 10.0
) -> Atoms:
    """A rattled ``metal``(111) slab with ``adsorbate`` on ``site``, OC20 tags and the bottom layers fixed.

    The top half of the layers (rounded up) is free and tagged 1, the rest fixed and tagged 0, the adsorbate tagged
    2; its binding atom starts ``ANCHOR_DISTANCE`` from the nearest surface atom, a second atom straight above it.
    """
    slab = fcc111(metal, size, vacuum=vacuum)
    layer = slab.get_tags()  # ase numbers layers from the top (1) down
    nn = np.linalg.norm(slab.cell[0]) / size[0]  # nearest-neighbour distance in the surface
    lateral = {"ontop": 0.0, "bridge": nn / 2, "fcc": nn / np.sqrt(3), "hcp": nn / np.sqrt(3)}[site]
    height = float(np.sqrt(ANCHOR_DISTANCE[adsorbate[0]] ** 2 - lateral**2))
    positions = [[0.0, 0.0, 0.0]] + ([[0.0, 0.0, BOND[adsorbate]]] if len(adsorbate) > 1 else [])
    add_adsorbate(slab, Atoms(adsorbate, positions=positions), height, site, mol_index=0)
    free = layer <= (size[2] + 1) // 2
    slab.set_tags(np.concatenate([np.where(free, 1, 0), np.full(len(adsorbate), 2)]))
    slab.set_constraint(FixAtoms(indices=np.where(~free)[0]))
    slab.rattle(0.02, seed=1)  # no exact ties in the neighbour lists of an ideal lattice
    return slab


def adsorbate_height(atoms: Atoms) -> float:
    """Height (Å) of the adsorbate's binding atom (the first atom tagged 2) above the highest surface atom."""
    tags = atoms.get_tags()
    return float(atoms.positions[np.argmax(tags == 2), 2] - atoms.positions[tags == 1, 2].max())


def relax(atoms: Atoms, calc: Calculator, fmax: float, steps: int) -> dict[str, Any]:
    """BFGS on a copy of ``atoms``; returns the relaxed atoms, the energy of every step (step 0 first) and more."""
    atoms = atoms.copy()
    atoms.calc = calc
    energies: list[float] = []
    t0 = time.perf_counter()
    opt = BFGS(atoms, logfile=None)
    opt.attach(lambda: energies.append(atoms.get_potential_energy()), interval=1)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    return {"atoms": atoms, "energies": np.array(energies), "steps": opt.nsteps, "converged": converged,
            "seconds": time.perf_counter() - t0}


def plot_energies(curves: dict[str, np.ndarray], title: str, path: Path) -> None:
    """Energy vs BFGS step for each calculator: absolute (left) and minus the last value (right), as a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - the plot extra is missing
        raise SystemExit("this example plots with matplotlib: pip install 'mlcalc[plot]'") from err
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg: no screen needed
    ax_abs, ax_rel = fig.subplots(1, 2)
    for (label, energies), marker in zip(curves.items(), "os^v", strict=False):
        steps = np.arange(len(energies))
        ax_abs.plot(steps, energies, marker=marker, ms=3, label=label)
        ax_rel.plot(steps, energies - energies[-1], marker=marker, ms=3, label=label)
    ax_abs.set(xlabel="BFGS step", ylabel="energy (eV)", title="energy")
    ax_rel.set(xlabel="BFGS step", ylabel="E - E(relaxed) (eV)", title="relaxation energy still to go")
    ax_rel.axhline(0.0, color="0.6", lw=0.8)
    ax_abs.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="checkpoint file (default: the shipped one)")
    parser.add_argument("--metal", default="Cu", choices=METALS)
    parser.add_argument("--adsorbate", default="O", choices=ADSORBATES)
    parser.add_argument("--site", default="fcc", choices=SITES)
    parser.add_argument("--size", type=int, nargs=3, default=(3, 3, 4), metavar=("NX", "NY", "LAYERS"),
                        help="slab size (default 3 3 4)")
    parser.add_argument("--fmax", type=float, default=0.05, help="force convergence criterion, eV/Å")
    parser.add_argument("--steps", type=int, default=300, help="maximum number of BFGS steps")
    parser.add_argument("--output", default="relax_adsorbate.png", help="PNG file for the energy-vs-step plot")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    calc = load_calculator(args.checkpoint, device=args.device, dtype=args.dtype)
    start = adsorbate_on_fcc111(args.metal, args.adsorbate, args.site, tuple(args.size))
    name = f"{args.adsorbate} on {args.metal}(111), {args.site} site"
    model = relax(start, calc, args.fmax, args.steps)
    emt = relax(start, EMT(), args.fmax, args.steps)
    cross = model["atoms"].copy()
    cross.calc = EMT()
    e_cross = cross.get_potential_energy()  # EMT's energy of the model's relaxed structure

    print(f"{name}: {len(start)} atoms ({'x'.join(map(str, args.size))} slab), BFGS to fmax {args.fmax} eV/Å")
    print(f"model: {type(calc).__name__} ({Path(args.checkpoint).name}, {calc.info['dtype']}, {calc.info['device']})")
    print(f"{'':8s}{'E start (eV)':>14s}{'E relaxed (eV)':>16s}{'relaxation (eV)':>17s}{'steps':>7s}"
          f"{'converged':>11s}{'time (s)':>10s}")
    for label, r in (("model", model), ("EMT", emt)):
        e = r["energies"]
        print(f"{label:8s}{e[0]:14.4f}{e[-1]:16.4f}{e[-1] - e[0]:17.4f}{r['steps']:7d}{r['converged']!s:>11s}"
              f"{r['seconds']:10.1f}")
    e_model, e_emt = float(model["energies"][-1]), float(emt["energies"][-1])
    print(f"model - EMT relaxed energy: {e_model - e_emt:+.4f} eV")
    print(f"EMT energy of the model's relaxed structure - EMT's minimum: {e_cross - e_emt:+.4f} eV")
    print(f"{args.adsorbate[0]} height above the top layer: model {adsorbate_height(model['atoms']):.3f} Å, "
          f"EMT {adsorbate_height(emt['atoms']):.3f} Å")

    output = Path(args.output)
    plot_energies({f"model ({Path(args.checkpoint).name})": model["energies"], "EMT": emt["energies"]}, name, output)
    print(f"wrote {output}")
    return {"model": model, "emt": emt, "emt_of_model_structure": e_cross, "output": output}


if __name__ == "__main__":
    main()
