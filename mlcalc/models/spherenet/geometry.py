"""Periodic SphereNet geometry on the ordinary edge list: triplets, angles, torsion reference and torsion frame.

Edge ``e``: source j (image ``cell_offsets[e]``) -> target i, edge vector ``v_e = pos[j] + offsets @ cell - pos[i]``.
A triplet pairs an edge k->j (``idx_kj``) with an edge j->i (``idx_ji``); in the frame of i, j sits at the image of
``idx_ji`` and k at that image plus the image of ``idx_kj``. Only the reverse of the same edge (source i, offset
``-offset_ji``) is dropped, so k may be atom i in another image (small cells).

Torsion of a triplet (DIG's definition, done right): among the *other* triplets sharing the edge j->i (candidates n:
edges into j other than the reverse edge and k->j itself) the reference is the one whose half-plane (bounded by the
j->i axis) follows that of k counter-clockwise about j->i with the smallest angle in (0, 2 pi]; candidates collinear
with j->i or coplanar with k on its side (angle 0 within a tolerance) count as 2 pi. Without any valid candidate the
torsion is 0 (DIG's intended 2 pi). Only this discrete choice is made without gradients; the basis then uses the
direction of k in the frame (reference half-plane, j->i axis), all in smooth Cartesian algebra.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlcalc.nn.scatter import gather, scatter_sum, segment_ranks


def build_triplets(edge_index: Tensor, cell_offsets: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Triplet edge pairs (idx_kj, idx_ji), each (T,), grouped by idx_ji ascending.

    Every edge k->j into the source j of edge j->i, except the reverse edge (source i, offset -offset_ji).
    """
    src, tgt = edge_index[0], edge_index[1]
    num_edges = src.numel()
    order = torch.argsort(tgt, stable=True)
    deg = torch.bincount(tgt, minlength=num_nodes)
    start = torch.cumsum(deg, 0) - deg
    per_edge = deg[src]  # candidates k->j for each edge j->i
    idx_ji = torch.repeat_interleave(torch.arange(num_edges, device=src.device), per_edge)
    rank = segment_ranks(idx_ji, num_edges)
    idx_kj = order[start[src[idx_ji]] + rank]
    reverse = (src[idx_kj] == tgt[idx_ji]) & (cell_offsets[idx_kj] == -cell_offsets[idx_ji]).all(dim=1)
    keep = ~reverse
    return idx_kj[keep], idx_ji[keep]


def _azimuth_frame(axis: Tensor) -> tuple[Tensor, Tensor]:
    """Two unit vectors (e1, e2) completing the unit ``axis`` (..., 3) to a right-handed frame (e1, e2, axis)."""
    helper = torch.zeros_like(axis)
    helper.scatter_(-1, axis.abs().argmin(dim=-1, keepdim=True), 1.0)
    e1 = helper - (helper * axis).sum(-1, keepdim=True) * axis
    e1 = e1 / e1.norm(dim=-1, keepdim=True)
    return e1, torch.cross(axis, e1, dim=-1)


def _azimuths(vec: Tensor, idx_kj: Tensor, idx_ji: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Azimuth (T,) of k about the j->i axis in the frame of ``_azimuth_frame``, and whether k is collinear with
    j->i (T,) bool: its distance from the axis is at most ``tol`` times |j->k| (then the azimuth is rounding)."""
    axis = -vec / vec.norm(dim=-1, keepdim=True)  # unit j->i per edge
    e1, e2 = _azimuth_frame(axis)
    r_k = vec[idx_kj]
    a = axis[idx_ji]
    along = (r_k * a).sum(-1)
    perp = (r_k - along.unsqueeze(-1) * a).norm(dim=-1)
    collinear = perp <= tol * r_k.norm(dim=-1)
    azimuth = torch.atan2((r_k * e2[idx_ji]).sum(-1), (r_k * e1[idx_ji]).sum(-1))
    return azimuth, collinear


@torch.no_grad()
def torsion_reference(vec: Tensor, idx_kj: Tensor, idx_ji: Tensor, tol: float | None = None) -> Tensor:
    """Index (T,) of the reference triplet for each triplet (itself when it has no valid candidate).

    ``vec`` (E, 3) edge vectors; triplets must be grouped by ``idx_ji``. ``tol``: angular tolerance (rad) below
    which a candidate counts as coplanar with k (default sqrt of the dtype's machine epsilon), also the relative
    tolerance for "collinear with j->i".
    """
    if tol is None:
        tol = math.sqrt(torch.finfo(vec.dtype).eps)
    num_trip = idx_kj.numel()
    device = vec.device
    self_ref = torch.arange(num_trip, device=device)
    if num_trip == 0:
        return self_ref
    azimuth, collinear = _azimuths(vec, idx_kj, idx_ji, tol)
    # all ordered pairs (t, n) of triplets sharing idx_ji
    group_size = torch.bincount(idx_ji, minlength=vec.shape[0])
    group_start = torch.cumsum(group_size, 0) - group_size
    q_t = torch.repeat_interleave(self_ref, group_size[idx_ji])
    q_n = group_start[idx_ji[q_t]] + segment_ranks(q_t, num_trip)
    angle = torch.remainder(azimuth[q_n] - azimuth[q_t], 2 * math.pi)
    valid = (q_n != q_t) & ~collinear[q_n] & (angle > tol) & (angle < 2 * math.pi - tol)
    angle = torch.where(valid, angle, torch.full_like(angle, math.inf))
    best = torch.full((num_trip,), math.inf, dtype=vec.dtype, device=device)
    best = best.scatter_reduce(0, q_t, angle, reduce="amin")
    winner = valid & (angle == best[q_t])
    ref = torch.full((num_trip,), num_trip, dtype=torch.long, device=device)
    ref = ref.scatter_reduce(0, q_t[winner], q_n[winner], reduce="amin")
    return torch.where(ref == num_trip, self_ref, ref)


@torch.no_grad()
def half_plane_classes(vec: Tensor, idx_kj: Tensor, idx_ji: Tensor, tol: float | None = None) -> tuple[Tensor, Tensor]:
    """Half-plane class (T,) long of each triplet, and whether its k is collinear with j->i (T,) bool.

    Triplets of one edge j->i whose k lie in the same half-plane bounded by the j->i axis (azimuths equal within
    ``tol`` rad, default sqrt(eps) as ``torsion_reference``, chained, also across the +-pi cut) share a class;
    triplets with k collinear with j->i have classes of their own. Used by ``triplet_directions`` to average the
    torsion reference over ties (see there). Only this discrete grouping is made without gradients.
    """
    if tol is None:
        tol = math.sqrt(torch.finfo(vec.dtype).eps)
    num_trip = idx_kj.numel()
    device = vec.device
    azimuth, collinear = _azimuths(vec, idx_kj, idx_ji, tol)
    # runs of equal azimuth among the non-collinear triplets of each edge, ordered by (edge, azimuth)
    kept = torch.nonzero(~collinear, as_tuple=True)[0]
    order = kept[torch.argsort(azimuth[kept], stable=True)]
    order = order[torch.argsort(idx_ji[order], stable=True)]
    grp, az = idx_ji[order], azimuth[order]
    num_kept = order.numel()
    classes = torch.empty(num_trip, dtype=torch.long, device=device)
    if num_kept:
        same_edge = grp[1:] == grp[:-1]
        starts = torch.ones(num_kept, dtype=torch.bool, device=device)
        starts[1:] = ~same_edge | (az[1:] - az[:-1] > tol)
        label = torch.cumsum(starts.long(), 0) - 1
        # the last run of an edge joins its first run when they meet across the +-pi cut
        first = torch.ones(num_kept, dtype=torch.bool, device=device)
        first[1:] = ~same_edge
        last = torch.ones(num_kept, dtype=torch.bool, device=device)
        last[:-1] = ~same_edge
        first_of_edge = torch.zeros(int(grp.max()) + 1, dtype=torch.long, device=device)
        first_of_edge[grp[first]] = torch.nonzero(first, as_tuple=True)[0]
        f = first_of_edge[grp]
        wrap = last & (az[f] + 2 * math.pi - az <= tol) & (label != label[f])
        relabel = torch.arange(int(label[-1]) + 1, device=device)
        relabel[label[wrap]] = label[f[wrap]]
        classes[order] = relabel[label]
    classes[collinear] = num_kept + torch.arange(num_trip - num_kept, device=device)
    return classes, collinear


def _safe_unit(v: Tensor) -> tuple[Tensor, Tensor]:
    """``v / |v|`` and ``|v|`` with zero vectors mapped to zero (finite gradients)."""
    sq = (v * v).sum(-1, keepdim=True)
    nonzero = sq > 0
    norm = torch.sqrt(torch.where(nonzero, sq, torch.ones_like(sq)))
    return torch.where(nonzero, v / norm, torch.zeros_like(v)), norm.squeeze(-1)


def triplet_directions(
    vec: Tensor,
    dist: Tensor,
    idx_kj: Tensor,
    idx_ji: Tensor,
    ref: Tensor | None,
    classes: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Direction of k seen from j in the triplet frame: z = cos(angle), and (x, y) = sin(angle) (cos, sin)(torsion).

    z: cosine of the angle between j->i and j->k (T,). With ``ref`` (T,) reference triplets: x, y (T,) with
    torsion = angle from k's half-plane to the reference half-plane, counter-clockwise about j->i (DIG's sign).
    ``classes``: ``half_plane_classes`` of these triplets if already computed (else computed here).

    Derivatives at lattice coincidences (the values are those of the definition above):

    * references tied at equal azimuth (several candidates in one half-plane, common in ideal lattices) give the
      same torsion but different gradients (the energy has a kink there, a minimum over candidates): the reference
      direction is the mean over the tied half-plane (``half_plane_classes``), i.e. the mean of the one-sided
      gradients, the central finite-difference one, independent of rounding and of the atom order;
    * k collinear with j->i: x = y = 0 whatever the reference, which rounding picks (k's azimuth is noise);
      x and y are then constant for autograd (zero derivative, the symmetric choice at this cone point).

    With both, ideal slabs get forces with the lattice's symmetry (in-plane forces 0 on an fcc111 slab: 1e-15
    instead of up to 1 % of the largest force, varying with the slab's position).
    """
    r_k = gather(vec, idx_kj)  # j -> k (gather: deterministic backward)
    axis = -gather(vec, idx_ji) / gather(dist, idx_ji).unsqueeze(-1)  # unit j -> i
    u_k = r_k / gather(dist, idx_kj).unsqueeze(-1)
    z = (u_k * axis).sum(-1)
    if ref is None:
        return z, None, None
    classes, k_on_axis = half_plane_classes(vec.detach(), idx_kj, idx_ji) if classes is None else classes
    perp = r_k - (r_k * axis).sum(-1, keepdim=True) * axis  # each triplet's k off the axis
    n_hat, _ = _safe_unit(gather(perp, ref))
    perp_hat, _ = _safe_unit(perp)
    num_classes = int(classes.max()) + 1 if classes.numel() else 0
    ref_class = classes[ref]
    has_ref = ref != torch.arange(ref.numel(), device=ref.device)  # without a reference the torsion is 0
    tied = (torch.bincount(classes, minlength=num_classes) > 1)[ref_class] & has_ref
    mean_hat, _ = _safe_unit(gather(scatter_sum(perp_hat, classes, num_classes), ref_class))
    n_hat = torch.where(tied.unsqueeze(-1), mean_hat, n_hat)
    x = (u_k * n_hat).sum(-1)
    y = (axis * torch.cross(u_k, n_hat, dim=-1)).sum(-1)
    x = torch.where(k_on_axis, x.detach(), x)
    y = torch.where(k_on_axis, y.detach(), y)
    return z, x, y
