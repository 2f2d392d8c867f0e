"""Radius-graph build time: mlcalc (vesin and torch backends) next to raw vesin and ASE's neighbor_list.

Run: ``OMP_NUM_THREADS=1 python benchmarks/graph.py`` (options: --sizes, --cutoffs, --budget, --repeats,
--tables). Table "bulk": rattled fcc Cu supercells (a = 3.61 Å, 0.1 Å rattle), the dense bulk case. Every number
in one row comes from the same run on the same structure; a combination whose time, extrapolated linearly in the
number of atoms from the previous size, would exceed --budget seconds is skipped and marked as such.
Table "spread": the same atoms compact and spread over kilometres of empty space (exploding MD, huge boxes), with
the spread/compact time ratio; raw vesin is skipped where it is known to grid the empty space for minutes.
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
from ase.build import bulk, fcc111
from ase.neighborlist import neighbor_list

from mlcalc.calculator import validate_atoms
from mlcalc.graph import radius_graph


def copper(n_target: int, rattle: float = 0.1) -> Atoms:
    """Rattled (``rattle`` Å) fcc Cu supercell with about ``n_target`` atoms (conventional cell repeated)."""
    n = max(1, round((n_target / 4) ** (1 / 3)))
    reps = [n, n, n]
    k = 0
    while 4 * np.prod(reps) < 0.97 * n_target:
        reps[k % 3] += 1
        k += 1
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
    atoms.rattle(rattle, seed=0)
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


def spread_cases() -> list[tuple[str, Atoms, Atoms, bool]]:
    """(name, compact structure, the same atoms spread out, whether raw vesin finishes on the spread one)."""
    rng = np.random.default_rng(0)
    gas = Atoms("Cu60", positions=rng.uniform(0, 12, (60, 3)))
    gas_far = Atoms("Cu60", positions=rng.uniform(0, 1e6, (60, 3)))
    slab = fcc111("Cu", (8, 8, 6), vacuum=8.0)
    slab.pbc = (True, True, False)
    top = slab.positions[:, 2].max()
    near, runaway, far = slab.copy(), slab.copy(), slab.copy()
    near += Atoms("O2", positions=[[1, 1, top + 4], [2.2, 1, top + 4]])
    runaway += Atoms("O2", positions=[[1, 1, top + 2.4e3], [2.2, 1, top + 2.4e3]])
    far += Atoms("O2", positions=[[1, 1, top + 1e5], [2.2, 1, top + 1e5]])
    cube = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(8)
    cube.rattle(0.05, seed=0)
    in_box = cube.copy()
    in_box.set_cell(np.eye(3) * 1e5)
    return [
        ("60 atoms: 12 Å -> 1e6 Å box, pbc F", gas, gas_far, True),
        ("slab + O2: 4 Å -> 2.4e3 Å above, pbc TTF", near, runaway, True),
        ("slab + O2: 4 Å -> 1e5 Å above, pbc TTF", near, far, False),
        ("Cu 2048: bulk -> cluster in 1e5 Å periodic box", cube, in_box, True),
    ]


def spread_table(repeats: int) -> None:
    """Compact vs spread-out timings of the same atoms: the graph's cost must not grow with empty space."""
    methods: dict[str, Callable[[Atoms], object]] = {
        "mlcalc vesin": lambda a: radius_graph(a, 6.0, 50),
        "mlcalc torch(cpu)": lambda a: radius_graph(a, 6.0, 50, backend="torch"),
        "validate_atoms": validate_atoms,
        "vesin raw": lambda a: vesin.NeighborList(cutoff=6.0, full_list=True).compute(
            a.positions, a.cell.array if a.pbc.any() else np.zeros((3, 3)), list(a.pbc), "ij"
        ),
    }
    print("\nspread-out structures, cutoff 6 Å (validate_atoms: 1 Å search); seconds compact / spread (ratio)")
    header = "| case | atoms | " + " | ".join(methods) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, compact, spread, raw_ok in spread_cases():
        cells = []
        for method, fn in methods.items():
            t_compact, _ = best_time(lambda f=fn, a=compact: f(a), repeats)
            if method == "vesin raw" and not raw_ok:
                cells.append(f"{t_compact:.4f} / skipped (minutes)")
                continue
            t_spread, _ = best_time(lambda f=fn, a=spread: f(a), repeats)
            cells.append(f"{t_compact:.4f} / {t_spread:.4f} ({t_spread / t_compact:.1f}x)")
        print(f"| {name} | {len(spread)} | " + " | ".join(cells) + " |", flush=True)


def bulk_table(args: argparse.Namespace) -> None:
    """Rattled bulk Cu of growing size: every backend and reference side by side."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000, 50000])
    parser.add_argument("--cutoffs", type=float, nargs="+", default=[6.0, 12.0])
    parser.add_argument("--budget", type=float, default=60.0, help="skip combinations estimated above this (s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tables", nargs="+", choices=["bulk", "spread"], default=["bulk", "spread"])
    args = parser.parse_args()

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"torch {torch.__version__}, vesin {vesin.__version__}, OMP_NUM_THREADS={threads}, "
        f"torch threads {torch.get_num_threads()}; times in seconds (best of {args.repeats} below 2 s)"
    )
    if "bulk" in args.tables:
        bulk_table(args)
    if "spread" in args.tables:
        spread_table(args.repeats)


if __name__ == "__main__":
    main()
