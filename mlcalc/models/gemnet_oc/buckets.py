"""Padded products over buckets of similar group sizes: GemNet-OC's quadruplet bilinear with less padding.

The efficient bilinear layers pad every output edge to the largest group (``Aggregation.kmax``) and multiply
(E, S, kmax) x (E, kmax, C) per edge. On an OC20 slab the quadruplet groups range from 0 to 247 rows (median ~200,
a quarter below 60), so ~43 % of that product is zeros. Here the edges are sorted by group size and cut into
buckets, each padded only to its own largest group: a bucket starts at the largest remaining group k and takes
every group larger than ``ratio`` x k. Empty groups are skipped (their output is zero). The padded values of all
buckets live in one flat (V, ...) layout, V = sum over buckets of (edges x width), so each operand is one gather.

Every real term of each per-edge sum is the same product as in the fully padded layout, only fewer zero terms are
added: the result equals the padded product up to float32 summation order. Used without autograd, for calls that
run in one chunk and are not being traced by torch.compile (bucket sizes depend on the data).

The layer multiplies the result by each edge's projected radial basis, rad_W1 @ (sph @ m); with
``BucketedBasis.product(rad=...)`` that is computed as (rad_W1 @ sph) @ m, the first product once per call, as the
bases are the same for every interaction block. The bilinear layer itself is GemNet-OC's (Gasteiger et al., "GemNet-OC:
developing graph neural networks for large and diverse molecular simulation datasets", TMLR 2022; fairchem's
``EfficientInteractionBilinear``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mlcalc.nn.scatter import gather
from mlcalc.nn.workspace import Workspace

#: a bucket takes the groups larger than RATIO x its largest one (occupancy >= RATIO, ~93 % on an OC20 slab)
RATIO = 0.75


@dataclass
class BucketPlan:
    """Buckets of an ``Aggregation``'s slots: slots[b] (n_b,) slot ids, widths[b] its padded width, offsets[b]
    its start in the flat layout; flat_of_row (R,) each row's position in the flat layout; volume V."""

    slots: list[Tensor]
    widths: list[int]
    offsets: list[int]
    flat_of_row: Tensor
    volume: int
    #: per source index (id, None for the rows themselves): (V,) source row of each flat position
    positions: dict[int | None, Tensor] = field(default_factory=dict, repr=False)
    #: where the large operands live: the model's ``Workspace`` (kept across calls) or, without one, buffers of
    #: this plan reused by every ``BucketedBasis.product`` of the call. On the VMs measured a fresh 20 MB tensor
    #: costs ~10 ms in page faults, more than the gather that fills it
    pool: Workspace | None = field(default=None, repr=False)
    workspace: dict[tuple, Tensor] = field(default_factory=dict, repr=False)
    _padding: Tensor | None = field(default=None, repr=False)

    @staticmethod
    def of(outer: Tensor, inner: Tensor, size: int, ratio: float = RATIO, pool: Workspace | None = None) -> BucketPlan:
        """Plan for rows with slot ``outer`` (R,) and position ``inner`` (R,) among ``size`` slots; the large
        operands in ``pool`` when given."""
        counts = torch.bincount(outer, minlength=size)
        sorted_counts, order = torch.sort(counts, descending=True, stable=True)
        desc = sorted_counts.tolist()
        neg = [-c for c in desc]  # ascending, for bisect
        slots, widths, offsets = [], [], []
        start, offset = 0, 0
        flat_of_slot = torch.zeros(size, dtype=torch.long, device=outer.device)
        while start < size and desc[start] > 0:
            width = desc[start]
            stop = bisect.bisect_left(neg, -ratio * width, lo=start + 1)  # first group <= ratio x width
            ids = order[start:stop]
            flat_of_slot[ids] = offset + width * torch.arange(stop - start, device=outer.device)
            slots.append(ids)
            widths.append(width)
            offsets.append(offset)
            offset += (stop - start) * width
            start = stop
        flat_of_row = flat_of_slot[outer] + inner
        return BucketPlan(slots, widths, offsets, flat_of_row, offset, pool=pool)

    def source_positions(self, index: Tensor | None) -> Tensor:
        """(V,) source row of each flat position: the row itself, or ``index[row]``; row 0 for padding."""
        key = None if index is None else id(index)
        positions = self.positions.get(key)
        if positions is None:
            rows = self.flat_of_row.shape[0]
            source = torch.arange(rows, device=self.flat_of_row.device) if index is None else index
            positions = torch.zeros(self.volume, dtype=torch.long, device=self.flat_of_row.device)
            positions[self.flat_of_row] = source
            self.positions[key] = positions
        return positions

    def gather(
        self, src: Tensor, index: Tensor | None = None, role: str | None = None, zero_pad: bool = True
    ) -> Tensor:
        """(V, ...) flat padded layout of the rows' values src[row] (or src[index[row]]), zeros in the padding
        (copies of src's first row without ``zero_pad``: for an operand whose partner is zero there). ``role``:
        written into the plan's buffer of that role, which the next gather of the role overwrites."""
        if src.shape[0] == 0:  # nothing to gather: all padding
            return src.new_zeros((self.volume, *src.shape[1:]))
        # gathered with src's first row in the padding, then those positions zeroed: no copy of src with a zero row
        # appended (for the bases' (Q, n) factors that copy cost more than the gather)
        positions = self.source_positions(index)
        if role is None:
            out = gather(src, positions)
        else:
            out = torch.index_select(src, 0, positions, out=self.buffer(role, (self.volume, *src.shape[1:]), src))
        return out.index_fill_(0, self.padding(), 0) if zero_pad else out

    def padding(self) -> Tensor:
        """(V - R,) the flat positions that hold no row."""
        if self._padding is None:
            free = torch.ones(self.volume, dtype=torch.bool, device=self.flat_of_row.device)
            free[self.flat_of_row] = False
            self._padding = torch.nonzero(free).flatten()
        return self._padding

    def buffer(self, role: str, shape: tuple[int, ...], like: Tensor, zeros: bool = False) -> Tensor:
        """The buffer of ``role`` with this shape and like's dtype and device; ``zeros``: zero-filled the first
        time the plan hands it out."""
        key = (role, shape, like.dtype, like.device)
        buf = self.workspace.get(key)
        if buf is None:
            if self.pool is not None:
                buf = self.pool.get(("gemnet_oc.buckets", role), shape, like.dtype, like.device)
                if zeros:
                    buf.zero_()
            else:
                buf = like.new_zeros(shape) if zeros else like.new_empty(shape)
            self.workspace[key] = buf
        return buf

    def bucket(self, flat: Tensor, b: int) -> Tensor:
        """Bucket b of a flat layout (V, *C) as (n_b, width_b, *C) (a view)."""
        n, width = self.slots[b].shape[0], self.widths[b]
        return flat[self.offsets[b] : self.offsets[b] + n * width].view(n, width, *flat.shape[1:])


@dataclass
class BucketedBasis:
    """An angular basis of S values per row in a plan's flat layout (V, S): per bucket the (n_b, S, width_b)
    operand of the padded product. Built by ``outer_product``; ``bfloat16`` keeps one bfloat16 copy."""

    plan: BucketPlan
    flat: Tensor
    _bfloat16: Tensor | None = field(default=None, repr=False)
    #: (rad, bfloat16) -> per bucket rad[slots] @ operand (n_b, I, width_b): see ``product``'s ``rad``
    _projected: tuple[Tensor, bool, list[Tensor]] | None = field(default=None, repr=False)

    @staticmethod
    def outer_product(plan: BucketPlan, first: Tensor, second: Tensor) -> BucketedBasis:
        """Rows' outer products first (R, n) x second (R, n) -> (R, n * n) values, laid out flat by the plan."""
        a, b = plan.gather(first, role="first"), plan.gather(second, role="second")  # (V, n)
        n = first.shape[1]
        outer = plan.buffer("outer", (plan.volume, n, n), first)
        return BucketedBasis(plan, torch.mul(a[:, :, None], b[:, None, :], out=outer).flatten(1))

    def operand(self, b: int, bfloat16: bool = False) -> Tensor:
        """(n_b, S, width_b) of bucket b (a transposed view of the flat layout)."""
        flat = self.flat
        if bfloat16:
            if self._bfloat16 is None:
                self._bfloat16 = self.flat.to(torch.bfloat16)
            flat = self._bfloat16
        return torch.transpose(self.plan.bucket(flat, b), 1, 2)

    def projected(self, rad: Tensor, bfloat16: bool = False) -> list[Tensor]:
        """Per bucket rad[slots] @ operand: (n_b, I, width_b) from a per-slot matrix rad (size, I, S); kept while
        rad is the last one asked for (a call's blocks share one projected radial basis)."""
        hit = self._projected
        if hit is not None and hit[0] is rad and hit[1] == bfloat16:
            return hit[2]
        volume, width = self.plan.volume, rad.shape[1]
        flat = self.plan.buffer("projected", (volume * width,), self.flat)
        parts = []
        start = 0
        for b, slots in enumerate(self.plan.slots):
            n, k = slots.shape[0], self.plan.widths[b]
            part = flat[start : start + n * width * k].view(n, width, k)
            torch.bmm(rad[slots].to(self.flat.dtype), self.operand(b), out=part)
            parts.append(part.to(torch.bfloat16) if bfloat16 else part)
            start += n * width * k
        self._projected = (rad, bfloat16, parts)
        return parts

    def product(
        self, m: Tensor, size: int, index: Tensor | None = None, bfloat16: bool = False, rad: Tensor | None = None
    ) -> Tensor:
        """sum_k basis[e, :, k] m[row(e, k)] for every slot e: (size, S, C) from the rows' values m (R, C), or
        m[index[row]] with ``index``. With ``rad`` (size, I, S): rad[e] @ that sum, (size, I, C), computed as
        (rad[e] @ basis[e]) @ m with the first product made once per rad (``projected``): the bilinear layers
        multiply every block's messages with the same projected radial basis. ``bfloat16``: operands in
        bfloat16, float32 accumulation and result. The result is a buffer of the plan that the next ``product``
        of the call overwrites: consume it at once."""
        src = m.to(torch.bfloat16) if bfloat16 else m
        flat_m = self.plan.gather(src, index, role="messages", zero_pad=False)  # (V, C); the basis is 0 in padding
        operands = self.projected(rad, bfloat16) if rad is not None else None
        rows = self.flat.shape[1] if rad is None else rad.shape[1]
        # reused: every call writes the same slots, the others (empty groups) stay zero
        out = self.plan.buffer("product", (size, rows, m.shape[1]), m, zeros=True)
        for b, slots in enumerate(self.plan.slots):
            left = operands[b] if operands is not None else self.operand(b, bfloat16)
            part = torch.bmm(left, self.plan.bucket(flat_m, b))
            out.index_copy_(0, slots, part.to(out.dtype))
        return out
