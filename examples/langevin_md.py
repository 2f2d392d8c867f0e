"""Langevin molecular dynamics of an adsorbate on Cu(111) with the shipped GemNet-OC checkpoint.

A 3x3x4 Cu(111) slab (bottom two layers fixed, OC20 tags) with O on an fcc site (``--adsorbate CO --site ontop``
for CO) is given Maxwell-Boltzmann velocities at ``--temperature`` and run with ASE's Langevin thermostat
(``ase.md.langevin.Langevin``) on the forces of ``checkpoints/gemnet_oc-emt.pt``, a small GemNet-OC trained on EMT
labels with gradient (energy-conserving) forces. It writes an ASE trajectory (every ``--interval`` steps) and a PNG
with the temperature and the potential, kinetic and total energy of every step, and prints a summary.

    python examples/langevin_md.py --steps 200 --temperature 500
    ase gui langevin_md.traj                    # watch it

The thermostat exchanges energy with a bath, so the total energy is not conserved; with ``--friction 0`` the run is
NVE (velocity Verlet) and the total-energy drift measures the integration error. Needs matplotlib
(``pip install mlcalc[plot]``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from ase.io.trajectory import Trajectory
from ase.md.langevin import Langevin

from mlcalc import load_calculator

try:  # ase >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ase: the same draw under its previous name
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms: Atoms, temperature_K: float, *, rng: np.random.Generator) -> None:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE.parent / "checkpoints" / "gemnet_oc-emt.pt"

ADSORBATES = ("H", "C", "N", "O", "OH", "CO", "CH", "NH")  # first atom binds to the surface
SITES = ("ontop", "bridge", "fcc", "hcp")
#: starting distance (Å) of the binding atom to its nearest surface atom, and bond length (Å) of diatomic adsorbates
ANCHOR_DISTANCE = {"H": 1.8, "C": 1.9, "N": 1.9, "O": 2.0}
BOND = {"OH": 0.98, "CO": 1.15, "CH": 1.10, "NH": 1.03}


def adsorbate_on_cu111(adsorbate: str, site: str, size: tuple[int, int, int] = (3, 3, 4)) -> Atoms:
    """Cu(111) slab + ``adsorbate`` on ``site``; top half of the layers free (tag 1), the rest fixed (tag 0)."""
    slab = fcc111("Cu", size, vacuum=10.0)
    layer = slab.get_tags()  # ase numbers layers from the top (1) down
    nn = np.linalg.norm(slab.cell[0]) / size[0]  # nearest-neighbour distance in the surface
    lateral = {"ontop": 0.0, "bridge": nn / 2, "fcc": nn / np.sqrt(3), "hcp": nn / np.sqrt(3)}[site]
    height = float(np.sqrt(ANCHOR_DISTANCE[adsorbate[0]] ** 2 - lateral**2))
    positions = [[0.0, 0.0, 0.0]] + ([[0.0, 0.0, BOND[adsorbate]]] if len(adsorbate) > 1 else [])
    add_adsorbate(slab, Atoms(adsorbate, positions=positions), height, site, mol_index=0)
    free = layer <= (size[2] + 1) // 2
    slab.set_tags(np.concatenate([np.where(free, 1, 0), np.full(len(adsorbate), 2)]))
    slab.set_constraint(FixAtoms(indices=np.where(~free)[0]))
    return slab


def plot_md(log: dict[str, np.ndarray], target: float | None, title: str, path: Path) -> None:
    """Temperature (top) and potential, kinetic and total energy (bottom) per MD step, as a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - the plot extra is missing
        raise SystemExit("this example plots with matplotlib: pip install 'mlcalc[plot]'") from err
    fig = Figure(figsize=(7, 6), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg: no screen needed
    ax_t, ax_e = fig.subplots(2, 1, sharex=True)
    ax_t.plot(log["step"], log["temperature"], lw=1)
    if target is not None:
        ax_t.axhline(target, color="0.5", ls="--", lw=0.8, label=f"thermostat {target:g} K")
        ax_t.legend()
    ax_t.set(ylabel="temperature (K)")
    e0 = log["potential"][0]  # potential and total relative to the initial potential energy, kinetic as it is
    for key in ("potential", "kinetic", "total"):
        ax_e.plot(log["step"], log[key] - (0.0 if key == "kinetic" else e0), lw=1, label=key)
    ax_e.set(xlabel="MD step", ylabel="energy (eV)", title=f"energies (potential and total minus {e0:.3f} eV)")
    ax_e.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="checkpoint file (default: the shipped one)")
    parser.add_argument("--adsorbate", default="O", choices=ADSORBATES)
    parser.add_argument("--site", default="fcc", choices=SITES)
    parser.add_argument("--size", type=int, nargs=3, default=(3, 3, 4), metavar=("NX", "NY", "LAYERS"),
                        help="slab size (default 3 3 4)")
    parser.add_argument("--steps", type=int, default=200, help="number of MD steps")
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="thermostat temperature, K")
    parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (0: NVE)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and the thermostat noise")
    parser.add_argument("--interval", type=int, default=5, help="write a trajectory frame every N steps")
    parser.add_argument("--trajectory", default="langevin_md.traj", help="ASE trajectory file")
    parser.add_argument("--output", default="langevin_md.png", help="PNG file for the temperature and energy plots")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    calc = load_calculator(args.checkpoint, device=args.device, dtype=args.dtype)
    atoms = adsorbate_on_cu111(args.adsorbate, args.site, tuple(args.size))
    atoms.calc = calc
    rng = np.random.default_rng(args.seed)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=rng)  # fixed atoms keep zero momentum
    # friction in ASE units (1/time); fixcm=False: the bottom layers are fixed, the centre of mass need not be
    dyn = Langevin(atoms, args.timestep * units.fs, temperature_K=args.temperature,
                   friction=args.friction / units.fs, fixcm=False, rng=rng)

    rows: list[tuple[int, float, float, float]] = []

    def record() -> None:
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        rows.append((dyn.nsteps, epot, ekin, atoms.get_temperature()))

    dyn.attach(record, interval=1)  # observers also run before the first step: steps + 1 rows
    t0 = time.perf_counter()
    with Trajectory(args.trajectory, "w", atoms) as traj:
        dyn.attach(traj.write, interval=args.interval)
        dyn.run(args.steps)
    seconds = time.perf_counter() - t0

    step, epot, ekin, temperature = (np.array(c) for c in zip(*rows, strict=True))
    log = {"step": step, "potential": epot, "kinetic": ekin, "total": epot + ekin, "temperature": temperature}
    tags = atoms.get_tags()  # binding atom (the first tagged 2) above the highest surface atom (tagged 1)
    height = atoms.positions[np.argmax(tags == 2), 2] - atoms.positions[tags == 1, 2].max()
    half = slice(len(step) // 2, None)
    n_frames = args.steps // args.interval + 1
    thermostat = f"Langevin {args.temperature:g} K" if args.friction > 0 else "NVE"
    title = f"{args.adsorbate} on Cu(111) ({args.site}), {thermostat}, {args.timestep:g} fs"
    print(f"{title}: {len(atoms)} atoms ({atoms.get_number_of_degrees_of_freedom()} degrees of freedom), "
          f"{args.steps} steps, friction {args.friction:g} 1/fs")
    print(f"model: {type(calc).__name__} ({Path(args.checkpoint).name}, {calc.info['dtype']}, {calc.info['device']}), "
          f"{1000 * seconds / max(args.steps, 1):.1f} ms/step")
    print(f"temperature over the last {len(step[half])} steps: mean {temperature[half].mean():.1f} K, "
          f"std {temperature[half].std():.1f} K ({'target' if args.friction > 0 else 'initial draw at'} "
          f"{args.temperature:g} K)")
    print(f"potential energy: start {epot[0]:.4f} eV, end {epot[-1]:.4f} eV, min {epot.min():.4f} eV, "
          f"max {epot.max():.4f} eV")
    print(f"total energy: start {log['total'][0]:.4f} eV, end {log['total'][-1]:.4f} eV "
          f"(change {log['total'][-1] - log['total'][0]:+.4f} eV)")
    print(f"{args.adsorbate[0]} height above the top layer at the end: {height:.3f} Å")
    output = Path(args.output)
    plot_md(log, args.temperature if args.friction > 0 else None, title, output)
    print(f"wrote {args.trajectory} ({n_frames} frames) and {output}")
    return {"log": log, "trajectory": Path(args.trajectory), "frames": n_frames, "output": output,
            "seconds": seconds}


if __name__ == "__main__":
    main()
