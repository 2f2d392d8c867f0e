"""Gather/scatter/segment helpers in plain torch (no torch_scatter).

Determinism: ``gather`` and ``scatter_sum`` go through ``index_select`` / ``index_add_``, which on CPU sum in a fixed
order whatever the thread count, so repeated calls on the same input are bit-identical (advanced indexing
``x[index]`` is not: its backward, ``index_put_(accumulate=True)``, uses unordered atomic float32 adds on CPU when
torch runs with more than one thread). On CUDA ``index_add_`` uses atomics, so GPU results are not bit-repeatable.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gather(src: Tensor, index: Tensor) -> Tensor:
    """Rows ``src[index]`` for an integer ``index`` of any shape: (*index.shape, *src.shape[1:]).

    Same values as advanced indexing, but the backward sums the gathered gradients with ``index_add_`` (fixed order)
    instead of ``index_put_(accumulate=True)`` (atomic adds on CPU with several threads): use it wherever gradients
    flow back through a gather with repeated indices (atoms -> edges, edges -> triplets, ...).
    """
    if index.dim() == 1:
        return torch.index_select(src, 0, index)
    return torch.index_select(src, 0, index.reshape(-1)).view(*index.shape, *src.shape[1:])


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
