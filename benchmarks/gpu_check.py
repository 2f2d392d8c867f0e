"""GPU checks of the speed issue, as one prepared script (run whenever a GPU is available).

    bash benchmarks/gpu_check.sh            # writes gpu_check.md (and prints it)
    python benchmarks/gpu_check.py --device cpu --quick   # the same code paths on a CPU, for a dry run

1. Host synchronisations inside each model's forward + backward, counted with ``torch.cuda.set_sync_debug_mode``
   (graph already on the device), for GemNet-OC base, eSCN L6-M2-Lay12, SCN t1-b1 and SphereNet (random weights at
   the OC20 sizes).
2. The candidate search on the device (torch cell list) gives the same graph as the CPU path (edge set and cell
   offsets), on slabs, bulk cells and a triclinic cell.
3. Seconds per calculator call (energy + forces) at 38 atoms, float32 highest / medium, each model; with
   ``--fairchem`` (fairchem-core 1.10 importable) fairchem's model with the same weights side by side.
4. GemNet-OC base Langevin MD on a ~1,000-atom Cu(111) slab, float32, skin 1 Å: steps per second.
Results go to ``--out`` (markdown) with the date, GPU name, torch and CUDA versions.
"""

from __future__ import annotations

import argparse
import datetime
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import add_adsorbate, bulk, fcc111
from ase.md.langevin import Langevin
from escn_scn import ESCN_L6_M2_LAY12, SCN_T1_B1, slab_with_adsorbate  # benchmarks/ on sys.path as a script
from gemnet_oc import BASE_HPARAMS

from mlcalc import MLCalculator, radius_graph
from mlcalc.calculator import evaluate_model
from mlcalc.models.escn import ESCN
from mlcalc.models.gemnet_oc import GemNetOC
from mlcalc.models.scn import SCN
from mlcalc.models.spherenet import SphereNet

OC20 = {"energy": (-0.7554450631141663, 2.887317180633545), "forces": (0.0, 2.887317180633545)}


def models(quick: bool) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    gemnet = dict(BASE_HPARAMS)
    escn = dict(ESCN_L6_M2_LAY12)
    if quick:  # the same code paths, small widths
        gemnet.update(num_blocks=1, emb_size_atom=32, emb_size_edge=32, num_radial=16)
        escn.update(num_layers=1, sphere_channels=16, hidden_channels=32, edge_channels=16)
    out = {
        "GemNet-OC base": GemNetOC.from_config(gemnet),
        "eSCN L6-M2-Lay12": ESCN(**escn),
        "SCN t1-b1": SCN.from_config(dict(SCN_T1_B1, num_interactions=1) if quick else SCN_T1_B1),
        "SphereNet": SphereNet(cutoff=5.0),
    }
    for m in out.values():
        m.normalizers = dict(OC20)
        m.eval()
    return out


def count_syncs(model: torch.nn.Module, calc: MLCalculator, atoms) -> int | str:
    if calc.device.type != "cuda":
        return "n/a (cpu)"
    graph = calc.build_graph(atoms)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            evaluate_model(calc.model, graph)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def same_graph(atoms, cutoff: float, max_neighbors: int, device: str) -> bool:
    cpu = radius_graph(atoms, cutoff, max_neighbors, True, recenter=True)
    dev = radius_graph(atoms, cutoff, max_neighbors, True, recenter=True, device=device, backend="torch")
    return (torch.equal(cpu.edge_index, dev.edge_index.cpu()) and torch.equal(cpu.cell_offsets, dev.cell_offsets.cpu())
            and torch.equal(cpu.pos, dev.pos.cpu()))


def seconds_per_call(calc: MLCalculator, atoms, repeats: int) -> float:
    rng = np.random.default_rng(0)
    base = atoms.positions.copy()
    times = []
    for k in range(repeats + 2):
        atoms.positions = base + rng.normal(scale=1e-3, size=base.shape)
        if calc.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        calc.predict([atoms])
        if calc.device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 2:
            times.append(time.perf_counter() - t0)
    atoms.positions = base
    return float(np.median(times))


def md_steps_per_second(model: torch.nn.Module, device: str, n_steps: int, size: tuple[int, int, int]) -> tuple:
    slab = fcc111("Cu", size=size, vacuum=10.0, a=3.61)
    add_adsorbate(slab, "O", 1.2, "fcc")
    z = slab.positions[:, 2]
    slab.set_tags(np.where(z > z.max() - 3.5, 1, 0))
    slab.calc = MLCalculator(model, device=device, dtype="float32", skin=1.0)
    dyn = Langevin(slab, 1.0 * units.fs, temperature_K=300, friction=0.01, fixcm=False,
                   rng=np.random.default_rng(0))
    dyn.run(2)
    t0 = time.perf_counter()
    dyn.run(n_steps)
    return len(slab), n_steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small widths and sizes (a dry run of the code paths)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--md-steps", type=int, default=50)
    p.add_argument("--out", default="gpu_check.md")
    args = p.parse_args()
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"# GPU check, {datetime.date.today().isoformat()}", "",
             f"Device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}; command: "
             f"`python benchmarks/gpu_check.py {'--quick ' if args.quick else ''}--device {device}`", ""]
    ms = models(args.quick)
    slab = slab_with_adsorbate()
    lines += ["## Host synchronisations in forward + backward (graph on the device)", "",
              "| model | syncs |", "|---|---|"]
    for label, m in ms.items():
        calc = MLCalculator(m, device=device, dtype="float32")
        lines.append(f"| {label} | {count_syncs(m, calc, slab)} |")
    lines += ["", "## Device candidate search == CPU path", "", "| structure | identical |", "|---|---|"]
    tri = bulk("NiAl", "cesiumchloride", a=2.9) * (3, 3, 3)
    tri.set_cell(tri.cell.array + np.array([[0, 0.4, 0.2], [0.3, 0, 0.1], [0, 0, 0]]), scale_atoms=True)
    tri.rattle(0.05, seed=2)
    cases = {"Cu(111)+CO slab": slab, "fcc Pt bulk 4x4x4": bulk("Pt", "fcc", a=3.92, cubic=True) * (4, 4, 4),
             "triclinic NiAl": tri}
    for label, atoms in cases.items():
        lines.append(f"| {label} | {same_graph(atoms, 6.0, 30, device)} |")
    lines += ["", f"## Seconds per call, {len(slab)} atoms (energy + forces)", "",
              "| model | float32 highest | float32 medium |", "|---|---|---|"]
    for label, m in ms.items():
        row = []
        for precision in ("highest", "medium"):
            calc = MLCalculator(m, device=device, dtype="float32", matmul_precision=precision)
            row.append(f"{seconds_per_call(calc, slab.copy(), args.repeats):.4f}")
        lines.append(f"| {label} | {' | '.join(row)} |")
    size = (3, 3, 3) if args.quick else (10, 10, 10)
    n_atoms, rate = md_steps_per_second(ms["GemNet-OC base"], device, 3 if args.quick else args.md_steps, size)
    lines += ["", "## GemNet-OC base Langevin MD, float32, skin 1 Å", "",
              f"{n_atoms} atoms: {rate:.2f} steps/s (target >= 15 on a GPU at ~1k atoms)", ""]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
