"""Scatter/segment helpers in plain torch (no torch_scatter)."""

from __future__ import annotations

import torch
from torch import Tensor


def scatter_sum(src: Tensor, index: Tensor, dim_size: int, dim: int = 0) -> Tensor:
    """Sum rows of ``src`` into ``dim_size`` buckets given by ``index`` along ``dim``.

    ``index`` is 1-D with ``src.shape[dim]`` entries. Returns a tensor whose ``dim`` has size ``dim_size``.
    """
    shape = list(src.shape)
    shape[dim] = dim_size
    out = src.new_zeros(shape)
    return out.index_add_(dim, index, src)


def scatter_mean(src: Tensor, index: Tensor, dim_size: int, dim: int = 0) -> Tensor:
    """Mean of the rows of ``src`` per bucket (empty buckets give 0)."""
    total = scatter_sum(src, index, dim_size, dim)
    count = torch.zeros(dim_size, dtype=src.dtype, device=src.device)
    count.index_add_(0, index, torch.ones_like(index, dtype=src.dtype))
    shape = [1] * src.dim()
    shape[dim] = dim_size
    return total / count.clamp(min=1).view(shape)


def segment_ranks(index: Tensor, dim_size: int) -> Tensor:
    """Position of each entry within its group, for an ``index`` sorted ascending. Shape as ``index``."""
    counts = torch.bincount(index, minlength=dim_size)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(index.numel(), device=index.device) - starts[index]
