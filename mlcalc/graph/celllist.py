"""Pure-torch cell list: periodic neighbour candidates on any device (GPU included), batched, O(N).

Shared geometry helpers (cell completion, squared pair distances) live here too, so that every backend computes
the distances it filters on with the same float64 arithmetic and therefore keeps exactly the same pairs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

#: fairchem drops pairs with d² <= 1e-4 Å² (an atom with itself at zero offset, or two overlapping atoms).
MIN_DISTANCE_SQ = 1e-4
#: Å added to the cutoff of a candidate search (the exact ``d² <= cutoff²`` test is done on its output).
SEARCH_MARGIN = 1e-6
#: upper bound on the bins along one axis (keeps bin keys small for huge, sparse non-periodic extents).
_MAX_BINS_PER_AXIS = 4096
#: upper bound on the candidate pairs expanded at once (memory of one chunk ~ 250 bytes per pair).
_CHUNK_PAIRS = 1 << 20


def complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Cell (3, 3) whose periodic rows are those of ``cell`` and whose other rows are an orthonormal complement.

    Only the periodic rows matter for a neighbour search (offsets along other axes are zero); replacing the rest
    gives an invertible, right-handed cell even for slabs, wires and molecules with zero rows.
    """
    out = np.array(cell, dtype=np.float64, copy=True)
    periodic = [ax for ax in range(3) if pbc[ax]]
    missing = [ax for ax in range(3) if not pbc[ax]]
    if not missing:
        return out
    if periodic:
        # right singular vectors beyond the rank of the periodic rows span their orthogonal complement
        _, _, vt = np.linalg.svd(out[periodic], full_matrices=True)
        complement = vt[len(periodic) :]
    else:
        complement = np.eye(3)
    out[missing] = complement
    if np.linalg.det(out) < 0:
        out[missing[0]] *= -1.0
    return out


def pair_distances_sq(
    pos: Tensor, cell: Tensor, i: Tensor, j: Tensor, shifts: Tensor, edge_batch: Tensor | None = None
) -> Tensor:
    """Squared lengths (E,) of ``pos[j] + S @ cell - pos[i]``, in the dtype of ``pos`` (float64 here).

    cell: (3, 3), or (B, 3, 3) with ``edge_batch`` (E,) giving each pair's structure. Computed per Cartesian
    component, one IEEE operation at a time in a fixed order, so every backend and device rounds identically;
    buffers are reused (large temporaries dominate the cost on CPU).
    """
    n = i.shape[0]
    kw = {"dtype": pos.dtype, "device": pos.device}
    s = [torch.empty(n, **kw).copy_(shifts[:, k]) for k in range(3)]
    total, v, off, tmp = (torch.zeros(n, **kw), torch.empty(n, **kw), torch.empty(n, **kw), torch.empty(n, **kw))
    for e in range(3):
        if edge_batch is None:
            c = [cell[..., k, e].reshape(()) for k in range(3)]
        else:
            c = [cell[:, k, e][edge_batch] for k in range(3)]
        torch.mul(s[0], c[0], out=off)
        off.add_(torch.mul(s[1], c[1], out=tmp))
        off.add_(torch.mul(s[2], c[2], out=tmp))
        p = pos[:, e].contiguous()
        torch.index_select(p, 0, j, out=v)
        v.sub_(torch.index_select(p, 0, i, out=tmp))
        v.add_(off)
        total.add_(v.mul_(v))
    return total


def _bin_layout(
    frac_min: np.ndarray, frac_max: np.ndarray, heights: np.ndarray, pbc: np.ndarray, width: float, reach: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per structure and axis: bin count n, fractional origin, bins per unit fraction, search range r (all (B, 3))."""
    n_bins = np.ones_like(heights, dtype=np.int64)
    origin = np.zeros_like(heights)
    scale = np.ones_like(heights)
    reach_bins = np.ones_like(heights, dtype=np.int64)
    for b in range(heights.shape[0]):
        for ax in range(3):
            h = heights[b, ax]
            if pbc[b, ax]:
                n = int(min(max(math.floor(h / width), 1), _MAX_BINS_PER_AXIS))
                w = h / n
                scale[b, ax] = n
            else:
                span = frac_max[b, ax] - frac_min[b, ax] if frac_max[b, ax] >= frac_min[b, ax] else 0.0  # no atoms
                extent = span * h
                w = max(width, extent / (_MAX_BINS_PER_AXIS - 1))
                n = int(math.floor(extent / w)) + 1
                origin[b, ax] = frac_min[b, ax]
                scale[b, ax] = h / w
            n_bins[b, ax] = n
            reach_bins[b, ax] = max(int(math.ceil(reach / w)), 1)
    return n_bins, origin, scale, reach_bins


def cell_list_pairs(
    pos: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, cutoff: float, subdivisions: int = 2
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All pairs (target i, source j, integer image S of j) with 1e-4 Å² < |pos[j] + S@cell - pos[i]|² <= cutoff².

    Args:
        pos: (N, 3) float64 positions (anywhere; no wrapping needed), on any device.
        cell: (B, 3, 3) float64 cell rows; pbc: (B, 3) bool; batch: (N,) structure index of each atom.
        cutoff: radius in Å.
        subdivisions: bins per cutoff length (2: bins >= cutoff/2 wide, 125 neighbour bins, fewer candidates).

    Returns i, j (E,) int64 global atom indices (i non-decreasing), S (E, 3) int64 and the squared distances d2
    (E,) float64 (``pair_distances_sq``), on the device of ``pos``.
    Positions are wrapped into the cell only to assign bins; pair geometry is always recomputed from ``pos``.
    """
    device = pos.device
    num_atoms = pos.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=device)
    nothing = empty, empty, torch.zeros((0, 3), dtype=torch.long, device=device), pos.new_zeros(0)
    if num_atoms == 0:
        return nothing
    cell_np = cell.detach().cpu().numpy().astype(np.float64)
    pbc_np = pbc.detach().cpu().numpy().astype(bool)
    n_struct = cell_np.shape[0]
    full = np.stack([complete_cell(cell_np[b], pbc_np[b]) for b in range(n_struct)])
    inv = np.linalg.inv(full)  # frac = pos @ inv; column e of inv is the reciprocal vector of axis e
    heights = 1.0 / np.linalg.norm(inv, axis=1)  # (B, 3) distance between lattice planes
    inv_t = torch.as_tensor(inv, device=device)
    pbc_t = pbc.to(device=device, dtype=torch.bool)

    frac = torch.einsum("nk,nke->ne", pos, inv_t[batch])
    wrap = torch.where(pbc_t[batch], torch.floor(frac), torch.zeros_like(frac))
    frac = frac - wrap
    wrap = wrap.long()
    big = torch.finfo(frac.dtype).max
    fmin = torch.full((n_struct, 3), big, dtype=frac.dtype, device=device)
    fmax = torch.full((n_struct, 3), -big, dtype=frac.dtype, device=device)
    idx3 = batch[:, None].expand(-1, 3)
    fmin = fmin.scatter_reduce(0, idx3, frac, "amin").cpu().numpy()
    fmax = fmax.scatter_reduce(0, idx3, frac, "amax").cpu().numpy()
    reach = cutoff + SEARCH_MARGIN
    n_bins, origin, scale, reach_bins = _bin_layout(fmin, fmax, heights, pbc_np, reach / subdivisions, reach)
    bins_per_struct = n_bins.prod(axis=1)
    base = np.concatenate([[0], np.cumsum(bins_per_struct)[:-1]])
    if int(bins_per_struct.sum()) >= 2**62:
        raise ValueError("too many cell-list bins; the structures are too large for the torch backend")

    n_t = torch.as_tensor(n_bins, device=device)
    base_t = torch.as_tensor(base, device=device)
    reach_t = torch.as_tensor(reach_bins, device=device)
    coords = torch.floor(
        (frac - torch.as_tensor(origin, device=device)[batch]) * torch.as_tensor(scale, device=device)[batch]
    )
    coords = torch.minimum(coords.long().clamp(min=0), n_t[batch] - 1)
    key = _bin_key(coords, n_t[batch], base_t[batch])
    order = torch.argsort(key)
    sorted_key = key[order]

    rmax = reach_bins.max(axis=0)
    axes = [torch.arange(-r, r + 1, device=device) for r in rmax]
    disp = torch.cartesian_prod(*axes).reshape(-1, 3)  # (K, 3)
    n_disp = disp.shape[0]
    cutoff_sq = float(cutoff) ** 2
    out: list[list[Tensor]] = [[], [], [], []]
    rows_per_chunk = max(1, _CHUNK_PAIRS // n_disp)
    for lo in range(0, num_atoms, rows_per_chunk):
        rows = torch.arange(lo, min(lo + rows_per_chunk, num_atoms), device=device)
        b = batch[rows]
        nb = coords[rows, None, :] + disp[None]  # (m, K, 3) neighbour bins before wrapping
        n_row = n_t[b][:, None, :]
        periodic = pbc_t[b][:, None, :]
        valid = (disp.abs()[None] <= reach_t[b][:, None, :]).all(-1)
        valid &= (periodic | ((nb >= 0) & (nb < n_row))).all(-1)
        image = torch.where(periodic, torch.div(nb, n_row, rounding_mode="floor"), torch.zeros_like(nb))
        nb = nb - image * n_row
        nkey = _bin_key(nb.clamp(min=0), n_row, base_t[b][:, None])
        start = torch.searchsorted(sorted_key, nkey.reshape(-1))
        stop = torch.searchsorted(sorted_key, nkey.reshape(-1), right=True)
        count = torch.where(valid.reshape(-1), stop - start, torch.zeros_like(start))
        _expand_chunk(pos, cell, batch, wrap, order, rows, n_disp, image.reshape(-1, 3), start, count, cutoff_sq, out)
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
        keep = (d2 > MIN_DISTANCE_SQ) & (d2 <= cutoff_sq)
        for parts, values in zip(out, (i, j, s, d2), strict=True):
            parts.append(values[keep])
