"""Time per calculator call of eSCN (OC20 L6-M2-Lay12 hyper-parameters) and SCN (OC20 t1-b1), random weights.

Structure: a rattled Cu(111) 3x3x4 slab with a CO adsorbate (38 atoms), float32, CPU. Every call rebuilds the
graph and evaluates energy and forces (what an ASE optimiser step costs).

    OMP_NUM_THREADS=2 python benchmarks/escn_scn.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111

from mlcalc.calculator import MLCalculator
from mlcalc.models.escn import ESCN

logger = logging.getLogger("benchmarks.escn_scn")

# configs/oc20/s2ef/all/escn/eSCN-L6-M2-Lay12-All-MD.yml (model section)
ESCN_L6_M2_LAY12 = dict(
    num_layers=12,
    max_neighbors=20,
    cutoff=12.0,
    sphere_channels=128,
    hidden_channels=256,
    lmax_list=[6],
    mmax_list=[2],
    num_sphere_samples=128,
    distance_function="gaussian",
    regress_forces=True,
    use_pbc=True,
    basis_width_scalar=2.0,
    otf_graph=True,
)

# configs/oc20/s2ef/2M/scn/scn-t1-b1.yml (model section)
SCN_T1_B1 = dict(
    num_interactions=12,
    hidden_channels=1024,
    sphere_channels=128,
    sphere_channels_reduce=128,
    num_sphere_samples=128,
    num_basis_functions=128,
    distance_function="gaussian",
    max_num_neighbors=40,
    cutoff=8.0,
    lmax=6,
    mmax=1,
    use_grid=True,
    num_bands=1,
    num_taps=1,
    regress_forces=True,
    use_pbc=True,
    basis_width_scalar=2.0,
    otf_graph=True,
)


def slab_with_adsorbate(seed: int = 0) -> Atoms:
    """Rattled Cu(111) 3x3x4 slab (10 Å vacuum) with CO on an fcc site; OC20-style tags."""
    slab = fcc111("Cu", size=(3, 3, 4), vacuum=10.0)
    slab.set_tags(np.where(slab.positions[:, 2] > slab.positions[:, 2].min() + 3.0, 1, 0))
    add_adsorbate(slab, Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]], tags=[2, 2]), 1.9, "fcc")
    slab.rattle(0.05, seed=seed)
    return slab


def time_calls(calc: MLCalculator, atoms: Atoms, repeats: int) -> tuple[float, float, int]:
    """(median, min) seconds per energy+forces call (one warm-up call first) and the number of edges."""
    atoms = atoms.copy()
    atoms.calc = calc
    atoms.get_forces()
    times = []
    for k in range(repeats):
        atoms.positions[0, 0] += 1e-4 * (-1) ** k  # force a recalculation
        t0 = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - t0)
    num_edges = calc.build_graph(atoms).num_edges
    return statistics.median(times), min(times), num_edges


def build_models() -> list[tuple[str, torch.nn.Module]]:
    torch.manual_seed(0)
    models: list[tuple[str, torch.nn.Module]] = [("eSCN L6-M2-Lay12", ESCN(**ESCN_L6_M2_LAY12))]
    try:
        from mlcalc.models.scn import SCN
    except ImportError:  # SCN half: filled in when mlcalc.models.scn exists
        logger.warning("mlcalc.models.scn not available: SCN row skipped")
    else:
        models.append(("SCN t1-b1", SCN.from_config(SCN_T1_B1)))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    atoms = slab_with_adsorbate()
    rows = []
    for name, model in build_models():
        calc = MLCalculator(model, device="cpu", dtype=torch.float32)
        median, best, num_edges = time_calls(calc, atoms, args.repeats)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append((name, len(atoms), num_edges, params, median, best))
    header = f"{'model':<20} {'atoms':>5} {'edges':>6} {'params':>10} {'median s/call':>14} {'min s/call':>11}"
    lines = [header, "-" * len(header)]
    lines += [f"{n:<20} {a:>5} {e:>6} {p:>10,} {m:>14.3f} {b:>11.3f}" for n, a, e, p, m, b in rows]
    lines.append(f"float32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} calls")
    print("\n".join(lines))  # noqa: T201  (the table is this script's output)


if __name__ == "__main__":
    main()
