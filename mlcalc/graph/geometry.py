"""Geometry shared by the graph room: completed cells, lattice frames, exact pair distances, circular gaps.

Every backend computes the distances it filters on with the same float64 arithmetic (``pair_distances_sq``) and
therefore keeps exactly the same pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: fairchem drops pairs with d² <= 1e-4 Å² (an atom with itself at zero offset, or two overlapping atoms).
MIN_DISTANCE_SQ = 1e-4
#: Å added to the cutoff of a candidate search (the exact ``d² <= cutoff²`` test is done on its output).
SEARCH_MARGIN = 1e-6


def complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Cell (3, 3) whose periodic rows are those of ``cell`` and whose other rows are an orthonormal complement.

    Only the periodic rows matter for a neighbour search (offsets along other axes are zero); replacing the rest
    gives an invertible, right-handed cell even for slabs, wires and molecules with zero rows. The complement rows
    are orthogonal to the periodic ones, so a fractional coordinate along a non-periodic axis is a Cartesian
    distance (Å) along a direction that no lattice translation changes.
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


def lattice_frames_np(cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``lattice_frames`` in numpy: cell (B, 3, 3), pbc (B, 3) -> full (B, 3, 3), inv (B, 3, 3), heights (B, 3)."""
    cell = np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(-1, 3)
    if len(cell) == 0:
        return cell, cell.copy(), np.zeros((0, 3))
    if len(cell) == 1 and not pbc.any():  # molecules: the identity, no SVD
        full = np.eye(3)[None]
    else:
        full = np.stack([complete_cell(c, p) for c, p in zip(cell, pbc, strict=True)])
    inv = np.linalg.inv(full)
    return full, inv, 1.0 / np.linalg.norm(inv, axis=1)


def lattice_frames(cell: Tensor, pbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Completed cells, their inverses and the distances between lattice planes, per structure.

    Args:
        cell: (B, 3, 3) cell rows, Å (any float dtype; the frames are computed in float64 on the CPU).
        pbc: (B, 3) bool.

    Returns ``full`` (B, 3, 3) (``complete_cell`` of each structure), ``inv`` (B, 3, 3) with fractional
    coordinates ``frac = pos @ inv`` (column e of ``inv`` is the reciprocal vector of axis e) and ``heights``
    (B, 3), Å: the distance between the lattice planes of axis e, so that two points whose fractional coordinates
    along e differ by f are at least ``|f| * heights[e]`` apart. All float64, on the device of ``cell``.
    """
    frames = lattice_frames_np(cell.detach().cpu().numpy(), pbc.detach().cpu().numpy())
    return tuple(torch.as_tensor(a, dtype=torch.float64, device=cell.device) for a in frames)


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


def group_lexsort(group: Tensor, values: Tensor) -> Tensor:
    """Permutation sorting by ``group`` (int64), then ``values`` (stable)."""
    order = torch.argsort(values, stable=True)
    return order[torch.argsort(group[order], stable=True)]


def largest_circular_gap(group: Tensor, frac: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Cut each group's points on a unit circle at their widest gap.

    Args:
        group: (N,) int64 group of each point, in [0, num_groups).
        frac: (N,) positions on a circle of period 1, in [0, 1) (wrapped fractional coordinates).
        num_groups: G.

    Returns ``gap`` (G,): the widest empty arc of each group, in periods (1 for a group of one point, 0 for an
    empty group), and ``move`` (N,) bool: the points to move by +1 period so that every group occupies the
    contiguous interval [start, start + 1 - gap], where start is the first point after the widest gap. When the
    arc through the origin (from the last point round to the first) is one of the widest, nothing moves.
    """
    n = frac.shape[0]
    device = frac.device
    gap = torch.zeros(num_groups, dtype=frac.dtype, device=device)
    move = torch.zeros(n, dtype=torch.bool, device=device)
    if n == 0:
        return gap, move
    order = group_lexsort(group, frac)
    g, f = group[order], frac[order]
    counts = torch.bincount(group, minlength=num_groups)
    first = torch.cumsum(counts, 0) - counts
    occupied = counts > 0
    last = first + counts - 1
    wrap_gap = torch.zeros(num_groups, dtype=frac.dtype, device=device)
    wrap_gap[occupied] = f[first[occupied]] + 1.0 - f[last[occupied]]
    following = torch.empty_like(f)  # gap after each sorted point (to the next point of its group, or round)
    following[:-1] = f[1:] - f[:-1]
    following[last[occupied]] = wrap_gap[occupied]
    gap = gap.scatter_reduce(0, g, following, "amax")
    position = torch.arange(n, device=device)
    widest = following >= gap[g]
    cut = torch.full((num_groups,), n, dtype=torch.long, device=device)
    cut = cut.scatter_reduce(0, g[widest], position[widest], "amin")  # first widest gap of each group
    rotate = occupied & (wrap_gap < gap)
    move[order] = rotate[g] & (position <= cut[g])
    return gap, move
