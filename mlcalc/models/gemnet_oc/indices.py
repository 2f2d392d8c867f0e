"""GemNet-OC graphs and interaction indices, built with torch ops on the graph's device.

Conventions: an edge s -> t has source (neighbour) s, target (centre) t and integer image ``offsets`` n of the
source; ``vec`` = pos[s] + n @ cell - pos[t] (target to source, Å), ``dist`` = |vec| and ``vector`` =
-vec / dist, the unit vector from source to target (fairchem's "vector"). Triplets "b -> a <- c" pair an input
edge b -> a with an output edge c -> a; quadruplets "d -> b -> a <- c" chain input edge d -> b, an intermediate
interaction edge b -> a and output edge c -> a.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlcalc.graph import select_neighbors
from mlcalc.models.gemnet_oc.layers import Aggregation
from mlcalc.nn.chunking import Chunk


@dataclass
class Edges:
    """One edge set: src (E,), dst (E,), offsets (E, 3) long, vec (E, 3), dist (E,), vector (E, 3)."""

    src: Tensor
    dst: Tensor
    offsets: Tensor
    vec: Tensor
    dist: Tensor
    vector: Tensor

    @classmethod
    def from_vectors(cls, src: Tensor, dst: Tensor, offsets: Tensor, vec: Tensor) -> Edges:
        dist = torch.linalg.vector_norm(vec, dim=-1)
        return cls(src, dst, offsets, vec, dist, -vec / dist[:, None])

    @property
    def num(self) -> int:
        return int(self.src.shape[0])

    @property
    def edge_index(self) -> Tensor:
        return torch.stack([self.src, self.dst])

    def select(self, mask: Tensor) -> Edges:
        return Edges(*(getattr(self, k)[mask] for k in ("src", "dst", "offsets", "vec", "dist", "vector")))


def subselect(
    edges: Edges,
    num_atoms: int,
    cutoff: float,
    max_neighbors: int | None,
    cutoff_orig: float,
    max_neighbors_orig: int | None,
    strict: bool,
) -> Edges:
    """Sub-graph with a smaller cutoff (Å) and/or max_neighbors, as fairchem's ``subselect_graph``: the cutoff
    is applied when it differs from the original (not isclose), then the max-neighbour selection on distances
    (non-strict: tolerance 0.01 Å) when max_neighbors differs from the original."""
    out = edges
    if not abs(cutoff - cutoff_orig) <= 1e-8 + 1e-5 * abs(cutoff_orig):  # numpy.isclose defaults
        out = out.select(out.dist <= cutoff)
    if max_neighbors != max_neighbors_orig and max_neighbors is not None:
        out = out.select(select_neighbors(out.dst, out.dist.detach(), num_atoms, max_neighbors, strict=strict))
    return out


def symmetrize(edges: Edges) -> tuple[Edges, Tensor]:
    """Keep edges with s < t (and, between images of one atom, those with lexicographically positive offsets
    n), then append their reverses. Returns the symmetric edges and ``id_swap`` (index of each edge's
    reverse)."""
    n = edges.offsets
    positive = (n[:, 0] > 0) | ((n[:, 0] == 0) & (n[:, 1] > 0)) | ((n[:, 0] == 0) & (n[:, 1] == 0) & (n[:, 2] > 0))
    keep = (edges.src < edges.dst) | ((edges.src == edges.dst) & positive)
    half = edges.select(keep)
    num_half = half.num
    sym = Edges(
        src=torch.cat([half.src, half.dst]),
        dst=torch.cat([half.dst, half.src]),
        offsets=torch.cat([half.offsets, -half.offsets]),
        vec=torch.cat([half.vec, -half.vec]),
        dist=torch.cat([half.dist, half.dist]),
        vector=torch.cat([half.vector, -half.vector]),
    )
    ar = torch.arange(num_half, device=half.src.device)
    return sym, torch.cat([ar + num_half, ar])


def _edges_at(target: Tensor, num_atoms: int, atoms: Tensor) -> tuple[Tensor, Tensor]:
    """All pairs (query q, edge e) with target[e] == atoms[q], grouped by q ascending."""
    order = torch.argsort(target, stable=True)
    counts = torch.bincount(target, minlength=num_atoms)
    starts = torch.cumsum(counts, 0) - counts
    per_query = counts[atoms]
    query = torch.repeat_interleave(torch.arange(atoms.shape[0], device=atoms.device), per_query)
    first = torch.cumsum(per_query, 0) - per_query
    rank = torch.arange(query.shape[0], device=atoms.device) - first[query]
    return query, order[starts[atoms][query] + rank]


def inner_index(index: Tensor, size: int, is_sorted: bool = False) -> Tensor:
    """Position of each entry within its group, in order of appearance ([0 0 1 0 1] -> [0 1 0 2 1]).
    ``is_sorted``: the index is known to be ascending (skips a sort)."""
    counts = torch.bincount(index, minlength=size)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(index.shape[0], device=index.device)
    if is_sorted:
        return positions - starts[index]
    order = torch.argsort(index, stable=True)
    rank = torch.empty_like(index)
    rank[order] = positions - starts[index[order]]
    return rank


@dataclass
class Triplets:
    """in_ (T,): input edge; out (T,): output edge (ascending); agg: padded layout over output edges."""

    in_: Tensor
    out: Tensor
    agg: Aggregation


def _triplets(in_: Tensor, out: Tensor, num_out: int) -> Triplets:
    inner = inner_index(out, num_out, is_sorted=True)
    return Triplets(in_, out, Aggregation(out, inner, num_out, -1))


def get_triplets(main: Edges, num_atoms: int) -> Triplets:
    """Edge pairs b -> a <- c of one graph with distinct edges (b == c allowed for different images)."""
    out, in_ = _edges_at(main.dst, num_atoms, main.dst)
    mask = in_ != out
    return _triplets(in_[mask], out[mask], main.num)


def get_mixed_triplets(graph_in: Edges, graph_out: Edges, num_atoms: int, to_outedge: bool = False) -> Triplets:
    """For each output edge c -> a of ``graph_out``, the input edges b -> x of ``graph_in`` with x = a (or, with
    ``to_outedge``, x = c), excluding those whose far atom is the output edge's other atom in the same image."""
    pivot = graph_out.src if to_outedge else graph_out.dst
    out, in_ = _edges_at(graph_in.dst, num_atoms, pivot)
    atom_in = graph_in.src[in_]
    if to_outedge:
        atom_out = graph_out.dst[out]
        offset_sum = graph_out.offsets[out] + graph_in.offsets[in_]
    else:
        atom_out = graph_out.src[out]
        offset_sum = graph_out.offsets[out] - graph_in.offsets[in_]
    mask = (atom_in != atom_out) | torch.any(offset_sum != 0, dim=-1)
    return _triplets(in_[mask], out[mask], graph_out.num)


@dataclass
class Quadruplets:
    """Quadruplets d -> b -> a <- c.

    triplet_in: d -> b -> a (in_: main edge d -> b, out: qint edge b -> a).
    triplet_out: c -> a <- b (in_: qint edge b -> a, out: main edge c -> a).
    out (Q,): main edge c -> a (ascending); trip_in_to_quad / trip_out_to_quad (Q,): the triplets of each
    quadruplet; agg: padded layout over main edges.
    """

    triplet_in: Triplets
    triplet_out: Triplets
    out: Tensor
    trip_in_to_quad: Tensor
    trip_out_to_quad: Tensor
    agg: Aggregation


def get_quadruplets(main: Edges, qint: Edges, num_atoms: int) -> Quadruplets:
    """All d -> b -> a <- c with d -> b, c -> a main edges and b -> a a qint edge, c and d distinct images."""
    trip_in = get_mixed_triplets(main, qint, num_atoms, to_outedge=True)
    trip_out = get_mixed_triplets(qint, main, num_atoms, to_outedge=False)
    # pair every output triplet with the input triplets sharing its intermediate edge b -> a
    counts = torch.bincount(trip_in.out, minlength=qint.num)
    starts = torch.cumsum(counts, 0) - counts
    per_trip_out = counts[trip_out.in_]
    trip_out_to_quad = torch.repeat_interleave(
        torch.arange(trip_out.out.shape[0], device=main.src.device), per_trip_out
    )
    first = torch.cumsum(per_trip_out, 0) - per_trip_out
    rank = torch.arange(trip_out_to_quad.shape[0], device=main.src.device) - first[trip_out_to_quad]
    trip_in_to_quad = starts[trip_out.in_][trip_out_to_quad] + rank

    out = trip_out.out[trip_out_to_quad]
    inter = trip_out.in_[trip_out_to_quad]
    edge_db = trip_in.in_[trip_in_to_quad]
    offset_cd = main.offsets[edge_db] + qint.offsets[inter] - main.offsets[out]
    mask = (main.src[out] != main.src[edge_db]) | torch.any(offset_cd != 0, dim=-1)
    out = out[mask]
    agg = Aggregation(out, inner_index(out, main.num, is_sorted=True), main.num, -1)
    return Quadruplets(trip_in, trip_out, out, trip_in_to_quad[mask], trip_out_to_quad[mask], agg)


def neighbor_aggregation(edges: Edges, num_atoms: int) -> Aggregation:
    """Padded layout of target-sorted edges per target atom."""
    return Aggregation(edges.dst, inner_index(edges.dst, num_atoms), num_atoms, -1)


def resolve_kmax(aggs: list[Aggregation]) -> None:
    """Set the padded widths (largest group size) of several layouts in place, with one device sync."""
    if not aggs:
        return
    device = aggs[0].inner.device
    zero = torch.zeros((), dtype=torch.long, device=device)
    maxima = torch.stack([a.inner.max() + 1 if a.inner.numel() > 0 else zero for a in aggs]).tolist()
    for agg, kmax in zip(aggs, maxima, strict=True):
        agg.kmax = int(kmax)


def _row_starts(agg: Aggregation) -> Tensor:
    """(size + 1,) offset of each slot's first row when the rows are sorted by slot (the last entry is R)."""
    counts = torch.bincount(agg.outer, minlength=agg.size)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def plan_chunks(
    layouts: list[tuple[Aggregation, int]], nested: list[tuple[Aggregation, Aggregation]] | None = None
) -> None:
    """Split each layout into chunks of whole slots holding at most its budget of padded rows (slots x kmax; at
    least one slot per chunk), in place, with one device sync; kmax must be resolved.

    layouts: (layout, padded rows per chunk). ``nested``: pairs (outer, inner) where the rows of ``outer`` are
    the slots of ``inner`` (edges -> atoms over triplets -> edges): a chunk of outer slots then pads slots x
    outer.kmax x inner.kmax rows of inner, and, when outer's rows are sorted by slot, gets the range of inner rows
    it covers (``Aggregation.inner_rows``). A layout whose slots are not ascending gets ``order`` (its rows
    sorted by slot, stable).
    """
    if not layouts:
        return
    inner_of = {id(outer): inner for outer, inner in (nested or [])}
    device = layouts[0][0].outer.device
    parts: list[Tensor] = []
    slot_bounds: list[list[int]] = []
    for agg, budget in layouts:
        inner = inner_of.get(id(agg))
        width = max(agg.kmax, 1) * (max(inner.kmax, 1) if inner is not None else 1)
        per_chunk = max(1, budget // width)
        bounds = [*range(0, agg.size, per_chunk), agg.size] if agg.size > 0 else [0, 0]
        slot_bounds.append(bounds)
        row_bounds = _row_starts(agg)[torch.tensor(bounds, device=device)]
        unsorted = (agg.outer[1:] < agg.outer[:-1]).any() if agg.outer.numel() > 1 else torch.zeros((), device=device)
        parts += [row_bounds, unsorted.long().view(1)]
        if inner is not None:
            parts.append(_row_starts(inner)[row_bounds])
    values = torch.cat(parts).tolist()
    pos = 0
    for (agg, _), bounds in zip(layouts, slot_bounds, strict=True):
        n = len(bounds)
        row_bounds, unsorted = values[pos : pos + n], bool(values[pos + n])
        pos += n + 1
        agg.chunks = [Chunk(bounds[i], bounds[i + 1], row_bounds[i], row_bounds[i + 1]) for i in range(n - 1)]
        agg.order = torch.argsort(agg.outer, stable=True) if unsorted else None
        agg.inner_rows = None
        if id(agg) in inner_of:
            inner_bounds = values[pos : pos + n]
            pos += n
            if not unsorted:
                agg.inner_rows = [(inner_bounds[i], inner_bounds[i + 1]) for i in range(n - 1)]
