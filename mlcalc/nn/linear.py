"""Linear layers whose inference calls on CPUs run oneDNN's prepacked matrix product.

``Linear`` is ``torch.nn.Linear`` (same parameters, same state_dict keys, same result up to float32 rounding). When
no gradient is recorded through the call (direct-force inference: ``torch.no_grad``, inference mode, or inputs and
parameters that do not require grad), on a CPU, in float32, its product runs through oneDNN with the weight
reordered once into oneDNN's blocked layout and kept (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, the kernels TorchInductor's CPU weight prepacking uses), with an optional SiLU fused into the
product's epilogue. On the OC20-size GemNet-OC, eSCN and SCN layers (about a thousand rows of 512 channels) this is
5-20 % faster than ``torch.nn.functional.linear`` (MKL sgemm on a plain weight) on the CPU measured, an AVX-512
AMD EPYC (``docs/performance.md``): the weight is not re-blocked every call and the activation does not take a
second pass over the output.

Inside ``mlcalc.precision.Bfloat16Linears`` ("medium" on CPUs with bfloat16 arithmetic) the prepacked weight is a
bfloat16 copy and the call keeps that mode's arithmetic: bfloat16 input and weight, float32 accumulation, product
rounded to bfloat16, returned as float32, bias added in float32.

Every other call (autograd recording, CUDA, float64, torch.compile tracing, an empty input, a torch build without
these oneDNN kernels) is ``torch.nn.functional.linear``. The prepacked copies cost one extra copy of each weight
(~156 MB for GemNet-OC base); they live in a weak dictionary keyed by the weight and are rebuilt when the weight is
changed in place (its version counter), moved or replaced; the calculator's memory check counts them before they
exist (``pending_pack_bytes``). Nothing global is changed.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from mlcalc.precision import bfloat16_products

logger = logging.getLogger(__name__)

#: rows the prepacked layout is chosen for (oneDNN's batch-size hint); fixed, so results do not depend on which
#: structure was evaluated first
_PACK_ROWS = 1024
#: weight (a view's base) -> {(dtype, storage offset, shape, stride): ((version counter, data_ptr), packed weight)}
_PACKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build runs oneDNN's prepacked linear on the CPU (checked once on a tiny product)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        w = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 7
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        fused = torch.ops.mkldnn._linear_pointwise(x, packed, None, "swish", [], "")
        ref = x @ w.T
        return bool(
            torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
            and torch.allclose(fused, nn.functional.silu(ref), rtol=1e-5, atol=1e-5)
        )
    except Exception as err:  # noqa: BLE001 - any failure means: use torch.nn.functional.linear
        logger.debug("oneDNN prepacked linear unavailable: %s", err)
        return False


def _packed_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    # a view of a parameter (e.g. one block of a concatenated layer's weight) is cached under the parameter
    owner = weight._base if weight._base is not None else weight
    entry = _PACKED.get(owner)
    if entry is None:
        entry = {}
        _PACKED[owner] = entry
    # one entry per view of the owner; replaced (not added) when the data moves (``.to()``, ``.data =``)
    key = (dtype, weight.storage_offset(), tuple(weight.shape), weight.stride())
    stamp = (weight._version, weight.data_ptr())  # views share their base's version counter
    hit = entry.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), _PACK_ROWS)
    entry[key] = (stamp, packed)
    return packed


def _fast_path(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0 or x.dim() < 2:
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    return onednn_linear_available()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, silu: bool = False) -> Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``, then ``silu`` if asked; see the module docstring for when
    the prepacked oneDNN product runs instead.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None. Returns
    (..., out_features) in x's dtype.
    """
    if not _fast_path(x, weight, bias):
        out = nn.functional.linear(x, weight, bias)
        return nn.functional.silu(out, inplace=not out.requires_grad) if silu else out
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    if bfloat16_products():
        out = torch.ops.mkldnn._linear_pointwise(
            rows.to(torch.bfloat16), _packed_weight(weight, torch.bfloat16), None, "none", [], ""
        ).to(torch.float32)
        if bias is not None:
            out += bias
        if silu:
            nn.functional.silu(out, inplace=True)
    else:
        out = torch.ops.mkldnn._linear_pointwise(
            rows, _packed_weight(weight, torch.float32), bias, "swish" if silu else "none", [], ""
        )
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``torch.nn.Linear`` (same parameters and state_dict keys) whose inference calls on CPUs use oneDNN's
    prepacked product (``mlcalc.nn.linear``). ``forward(x, silu=True)`` applies SiLU to the output (fused into the
    product on that path)."""

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:  # type: ignore[override]
        """x (..., in_features) -> (..., out_features): x @ weight.T + bias, then SiLU with ``silu``."""
        return linear(x, self.weight, self.bias, silu=silu)


def pending_pack_bytes(module: nn.Module) -> int:
    """Bytes that the prepacked copies of ``module``'s float32 CPU ``Linear`` weights will add on its first call
    without autograd (0 for weights already packed, or where the oneDNN path is unavailable): what the memory check
    adds to a direct-force model's estimate before that call."""
    if not onednn_linear_available():
        return 0
    total = 0
    for layer in module.modules():
        w = layer.weight if isinstance(layer, Linear) else None
        if w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w not in _PACKED:
            total += w.numel() * w.element_size()
    return total
