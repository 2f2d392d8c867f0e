"""Time per calculator call of GemNet-OC with the official OC20 base hyperparameters (random weights), CPU.

    python benchmarks/gemnet_oc.py [--repeats 3] [--threads N] [--dtype float32]

Structures: a rattled 3x3x4 Cu(111) slab with an O adsorbate (OC20 tags: quadruplet interactions active) and a
rattled 500-atom fcc Cu bulk cell (tags 0: no quadruplets). Each call changes the positions slightly, so the
graph, the indices and energy + forces are recomputed. If fairchem-core is importable (reference venv), the
same model in fairchem is timed side by side (its own on-the-fly graph, same weights).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from _side_by_side import fairchem_runner, time_calls  # benchmarks/ is on sys.path when run as a script
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111

import mlcalc.models.gemnet_oc  # noqa: F401  (registers the model)
from mlcalc import GemNetOCCalculator
from mlcalc.models.gemnet_oc import GemNetOC

#: configs/oc20/s2ef/all/gemnet/gemnet-oc.yml (fairchem 1.10), model section
BASE_HPARAMS = dict(
    num_spherical=7, num_radial=128, num_blocks=4, emb_size_atom=256, emb_size_edge=512, emb_size_trip_in=64,
    emb_size_trip_out=64, emb_size_quad_in=32, emb_size_quad_out=32, emb_size_aint_in=64, emb_size_aint_out=64,
    emb_size_rbf=16, emb_size_cbf=16, emb_size_sbf=32, num_before_skip=2, num_after_skip=2, num_concat=1,
    num_atom=3, num_output_afteratom=3, cutoff=12.0, cutoff_qint=12.0, cutoff_aeaint=12.0, cutoff_aint=12.0,
    max_neighbors=30, max_neighbors_qint=8, max_neighbors_aeaint=20, max_neighbors_aint=1000,
    rbf={"name": "gaussian"}, envelope={"name": "polynomial", "exponent": 5}, cbf={"name": "spherical_harmonics"},
    sbf={"name": "legendre_outer"}, extensive=True, output_init="HeOrthogonal", activation="silu",
    regress_forces=True, direct_forces=True, forces_coupled=False, quad_interaction=True,
    atom_edge_interaction=True, edge_atom_interaction=True, atom_interaction=True, num_atom_emb_layers=2,
    num_global_out_layers=2, qint_tags=[1, 2],
)  # fmt: skip


def slab_with_adsorbate() -> Atoms:
    slab = fcc111("Cu", size=(3, 3, 4), vacuum=10.0, a=3.61)
    add_adsorbate(slab, "O", 1.2, "fcc")
    z = slab.positions[:36, 2]
    layers = np.unique(np.round(z, 3))
    tags = np.where(slab.positions[:, 2] >= layers[2] - 1e-3, 1, 0)
    tags[-1] = 2
    slab.set_tags(tags)
    slab.rattle(0.05, seed=1)
    return slab


def bulk_500() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (5, 5, 5)
    atoms.rattle(0.05, seed=2)
    return atoms


def graph_stats(model: GemNetOC, calc: GemNetOCCalculator, atoms: Atoms) -> dict[str, int]:
    with torch.no_grad():
        idx = model.build_indices(calc.build_graph(atoms))
    return {
        "a2a": idx.a2a.num,
        "main": idx.main.num,
        "triplets": idx.trip_e2e.out.numel(),
        "quadruplets": idx.quad.out.numel(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-fairchem", action="store_true", help="skip fairchem even if importable")
    parser.add_argument(
        "--modes", default="highest,medium", help="mlcalc modes, comma-separated: highest, high, medium, +compile"
    )
    parser.add_argument("--slab-only", action="store_true", help="time the 37-atom slab only (not the 500-atom bulk)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GemNetOC(**BASE_HPARAMS)
    modes = [(m.removesuffix("+compile"), m.endswith("+compile")) for m in args.modes.split(",")]
    calcs = {
        m: GemNetOCCalculator(model, device="cpu", dtype=dtype, matmul_precision=p, compile=c)
        for m, (p, c) in zip(args.modes.split(","), modes, strict=True)
    }
    calc = next(iter(calcs.values()))
    reference = None if args.no_fairchem else fairchem_runner(
        "fairchem.core.models.gemnet_oc.gemnet_oc.GemNetOC", model, dtype, scale_file=None
    )

    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"GemNet-OC base (OC20 all), {n_params / 1e6:.1f} M parameters, random weights, {args.dtype}, CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} calls; fairchem in float32 "
          f"(highest); mlcalc per matmul_precision mode (+compile: torch.compile, first call excluded)")  # fmt: skip
    header = (f"{'structure':<26}{'atoms':>6}{'a2a':>9}{'main':>8}{'triplets':>10}{'quads':>10}{'mode':>17}"
              f"{'mlcalc s/call':>15}")  # fmt: skip
    if reference is not None:
        header += f"{'fairchem s/call':>17}{'speed-up':>10}{'|dE|/|E|':>10}"
    print(header)
    structures = [("Cu(111) 3x3x4 + O", slab_with_adsorbate())]
    if not args.slab_only:
        structures.append(("Cu fcc bulk 500", bulk_500()))
    for name, atoms in structures:
        stats = graph_stats(calc.model, calc, atoms)
        t_ref, ref_error = None, None
        for mode, c in calcs.items():
            if c.compile:
                c.calculate(atoms.copy(), ["energy", "forces"])  # compiles

            def ours(atoms: Atoms, c: GemNetOCCalculator = c) -> None:
                c.calculate(atoms, ["energy", "forces"])

            t_ours, _ = time_calls(ours, atoms, args.repeats)
            row = (f"{name:<26}{len(atoms):>6}{stats['a2a']:>9}{stats['main']:>8}{stats['triplets']:>10}"
                   f"{stats['quadruplets']:>10}{mode:>17}{t_ours:>15.3f}")  # fmt: skip
            if reference is not None:
                if t_ref is None and ref_error is None:
                    try:
                        t_ref, _ = time_calls(reference, atoms, args.repeats)
                    except RuntimeError as err:  # fairchem 1.10 fails on an empty quadruplet graph (no tagged atoms)
                        ref_error = str(err).splitlines()[0][:50]
                if ref_error is not None:
                    row += f"{'fails':>17}  ({ref_error}...)"
                else:
                    c.calculate(atoms, ["energy"])
                    e_ours, e_ref = c.results["energy"], reference(atoms)
                    row += f"{t_ref:>17.3f}{t_ref / t_ours:>10.2f}{abs(e_ours - e_ref) / abs(e_ref):>10.1e}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
