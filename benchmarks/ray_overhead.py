"""Overhead of mlcalc.distributed per structure: predict_many / relax_many on a local Ray vs the serial calls.

    ./run python benchmarks/ray_overhead.py [--n 64] [--workers 2]

OC20-style slabs (as benchmarks/inference_server.py) with the shipped GemNet-OC, torch pinned to one thread per
worker. Reports wall time, structures/s and (parallel wall x workers - serial) / n as the overhead per structure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ray
import torch
from inference_server import slabs  # benchmarks/ is on sys.path when run as a script

from mlcalc import load_calculator
from mlcalc.distributed import WorkerPool
from mlcalc.optimize import relax


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "checkpoints" / "gemnet_oc-emt.pt"
    p.add_argument("--checkpoint", default=str(default))
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    structures = slabs(args.n)
    calc = load_calculator(args.checkpoint, device="cpu")
    t0 = time.perf_counter()
    calc.predict(structures, batch_size=8)
    t_pred = time.perf_counter() - t0
    t0 = time.perf_counter()
    relax(structures, calc, fmax=0.05, batch_size=8, progress=False)
    t_relax = time.perf_counter() - t0
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    with WorkerPool(args.checkpoint, num_workers=args.workers, device="cpu") as pool:
        list(pool.iter_predict(structures[:2], chunk_size=1, progress=False))  # workers up and warm
        t0 = time.perf_counter()
        list(pool.iter_predict(structures, chunk_size=8, batch_size=8, progress=False))
        r_pred = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(pool.iter_relax(structures, chunk_size=8, progress=False, fmax=0.05, batch_size=8))
        r_relax = time.perf_counter() - t0
    ray.shutdown()
    w = args.workers
    print(f"| task | serial s | Ray, {w} workers, s | structures/s serial | structures/s Ray | overhead ms/structure |")
    print("|---|---|---|---|---|---|")
    for task, serial, par in (("single points", t_pred, r_pred), ("BFGS relaxations", t_relax, r_relax)):
        overhead = (par * w - serial) / args.n * 1000
        print(f"| {task} | {serial:.2f} | {par:.2f} | {args.n / serial:.1f} | {args.n / par:.1f} | {overhead:.1f} |")


if __name__ == "__main__":
    main()
