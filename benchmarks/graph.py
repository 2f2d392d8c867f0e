"""Radius-graph build time: mlcalc (vesin and torch backends) next to raw vesin and ASE's neighbor_list.

Run: ``OMP_NUM_THREADS=1 python benchmarks/graph.py`` (options: --sizes, --cutoffs, --budget, --repeats).
Structures are rattled fcc Cu supercells (a = 3.61 Å, 0.1 Å rattle), the dense bulk case. Every number in one
row comes from the same run on the same structure; a combination whose time, extrapolated linearly in the
number of atoms from the previous size, would exceed --budget seconds is skipped and marked as such.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import vesin
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list

from mlcalc.graph import radius_graph


def copper(n_target: int) -> Atoms:
    """Rattled fcc Cu supercell with about ``n_target`` atoms (conventional cell repeated)."""
    n = max(1, round((n_target / 4) ** (1 / 3)))
    reps = [n, n, n]
    k = 0
    while 4 * np.prod(reps) < 0.97 * n_target:
        reps[k % 3] += 1
        k += 1
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
    atoms.rattle(0.1, seed=0)
    return atoms


def vesin_raw(atoms: Atoms, cutoff: float) -> int:
    nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
    i, _, _ = nl.compute(atoms.positions, atoms.cell.array, True, "ijS")
    return len(i)


def ase_nl(atoms: Atoms, cutoff: float) -> int:
    return len(neighbor_list("ijS", atoms, cutoff)[0])


METHODS: dict[str, Callable[[Atoms, float], int]] = {
    "mlcalc vesin": lambda a, c: radius_graph(a, c).num_edges,
    "mlcalc vesin k=50": lambda a, c: radius_graph(a, c, 50).num_edges,
    "mlcalc torch(cpu)": lambda a, c: radius_graph(a, c, backend="torch").num_edges,
    "vesin raw": vesin_raw,
    "ase": ase_nl,
}


def best_time(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Best wall time of ``repeats`` calls (one call if the first takes > 2 s) and the call's result."""
    best, result = float("inf"), 0
    for k in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        if k == 0 and best > 2.0:
            break
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000, 50000])
    parser.add_argument("--cutoffs", type=float, nargs="+", default=[6.0, 12.0])
    parser.add_argument("--budget", type=float, default=60.0, help="skip combinations estimated above this (s)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"torch {torch.__version__}, vesin {vesin.__version__}, OMP_NUM_THREADS={threads}, "
        f"torch threads {torch.get_num_threads()}; times in seconds (best of {args.repeats} below 2 s)"
    )
    header = "| cutoff | atoms | edges | " + " | ".join(METHODS) + " | mlcalc/vesin raw |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for cutoff in args.cutoffs:
        previous: dict[str, tuple[int, float]] = {}
        for n_target in args.sizes:
            atoms = copper(n_target)
            cells, edges = [], set()
            times: dict[str, float] = {}
            for name, method in METHODS.items():
                if name in previous:
                    n_prev, t_prev = previous[name]
                    estimate = t_prev * len(atoms) / n_prev
                    if estimate > args.budget:
                        cells.append(f"skipped (est. {estimate:.0f} s)")
                        continue
                seconds, count = best_time(lambda m=method, a=atoms, c=cutoff: m(a, c), args.repeats)
                times[name] = seconds
                previous[name] = (len(atoms), seconds)
                cells.append(f"{seconds:.4f}" if seconds < 1 else f"{seconds:.2f}")
                if "k=50" not in name:
                    edges.add(count)
            ratio = times["mlcalc vesin"] / times["vesin raw"] if {"mlcalc vesin", "vesin raw"} <= times.keys() else 0
            shown = "/".join(str(e) for e in sorted(edges))  # one number unless methods disagree
            print(f"| {cutoff:g} | {len(atoms)} | {shown} | " + " | ".join(cells) + f" | {ratio:.1f} |", flush=True)


if __name__ == "__main__":
    main()
