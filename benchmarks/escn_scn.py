"""Time per calculator call of eSCN (OC20 L6-M2-Lay12 hyper-parameters) and SCN (OC20 t1-b1), random weights.

Structure: a rattled Cu(111) 3x3x4 slab with a CO adsorbate (38 atoms), float32, CPU. Every call rebuilds the
graph and evaluates energy and forces (what an ASE optimiser step costs). If fairchem-core is importable (reference
venv), fairchem's own eSCN / SCN with the same weights is timed side by side on the same structure (its own
on-the-fly graph). fairchem draws a random auxiliary vector per edge (torch.rand_like) to fix the edge frames, so
its outputs differ slightly from mlcalc's deterministic frames; the energies still agree closely for eSCN.

    OMP_NUM_THREADS=2 python benchmarks/escn_scn.py [--repeats 5] [--threads 2] [--no-fairchem]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from _side_by_side import fairchem_runner, time_calls  # benchmarks/ is on sys.path when run as a script
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


FAIRCHEM_CLASS = {
    "ESCN": "fairchem.core.models.escn.escn.eSCN",
    "SCN": "fairchem.core.models.scn.scn.SphericalChannelNetwork",
}


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
    parser.add_argument("--no-fairchem", action="store_true", help="skip fairchem even if importable")
    parser.add_argument(
        "--precisions", default="highest,medium", help="mlcalc matmul_precision modes to time (fairchem: float32)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32
    atoms = slab_with_adsorbate()
    header = (
        f"{'model':<20} {'atoms':>5} {'edges':>6} {'params':>12} {'precision':>9} {'median s/call':>14} "
        f"{'min s/call':>11}"
    )
    rows, with_fairchem = [], False
    for name, model in build_models():
        reference = None if args.no_fairchem else fairchem_runner(FAIRCHEM_CLASS[type(model).__name__], model, dtype)
        t_ref = None
        for precision in args.precisions.split(","):
            calc = MLCalculator(model, device="cpu", dtype=dtype, matmul_precision=precision)

            def ours(atoms: Atoms, calc: MLCalculator = calc) -> None:
                calc.calculate(atoms, ["energy", "forces"])

            median, best = time_calls(ours, atoms, args.repeats)
            num_edges = calc.build_graph(atoms).num_edges
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row = (
                f"{name:<20} {len(atoms):>5} {num_edges:>6} {params:>12,} {precision:>9} {median:>14.3f} {best:>11.3f}"
            )
            if reference is not None:
                if t_ref is None:  # fairchem float32, timed once per model, right after mlcalc's first mode
                    t_ref, _ = time_calls(reference, atoms, args.repeats)
                calc.calculate(atoms, ["energy"])
                e_ours, e_ref = calc.results["energy"], reference(atoms)
                row += f" {t_ref:>16.3f} {t_ref / median:>9.2f} {abs(e_ours - e_ref) / abs(e_ref):>9.1e}"
                with_fairchem = True
            rows.append(row)
    if with_fairchem:
        header += f" {'fairchem s/call':>16} {'speed-up':>9} {'|dE|/|E|':>9}"
    lines = [header, "-" * len(header), *rows]
    lines.append(f"float32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} calls")
    print("\n".join(lines))  # noqa: T201  (the table is this script's output)


if __name__ == "__main__":
    main()
