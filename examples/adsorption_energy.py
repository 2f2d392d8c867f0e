"""An adsorption energy from three relaxations, with the shipped GemNet-OC checkpoint and with EMT side by side.

    E_ads = E(slab + adsorbate) - E(slab) - sum_i c_i E(gas molecule i)

for example O on Pt(111) (the default, fcc site) referenced to 1/2 O2, or CO on Pt(111) (``--adsorbate CO``, top
site) referenced to gas-phase CO. Each term is relaxed with BFGS: the slab with the adsorbate and the clean slab
(3x3x4, bottom two layers fixed, OC20 tags) and each gas molecule alone in a box (non-periodic by default,
``--periodic-gas`` for a periodic box), once with the model ``checkpoints/gemnet_oc-emt.pt`` and once with EMT, the
data the model was trained on. This is how OC20's adsorption energies are defined (with DFT and its own gas
references); both sides here use the same structures and references, so the two columns compare like with like.

mlcalc's EMT data set holds slabs, adsorbates on slabs and bulk cells but no isolated molecules: the gas-phase
energies are an extrapolation for the model. The line E(slab + adsorbate) - E(slab) involves only in-distribution
structures; the difference between it and E_ads is the gas reference.

    python examples/adsorption_energy.py                       # O/Pt(111), 1/2 O2
    python examples/adsorption_energy.py --adsorbate CO        # CO/Pt(111), CO
    python examples/adsorption_energy.py --metal Cu --adsorbate OH   # OH/Cu(111), H2O - 1/2 H2
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from mlcalc import load_calculator

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE.parent / "checkpoints" / "gemnet_oc-emt.pt"

METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
SITES = ("ontop", "bridge", "fcc", "hcp")
#: gas-phase reference of each adsorbate: {molecule (ase.build.molecule name): coefficient}
REFERENCES: dict[str, dict[str, float]] = {
    "H": {"H2": 0.5},
    "N": {"N2": 0.5},
    "O": {"O2": 0.5},
    "OH": {"H2O": 1.0, "H2": -0.5},
    "CO": {"CO": 1.0},
}
DEFAULT_SITE = {"H": "fcc", "N": "fcc", "O": "fcc", "OH": "fcc", "CO": "ontop"}
#: starting distance (Å) of the binding atom to its nearest surface atom, and bond length (Å) of diatomic adsorbates
ANCHOR_DISTANCE = {"H": 1.8, "C": 1.9, "N": 1.9, "O": 2.0}
BOND = {"OH": 0.98, "CO": 1.15}


def fcc111_slab(metal: str, size: tuple[int, int, int], adsorbate: str | None = None, site: str = "fcc") -> Atoms:
    """A rattled ``metal``(111) slab, optionally with ``adsorbate`` on ``site``; OC20 tags, bottom layers fixed.

    The top half of the layers (rounded up) is free and tagged 1, the rest fixed and tagged 0, the adsorbate tagged
    2; its binding atom starts ``ANCHOR_DISTANCE`` from the nearest surface atom, a second atom straight above it.
    """
    slab = fcc111(metal, size, vacuum=10.0)
    layer = slab.get_tags()  # ase numbers layers from the top (1) down
    n_ads = 0
    if adsorbate is not None:
        nn = np.linalg.norm(slab.cell[0]) / size[0]  # nearest-neighbour distance in the surface
        lateral = {"ontop": 0.0, "bridge": nn / 2, "fcc": nn / np.sqrt(3), "hcp": nn / np.sqrt(3)}[site]
        height = float(np.sqrt(ANCHOR_DISTANCE[adsorbate[0]] ** 2 - lateral**2))
        positions = [[0.0, 0.0, 0.0]] + ([[0.0, 0.0, BOND[adsorbate]]] if len(adsorbate) > 1 else [])
        add_adsorbate(slab, Atoms(adsorbate, positions=positions), height, site, mol_index=0)
        n_ads = len(adsorbate)
    free = layer <= (size[2] + 1) // 2
    slab.set_tags(np.concatenate([np.where(free, 1, 0), np.full(n_ads, 2)]))
    slab.set_constraint(FixAtoms(indices=np.where(~free)[0]))
    slab.rattle(0.02, seed=1)  # the same displacements of the slab atoms with and without the adsorbate
    return slab


def gas_molecule(name: str, vacuum: float, periodic: bool) -> Atoms:
    """``ase.build.molecule(name)`` centred in a box with ``vacuum`` Å on each side, tagged 2 like an adsorbate."""
    mol = molecule(name)
    mol.center(vacuum=vacuum)
    mol.pbc = periodic
    mol.set_tags(np.full(len(mol), 2))
    return mol


def relaxed_energy(atoms: Atoms, calc: Calculator, fmax: float, steps: int) -> tuple[float, int, bool]:
    """BFGS on a copy of ``atoms``: (relaxed energy, steps, converged)."""
    atoms = atoms.copy()
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    return atoms.get_potential_energy(), opt.nsteps, converged


def coefficient(c: float) -> str:
    """0.5 -> '1/2 ', 1 -> '', 2 -> '2 ' (for printing the reference)."""
    f = Fraction(c).limit_denominator(12)
    return "" if f == 1 else f"{f} "


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="checkpoint file (default: the shipped one)")
    parser.add_argument("--metal", default="Pt", choices=METALS)
    parser.add_argument("--adsorbate", default="O", choices=sorted(REFERENCES))
    parser.add_argument("--site", default=None, choices=SITES, help="default: ontop for CO, fcc for the others")
    parser.add_argument("--size", type=int, nargs=3, default=(3, 3, 4), metavar=("NX", "NY", "LAYERS"),
                        help="slab size (default 3 3 4)")
    parser.add_argument("--vacuum", type=float, default=6.0, help="vacuum (Å) around each gas molecule")
    parser.add_argument("--periodic-gas", action="store_true", help="periodic box for the gas molecules")
    parser.add_argument("--fmax", type=float, default=0.05, help="force convergence criterion, eV/Å")
    parser.add_argument("--steps", type=int, default=300, help="maximum number of BFGS steps per relaxation")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    ads = args.adsorbate
    site = args.site or DEFAULT_SITE[ads]
    size = tuple(args.size)
    refs = REFERENCES[ads]
    structures = {f"slab + {ads}": fcc111_slab(args.metal, size, ads, site), "slab": fcc111_slab(args.metal, size)}
    structures.update({name: gas_molecule(name, args.vacuum, args.periodic_gas) for name in refs})

    calc = load_calculator(args.checkpoint, device=args.device, dtype=args.dtype)
    results: dict[str, dict[str, Any]] = {}
    for label, c in (("model", calc), ("EMT", EMT())):
        runs = {key: relaxed_energy(atoms, c, args.fmax, args.steps) for key, atoms in structures.items()}
        e = {key: r[0] for key, r in runs.items()}
        binding = e[f"slab + {ads}"] - e["slab"]
        gas = sum(coef * e[name] for name, coef in refs.items())
        results[label] = {"energies": e, "steps": {k: r[1] for k, r in runs.items()},
                          "converged": all(r[2] for r in runs.values()), "binding": binding, "E_ads": binding - gas}

    ref_text = " + ".join(f"{coefficient(c)}{n}" for n, c in refs.items()).replace("+ -", "- ")
    box = f"{'periodic' if args.periodic_gas else 'non-periodic'} box, {args.vacuum:g} Å vacuum"
    print(f"{ads} on {args.metal}(111), {site} site, {'x'.join(map(str, size))} slab; gas reference: {ref_text} "
          f"({box}); BFGS to fmax {args.fmax} eV/Å")
    print(f"model: {type(calc).__name__} ({Path(args.checkpoint).name}, {calc.info['dtype']}, {calc.info['device']})")
    rows = [(f"E({key})", results["model"]["energies"][key], results["EMT"]["energies"][key]) for key in structures]
    rows.append((f"E(slab + {ads}) - E(slab)", results["model"]["binding"], results["EMT"]["binding"]))
    rows.append((f"E_ads (vs {ref_text})", results["model"]["E_ads"], results["EMT"]["E_ads"]))
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'':{width}s}{'model (eV)':>12s}{'EMT (eV)':>12s}{'model - EMT':>13s}")
    for name, m, r in rows:
        print(f"{name:{width}s}{m:12.4f}{r:12.4f}{m - r:+13.4f}")
    steps = ", ".join(f"{k} {results['model']['steps'][k]}/{results['EMT']['steps'][k]}" for k in structures)
    converged = results["model"]["converged"] and results["EMT"]["converged"]
    print(f"BFGS steps (model/EMT): {steps}; all converged: {converged}")
    return {"model": results["model"], "emt": results["EMT"], "reference": refs, "site": site}


if __name__ == "__main__":
    main()
