"""Every benchmark table in one command; the output (with machine, date and command) goes to docs/performance.md.

    ./run python benchmarks/run.py [--fairchem VENV] [--quick] [--out docs/performance.md]

Runs, one after the other and pinned to one torch thread (each ratio comes from one run of one script):
precision.py (time and accuracy per matmul precision, OC20-size models), gemnet_oc.py and escn_scn.py (per call,
side by side with fairchem 1.10 when ``--fairchem VENV`` names the reference environment, whose python then runs
them; it needs ``pip install vesin platformdirs`` there and imports mlcalc from this checkout), graph.py (radius
graph vs vesin and ASE), skin.py (graph time per MD step with and without neighbour reuse), relax_batched.py
(mlcalc.optimize vs ASE one by one), inference_server.py (16 concurrent relaxations vs one by one),
ray_overhead.py (mlcalc.distributed on a local Ray vs serial) and memory.py (time and peak memory of one call at
1k / 5k / 20k atoms). The full run takes several hours on one core (memory.py's 5k and 20k calls most of it);
``--quick`` takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fairchem", help="reference venv with fairchem-core 1.10 (side-by-side columns)")
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats and smaller sizes (minutes instead of hours; no 5k/20k)"
    )
    p.add_argument(
        "--out", default=str(ROOT / "docs" / "performance.md"), help="where to write the tables (default: %(default)s, "
        "overwritten)"
    )
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ours = sys.executable
    ref = str(Path(args.fairchem) / "bin" / "python") if args.fairchem else ours
    q = args.quick
    runs = [
        ("Per call and matmul precision (OC20-size models, random weights)", ours,
         ["precision.py", "--repeats", "1" if q else "3"]),
        *([] if q else [("torch.compile rows (GemNet-OC base; the first call compiles)", ours,
                          ["precision.py", "--models", "gemnet_oc", "--compile", "--repeats", "3"])]),
        ("GemNet-OC base per call" + (", fairchem side by side" if args.fairchem else ""), ref,
         ["gemnet_oc.py", "--threads", "1", "--repeats", "1" if q else "3"]),
        ("eSCN / SCN per call" + (", fairchem side by side" if args.fairchem else ""), ref,
         ["escn_scn.py", "--threads", "1", "--repeats", "1" if q else "3"]),
        ("Radius graph", ours, ["graph.py", "--sizes", "100", "1000", *([] if q else ["10000"]), "--tables", "bulk"]),
        ("Neighbour reuse (skin) per MD step", ours, ["skin.py", "--sizes", "100", "1000", *([] if q else ["5000"]),
                                                     "--steps", "20" if q else "100"]),
        ("Batched relaxations (mlcalc.optimize) vs ASE one by one", ours,
         ["relax_batched.py", "--structures", "8" if q else "32"]),
        ("Concurrent relaxations through InferenceServer", ours, ["inference_server.py", "--n", "4" if q else "16"]),
        ("Ray overhead per structure (local, 2 workers)", ours, ["ray_overhead.py", "--n", "16" if q else "64"]),
        ("Time and peak memory of one call on large fcc Cu cells", ours,
         ["memory.py", "--sizes", *(["1000"] if q else ["1000", "5000", "20000"])]),
    ]
    command = "./run python benchmarks/run.py" + (" --quick" if q else "")
    command += " --fairchem VENV" if args.fairchem else ""
    head = [
        "# Performance", "",
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {cpu_name()} ({os.cpu_count()} cores), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; one torch thread per run; "
        f"command `{command}`. Compare ratios within a table (each comes from one run), not seconds across machines.",
        "",
    ]
    sections = []
    for title, python, argv in runs:
        print(f"== {title}", flush=True)
        proc = subprocess.run([python, str(HERE / argv[0]), *argv[1:]], cwd=HERE, env=env, capture_output=True,
                              text=True)
        body = proc.stdout.strip() or "(no output)"
        if proc.returncode:
            body += f"\n\nfailed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
        print(body, flush=True)
        sections += [f"## {title}", "", f"`{Path(python).name} benchmarks/{' '.join(argv)}`", "", body, ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(head + sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
