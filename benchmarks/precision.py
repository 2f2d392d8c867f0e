"""What each matmul precision costs: time per call and deviation from float64, OC20-size models (random weights).

    ./run python benchmarks/precision.py [--repeats 3] [--models gemnet_oc,escn,scn]

GemNet-OC base (configs/oc20/s2ef/all/gemnet/gemnet-oc.yml), eSCN L6-M2-Lay12 and SCN t1-b1 with their OC20
normalisers (energy std 2.887 eV), on a rattled 38-atom Cu(111)+CO slab with OC20 tags, torch pinned to 1 thread.
Rows: float64 (the reference), float32 "highest", "high" and "medium" (bfloat16 matmuls, float32 accumulation).
Columns: median seconds per call (energy + forces), |ΔE| (eV) and max |ΔF| (eV/Å) from float64, and the speed-up over
float32 "highest". All rows come from the same run; compare ratios, not seconds, across machines.
"""

from __future__ import annotations

import argparse

import torch
from _side_by_side import time_calls  # benchmarks/ is on sys.path when run as a script
from escn_scn import ESCN_L6_M2_LAY12, SCN_T1_B1, slab_with_adsorbate
from gemnet_oc import BASE_HPARAMS

from mlcalc import MLCalculator
from mlcalc.models.escn import ESCN
from mlcalc.models.gemnet_oc import GemNetOC
from mlcalc.models.scn import SCN

OC20_NORMALIZERS = {"energy": (-0.7554450631141663, 2.887317180633545), "forces": (0.0, 2.887317180633545)}
MODES = [("float64", "highest", False), ("float32", "highest", False), ("float32", "high", False),
         ("float32", "medium", False)]
COMPILED = [("float32", "highest", True), ("float32", "medium", True)]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = {
        "gemnet_oc": lambda: GemNetOC.from_config(BASE_HPARAMS),
        "escn": lambda: ESCN(**ESCN_L6_M2_LAY12),
        "scn": lambda: SCN.from_config(SCN_T1_B1),
    }[name]()
    model.normalizers = dict(OC20_NORMALIZERS)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="gemnet_oc,escn,scn")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (first call compiles: minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    atoms = slab_with_adsorbate()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread, "
          f"{len(atoms)} atoms")
    print("| model | dtype | matmul_precision | compile | s/call | speed-up vs float32 highest | |ΔE| eV "
          "| max |ΔF| eV/Å |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = build(name)
        rows, ref, base_time = [], None, None
        for dtype, precision, compiled in MODES + (COMPILED if args.compile else []):
            calc = MLCalculator(model, device="cpu", dtype=dtype, matmul_precision=precision, compile=compiled)
            seconds, _ = time_calls(lambda a, c=calc: c.predict([a]), atoms, args.repeats)
            out = calc.predict([atoms])[0]
            if ref is None:
                ref = out
            if dtype == "float32" and precision == "highest" and not compiled:
                base_time = seconds
            de = abs(out["energy"] - ref["energy"])
            df = float(abs(out["forces"] - ref["forces"]).max())
            rows.append((dtype, precision, compiled, seconds, de, df))
        for dtype, precision, compiled, seconds, de, df in rows:
            speed = f"{base_time / seconds:.2f}x" if dtype == "float32" else "-"
            print(f"| {name} | {dtype} | {precision} | {'yes' if compiled else 'no'} | {seconds:.3f} | {speed} | "
                  f"{de:.2e} | {df:.2e} |")


if __name__ == "__main__":
    main()
