"""Time and peak memory of one calculator call (energy + forces) on large fcc Cu cells, OC20-size models.

    ./run python benchmarks/memory.py [--sizes 1000 5000 20000] [--models gemnet_oc,gemnet_oc_direct,escn,scn,spherenet]

Each (model, size) runs in a fresh process pinned to one torch thread: build the model (random weights at the official
sizes: GemNet-OC base with gradient and with direct forces, eSCN L6-M2-Lay12, SCN t1-b1, SphereNet with DIG's
defaults), build a rattled fcc Cu cell of about N atoms, then one ``calc.get_forces`` (graph, indices, energy and
forces), float32. Reported: seconds of that call, the process's peak resident memory (``VmHWM``, includes ~0.5 GiB of
Python, torch and the model), and what the call added on top of the resident memory before it. A call that runs
out of memory reports the MemoryError's message. Memory is the operating system's count, so it holds for any
allocator; compare sizes within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1024**3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_model(name: str):
    import torch
    from escn_scn import ESCN_L6_M2_LAY12, SCN_T1_B1
    from gemnet_oc import BASE_HPARAMS
    from precision import OC20_NORMALIZERS

    from mlcalc.models.escn import ESCN
    from mlcalc.models.gemnet_oc import GemNetOC
    from mlcalc.models.scn import SCN
    from mlcalc.models.spherenet import SphereNet

    torch.manual_seed(0)
    if name == "gemnet_oc":
        model = GemNetOC.from_config(dict(BASE_HPARAMS, direct_forces=False))
    elif name == "gemnet_oc_direct":
        model = GemNetOC.from_config(BASE_HPARAMS)
    elif name == "escn":
        model = ESCN(**ESCN_L6_M2_LAY12)
    elif name == "scn":
        model = SCN.from_config(SCN_T1_B1)
    elif name == "spherenet":
        model = SphereNet()
    else:
        raise ValueError(f"unknown model {name!r}")
    if name != "spherenet":
        model.normalizers = dict(OC20_NORMALIZERS)
    return model.eval()


def one(name: str, n_atoms: int, chunk: int | None) -> dict:
    """Run one case in this process and return its measurements."""
    import torch
    from graph import copper

    from mlcalc import MLCalculator

    torch.set_num_threads(1)
    model = build_model(name)
    atoms = copper(n_atoms, rattle=0.05)
    if chunk is not None:
        model.chunk_size = chunk
    calc = MLCalculator(model, device="cpu", dtype="float32")
    atoms.calc = calc
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    error = None
    try:
        atoms.get_forces()
    except MemoryError as exc:
        error = str(exc)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "model": name,
        "atoms": len(atoms),
        "edges": getattr(calc, "last_num_edges", None),
        "seconds": seconds,
        "peak_gib": peak * 1024 / GIB,
        "added_gib": (peak - before) * 1024 / GIB,
        "error": error,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    p.add_argument("--models", default="gemnet_oc,gemnet_oc_direct,escn,scn,spherenet")
    p.add_argument("--chunk", type=int, default=None, help="the model's chunk_size (default: its own)")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "ATOMS"), help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.chunk)))
        return

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    print("| model | atoms | s/call | peak RSS (GiB) | added by the call (GiB) | note |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for size in args.sizes:
            cmd = [sys.executable, str(HERE / "memory.py"), "--one", name, str(size)]
            if args.chunk is not None:
                cmd += ["--chunk", str(args.chunk)]
            try:
                proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"| {name} | ~{size} | > {args.timeout:.0f} | - | - | timed out |", flush=True)
                continue
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                print(f"| {name} | ~{size} | - | - | - | exit {proc.returncode}: {tail} |", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            note = r["error"][:120] if r["error"] else ""
            print(
                f"| {name} | {r['atoms']} | {r['seconds']:.1f} | {r['peak_gib']:.2f} | {r['added_gib']:.2f} | {note} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
