"""Pure-torch cell list: periodic neighbour candidates on any device (GPU included), batched, O(N).

Structures are first split into clusters that cannot be neighbours (``mlcalc.graph.clusters``), and each cluster
is binned over its own extent, so the number of bins follows the atoms, not the empty space between them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlcalc.graph.clusters import Clusters, split_clusters
from mlcalc.graph.geometry import (  # noqa: F401  (re-exported: the helpers used to live here)
    MIN_DISTANCE_SQ,
    SEARCH_MARGIN,
    complete_cell,
    pair_distances_sq,
)

#: upper bound on the bins along one axis (keeps bin keys small for huge, sparse non-periodic extents).
_MAX_BINS_PER_AXIS = 4096
#: upper bound on the candidate pairs expanded at once (memory of one chunk ~ 250 bytes per pair).
_CHUNK_PAIRS = 1 << 20


def _bin_layout(
    frac_min: Tensor, frac_max: Tensor, heights: Tensor, pbc: Tensor, width: float, reach: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bins of each cluster (C clusters): count n, fractional origin, bins per unit fraction, search range r.

    frac_min, frac_max: (C, 3) extent of the cluster's fractional coordinates; heights: (C, 3) Å between lattice
    planes; pbc: (C, 3) bool. Periodic axes: n = floor(height / width) bins over the whole period; other axes:
    bins at least ``width`` wide over the cluster's extent. All (C, 3): int64, float64, float64, int64.
    """
    h = heights
    n_periodic = torch.floor(h / width).clamp(1, _MAX_BINS_PER_AXIS)
    extent = (frac_max - frac_min).clamp(min=0.0) * h
    w_open = torch.clamp(extent / (_MAX_BINS_PER_AXIS - 1), min=width)
    n_open = torch.floor(extent / w_open) + 1
    w = torch.where(pbc, h / n_periodic, w_open)
    n_bins = torch.where(pbc, n_periodic, n_open).long()
    origin = torch.where(pbc, torch.zeros_like(frac_min), frac_min)
    scale = torch.where(pbc, n_periodic, h / w_open)
    reach_bins = torch.ceil(reach / w).clamp(min=1).long()
    return n_bins, origin, scale, reach_bins


def cell_list_pairs(
    pos: Tensor,
    cell: Tensor,
    pbc: Tensor,
    batch: Tensor,
    cutoff: float,
    subdivisions: int = 2,
    *,
    include_overlaps: bool = False,
    clusters: Clusters | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All pairs (target i, source j, integer image S of j) with 1e-4 Å² < |pos[j] + S@cell - pos[i]|² <= cutoff².

    Args:
        pos: (N, 3) float64 positions (anywhere; no wrapping needed), on any device.
        cell: (B, 3, 3) float64 cell rows; pbc: (B, 3) bool; batch: (N,) structure index of each atom.
        cutoff: radius in Å.
        subdivisions: bins per cutoff length (2: bins >= cutoff/2 wide, 125 neighbour bins, fewer candidates).
        include_overlaps: keep pairs closer than 0.01 Å too (exact duplicates at d = 0 included); only an atom
            with itself at zero image is dropped.
        clusters: the decomposition of ``split_clusters(pos, cell, pbc, batch, cutoff + SEARCH_MARGIN)`` if the
            caller already has it.

    Returns i, j (E,) int64 global atom indices, S (E, 3) int64 and the squared distances d2 (E,) float64
    (``pair_distances_sq`` of ``pos``, in the frame of the input positions), on the device of ``pos``.
    Each cluster is binned over its own extent (positions wrapped or unrolled only to assign bins); pair geometry
    is always recomputed from ``pos``.
    """
    device = pos.device
    num_atoms = pos.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=device)
    nothing = empty, empty, torch.zeros((0, 3), dtype=torch.long, device=device), pos.new_zeros(0)
    if num_atoms == 0:
        return nothing
    reach = cutoff + SEARCH_MARGIN
    if clusters is None:
        clusters = split_clusters(pos, cell, pbc, batch, reach)
    label, frac, wrap = clusters.label, clusters.frac, clusters.image
    c_pbc = clusters.pbc
    n_clusters = clusters.num_clusters
    big = torch.finfo(frac.dtype).max
    idx3 = label[:, None].expand(-1, 3)
    fmin = torch.full((n_clusters, 3), big, dtype=frac.dtype, device=device).scatter_reduce(0, idx3, frac, "amin")
    fmax = torch.full((n_clusters, 3), -big, dtype=frac.dtype, device=device).scatter_reduce(0, idx3, frac, "amax")
    heights = clusters.heights[clusters.structure]
    n_t, origin, scale, reach_t = _bin_layout(fmin, fmax, heights, c_pbc, reach / subdivisions, reach)
    bins_per_cluster = n_t.prod(dim=1)
    base_t = torch.cumsum(bins_per_cluster, 0) - bins_per_cluster
    if float(bins_per_cluster.double().sum()) >= 2.0**62:
        raise ValueError("too many cell-list bins; the structures are too large for the torch backend")

    coords = torch.floor((frac - origin[label]) * scale[label])
    coords = torch.minimum(coords.long().clamp(min=0), n_t[label] - 1)
    key = _bin_key(coords, n_t[label], base_t[label])
    order = torch.argsort(key)
    sorted_key = key[order]

    rmax = reach_t.amax(dim=0).tolist()
    axes = [torch.arange(-r, r + 1, device=device) for r in rmax]
    disp = torch.cartesian_prod(*axes).reshape(-1, 3)  # (K, 3)
    n_disp = disp.shape[0]
    cutoff_sq = float(cutoff) ** 2
    out: list[list[Tensor]] = [[], [], [], []]
    rows_per_chunk = max(1, _CHUNK_PAIRS // n_disp)
    for lo in range(0, num_atoms, rows_per_chunk):
        rows = torch.arange(lo, min(lo + rows_per_chunk, num_atoms), device=device)
        c = label[rows]
        nb = coords[rows, None, :] + disp[None]  # (m, K, 3) neighbour bins before wrapping
        n_row = n_t[c][:, None, :]
        periodic = c_pbc[c][:, None, :]
        valid = (disp.abs()[None] <= reach_t[c][:, None, :]).all(-1)
        valid &= (periodic | ((nb >= 0) & (nb < n_row))).all(-1)
        image = torch.where(periodic, torch.div(nb, n_row, rounding_mode="floor"), torch.zeros_like(nb))
        nb = nb - image * n_row
        nkey = _bin_key(nb.clamp(min=0), n_row, base_t[c][:, None])
        start = torch.searchsorted(sorted_key, nkey.reshape(-1))
        stop = torch.searchsorted(sorted_key, nkey.reshape(-1), right=True)
        count = torch.where(valid.reshape(-1), stop - start, torch.zeros_like(start))
        _expand_chunk(
            pos, cell, batch, wrap, order, rows, n_disp, image.reshape(-1, 3), start, count, cutoff_sq,
            include_overlaps, out,
        )  # fmt: skip
    if not out[0]:
        return nothing
    return tuple(torch.cat(parts) for parts in out)


def _bin_key(coords: Tensor, n_bins: Tensor, base: Tensor) -> Tensor:
    """Global linear bin key of integer bin coordinates (..., 3)."""
    return base + (coords[..., 0] * n_bins[..., 1] + coords[..., 1]) * n_bins[..., 2] + coords[..., 2]


def _expand_chunk(
    pos: Tensor,
    cell: Tensor,
    batch: Tensor,
    wrap: Tensor,
    order: Tensor,
    rows: Tensor,
    n_disp: int,
    image: Tensor,
    start: Tensor,
    count: Tensor,
    cutoff_sq: float,
    include_overlaps: bool,
    out: list[list[Tensor]],
) -> None:
    """Expand (row, neighbour bin) queries into pairs, in slices of at most ``_CHUNK_PAIRS``, keep those in range."""
    device = pos.device
    per_row = count.reshape(-1, n_disp).sum(1)
    cum = torch.cumsum(per_row, 0)
    total = int(cum[-1]) if cum.numel() else 0
    if total == 0:
        return
    cuts = torch.arange(_CHUNK_PAIRS, max(total, _CHUNK_PAIRS), _CHUNK_PAIRS, device=device)
    inner = torch.searchsorted(cum, cuts, right=True).clamp(1, rows.numel() - 1) if rows.numel() > 1 else cuts[:0]
    bounds = sorted({0, rows.numel(), *inner.tolist()})
    single_cell = cell.shape[0] == 1
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        c = count[r0 * n_disp : r1 * n_disp]
        n_pairs = int(c.sum())
        if n_pairs == 0:
            continue
        q = torch.repeat_interleave(torch.arange(c.numel(), device=device), c)
        within = torch.arange(n_pairs, device=device) - (torch.cumsum(c, 0) - c)[q]
        j = order[start[r0 * n_disp : r1 * n_disp][q] + within]
        i = rows[r0 + torch.div(q, n_disp, rounding_mode="floor")]
        s = image[r0 * n_disp : r1 * n_disp][q] - wrap[j] + wrap[i]
        d2 = (
            pair_distances_sq(pos, cell[0], i, j, s) if single_cell else pair_distances_sq(pos, cell, i, j, s, batch[i])
        )
        if include_overlaps:
            keep = (d2 <= cutoff_sq) & ((i != j) | s.any(dim=1))
        else:
            keep = (d2 > MIN_DISTANCE_SQ) & (d2 <= cutoff_sq)
        for parts, values in zip(out, (i, j, s, d2), strict=True):
            parts.append(values[keep])
