"""Periodic radius graph: O(N) candidate search (vesin or a torch cell list) and fairchem-style max-neighbour selection.

Semantics follow fairchem's ``radius_graph_pbc`` / ``get_max_neighbors_mask``: pairs with 1e-4 Å² < d² <= cutoff²,
images only along periodic axes, edge_index[0] = source j (the atom whose image is used), edge_index[1] = target i.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from torch import Tensor

from mlcalc.graph.atomgraph import AtomGraph
from mlcalc.graph.celllist import cell_list_pairs
from mlcalc.graph.clusters import Clusters, is_sparse, split_clusters
from mlcalc.graph.geometry import MIN_DISTANCE_SQ, SEARCH_MARGIN, complete_cell, pair_distances_sq

logger = logging.getLogger(__name__)

#: fairchem drops pairs with d <= 0.01 Å (it tests d² > 1e-4): an atom with itself at zero offset.
MIN_DISTANCE = 0.01
#: tolerance added to the (k+1)-th nearest value in non-strict max-neighbour selection.
NONSTRICT_TOLERANCE = 0.01
#: candidate-search backends accepted by ``radius_graph``.
BACKENDS = ("auto", "vesin", "torch")
#: above this many clusters to search, the vesin backend hands the batch to the torch cell list (one vectorised
#: pass instead of one vesin call per cluster; the pairs are the same).
_VESIN_MAX_CLUSTERS = 64
#: ... and when a cluster periodic along some axes spans more than this many radii along another.
_VESIN_MAX_OPEN_SPAN = 64


def check_cell(cell: np.ndarray, pbc: np.ndarray, label: str = "structure") -> None:
    """Raise ValueError if the cell is non-finite or a periodic axis has a zero / dependent cell vector."""
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if cell.shape != (3, 3) or pbc.shape != (3,):
        raise ValueError(f"{label}: cell must be (3, 3) and pbc (3,), got {cell.shape} and {pbc.shape}")
    if not np.all(np.isfinite(cell)):
        raise ValueError(f"{label}: the cell contains NaN or inf")
    lengths = np.linalg.norm(cell, axis=1)
    for ax in range(3):
        if pbc[ax] and lengths[ax] < 1e-8:
            raise ValueError(
                f"{label}: pbc is True along axis {ax} but cell vector {ax} has zero length; "
                "set a cell or turn periodicity off along that axis"
            )
    if pbc.any():
        periodic_cell = cell[pbc]
        if np.linalg.matrix_rank(periodic_cell, tol=1e-8 * max(lengths.max(), 1.0)) < int(pbc.sum()):
            raise ValueError(f"{label}: the periodic cell vectors are linearly dependent (degenerate cell)")


def _vesin_group(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, reach: float) -> tuple[Tensor, ...]:
    """vesin's full list of one group of atoms within ``reach``: i, j (E,) int64 local indices, S (E, 3) int64."""
    return tuple(torch.from_numpy(a) for a in _vesin_group_np(positions, cell, pbc, reach))


def _vesin_group_np(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, reach: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_vesin_group`` as numpy arrays."""
    import vesin

    box = complete_cell(cell, pbc) if pbc.any() else np.zeros((3, 3))
    nl = vesin.NeighborList(cutoff=float(reach), full_list=True)
    i, j, shifts = nl.compute(np.ascontiguousarray(positions), box, [bool(p) for p in pbc], "ijS", copy=False)
    return i.astype(np.int64), j.astype(np.int64), np.array(shifts, dtype=np.int64).reshape(-1, 3)


def _long_mixed_cluster(clusters: Clusters, reach: float) -> bool:
    """Whether a cluster periodic along some axis spans more than ``_VESIN_MAX_OPEN_SPAN`` x reach along another
    (vesin's cost grows with the square of that span; the torch cell list's does not)."""
    mixed = clusters.pbc.any(dim=1) & ~clusters.pbc.all(dim=1) & (clusters.size > _VESIN_MAX_OPEN_SPAN)
    if not bool(mixed.any()):
        return False
    x = clusters.frac * clusters.heights[clusters.structure[clusters.label]]
    idx = clusters.label[:, None].expand(-1, 3)
    lo = torch.full((clusters.num_clusters, 3), float("inf"), dtype=x.dtype).scatter_reduce(0, idx, x, "amin")
    hi = torch.full_like(lo, float("-inf")).scatter_reduce(0, idx, x, "amax")
    span = (hi - lo).masked_fill(clusters.pbc, 0.0).amax(dim=1)
    return bool((span[mixed] > _VESIN_MAX_OPEN_SPAN * reach).any())


def _vesin_pairs(
    pos: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, cutoff: float, include_overlaps: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pairs of a batch on the CPU with vesin, one call per structure or, for sparse structures, per cluster.

    pos (N, 3) float64, cell (B, 3, 3) float64, pbc (B, 3) bool, batch (N,) int64, all on the CPU. Returns i, j
    (E,) int64 global indices, S (E, 3) int64 (frame of ``pos``), d2 (E,) float64 with d2 <= cutoff² and
    d2 > 1e-4 Å² (``include_overlaps``: every pair except an atom with itself at zero image). Sparse structures
    (atoms far apart, huge boxes) are split by ``split_clusters`` first; above ``_VESIN_MAX_CLUSTERS`` clusters
    the torch cell list does the search in one vectorised pass (same pairs).
    """
    reach = float(cutoff) + SEARCH_MARGIN
    clusters = split_clusters(pos, cell, pbc, batch, reach) if is_sparse(pos, cell, pbc, batch, reach) else None
    pbc_np, cell_np, pos_np = pbc.numpy(), cell.numpy(), pos.numpy()
    parts = []
    if clusters is not None and clusters.split:
        searched = torch.nonzero((clusters.size >= 2) | clusters.pbc.any(dim=1)).squeeze(1)
        if searched.numel() > _VESIN_MAX_CLUSTERS or _long_mixed_cluster(clusters, reach):
            return cell_list_pairs(pos, cell, pbc, batch, cutoff, include_overlaps=include_overlaps, clusters=clusters)
        frame = (pos - torch.einsum("nk,nke->ne", clusters.image.to(pos.dtype), cell[batch])).numpy()
        members = torch.argsort(clusters.label, stable=True)
        first = (torch.cumsum(clusters.size, 0) - clusters.size).tolist()
        sizes, structure, c_pbc = clusters.size.tolist(), clusters.structure.tolist(), clusters.pbc.numpy()
        for c in searched.tolist():
            atoms = members[first[c] : first[c] + sizes[c]]
            li, lj, ls = _vesin_group(frame[atoms.numpy()], cell_np[structure[c]], c_pbc[c], reach)
            parts.append((atoms.index_select(0, li), atoms.index_select(0, lj), ls))
    else:  # one vesin call per structure, on the input positions
        bounds = np.cumsum(np.bincount(batch.numpy(), minlength=cell.shape[0])).tolist()
        for b, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
            if hi > lo:
                li, lj, ls = _vesin_group(pos_np[lo:hi], cell_np[b], pbc_np[b], reach)
                parts.append((li + lo, lj + lo, ls) if lo else (li, lj, ls))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros((0, 3), dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    i, j, shifts = parts[0] if len(parts) == 1 else (torch.cat(p) for p in zip(*parts, strict=True))
    if clusters is not None and clusters.split:  # back to the frame of the input positions
        shifts = shifts + clusters.image.index_select(0, i) - clusters.image.index_select(0, j)
    if cell.shape[0] == 1:
        d2 = pair_distances_sq(pos, cell[0], i, j, shifts)
    else:
        d2 = pair_distances_sq(pos, cell, i, j, shifts, batch.index_select(0, i))
    if include_overlaps:
        keep = (d2 <= float(cutoff) ** 2) & ((i != j) | shifts.any(dim=1))
    else:
        keep = (d2 > MIN_DISTANCE_SQ) & (d2 <= float(cutoff) ** 2)
    if bool(keep.all()):
        return i, j, shifts, d2
    keep = torch.nonzero(keep).squeeze(1)
    return i.index_select(0, keep), j.index_select(0, keep), shifts.index_select(0, keep), d2.index_select(0, keep)


def candidate_pairs(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, *, include_overlaps: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (target i, source j, integer shift S) with 0.01 Å < |r_j + S@cell - r_i| <= cutoff (one structure).

    Args:
        positions: (N, 3) Å; cell: (3, 3) rows, Å; pbc: (3,) bool; cutoff: Å.
        include_overlaps: also keep pairs closer than 0.01 Å, exact duplicates at d = 0 included (only an atom
            with itself at zero shift is left out): what input validation needs.

    vesin cell list (O(N), any cell shape, cells smaller than the cutoff, atoms outside the cell); sparse
    structures are split into clusters first, so the cost does not grow with the empty space between atoms.
    Returns numpy arrays i (E,), j (E,), S (E, 3) int64 and the float64 distances d (E,), in no particular order
    (both directions of every pair). Raises ValueError for a non-positive cutoff.
    """
    if not np.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    pos = np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    reach = float(cutoff) + SEARCH_MARGIN
    if is_sparse(pos, cell[None], pbc[None], None, reach):
        batch = torch.zeros(len(pos), dtype=torch.long)
        tensors = (torch.from_numpy(pos), torch.from_numpy(cell[None]), torch.from_numpy(pbc[None]))
        i, j, s, d2 = (t.numpy() for t in _vesin_pairs(*tensors, batch, cutoff, include_overlaps))
        return i, j, s, np.sqrt(d2)
    i, j, s = _vesin_group_np(pos, cell, pbc, reach)  # compact: one vesin call, distances in numpy
    d = np.sqrt((((pos[j] - pos[i]) + s @ cell) ** 2).sum(axis=1))
    if include_overlaps:
        keep = (d <= cutoff) & ((i != j) | s.any(axis=1))
    else:
        keep = (d > MIN_DISTANCE) & (d <= cutoff)
    return i[keep], j[keep], s[keep], d[keep]


def _check_max_neighbors(max_neighbors: int | None) -> None:
    if max_neighbors is not None and (isinstance(max_neighbors, bool) or int(max_neighbors) != max_neighbors):
        raise ValueError(f"max_neighbors must be a positive integer or None, got {max_neighbors!r}")
    if max_neighbors is not None and max_neighbors < 1:
        raise ValueError(f"max_neighbors must be >= 1 (None means no limit), got {max_neighbors}")


def _select_sorted(
    target: Tensor, values: Tensor, num_nodes: int, max_neighbors: int, strict: bool, tolerance: float
) -> Tensor:
    """``select_neighbors`` for edges already sorted by (target, value). Returns the (E,) keep mask."""
    counts = torch.bincount(target, minlength=num_nodes)
    if target.numel() == 0 or int(counts.max()) <= max_neighbors:
        return torch.ones(target.numel(), dtype=torch.bool, device=target.device)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(target.numel(), device=target.device).sub_(starts.index_select(0, target))
    if strict:
        return rank < max_neighbors
    # effective bound: (k+1)-th smallest value + tolerance; targets with <= k edges keep everything (inf)
    bound = torch.full((num_nodes,), float("inf"), dtype=values.dtype, device=values.device)
    at_k = torch.nonzero(rank == max_neighbors).squeeze(1)
    bound[target.index_select(0, at_k)] = values.index_select(0, at_k) + tolerance
    return values <= bound.index_select(0, target)


def select_neighbors(
    target: Tensor,
    values: Tensor,
    num_nodes: int,
    max_neighbors: int | None,
    strict: bool = True,
    tolerance: float = NONSTRICT_TOLERANCE,
) -> Tensor:
    """Boolean mask (E,) keeping at most ``max_neighbors`` nearest edges per target (fairchem semantics).

    ``values`` are what is compared (squared distances in the radius graph, distances in GemNet-OC's
    sub-selections). strict: exactly the k smallest per target (ties broken by edge order). Non-strict: every
    edge whose value is at most the (k+1)-th smallest value of its target + ``tolerance``, so degenerate shells
    stay whole. Targets with at most k edges keep all of them. Edges may come in any order; any device.
    """
    _check_max_neighbors(max_neighbors)
    n_edges = target.numel()
    if max_neighbors is None or n_edges == 0:
        return torch.ones(n_edges, dtype=torch.bool, device=target.device)
    order = torch.argsort(values, stable=True)
    order = order.index_select(0, torch.argsort(target.index_select(0, order), stable=True))
    target_sorted, values_sorted = target.index_select(0, order), values.index_select(0, order)
    keep_sorted = _select_sorted(target_sorted, values_sorted, num_nodes, max_neighbors, strict, tolerance)
    mask = torch.empty(n_edges, dtype=torch.bool, device=target.device)
    return mask.index_copy_(0, order, keep_sorted)  # order is a permutation: every entry written once


def _as_list(atoms_or_list: Atoms | Sequence[Atoms]) -> list[Atoms]:
    """One structure or a sequence of them as a list of Atoms (pymatgen Structure/Molecule are converted)."""
    from mlcalc.structures import as_atoms

    if isinstance(atoms_or_list, Atoms) or type(atoms_or_list).__module__.startswith("pymatgen."):
        return [as_atoms(atoms_or_list)]
    try:
        return [as_atoms(a) for a in atoms_or_list]
    except TypeError:
        raise TypeError("radius_graph expects an ase.Atoms, a pymatgen structure, or a sequence of them") from None


def _tie_key(j: Tensor, shifts: Tensor) -> Tensor:
    """Integer key ordering edges by source index, then shift (x, y, z)."""
    shifts = shifts.long()
    lo = shifts.amin(0)
    span = shifts.amax(0) - lo + 1
    key = j * span[0] + (shifts[:, 0] - lo[0])
    key = key * span[1] + (shifts[:, 1] - lo[1])
    return key * span[2] + (shifts[:, 2] - lo[2])


def _lexsort(keys: Sequence[Tensor]) -> Tensor:
    """Permutation sorting by ``keys[0]``, then ``keys[1]``, ... (stable argsorts, least significant first)."""
    order = torch.argsort(keys[-1], stable=True)
    for key in reversed(keys[:-1]):
        order = order.index_select(0, torch.argsort(key.index_select(0, order), stable=True))
    return order


def _sort_edges(i: Tensor, d2: Tensor, j: Tensor, shifts: Tensor) -> Tensor:
    """Permutation sorting edges by target, then squared distance, then source and shift (backend-independent).

    One integer sort on (target, float32 bits of d²) (non-negative floats order like their bit patterns, and
    rounding to float32 never inverts an order), then runs of equal keys - near or exact distance ties - are
    re-sorted exactly by (d², source, shift), so ties do not depend on the candidate order of the backend.
    """
    if i.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=i.device)
    key = (i << 31) | d2.float().view(torch.int32).long()
    key, order = torch.sort(key)  # = argsort(key), with the sorted keys (no gather)
    same = key[1:] == key[:-1]
    if bool(same.any()):
        in_run = torch.zeros(key.numel(), dtype=torch.bool, device=key.device)
        in_run[1:] |= same
        in_run[:-1] |= same
        slots = torch.nonzero(in_run).squeeze(1)
        sub = order.index_select(0, slots)
        keys = [i.index_select(0, sub), d2.index_select(0, sub)]
        keys.append(_tie_key(j.index_select(0, sub), shifts.index_select(0, sub)))
        order.index_copy_(0, slots, sub.index_select(0, _lexsort(keys)))
    return order


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "vesin" if device.type == "cpu" else "torch"
    return backend


def radius_graph(
    atoms_or_list: Atoms | Sequence[Atoms],
    cutoff: float,
    max_neighbors: int | None = None,
    strict: bool = True,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    backend: str = "auto",
    recenter: bool = False,
) -> AtomGraph:
    """Build the periodic radius graph of one structure or a batch of structures.

    Args:
        atoms_or_list: an Atoms or a list of Atoms (batched into one graph with ``batch``). Positions may lie
            outside the cell; per-axis pbc, any (non-degenerate) cell shape, cells smaller than the cutoff.
        cutoff: radius in Å; pairs with 0.01 Å < d <= cutoff become edges (fairchem: 1e-4 < d² <= cutoff²).
        max_neighbors: keep at most this many nearest neighbours per target (None: all).
        strict: fairchem's ``enforce_max_neighbors_strictly``: True keeps exactly the k nearest; False keeps
            degenerate shells whole (every neighbour with d² <= d²_(k+1) + 0.01 Å²).
        dtype, device: of the floating tensors (positions, cell) / of every tensor of the result.
        backend: candidate search; "vesin" (CPU), "torch" (cell list on ``device``), "auto" (vesin on CPU,
            torch elsewhere). Both give identical graphs.
        recenter: return ``graph.recentered()`` (computed in float64 before the cast to ``dtype``): positions
            wrapped / translated near the origin, offsets adjusted, every edge vector unchanged. Use it whenever
            ``dtype`` is float32: edge vectors then keep their float64 accuracy wherever the atoms sit.

    Returns an AtomGraph; edges sorted by target, then distance (then source index and offset). Cost: O(atoms +
    pairs) whatever the empty space between the atoms (sparse structures are split into independent clusters).
    """
    if not np.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    _check_max_neighbors(max_neighbors)
    structures = _as_list(atoms_or_list)
    if not structures:
        raise ValueError("radius_graph got an empty list of structures")
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = _resolve_backend(backend, device)
    pos_l, cell_l, pbc_l = [], [], []
    for k, atoms in enumerate(structures):
        label = f"structure {k}" if len(structures) > 1 else "structure"
        pos = np.asarray(atoms.positions, dtype=np.float64)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        check_cell(cell, pbc, label)
        if not np.all(np.isfinite(pos)):
            bad = np.where(~np.isfinite(pos).all(axis=1))[0]
            raise ValueError(f"{label}: positions of atoms {bad.tolist()[:10]} are NaN or inf")
        pos_l.append(pos)
        cell_l.append(cell)
        pbc_l.append(pbc)
    natoms = torch.tensor([len(a) for a in structures], dtype=torch.long)
    on_cpu = (
        torch.from_numpy(np.concatenate(pos_l, axis=0)),
        torch.from_numpy(np.stack(cell_l)),
        torch.from_numpy(np.stack(pbc_l)),
        torch.repeat_interleave(torch.arange(len(structures)), natoms),
    )
    pos64, cell64, pbc_t, batch = (t.to(device) for t in on_cpu)
    if backend == "torch":
        i, j, shifts, d2 = cell_list_pairs(pos64, cell64, pbc_t, batch, float(cutoff))
    else:
        i, j, shifts, d2 = (t.to(device) for t in _vesin_pairs(*on_cpu, float(cutoff)))

    # 1-D index_select gathers, not advanced indexing (several times faster on CPU); j and the shifts are
    # gathered once, after the max-neighbour selection (the selection needs only the sorted targets and d²)
    order = _sort_edges(i, d2, j, shifts)
    edge_index = torch.empty((2, order.numel()), dtype=torch.long, device=device)
    target = torch.index_select(i, 0, order, out=edge_index[1])
    if max_neighbors is not None:
        d2 = d2.index_select(0, order)
        keep = _select_sorted(target, d2, pos64.shape[0], int(max_neighbors), strict, NONSTRICT_TOLERANCE)
        if not bool(keep.all()):
            keep = torch.nonzero(keep).squeeze(1)
            order = order.index_select(0, keep)
            edge_index = torch.empty((2, order.numel()), dtype=torch.long, device=device)
            torch.index_select(target, 0, keep, out=edge_index[1])
    torch.index_select(j, 0, order, out=edge_index[0])
    shifts = shifts.index_select(0, order)
    graph = AtomGraph(
        pos=pos64,
        numbers=torch.tensor(np.concatenate([a.numbers for a in structures]), dtype=torch.long, device=device),
        cell=cell64,
        pbc=pbc_t,
        batch=batch,
        natoms=natoms.to(device),
        tags=torch.tensor(np.concatenate([a.get_tags() for a in structures]), dtype=torch.long, device=device),
        edge_index=edge_index,
        cell_offsets=shifts.long(),
        cutoff=float(cutoff),
    )
    if recenter:
        graph = graph.recentered()
    return graph if dtype == torch.float64 else graph.to(dtype=dtype)
