"""Graph time per MD step with and without neighbour reuse (``MLCalculator(skin=...)``).

Run: ``OMP_NUM_THREADS=1 python benchmarks/skin.py`` (options: --sizes, --skins, --steps, --temperature,
--cutoff, --max-neighbors). For each size, a rattled fcc Cu cell (a = 3.61 Å) runs Langevin MD (2 fs steps) with a
Lennard-Jones copper (epsilon 0.4093 eV, sigma 2.338 Å, Halicioglu & Pound 1975; cut at --cutoff) through an mlcalc
calculator; the frames are recorded, then replayed through ``calculator.build_graph`` of a skin=0 calculator
(a fresh radius graph every step: what every user gets by default) and of one calculator per skin (candidate
search only when an atom has moved skin/2). Reported: mean graph time per step (ms, the rebuild steps included),
the speed-up, the fraction of steps that rebuilt and the stored candidates per atom. Every replayed graph is checked
to be identical to the fresh one (outside the timed region). torch runs on one thread.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from graph import copper as graph_copper  # noqa: E402  (benchmarks/ is on sys.path as a script)

from mlcalc import MLCalculator  # noqa: E402
from mlcalc.models import LennardJones  # noqa: E402

CU_LJ = {"sigma": 2.338, "epsilon": 0.4093}


def copper(n_target: int) -> Atoms:
    """graph.py's rattled fcc Cu supercell, rattled by 0.05 Å."""
    return graph_copper(n_target, rattle=0.05)


def calculator(cutoff: float, max_neighbors: int | None, skin: float) -> MLCalculator:
    model = LennardJones(**CU_LJ, rc=cutoff)
    model.max_neighbors = max_neighbors
    return MLCalculator(model, device="cpu", dtype="float64", skin=skin)


def trajectory(atoms: Atoms, steps: int, temperature: float, cutoff: float) -> list[Atoms]:
    """``steps`` frames of Langevin MD at ``temperature`` K (momenta drawn at that temperature), 2 fs apart."""
    atoms = atoms.copy()
    rng = np.random.default_rng(1)
    sigma = np.sqrt(units.kB * temperature * atoms.get_masses())[:, None]
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * sigma)
    atoms.calc = calculator(cutoff, None, skin=1.0)
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
    frames = []
    for _ in range(steps):
        dyn.run(1)
        frames.append(Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc))
    return frames


def replay(frames: list[Atoms], calc: MLCalculator, reference: list | None) -> tuple[float, list]:
    """Mean seconds per ``build_graph`` over the frames; the graphs' (edge_index, offsets) when no reference."""
    total, kept = 0.0, []
    for k, frame in enumerate(frames):
        t0 = time.perf_counter()
        graph = calc.build_graph(frame)
        total += time.perf_counter() - t0
        if reference is None:
            kept.append((graph.edge_index, graph.cell_offsets, graph.pos))
        else:
            edge_index, offsets, pos = reference[k]
            same = torch.equal(graph.edge_index, edge_index) and torch.equal(graph.cell_offsets, offsets)
            if not (same and torch.equal(graph.pos, pos)):
                raise AssertionError(f"skin {calc.skin}: graph of frame {k} differs from the fresh build")
    return total / len(frames), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--skins", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=600.0, help="K")
    parser.add_argument("--cutoff", type=float, default=6.0, help="Å")
    parser.add_argument("--max-neighbors", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(
        f"cutoff {args.cutoff} Å, max_neighbors {args.max_neighbors}, {args.steps} MD steps of 2 fs at "
        f"{args.temperature:g} K per size, 1 torch thread; graph = calculator.build_graph (float64, recentred)\n"
    )
    print("| atoms | edges/atom | skin (Å) | candidates/atom | fresh ms/step | reuse ms/step | speed-up | rebuilds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        atoms = copper(size)
        frames = trajectory(atoms, args.steps, args.temperature, args.cutoff)
        fresh_calc = calculator(args.cutoff, args.max_neighbors, skin=0.0)
        fresh_calc.build_graph(frames[0])  # warm-up
        t_fresh, reference = replay(frames, fresh_calc, None)
        edges = reference[-1][0].shape[1] / len(atoms)
        for skin in args.skins:
            calc = calculator(args.cutoff, args.max_neighbors, skin=skin)
            t_skin, _ = replay(frames, calc, reference)
            stats = calc.neighbor_stats
            candidates = calc.neighbor_cache.num_candidates / len(atoms)
            print(
                f"| {len(atoms)} | {edges:.0f} | {skin:g} | {candidates:.0f} | {1e3 * t_fresh:.1f} | "
                f"{1e3 * t_skin:.1f} | {t_fresh / t_skin:.2f}x | {stats['builds']}/{len(frames)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
