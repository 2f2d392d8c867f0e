"""Bounded-memory evaluation of per-edge and per-triplet work: consecutive group chunks and activation checkpointing.

Large structures make the per-triplet tensors of a three-body model (bases, messages, their gradients) the peak of a
call. Processing the rows in chunks of whole groups (e.g. all triplets of a run of output edges, which the index
builders lay out contiguously) bounds what one chunk allocates; with gradients, ``checkpoint`` keeps only each
chunk's inputs and recomputes the chunk during the backward pass (Chen et al. 2016, "Training deep nets with
sublinear memory cost"; ``torch.utils.checkpoint``), so the memory of the whole call grows linearly with the rows
and the largest transient is one chunk's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


@dataclass(frozen=True)
class Chunk:
    """Groups [g0, g1) and their rows [r0, r1) (rows of group g are contiguous, groups ascending)."""

    g0: int
    g1: int
    r0: int
    r1: int


def group_chunks(
    group_of_row: Tensor, num_groups: int, max_rows: int | None, max_groups: int | None = None
) -> list[Chunk]:
    """Split groups 0..num_groups-1 into consecutive chunks of at most ``max_rows`` rows and ``max_groups`` groups.

    ``group_of_row`` (R,): group index of each row, ascending (rows of one group contiguous). A group with more
    than ``max_rows`` rows is a chunk of its own; groups without rows belong to the chunk around them. ``None``
    limits mean one chunk. Returns at least one chunk (an empty one when there are no groups). One host sync.
    """
    if num_groups == 0:
        return [Chunk(0, 0, 0, 0)]
    counts = torch.bincount(group_of_row, minlength=num_groups).cpu().numpy()
    ends = np.cumsum(counts)  # rows before group g + 1
    total = int(ends[-1])
    if (max_rows is None or total <= max_rows) and (max_groups is None or num_groups <= max_groups):
        return [Chunk(0, num_groups, 0, total)]
    max_rows = total if max_rows is None else max(1, int(max_rows))
    max_groups = num_groups if max_groups is None else max(1, int(max_groups))
    chunks, g0, r0 = [], 0, 0
    while g0 < num_groups:
        g1 = int(np.searchsorted(ends, r0 + max_rows, side="right"))  # groups fitting in the row budget
        g1 = min(max(g1, g0 + 1), g0 + max_groups, num_groups)
        r1 = int(ends[g1 - 1])
        chunks.append(Chunk(g0, g1, r0, r1))
        g0, r0 = g1, r1
    return chunks


def checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """``fn(*args)``, under ``torch.utils.checkpoint`` (non-reentrant) when ``enabled`` and gradients are recorded.

    Checkpointed, autograd keeps only the inputs and runs ``fn`` again in the backward pass; ``fn`` must be
    deterministic (same outputs when recomputed), which all mlcalc model code is. Torch function modes active now
    that can be re-entered (a ``for_recompute()`` method, e.g. ``mlcalc.precision.Bfloat16Linears``) are active
    during the recomputation too (the backward pass runs outside them), so it computes what the forward did.
    """
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    modes = [m for m in _get_current_function_mode_stack() if hasattr(m, "for_recompute")]
    if not modes:
        return _torch_checkpoint(fn, *args, use_reentrant=False)

    @contextmanager
    def recompute() -> Iterator[None]:
        with ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode.for_recompute())
            yield

    def contexts() -> tuple[Any, Any]:
        return nullcontext(), recompute()

    return _torch_checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def split_rows(x: Tensor, chunks: list[Chunk], groups: bool = True) -> tuple[Tensor, ...]:
    """Views of ``x`` for each chunk: rows [g0, g1) of a per-group tensor (``groups``) or [r0, r1) of a per-row one.

    One ``torch.split`` node, so the backward pass assembles a single gradient for ``x`` (slicing chunk by chunk
    would allocate a full-size gradient per chunk)."""
    sizes = [(c.g1 - c.g0) if groups else (c.r1 - c.r0) for c in chunks]
    return torch.split(x, sizes, dim=0)


class _WriteRows(torch.autograd.Function):
    """``buffer[start:stop] = part`` in place, for buffers filled by disjoint row ranges. The backward hands the
    incoming gradient on to the earlier writes unchanged (autograd's copy into a slice clones it per write) and
    gives part its rows (a view). Twice differentiable."""

    @staticmethod
    def forward(ctx, buffer: Tensor, part: Tensor, start: int, stop: int) -> Tensor:
        buffer[start:stop] = part
        ctx.mark_dirty(buffer)
        ctx.rows = (start, stop)
        return buffer

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        start, stop = ctx.rows
        return grad, grad[start:stop], None, None


def assemble_rows(results: Iterable[tuple[int, int, Any]], size: int) -> Any:
    """Chunk outputs ``(start, stop, result)`` (result: one tensor or a tuple, each with stop - start rows) as
    tensors of ``size`` rows, equal to their ``torch.cat`` when the ranges tile [0, size) in order.

    Each chunk's outputs are copied into buffers allocated at the first chunk (with autograd, by ``_WriteRows``),
    so none of them outlives its chunk: a list of outputs kept for a cat interleaves small long-lived blocks with
    the chunks' temporaries, and glibc's heap then grows with every chunk (freed, never returned). ``results``
    should be a generator, so that each chunk's outputs are freed before the next chunk is computed.
    """
    outs: list[Tensor] = []
    single = True
    for start, stop, result in results:
        single = isinstance(result, Tensor)
        pieces = (result,) if single else tuple(result)
        if not outs:
            outs = [p.new_empty((size, *p.shape[1:])) for p in pieces]
        for k, piece in enumerate(pieces):
            if torch.is_grad_enabled() and (piece.requires_grad or outs[k].requires_grad):
                outs[k] = _WriteRows.apply(outs[k], piece, start, stop)
            else:
                outs[k][start:stop] = piece
        del result, pieces
    return outs[0] if single else tuple(outs)
