"""GemNet-OC building blocks: scaled activations, dense/residual layers, scale factors, embeddings and the
efficient (padded-matmul) bilinear layers. Parameter names follow fairchem's state_dict."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mlcalc.models.gemnet_oc.buckets import BucketedBasis, BucketPlan
from mlcalc.nn.chunking import Chunk, assemble_rows, checkpoint, split_rows
from mlcalc.nn.init import init_skipped
from mlcalc.nn.linear import Linear, linear
from mlcalc.nn.scatter import gather
from mlcalc.nn.workspace import Workspace
from mlcalc.precision import bfloat16_products

#: a chunk function's result: one tensor or a tuple of tensors, each with the chunk's rows first
ChunkResult = Tensor | tuple[Tensor, ...]


# ---------------------------------------------------------------------------------------------- initialisers
def he_orthogonal_init(tensor: Tensor) -> Tensor:
    """Semi-orthogonal matrix, standardised per output row, with variance 1 / fan_in (in place); returned as is
    inside ``mlcalc.nn.init.skip_init()``."""
    if init_skipped():
        return tensor
    with torch.no_grad():
        nn.init.orthogonal_(tensor)
        fan_in = tensor.shape[:-1].numel() if tensor.dim() == 3 else tensor.shape[1]
        axis = [0, 1] if tensor.dim() == 3 else 1
        var, mean = torch.var_mean(tensor, dim=axis, unbiased=True, keepdim=True)
        tensor.copy_((tensor - mean) / (var + 1e-6) ** 0.5 * (1 / fan_in) ** 0.5)
    return tensor


def get_initializer(name: str):
    """Weight initialiser for the output layers ("HeOrthogonal" or "zeros")."""
    key = name.lower()
    if key == "heorthogonal":
        return he_orthogonal_init
    if key == "zeros":
        return nn.init.zeros_
    raise ValueError(f"unknown output_init {name!r} (known: HeOrthogonal, zeros)")


# ---------------------------------------------------------------------------------------------- basic layers
def needs_grad(x: Tensor) -> bool:
    """Whether autograd records operations on x (else in-place arithmetic on temporaries is safe)."""
    return torch.is_grad_enabled() and x.requires_grad


def mul_fresh(fresh: Tensor, other: Tensor) -> Tensor:
    """fresh * other (same shape), written into ``fresh``, a temporary no one else reads, when no gradient is
    recorded: no new buffer, the same products."""
    if needs_grad(fresh) or needs_grad(other):
        return fresh * other
    return fresh.mul_(other)


class ScaledSiLU(nn.Module):
    """SiLU(x) / 0.6, roughly variance preserving."""

    def __init__(self) -> None:
        super().__init__()
        self.scale_factor = 1 / 0.6
        self._activation = nn.SiLU()

    def forward(self, x: Tensor, fresh: bool = False) -> Tensor:
        """``fresh``: x is a temporary no one else reads; without autograd it is then overwritten (no new buffer,
        same arithmetic)."""
        if fresh and not needs_grad(x):
            return nn.functional.silu(x, inplace=True).mul_(self.scale_factor)
        # in place on the fresh SiLU output (its backward needs only x): saves a large temporary
        return self._activation(x).mul_(self.scale_factor)


class Dense(nn.Module):
    """Linear layer (``.linear``) followed by an optional scaled SiLU."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activation: str | None = None):
        super().__init__()
        self.linear = Linear(in_features, out_features, bias=bias)
        self.reset_parameters()
        act = activation.lower() if isinstance(activation, str) else activation
        if act in ("silu", "swish"):
            self._activation: nn.Module = ScaledSiLU()
        elif act is None:
            self._activation = nn.Identity()
        else:
            raise ValueError(f"unknown activation {activation!r} (GemNet-OC supports silu/swish or None)")

    def reset_parameters(self, initializer=he_orthogonal_init) -> None:
        initializer(self.linear.weight)
        if self.linear.bias is not None:
            with torch.no_grad():
                self.linear.bias.fill_(0)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self._activation, ScaledSiLU) and not needs_grad(x):
            # SiLU fused into the product where mlcalc.nn.linear can (no autograd), then the scale in place
            return self.linear(x, silu=True).mul_(self._activation.scale_factor)
        return self.activate(self.linear(x))

    def activate(self, x: Tensor) -> Tensor:
        """The activation of a fresh pre-activation x (may overwrite x when no gradient is recorded)."""
        if isinstance(self._activation, ScaledSiLU):
            return self._activation(x, fresh=True)
        return x


class ResidualLayer(nn.Module):
    """``(x + MLP(x)) / sqrt(2)`` with ``n_layers`` bias-free Dense layers (``.dense_mlp``)."""

    def __init__(self, units: int, n_layers: int = 2, activation: str | None = None) -> None:
        super().__init__()
        self.dense_mlp = nn.Sequential(*[Dense(units, units, activation=activation) for _ in range(n_layers)])
        self.inv_sqrt_2 = 1 / math.sqrt(2)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.dense_mlp) == 0:
            return (x + x) * self.inv_sqrt_2
        # in place on the fresh MLP output (same arithmetic as (x + mlp(x)) / sqrt(2))
        return self.dense_mlp(x).add_(x).mul_(self.inv_sqrt_2)


class ScaleFactor(nn.Module):
    """Fitted multiplicative constant (``.scale_factor``, not trainable). A value of 0 means 'not fitted' = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.tensor(0.0), requires_grad=False)

    def forward(self, x: Tensor, ref: Tensor | None = None) -> Tensor:  # ref kept for fairchem's call signature
        s = self.scale_factor
        return x * torch.where(s == 0, torch.ones_like(s), s)


# ---------------------------------------------------------------------------------------------- chunked execution
@dataclass(frozen=True)
class Chunking:
    """How the large per-row computations of one forward run; the result does not depend on it (up to rounding).

    rows: rows per chunk: edges, triplets or atoms of the tensor a row-wise computation maps, and for the padded
    layers slots x kmax padded rows (a chunk holds at least one slot); None = everything at once.
    checkpoint: keep only each chunk's inputs for the backward and recompute its intermediates there
    (``mlcalc.nn.chunking.checkpoint``: non-reentrant ``torch.utils.checkpoint``); only while autograd records.
    """

    rows: int | None = None
    checkpoint: bool = False

    def bounds(self, n: int) -> list[Chunk]:
        """Row ranges covering n rows (``Chunk`` with g = r), one range (possibly empty) without a chunk size."""
        if self.rows is None or n <= self.rows:
            return [Chunk(0, n, 0, n)]
        return [Chunk(s, min(s + self.rows, n), s, min(s + self.rows, n)) for s in range(0, n, self.rows)]


#: everything at once, no recomputation (the reference behaviour)
PLAIN = Chunking()


#: one call of a chunked computation: its output rows [start, stop) and the arguments of the chunk function
ChunkCall = tuple[int, int, tuple]


def run_chunks(
    fn: Callable[..., ChunkResult], calls: Sequence[ChunkCall], size: int, chunking: Chunking
) -> ChunkResult:
    """Assemble the outputs of ``fn(*args)`` for each call (start, stop, args) into tensors of ``size`` rows.

    fn returns one tensor (or a tuple) with stop - start rows. Under ``chunking.checkpoint`` each call is
    checkpointed: autograd keeps its arguments instead of its intermediates. Tensors that fn reads must come in
    args, not through a closure (an enclosing checkpoint can then drop and recompute them; a closure would keep
    them alive), and as pieces (``split_rows``) rather than sliced inside fn: the gradient of a slice is a
    zero-padded tensor of the whole size, that of a split is assembled once.
    """
    if len(calls) == 1:
        return checkpoint(fn, *calls[0][2], enabled=chunking.checkpoint)
    return assemble_rows(
        ((start, stop, checkpoint(fn, *args, enabled=chunking.checkpoint)) for start, stop, args in calls), size
    )


def map_rows(
    fn: Callable[..., ChunkResult], rows: Sequence[Tensor], shared: Sequence = (), chunking: Chunking = PLAIN
) -> ChunkResult:
    """``fn(*rows, *shared)`` for a row-wise fn, evaluated on chunks of ``chunking.rows`` rows of every tensor in
    ``rows`` (all with the same number of rows); ``shared`` is passed whole. Same result as one call."""
    n = rows[0].shape[0]
    chunks = chunking.bounds(n)
    pieces = [split_rows(r, chunks) for r in rows]
    calls = [(c.r0, c.r1, (*(p[i] for p in pieces), *shared)) for i, c in enumerate(chunks)]
    return run_chunks(fn, calls, n, chunking)


class _IndexAdd(torch.autograd.Function):
    """``out.index_add(0, index, src)`` whose backward keeps only the index (autograd's index_add keeps src, a
    tensor as large as the rows summed). Twice differentiable: the backward is a gather."""

    @staticmethod
    def forward(ctx, out: Tensor, index: Tensor, src: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        return out.index_add(0, index, src)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor]:
        (index,) = ctx.saved_tensors
        return grad, None, gather(grad, index)


def scatter_rows(
    fn: Callable[..., Tensor], rows: Sequence[Tensor], index: Tensor, dim_size: int, chunking: Chunking
) -> Tensor:
    """``scatter_sum(fn(*rows), index, dim_size)`` for a row-wise fn of tensors with R = len(index) rows, one
    chunk at a time (the same sums in the same order, without the (R, C) tensor; autograd keeps none of it)."""
    out: Tensor | None = None
    chunks = chunking.bounds(index.shape[0])
    pieces = [split_rows(r, chunks) for r in rows]
    for i, c in enumerate(chunks):
        start, stop = c.r0, c.r1
        part = checkpoint(fn, *(p[i] for p in pieces), enabled=chunking.checkpoint)
        if out is None:
            out = part.new_zeros((dim_size, *part.shape[1:]))
        if needs_grad(part) or needs_grad(out):
            out = _IndexAdd.apply(out, index[start:stop], part)
        else:
            out = out.index_add_(0, index[start:stop], part)
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------- padded aggregation
@dataclass
class Aggregation:
    """Row -> (slot, position) map for a zero-padded dense layout of a ragged grouping.

    outer: (R,) output slot of each row (edge or atom); ascending for triplets and quadruplets, by target atom for
    neighbour layouts. inner: (R,) position of the row inside its slot. size: number of slots. kmax: largest
    group size (the padded width); the index builders leave it at -1 and ``indices.resolve_kmax`` fills all of
    them with one device sync. ``indices.plan_chunks`` may add ``chunks`` (slot ranges [g0, g1) with their rows
    [r0, r1) in slot order, ``mlcalc.nn.chunking.Chunk``), ``order`` (the rows sorted by slot, where outer is not
    ascending) and, for a layout whose rows are the slots of an inner layout (edges -> atoms over triplets ->
    edges), ``inner_rows``: the inner layout's row range [start, stop) of each chunk.
    """

    outer: Tensor
    inner: Tensor
    size: int
    kmax: int
    chunks: list[Chunk] | None = None
    order: Tensor | None = None
    inner_rows: list[tuple[int, int]] | None = None
    #: per call (an Aggregation lives for one forward): padded source indices of ``pad_gather`` and reusable
    #: output buffers, so repeated paddings of one layout (one per interaction block) gather into memory that
    #: is already mapped instead of zero-filling fresh pages and scattering
    _pad_index: dict[tuple, Tensor] = field(default_factory=dict, repr=False, compare=False)
    _workspace: dict[tuple, Tensor] = field(default_factory=dict, repr=False, compare=False)
    _bfloat16: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)
    _buckets: BucketPlan | None = field(default=None, repr=False, compare=False)
    #: the model's scratch buffers (kept across calls) for the reused padded operands, when the model sets it
    pool: Workspace | None = field(default=None, repr=False, compare=False)

    def bucket_plan(self) -> BucketPlan | None:
        """The slots in buckets of similar size (``buckets.BucketPlan``, kept for the call), or None where they
        do not apply: a call in several chunks, or torch.compile tracing (bucket sizes depend on the data)."""
        if torch.compiler.is_compiling() or (self.chunks is not None and len(self.chunks) > 1):
            return None
        if self._buckets is None:
            self._buckets = BucketPlan.of(self.outer, self.inner, self.size, pool=self.pool)
        return self._buckets

    def bfloat16_of(self, x: Tensor) -> Tensor:
        """``x.to(torch.bfloat16)``, kept while x is the last tensor asked for (the basis every block multiplies)."""
        if self._bfloat16 is None or self._bfloat16[0] is not x:
            self._bfloat16 = (x, x.to(torch.bfloat16))
        return self._bfloat16[1]

    def chunk_list(self) -> list[Chunk]:
        """The planned chunks, or one chunk of everything."""
        return self.chunks if self.chunks is not None else [Chunk(0, self.size, 0, self.outer.shape[0])]

    def slot_calls(self, per_slot: Sequence[Tensor], shared: Sequence[Tensor] = ()) -> list[ChunkCall]:
        """``run_chunks`` calls over the slots, for a function of (slot_start, slot_stop, row_start, row_stop,
        *pieces, *shared): pieces are the chunk's slots of each tensor in ``per_slot`` (size rows each)."""
        chunks = self.chunk_list()
        pieces = [split_rows(t, chunks) for t in per_slot]
        return [(c.g0, c.g1, (c.g0, c.g1, c.r0, c.r1, *(p[i] for p in pieces), *shared)) for i, c in enumerate(chunks)]

    def rows(self, start: int, stop: int) -> slice | Tensor:
        """The rows [start, stop) in slot order: a slice when outer is ascending, else indices (R_chunk,)."""
        return slice(start, stop) if self.order is None else self.order[start:stop]

    def pad(self, x: Tensor) -> Tensor:
        """(R, ...) -> (size, kmax, ...), zeros where a slot has fewer rows."""
        return self.pad_rows(x, 0, self.size, slice(0, self.outer.shape[0]))

    def pad_rows(self, x: Tensor, slot_start: int, slot_stop: int, rows: slice | Tensor) -> Tensor:
        """Values x (R_chunk, ...) of ``rows`` (all in slots [slot_start, slot_stop)) -> (slot_stop - slot_start,
        kmax, ...), zeros elsewhere: the slots' block of ``pad``."""
        if not needs_grad(x):
            return self.pad_gather(x, slot_start, slot_stop, rows)
        out = x.new_zeros((slot_stop - slot_start, self.kmax, *x.shape[1:]))
        out[self.outer[rows] - slot_start, self.inner[rows]] = x
        return out

    def pad_columns(self, x: Tensor) -> Tensor:
        """(R, C) -> (size, C, kmax) (the transpose of ``pad``, laid out for matmul; a transposed view of a
        contiguous (size, kmax, C) tensor when no gradient is recorded)."""
        return self.pad_columns_rows(x, 0, self.size, slice(0, self.outer.shape[0]))

    def pad_columns_rows(self, x: Tensor, slot_start: int, slot_stop: int, rows: slice | Tensor) -> Tensor:
        """``pad_columns`` of the rows ``rows`` (values x (R_chunk, C)) of slots [slot_start, slot_stop):
        (slot_stop - slot_start, C, kmax)."""
        if not needs_grad(x):
            return torch.transpose(self.pad_gather(x, slot_start, slot_stop, rows), 1, 2)
        out = x.new_zeros((slot_stop - slot_start, x.shape[1], self.kmax))
        out[self.outer[rows] - slot_start, :, self.inner[rows]] = x
        return out

    def pad_gather(
        self,
        src: Tensor,
        slot_start: int,
        slot_stop: int,
        rows: slice | Tensor,
        index: Tensor | None = None,
        reuse: bool = False,
        zero_pad: bool = True,
    ) -> Tensor:
        """(slot_stop - slot_start, kmax, C) padded layout of the rows ``rows`` of slots [slot_start, slot_stop),
        gathered in one pass: a row's value is ``src[index[row]]`` with ``index``, else the row's entry of src
        (R_chunk, C), the values of ``rows`` in order; zeros elsewhere. The same values as ``pad_rows``; not
        differentiable (used without autograd). ``zero_pad=False``: the padding holds copies of src's first row
        instead of zeros (no zero row appended to src), for an operand whose partner in the product is zero there
        (a padded basis).

        The padded position -> source row map is built once per (slots, index) and kept for the call.
        ``reuse``: the result is written into a buffer kept for the call and overwritten by the next ``reuse``
        gather (of the same size; of any size and layout when the model's ``pool`` holds the buffer), so the
        caller must be done with it by then (a padded operand consumed at once).
        """
        compiling = torch.compiler.is_compiling()  # traced code keeps no cache (no guards on object ids)
        zero_pad = zero_pad or src.shape[0] == 0
        filler = src.shape[0] if zero_pad else 0  # the appended zero row, or src's first row
        key = None
        if not compiling:  # (id() while tracing would guard on the object: a recompilation every call)
            key = (slot_start, slot_stop, None if index is None else id(index), src.shape[0], zero_pad)
        positions = None if key is None else self._pad_index.get(key)
        if positions is None:
            n_slots = slot_stop - slot_start
            source = torch.arange(src.shape[0], device=src.device) if index is None else index[rows]
            positions = torch.full((n_slots * self.kmax,), filler, dtype=torch.long, device=src.device)
            positions[(self.outer[rows] - slot_start) * self.kmax + self.inner[rows]] = source
            if key is not None:
                self._pad_index[key] = positions
        # row src.shape[0] is the zero row
        src_ext = torch.cat([src, src.new_zeros((1, *src.shape[1:]))]) if zero_pad else src
        shape = (slot_stop - slot_start, self.kmax, *src.shape[1:])
        if not reuse or compiling:
            return gather(src_ext, positions).view(shape)
        buf_key = (positions.shape[0], *src.shape[1:], src.dtype, src.device)
        buffer = self._workspace.get(buf_key)
        if buffer is None:
            padded = (positions.shape[0], *src.shape[1:])
            if self.pool is not None:  # one buffer for every layout's padded operand, kept across calls
                buffer = self.pool.get("gemnet_oc.pad_gather", padded, src.dtype, src.device)
            else:
                buffer = src.new_empty(padded)
            self._workspace[buf_key] = buffer
        return torch.index_select(src_ext, 0, positions, out=buffer).view(shape)


def dot_clamped(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot product of unit vectors (R, 3), clamped to [-1, 1]: the cosine of their angle."""
    return torch.sum(x * y, dim=-1).clamp(min=-1, max=1)


@dataclass
class TripletBasis:
    """The projected circular basis of one triplet interaction, built chunk by chunk of output edges from the
    geometry (so that no (E, num_spherical, kmax) layout, nor its gradient, is ever whole).

    layer: a ``CircularBasisLayer`` (radial basis of the output edges' distances, angular basis of the cosines);
    emb: the ``BasisEmbedding`` projecting the radial basis; dist (E_out,) output-edge distances, Å; v_out (E_out,
    3), v_in (E_in, 3) unit vectors of the output and input edges; out, in_ (T,) the triplets' output and input
    edges; agg: triplets -> output edges. Same values as ``emb(layer(dist, cos), sph_agg=agg)`` sliced.
    """

    layer: nn.Module
    emb: BasisEmbedding
    dist: Tensor
    v_out: Tensor
    v_in: Tensor
    out: Tensor
    in_: Tensor
    agg: Aggregation

    def rad_w1(self, dist: Tensor) -> Tensor:
        """(E_chunk,) distances -> projected radial basis (E_chunk, emb_size_interm, num_spherical)."""
        return self.emb.project(self.layer.radial_basis(dist))

    def sph(self, v_out: Tensor, v_in: Tensor, edge_start: int, edge_stop: int, rows: slice | Tensor) -> Tensor:
        """Angular basis of the triplet rows ``rows`` of the output edges [edge_start, edge_stop), padded per
        edge: (E_chunk, num_spherical, kmax). v_out, v_in: the whole ``self.v_out``, ``self.v_in``."""
        cos = dot_clamped(gather(v_out, self.out[rows]), gather(v_in, self.in_[rows]))
        return self.agg.pad_columns_rows(self.layer.angular(cos), edge_start, edge_stop, rows)

    def whole(self, rad_agg: Aggregation | None = None) -> tuple[Tensor, Tensor]:
        """(rad_W1, sph) of all output edges at once, rad_W1 padded per atom with ``rad_agg`` as
        ``BasisEmbedding.arrange`` does."""
        rows = slice(0, self.out.shape[0])
        sph = self.sph(self.v_out, self.v_in, 0, self.agg.size, rows)
        return self.emb.arrange(self.rad_w1(self.dist), rad_agg=rad_agg), sph


@dataclass
class NeighborBasis:
    """Projected radial basis of a neighbour layout (atom-to-atom edges -> target atoms), built per chunk of
    atoms: radial_basis (E,) -> (E, num_radial), emb (``BasisEmbedding`` without num_spherical), dist (E,) Å,
    agg: edges -> atoms. Same values as ``emb(radial_basis(dist), rad_agg=agg)`` sliced."""

    radial_basis: nn.Module
    emb: BasisEmbedding
    dist: Tensor
    agg: Aggregation

    def atoms(self, dist: Tensor, atom_start: int, atom_stop: int, rows: slice | Tensor) -> Tensor:
        """(N_chunk, emb_size_interm, kmax) for atoms [atom_start, atom_stop) with edge rows ``rows`` (their
        distances ``dist[rows]`` given as dist)."""
        rad = self.emb.project(self.radial_basis(dist))  # (E_chunk, interm)
        return torch.transpose(self.agg.pad_rows(rad, atom_start, atom_stop, rows), 1, 2)

    def whole(self) -> Tensor:
        """(N, emb_size_interm, kmax) of all atoms at once."""
        return self.atoms(self.dist, 0, self.agg.size, slice(0, self.dist.shape[0]))


class BasisEmbedding(nn.Module):
    """Projects a radial basis with a weight tensor, ready for the efficient bilinear layers.

    With ``num_spherical``: weight (num_radial, num_spherical, emb_size_interm); else (emb_size_interm,
    num_radial).
    """

    def __init__(self, num_radial: int, emb_size_interm: int, num_spherical: int | None = None) -> None:
        super().__init__()
        self.num_radial = num_radial
        self.num_spherical = num_spherical
        if num_spherical is None:
            self.weight = nn.Parameter(torch.empty(emb_size_interm, num_radial))
        else:
            self.weight = nn.Parameter(torch.empty(num_radial, num_spherical, emb_size_interm))
        he_orthogonal_init(self.weight)

    def project(self, rad_basis: Tensor) -> Tensor:
        """(E, num_radial) -> (E, emb_size_interm, num_spherical), or (E, emb_size_interm) without num_spherical."""
        if self.num_spherical is None:
            return rad_basis @ self.weight.T
        rad_w1 = rad_basis @ self.weight.reshape(self.weight.shape[0], -1)
        # fairchem's layout: (num_spherical * interm) values read as (interm, num_spherical)
        return rad_w1.reshape(rad_basis.shape[0], self.weight.shape[2], self.num_spherical)

    def forward(
        self,
        rad_basis: Tensor,
        sph_basis: Tensor | None = None,
        rad_agg: Aggregation | None = None,
        sph_outer: Tensor | None = None,
        sph_agg: Aggregation | None = None,
    ):
        """
        rad_basis: (E, num_radial) raw radial basis; sph_basis: (T, num_spherical) raw angular basis.
        rad_agg: pads the projected radial basis per atom -> (N, emb_size_interm, kmax * num_spherical).
        sph_outer: edge of each angular row; without sph_agg returns the per-row product (T, emb_size_interm).
        sph_agg: pads the angular basis per edge -> returns (rad_W1, (E, num_spherical, kmax)).
        """
        return self.arrange(self.project(rad_basis), sph_basis, rad_agg, sph_outer, sph_agg)

    def arrange(
        self,
        rad_w1: Tensor,
        sph_basis: Tensor | None = None,
        rad_agg: Aggregation | None = None,
        sph_outer: Tensor | None = None,
        sph_agg: Aggregation | None = None,
    ):
        """The layouts of ``forward`` from the projected radial basis rad_w1 = ``project(rad_basis)``."""
        if rad_agg is not None:
            padded = rad_agg.pad(rad_w1)  # (N, kmax, interm, ...)
            padded = torch.transpose(padded, 1, 2)  # (N, interm, kmax, ...)
            rad_w1 = padded.flatten(2)  # (N, interm, kmax * num_spherical)

        if sph_basis is None:
            return rad_w1
        if sph_agg is None:
            return (gather(rad_w1, sph_outer) @ sph_basis[:, :, None]).squeeze(-1)  # (T, interm)
        sph2 = sph_agg.pad_columns(sph_basis)  # (E, num_spherical, kmax)
        return rad_w1, sph2


class EfficientInteractionBilinear(nn.Module):
    """Bilinear layer of (radial x angular basis) and neighbour embeddings, summed over neighbours, via padded
    matrix products: out[e] = W . vec(sum_s rad_W1[e,:,s] sum_k sph[e,s,k] m[k,:])."""

    def __init__(self, emb_size_in: int, emb_size_interm: int, emb_size_out: int) -> None:
        super().__init__()
        self.emb_size_in = emb_size_in
        self.emb_size_interm = emb_size_interm
        self.emb_size_out = emb_size_out
        self.bilinear = Dense(emb_size_in * emb_size_interm, emb_size_out, bias=False, activation=None)

    def forward(
        self,
        basis: tuple[Tensor, Tensor] | TripletBasis,
        m: Tensor,
        agg: Aggregation,
        agg2: Aggregation | None = None,
        index: Tensor | None = None,
        chunking: Chunking = PLAIN,
    ) -> Tensor:
        """basis: (rad_W1, sph) from BasisEmbedding, or a ``TripletBasis`` built per chunk; m: (T, emb_size_in) per
        triplet/quadruplet, or with ``index`` (T,) the rows m[index]; agg: triplets -> output edges; agg2
        (optional): output edges -> atoms. Returns (E or N, emb_size_out). Chunks of output slots (``agg.chunks``,
        or ``agg2.chunks`` with ``agg2.inner_rows``) bound the padded tensors; without a plan for agg2 its edges
        are done in one piece."""
        # "medium" on a bfloat16 CPU: the padded products in bfloat16 as well (float32 accumulation and result)
        bf16 = m.dtype == torch.float32 and m.device.type == "cpu" and bfloat16_products()

        def sph_m(m: Tensor, sph: Tensor, edge_start: int, edge_stop: int, rows: slice | Tensor) -> Tensor:
            """sum_k sph[e, :, k] m[k] of the output edges [edge_start, edge_stop) with their rows of sph:
            (E_chunk, num_spherical, emb_in)."""
            if not needs_grad(m):  # one gather into a buffer reused by every block (consumed at once)
                src = m[rows] if index is None else m
                if bf16:
                    src, sph = src.to(torch.bfloat16), agg.bfloat16_of(sph)
                # sph is zero in the padding: m_padded needs no zeros there
                m_padded = agg.pad_gather(src, edge_start, edge_stop, rows, index=index, reuse=True, zero_pad=False)
            else:
                m_rows = m[rows] if index is None else gather(m, index[rows])
                m_padded = agg.pad_rows(m_rows, edge_start, edge_stop, rows)  # (E_chunk, kmax, emb_in)
                if bf16:
                    m_padded, sph = m_padded.to(torch.bfloat16), sph.to(torch.bfloat16)
            out = torch.matmul(sph, m_padded)
            return out.to(torch.float32) if bf16 else out

        def atom_product(rad_w1: Tensor, sph_m_padded: Tensor) -> Tensor:
            """rad_W1 (N_chunk, interm, kmax2 * num_spherical) and the padded (N_chunk, kmax2, num_spherical,
            emb_in) -> (N_chunk, emb_out)."""
            sph_m_padded = sph_m_padded.flatten(1, 2)  # (N_chunk, kmax2 * num_spherical, emb_in)
            return self.bilinear((rad_w1 @ sph_m_padded).flatten(1))  # (N_chunk, interm, emb_in)

        lazy = isinstance(basis, TripletBasis)
        if agg2 is None and not lazy and isinstance(basis[1], BucketedBasis):  # one chunk, no autograd
            # rad_W1 @ (sph @ m) as (rad_W1 @ sph) @ m, the first product once per call: (E, interm, emb_in)
            return self.bilinear(basis[1].product(m, agg.size, index=index, bfloat16=bf16, rad=basis[0]).flatten(1))
        if agg2 is None:

            def edge_product(start: int, stop: int, rows: slice | Tensor, rad_w1: Tensor, sph: Tensor, m: Tensor):
                rad_w1_sph_m = torch.matmul(rad_w1, sph_m(m, sph, start, stop, rows))  # (E_chunk, interm, emb_in)
                return self.bilinear(rad_w1_sph_m.flatten(1))  # (E_chunk, emb_out)

            if lazy:

                def lazy_chunk(start: int, stop: int, row_start: int, row_stop: int, dist, m, v_out, v_in):
                    rows = agg.rows(row_start, row_stop)
                    sph = basis.sph(v_out, v_in, start, stop, rows)
                    return edge_product(start, stop, rows, basis.rad_w1(dist), sph, m)

                calls = agg.slot_calls([basis.dist], [m, basis.v_out, basis.v_in])
                return run_chunks(lazy_chunk, calls, agg.size, chunking)

            def edge_chunk(start: int, stop: int, row_start: int, row_stop: int, rad_w1: Tensor, sph: Tensor, m):
                return edge_product(start, stop, agg.rows(row_start, row_stop), rad_w1, sph, m)

            return run_chunks(edge_chunk, agg.slot_calls(list(basis), [m]), agg.size, chunking)

        if agg2.inner_rows is None:  # output edges in one piece, then atoms
            rad_w1, sph = basis.whole(agg2) if lazy else basis
            sph_m_all = sph_m(m, sph, 0, agg.size, slice(0, agg.outer.shape[0]))  # (E, num_spherical, emb_in)

            def atom_chunk(start: int, stop: int, row_start: int, row_stop: int, rad_w1: Tensor, sph_m_all: Tensor):
                rows = agg2.rows(row_start, row_stop)
                return atom_product(rad_w1, agg2.pad_rows(sph_m_all[rows], start, stop, rows))

            return run_chunks(atom_chunk, agg2.slot_calls([rad_w1], [sph_m_all]), agg2.size, chunking)

        # agg2's rows (edges) are ascending by atom: a chunk of atoms is a range of edges, and of their triplets
        atoms = agg2.chunk_list()
        if lazy:

            def lazy_fused(start: int, stop: int, edges: slice, triplets: slice, dist, m, v_out, v_in) -> Tensor:
                rad_w1 = agg2.pad_rows(basis.rad_w1(dist), start, stop, edges)  # (N_chunk, kmax2, interm, nsph)
                rad_w1 = torch.transpose(rad_w1, 1, 2).flatten(2)  # (N_chunk, interm, kmax2 * num_spherical)
                part = sph_m(
                    m, basis.sph(v_out, v_in, edges.start, edges.stop, triplets), edges.start, edges.stop, triplets
                )
                return atom_product(rad_w1, agg2.pad_rows(part, start, stop, edges))

            dist_pieces = split_rows(basis.dist, atoms, groups=False)  # per edge: the rows of agg2
            calls = [
                (c.g0, c.g1, (c.g0, c.g1, slice(c.r0, c.r1), slice(*r), dist_pieces[i], m, basis.v_out, basis.v_in))
                for i, (c, r) in enumerate(zip(atoms, agg2.inner_rows, strict=True))
            ]
            return run_chunks(lazy_fused, calls, agg2.size, chunking)

        def fused_chunk(start: int, stop: int, edges: slice, triplets: slice, rad_w1: Tensor, sph: Tensor, m):
            part = sph_m(m, sph, edges.start, edges.stop, triplets)  # (E_chunk, num_spherical, emb_in)
            return atom_product(rad_w1, agg2.pad_rows(part, start, stop, edges))

        rad_w1, sph = basis
        rad_pieces = split_rows(rad_w1, atoms)  # per atom
        sph_pieces = split_rows(sph, atoms, groups=False)  # per edge: the rows of agg2
        calls = [
            (c.g0, c.g1, (c.g0, c.g1, slice(c.r0, c.r1), slice(*r), rad_pieces[i], sph_pieces[i], m))
            for i, (c, r) in enumerate(zip(atoms, agg2.inner_rows, strict=True))
        ]
        return run_chunks(fused_chunk, calls, agg2.size, chunking)


# ---------------------------------------------------------------------------------------------- embeddings
class AtomEmbedding(nn.Module):
    """Element embedding: row Z-1 of ``embeddings.weight`` (num_elements, emb_size)."""

    def __init__(self, emb_size: int, num_elements: int) -> None:
        super().__init__()
        self.emb_size = emb_size
        self.embeddings = nn.Embedding(num_elements, emb_size)
        nn.init.uniform_(self.embeddings.weight, a=-math.sqrt(3), b=math.sqrt(3))

    def forward(self, z: Tensor) -> Tensor:
        return self.embeddings(z - 1)


class EdgeEmbedding(nn.Module):
    """Edge embedding Dense([h_source, h_target, m]) for edges given as (2, E) [source, target].

    Computed as W_s h[source] + W_t h[target] + W_m m with the atom terms projected per atom before the gather
    (N << E rows), the same linear map as the concatenated product.
    """

    def __init__(self, atom_features: int, edge_features: int, out_features: int, activation: str | None = None):
        super().__init__()
        self.atom_features = atom_features
        self.dense = Dense(2 * atom_features + edge_features, out_features, activation=activation, bias=False)

    def atom_terms(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(N, atom_features) -> the source and target terms W_s h, W_t h, each (N, out_features)."""
        weight = self.dense.linear.weight  # (out, 2 A + E_in): [W_s | W_t | W_m]
        a = self.atom_features
        return linear(h, weight[:, :a]), linear(h, weight[:, a : 2 * a])

    def edge_rows(self, m: Tensor, src: Tensor, dst: Tensor, source_term: Tensor, target_term: Tensor) -> Tensor:
        """The embedding of edges (src, dst) with features m (E_chunk, edge_features), from ``atom_terms``."""
        x = linear(m, self.dense.linear.weight[:, 2 * self.atom_features :])
        x = x.add_(gather(source_term, src))  # x is fresh: in place
        x = x.add_(gather(target_term, dst))
        return self.dense.activate(x)

    def forward(self, h: Tensor, m: Tensor, edge_index: Tensor, chunking: Chunking = PLAIN) -> Tensor:
        """h: (N, atom_features), m: (E, edge_features), edge_index: (2, E) -> (E, out_features)."""
        terms = self.atom_terms(h)
        return map_rows(self.edge_rows, [m, edge_index[0], edge_index[1]], terms, chunking)
