"""Refuse a system that cannot fit in memory before evaluating it.

A model that runs out of memory midway does not always fail cleanly: a CUDA allocation raises (mlcalc turns that
into MemoryError), but on Linux an over-committed CPU process is usually killed by the kernel's OOM killer, with no
Python error at all. So before each evaluation the calculator compares the model's estimate of the call's peak
(``MLModel.estimate_memory``: a linear function of atoms, edges and triplets fitted to ``benchmarks/memory.py``
measurements, with the allocator's overhead) with the memory the device has free, and raises MemoryError naming the
size of the system when it cannot fit.

Free memory: on CUDA, ``torch.cuda.mem_get_info`` plus what torch's caching allocator holds unused; on Linux CPUs,
``MemAvailable`` of /proc/meminfo, lowered to the cgroup's remaining limit (containers, batch schedulers) when there
is one. Where it cannot be read, nothing is checked.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GIB = 1024**3


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2 unified hierarchy
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            limit, usage = _read_int(base / "memory.max"), _read_int(base / "memory.current")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            limit, usage = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
            if limit is not None and limit >= 1 << 60:  # v1 "no limit"
                limit = None
        else:
            continue
        if limit is not None and usage is not None:
            return max(limit - usage, 0)
    return None


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes an evaluation on ``device`` can still allocate, or None where that cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError):
            return None
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return None
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        return None
    headroom = _cgroup_headroom()
    if available is not None and headroom is not None:
        return min(available, headroom)
    return available if available is not None else headroom


def check_fits(model: torch.nn.Module, graph, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise MemoryError when ``model.estimate_memory(graph)`` (bytes at float32, scaled to ``dtype``; plus, for a
    direct-force model's first float32 CPU call, the prepacked weight copies of ``mlcalc.nn.linear``) exceeds
    ``available_bytes(device)``. No-op for models without an estimate or devices without a reading."""
    estimate_fn = getattr(model, "estimate_memory", None)
    estimate = estimate_fn(graph) if estimate_fn is not None else None
    if not estimate:
        return
    estimate = int(estimate * dtype.itemsize / 4)
    direct = getattr(model, "direct_forces", False) or not getattr(model, "regress_forces", True)
    if direct and torch.device(device).type == "cpu" and dtype == torch.float32:
        from mlcalc.nn.linear import pending_pack_bytes

        estimate += pending_pack_bytes(model)  # the first autograd-free call keeps packed copies of the weights
    available = available_bytes(device)
    if available is None or estimate <= available:
        return
    name = getattr(model, "registry_name", type(model).__name__)
    raise MemoryError(
        f"{name} needs about {estimate / GIB:.1f} GiB for {graph.num_atoms} atoms in {graph.num_graphs} "
        f"structure(s) ({graph.num_edges} edges within {model.cutoff:g} Å), more than the {available / GIB:.1f} GiB "
        f"free on {device}: use fewer atoms per structure (or smaller batches, predict(batch_size=...)) or a "
        f"machine with more memory (the estimate is a fit to benchmarks/memory.py at the model's default chunk_size "
        f"and activation checkpointing; check_memory=False on the calculator skips this check)"
    )


@functools.cache
def _malloc_trim():  # noqa: ANN202
    """glibc's ``malloc_trim`` (Linux with glibc), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the operating system (glibc ``malloc_trim(0)``; nothing elsewhere).

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB) for reuse, and a long loop of chunked work
    whose temporaries vary in size fragments that heap: the resident memory of a call grows well beyond what its
    live tensors hold (SphereNet at 5,000 atoms: ~1.5 GiB live, ~4.7 GiB resident). Called between the layers of a
    chunked call, this returns those pages; it changes no allocator setting and costs a walk over the free lists.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
