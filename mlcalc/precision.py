"""bfloat16 linear layers for ``matmul_precision="medium"`` on CPUs.

``torch.set_float32_matmul_precision("medium")`` changes CUDA matmuls (bfloat16 inputs, float32 accumulation), but on
CPUs torch's float32 matrix products keep running in float32 (MKL sgemm) whatever the setting, so "medium" would
buy nothing there. Where the CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16), ``Bfloat16Linears`` makes the
learned linear layers (``torch.nn.functional.linear``: every Dense/Linear of the models, the bulk of their
arithmetic) run as bfloat16 matrix products: input and weight rounded to bfloat16, products accumulated in float32
by oneDNN, the product rounded to bfloat16 and returned as float32, the bias added in float32. Everything else
(geometry, bases, rotations, scatters, activations, other matrix products) stays float32. It is a
``TorchFunctionMode``: entered per evaluation on the evaluating thread (torch's mode stack is thread-local), it
changes nothing global. What it costs in accuracy is measured by ``benchmarks/precision.py``.
"""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_LINEAR = torch.nn.functional.linear
#: per thread: how many Bfloat16Linears modes are entered (torch's mode stack is thread-local too)
_ACTIVE = threading.local()


def bfloat16_products() -> bool:
    """Whether this thread is inside a ``Bfloat16Linears`` mode: model code may then also run its other large
    float32 matrix products in bfloat16 the same way (float32 accumulation, float32 result), e.g. GemNet-OC's
    padded bilinear layers."""
    if torch.compiler.is_compiling():
        return False
    return getattr(_ACTIVE, "depth", 0) > 0


@functools.cache
def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux /proc/cpuinfo flags avx512_bf16 or amx_bf16)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


class Bfloat16Linears(TorchFunctionMode):
    """Within this mode, float32 ``torch.nn.functional.linear`` calls run as bfloat16 matrix products (float32
    accumulation, bfloat16-rounded product, float32 result and bias); all other operations are untouched."""

    def __enter__(self) -> Bfloat16Linears:
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1
        try:
            return super().__enter__()
        except BaseException:
            _ACTIVE.depth -= 1
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            _ACTIVE.depth -= 1

    def for_recompute(self) -> Bfloat16Linears:
        """A fresh mode for activation-checkpoint recomputation (``mlcalc.nn.chunking.checkpoint``)."""
        return Bfloat16Linears()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _LINEAR:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu":
                out = _LINEAR(x.to(torch.bfloat16), weight.to(torch.bfloat16)).to(torch.float32)
                return out if bias is None else out + bias
        return func(*args, **kwargs)
