"""Split structures into clusters that cannot be neighbours, so a search's cost follows atoms, not empty space.

A cell list grids the volume the atoms span. Sixty atoms flying kilometres apart along a non-periodic axis (an
exploding MD run), or a molecule in a huge periodic box, make that grid - or, where the grid is capped, its cells
- enormous. Atoms on two sides of an empty slab thicker than the search radius cannot be neighbours, so before the
search each structure is cut along such gaps:

* non-periodic axis: sort the coordinate (a Cartesian distance along the axis of the completed cell), cut where
  consecutive atoms are more than the radius apart;
* periodic axis: on the circle of wrapped fractional coordinates (times the distance between lattice planes), if
  the widest empty arc exceeds the radius, cut the circle there and unroll it: the group then spans less than one
  period minus the radius along that axis, so none of its pairs uses an image along it, and the axis becomes
  non-periodic for the group (the atoms before the cut move by one lattice vector).

Cutting along one axis can open gaps along another, so the axes are swept until nothing changes. Each final
cluster spans at most (its atom count - 1) x radius along every axis where it is not periodic (along a periodic one
its atoms leave no gap wider than the radius), so a cell list over it has O(atoms) cells. The search then runs per
cluster on positions ``pos - image @ cell``; a pair (i, j, S_c) found there is (i, j, S_c + image[i] - image[j]) in
the frame of the input positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mlcalc.graph.geometry import group_lexsort, largest_circular_gap, lattice_frames, lattice_frames_np

#: a structure is split when a grid of ``reach``-sized cells over its extent (whole periods along periodic axes)
#: would have more than ``_SPARSE_FACTOR * atoms + _SPARSE_SLACK`` cells, or when it is periodic along some axes
#: and its atoms span more than ``_MAX_OPEN_SPAN`` x reach along another (vesin's cost grows with the square of
#: that span). Compact structures skip the sweeps entirely.
_SPARSE_FACTOR = 32
_SPARSE_SLACK = 4096
_MAX_OPEN_SPAN = 32
#: upper bound on the sweeps over the three axes (each sweep that changes something adds a cut; every
#: intermediate decomposition is valid, this only bounds the work on adversarial inputs).
_MAX_SWEEPS = 16


@dataclass
class Clusters:
    """Independent groups of atoms of a batch (N atoms, B structures, C clusters).

    Attributes:
        label: (N,) int64 cluster of each atom, in [0, C); clusters of one structure are consecutive.
        structure: (C,) int64 structure of each cluster.
        pbc: (C, 3) bool axes along which the cluster is still periodic (a subset of its structure's pbc).
        size: (C,) int64 atoms per cluster (>= 1).
        image: (N, 3) int64 lattice image n of each atom: the cluster holds the atom at ``pos - n @ cell``.
        frac: (N, 3) float64 fractional coordinates of ``pos - image @ cell`` in the completed cell of the
            structure; in [0, 1) along the cluster's periodic axes.
        heights: (B, 3) float64 distances between lattice planes of the completed cells, Å.
        split: False when no structure needed splitting (then clusters are the non-empty structures and
            ``image`` only wraps periodic coordinates into the cell).
    """

    label: Tensor
    structure: Tensor
    pbc: Tensor
    size: Tensor
    image: Tensor
    frac: Tensor
    heights: Tensor
    split: bool

    @property
    def num_clusters(self) -> int:
        return int(self.structure.shape[0])


def is_sparse(
    pos: Tensor | np.ndarray,
    cell: Tensor | np.ndarray,
    pbc: Tensor | np.ndarray,
    batch: Tensor | np.ndarray | None,
    reach: float,
) -> bool:
    """Whether any structure of the batch spans many more ``reach``-sized cells than it has atoms.

    Same arguments as ``split_clusters`` (numpy arrays or CPU tensors; ``batch`` None for one structure); the
    criterion ``split_clusters`` uses to decide whether to split, evaluated in numpy (a few microseconds), so
    callers can skip the decomposition for compact structures.
    """
    pos_np, cell_np, pbc_np = (np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t) for t in (pos, cell, pbc))
    if len(pos_np) < 2:
        return False
    _, inv, heights = lattice_frames_np(cell_np, pbc_np)
    pbc_np = pbc_np.reshape(-1, 3)
    if len(pbc_np) == 1:
        frac = pos_np @ inv[0]
        lo, hi, counts = frac.min(0, keepdims=True), frac.max(0, keepdims=True), np.array([len(frac)])
    else:
        b = np.asarray(batch.detach().cpu() if isinstance(batch, Tensor) else batch)
        frac = np.einsum("nk,nke->ne", pos_np, inv[b])
        counts = np.bincount(b, minlength=len(pbc_np))
        lo, hi = np.full((len(pbc_np), 3), np.inf), np.full((len(pbc_np), 3), -np.inf)
        np.minimum.at(lo, b, frac)
        np.maximum.at(hi, b, frac)
    span = np.where(pbc_np, 1.0, np.clip(hi - lo, 0.0, None)) * heights
    return _too_many_cells(span, counts, pbc_np, reach)


def _too_many_cells(span: np.ndarray, counts: np.ndarray, pbc: np.ndarray, reach: float) -> bool:
    """The splitting criterion: span (B, 3) Å of each structure, counts (B,) atoms, pbc (B, 3) bool."""
    lengths = span / reach
    cells = (np.floor(lengths) + 1.0).prod(axis=1)
    mixed = pbc.any(axis=1) & ~pbc.all(axis=1)
    long_open = mixed & (np.where(pbc, 0.0, lengths).max(axis=1) > _MAX_OPEN_SPAN)
    return bool(((cells > _SPARSE_FACTOR * counts + _SPARSE_SLACK) | long_open).any())


def _needs_split(frac: Tensor, batch: Tensor, pbc: Tensor, heights: Tensor, reach: float) -> bool:
    """``is_sparse`` in torch, from the unwrapped fractional coordinates (N, 3) and plane distances (B, 3)."""
    n_struct = pbc.shape[0]
    if n_struct == 1:
        lo, hi = frac.amin(dim=0, keepdim=True), frac.amax(dim=0, keepdim=True)
        counts = torch.full((1,), frac.shape[0], device=frac.device)
    else:
        big = torch.finfo(frac.dtype).max
        idx = batch[:, None].expand(-1, 3)
        lo = torch.full((n_struct, 3), big, dtype=frac.dtype, device=frac.device).scatter_reduce(0, idx, frac, "amin")
        hi = torch.full_like(lo, -big).scatter_reduce(0, idx, frac, "amax")
        counts = torch.bincount(batch, minlength=n_struct)
    span = (hi - lo).clamp(min=0.0).masked_fill(pbc, 1.0) * heights
    return _too_many_cells(*(t.cpu().numpy() for t in (span, counts, pbc)), reach)


def _relabel(label: Tensor, start: Tensor, order: Tensor) -> Tensor:
    """New labels from the sorted order and the sorted positions that start a new cluster."""
    new = torch.empty_like(label)
    new[order] = torch.cumsum(start.long(), 0) - 1
    return new


def _sweep_axis(
    ax: int, label: Tensor, c_struct: Tensor, c_pbc: Tensor, frac: Tensor, image: Tensor, heights: Tensor, reach: float
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Unroll the clusters periodic along ``ax`` with a wide gap, then cut every non-periodic cluster at its gaps.

    Updates ``frac`` and ``image`` in place; returns the new label, structure and pbc of the clusters and whether
    anything changed.
    """
    num = c_struct.shape[0]
    h = heights[c_struct, ax]  # (C,) Å per unit of fractional coordinate
    changed = False
    periodic = c_pbc[:, ax]
    if bool(periodic.any()):
        gap, move = largest_circular_gap(label, frac[:, ax], num)
        unroll = periodic & (gap * h > reach)
        if bool(unroll.any()):
            move &= unroll[label]
            frac[move, ax] += 1.0
            image[move, ax] -= 1
            c_pbc = c_pbc.clone()
            c_pbc[unroll, ax] = False
            changed = True
    x = frac[:, ax] * h[label]
    order = group_lexsort(label, x)
    ls, xs = label[order], x[order]
    start = torch.ones_like(ls, dtype=torch.bool)
    start[1:] = (ls[1:] != ls[:-1]) | ((xs[1:] - xs[:-1] > reach) & ~c_pbc[ls[1:], ax])
    heads = ls[start]
    # more clusters than occupied ones before: a cut (empty structures are dropped on the first sweep)
    changed = changed or heads.shape[0] > int((torch.bincount(label, minlength=num) > 0).sum())
    return _relabel(label, start, order), c_struct[heads], c_pbc[heads], changed


def split_clusters(pos: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, reach: float) -> Clusters:
    """Decompose a batch into clusters no pair within ``reach`` crosses.

    Args:
        pos: (N, 3) float64 positions, Å (anywhere; outside the cell too).
        cell: (B, 3, 3) float64 cell rows; pbc: (B, 3) bool; batch: (N,) int64 structure of each atom.
        reach: search radius, Å (cuts are made only where atoms are more than ``reach`` apart).

    Returns a ``Clusters`` on the device of ``pos``. Atoms of different clusters are more than ``reach`` apart
    in every periodic image; within a cluster, every pair within ``reach`` of the input appears (with image
    ``S_c = S - image[i] + image[j]``) among the pairs of the positions ``pos - image @ cell`` under the cluster's
    pbc. Compact structures are not split (``split`` False, one cluster per non-empty structure).
    """
    device = pos.device
    if not math.isfinite(reach) or reach <= 0:
        raise ValueError(f"reach must be a positive finite number, got {reach}")
    pbc = pbc.to(device=device, dtype=torch.bool)
    _, inv, heights = lattice_frames(cell, pbc)
    n_struct = pbc.shape[0]
    pos = pos.to(torch.float64)
    frac = pos @ inv[0] if n_struct == 1 else torch.einsum("nk,nke->ne", pos, inv[batch])
    split = pos.shape[0] > 1 and _needs_split(frac, batch, pbc, heights, reach)
    image = torch.floor(frac).masked_fill(~pbc[batch], 0.0)
    frac = frac - image
    image = image.long()
    label, c_struct, c_pbc = batch.clone(), torch.arange(n_struct, device=device), pbc.clone()
    if split:
        for _ in range(_MAX_SWEEPS):
            any_change = False
            for ax in range(3):
                label, c_struct, c_pbc, changed = _sweep_axis(ax, label, c_struct, c_pbc, frac, image, heights, reach)
                any_change |= changed
            if not any_change:
                break
    else:  # drop empty structures
        counts = torch.bincount(batch, minlength=n_struct)
        keep = counts > 0
        if not bool(keep.all()):
            label = (torch.cumsum(keep.long(), 0) - 1)[batch]
            c_struct, c_pbc = c_struct[keep], c_pbc[keep]
    size = torch.bincount(label, minlength=c_struct.shape[0])
    return Clusters(label, c_struct, c_pbc, size, image, frac, heights, split)
