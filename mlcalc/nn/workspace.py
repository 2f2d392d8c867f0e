"""Scratch buffers kept across a model's calls.

A model evaluated again and again on structures of similar size (a relaxation, MD) allocates the same large
temporaries every call. Large allocations come from fresh, unmapped memory (glibc serves blocks of 32 MiB and more
with mmap, and returns freed heap tops to the system), and on the virtual machines measured every fresh 4 KiB
page costs ~3 us in page faults: ~27,000 faults, ~80 ms, per 0.9 s call of GemNet-OC base on a 37-atom slab
(docs/performance.md, second session of 2026-12-01).
A ``Workspace`` keeps one buffer per role, grown when a call needs more and otherwise reused, so that its pages
stay mapped from one call to the next.

Buffers are per thread (two threads evaluating one model never share one) and are not part of the model's state:
a deep copy or a pickle of the owner gets an empty workspace. ``max_bytes`` bounds each buffer; a larger request
gets a fresh tensor that is not kept. The caller must be done with a role's buffer before asking for that role
again.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable

import torch
from torch import Tensor

#: default bound per kept buffer
MAX_BYTES = 256 * 2**20
#: a grown buffer gets this much room on top of the request (sizes drift by a few % between MD steps)
SLACK = 1.1


class Workspace:
    """Per-thread scratch buffers by role, kept across calls (see the module docstring).

    Args:
        max_bytes: bytes one kept buffer may hold (default 256 MiB); a larger request gets a fresh tensor that is
            not kept. A grown buffer is allocated with 10 % room (``SLACK``) for sizes that drift between calls.

    The buffers stay allocated until ``clear()`` (per thread) or until their thread ends; each thread that
    evaluates the owner keeps its own.
    """

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._local = threading.local()

    def _buffers(self) -> dict[tuple, Tensor]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def get(self, role: Hashable, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` (contiguous) that the next ``get`` of ``role`` overwrites."""
        numel = math.prod(shape)
        itemsize = dtype.itemsize
        if numel * itemsize > self.max_bytes:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (role, dtype, torch.device(device))
        buffers = self._buffers()
        buf = buffers.get(key)
        if buf is None or buf.numel() < numel:
            capacity = min(int(numel * SLACK) + 1, self.max_bytes // itemsize)
            buf = buffers[key] = torch.empty(capacity, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes this thread's buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._buffers().values())

    def clear(self) -> None:
        """Drop this thread's buffers."""
        self._buffers().clear()

    def __deepcopy__(self, memo: dict) -> Workspace:
        """An empty workspace with the same bound (buffers are not model state)."""
        return Workspace(self.max_bytes)

    def __getstate__(self) -> dict:
        """Pickled without buffers: only the bound."""
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        """An empty workspace with the pickled bound."""
        self.__init__(state["max_bytes"])
