"""Neighbour reuse between calls (a Verlet list with a skin): exact radius graphs for MD at less search cost.

The method is Verlet's neighbour list with a "skin" (L. Verlet, Phys. Rev. 159, 98 (1967)), as in ASE's
``NeighborList(skin=...)`` and LAMMPS' ``neighbor SKIN bin`` with its ``neigh_modify check yes`` rebuild rule: search
once for every pair within ``cutoff + skin``, keep those candidates and the positions they were found at, and
search again only when some atom has moved at least ``skin / 2`` since then.

Why skin/2: a pair's distance changes by at most the sum of its two atoms' displacements (triangle inequality,
same integer image on both sides). If every atom moved strictly less than skin/2, every distance changed by
strictly less than skin, so a pair that was farther than ``cutoff + skin`` at the reference positions is still
farther than ``cutoff`` now: every pair within the cutoff is among the stored candidates. The candidate search
runs at ``cutoff + skin + 1e-6`` Å, so float64 rounding of distances and displacements (below 1e-11 Å even for
coordinates of 10^4 Å) cannot break the argument.

Unlike ASE's and LAMMPS' lists, the reused graph is not "everything within cutoff + skin": every call recomputes
the squared distances of all candidates with the same float64 arithmetic as a fresh build (``pair_distances_sq``,
fixed operation order), keeps ``1e-4 Å² < d² <= cutoff²``, sorts with the same canonical key (``_sort_edges``:
target, distance, source, offset) and applies the same max-neighbour selection (``_select_sorted``), then the same
``AtomGraph.recentered()``. The result - edge_index, cell_offsets, their order, positions, the recentred float64
coordinates - is identical, bit for bit, to ``radius_graph(atoms, cutoff, max_neighbors, strict, recenter=True)``;
a model evaluated on it gives bit-identical energies and forces. What is saved is the candidate search (and some
gather cost, below); the per-call sort over the edges remains.

Besides the search, reuse keeps the image shifts ``S @ cell`` of the candidates (rounded as in
``pair_distances_sq``) and gathers with ``index_select`` on per-component rows instead of indexing (E, 3) rows; the
recentring is ``AtomGraph.recentered`` applied per atom (see ``_recentered_offsets``). All of it is integer or
identically ordered float64 arithmetic, hence the same bits.

Rebuild rules (anything else reuses): first call, a different cutoff, a different atom count, atomic numbers,
pbc or cell (compared exactly: an NPT or cell-relaxation step rebuilds every time), or some atom that moved
``>= skin / 2`` since the reference. Displacements are plain differences of the Cartesian positions: an atom
wrapped back into the cell (a jump by a lattice vector, e.g. after ``atoms.wrap()``) counts as a large move and
triggers a rebuild, which is always correct (the stored images ``S`` belong to the reference positions' frame).
max_neighbors and strict may change between calls (they are applied to each call's distances).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch
from ase import Atoms
from torch import Tensor

from mlcalc.graph.atomgraph import AtomGraph
from mlcalc.graph.geometry import MIN_DISTANCE_SQ
from mlcalc.graph.neighbors import (
    NONSTRICT_TOLERANCE,
    _check_max_neighbors,
    _select_sorted,
    _sort_edges,
    _vesin_pairs,
    check_cell,
)

logger = logging.getLogger(__name__)

#: Å added to ``cutoff + skin`` in the candidate search, far above float64 rounding of distances and displacements.
ROUNDING_MARGIN = 1e-6


def image_offsets(cell: Tensor, shifts: Tensor) -> Tensor:
    """Cartesian image shifts ``S @ cell`` (3, E) float64, Å, rounded exactly as inside ``pair_distances_sq``.

    cell: (3, 3) float64 rows, Å; shifts: (3, E) int64 (one row per lattice axis). Component e is
    ``(S0 c0e + S1 c1e) + S2 c2e``, one IEEE operation at a time in that order, so ``distances_sq_from_offsets``
    reproduces ``pair_distances_sq`` bit for bit.
    """
    n = shifts.shape[1]
    s = [shifts[k].to(torch.float64) for k in range(3)]
    out = torch.empty((3, n), dtype=torch.float64)
    tmp = torch.empty(n, dtype=torch.float64)
    for e in range(3):
        torch.mul(s[0], cell[0, e], out=out[e])
        out[e].add_(torch.mul(s[1], cell[1, e], out=tmp))
        out[e].add_(torch.mul(s[2], cell[2, e], out=tmp))
    return out


def distances_sq_from_offsets(pos: Tensor, i: Tensor, j: Tensor, offsets: Tensor) -> Tensor:
    """``pair_distances_sq(pos, cell, i, j, S)`` (E,) float64, Å², with the shifts precomputed (``image_offsets``).

    The same operations in the same order per component e: ``v = (pos[j, e] - pos[i, e]) + off[e]``, then
    ``total += v * v`` for e = 0, 1, 2 starting from +0; hence bit-identical squared distances. While the cell is
    unchanged the image shifts need not be recomputed every call.
    """
    n = i.shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    v, tmp = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for e in range(3):
        p = pos[:, e].contiguous()
        torch.index_select(p, 0, j, out=v)
        v.sub_(torch.index_select(p, 0, i, out=tmp))
        v.add_(offsets[e])
        total.add_(v.mul_(v))
    return total


def _gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """``rows[:, index]`` for a (3, E) tensor: one 1-D ``index_select`` per row (much faster than dim-1 gathers)."""
    out = torch.empty((rows.shape[0], index.numel()), dtype=rows.dtype)
    for k in range(rows.shape[0]):
        torch.index_select(rows[k], 0, index, out=out[k])
    return out


def _recentered_offsets(graph: AtomGraph, i: Tensor, j: Tensor, shifts: Tensor) -> AtomGraph:
    """``graph.recentered()`` of ``graph`` with edges (source j, target i, images ``shifts`` (3, E)) added.

    ``AtomGraph.recentered`` moves atom k by whole lattice vectors n_k and sets ``offsets' = S + n_j - n_i``; the
    positions do not depend on the edges. Called on one pseudo-edge per atom (k -> atom 0, zero image) it gives
    ``m_k = n_k - n_0`` and the recentred positions; ``S + m_j - m_i = S + n_j - n_i`` exactly (integers), so the
    result equals ``recentered()`` of the full graph, with 1-D gathers instead of advanced indexing of (E, 3) rows.
    """
    n = graph.num_atoms
    probe = replace(
        graph,
        edge_index=torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)]),
        cell_offsets=torch.zeros((n, 3), dtype=torch.long),
    ).recentered()
    m = probe.cell_offsets.t().contiguous()  # (3, N): n_k - n_0
    offsets = torch.empty((i.numel(), 3), dtype=torch.long)
    tmp = torch.empty(i.numel(), dtype=torch.long)
    for k in range(3):
        col = torch.add(shifts[k], torch.index_select(m[k], 0, j, out=tmp))
        offsets[:, k] = col.sub_(torch.index_select(m[k], 0, i, out=tmp))
    return replace(probe, edge_index=torch.stack([j, i]), cell_offsets=offsets)


class NeighborCache:
    """Candidate pairs within ``cutoff + skin`` of one structure, reused while no atom has moved ``skin / 2``.

    Args:
        skin: Å, > 0. Larger skins rebuild less often but filter more candidates every call (their number grows as
            ``(cutoff + skin)³``). 1-2 Å suits MD with 0.5-2 fs steps (LAMMPS' default skin is 2 Å in metal
            units, 0.3 sigma in LJ units; ASE's ``NeighborList`` defaults to 0.3 Å); atoms of a solid near room
            temperature stay within ~0.1-0.3 Å of their sites, so with 1 Å a crystal rarely rebuilds at all.

    ``graph(atoms, cutoff, max_neighbors, strict)`` returns exactly what ``radius_graph(atoms, cutoff, max_neighbors,
    strict, recenter=True)`` (float64, CPU) returns; see the module docstring for the criterion and why it is exact.
    ``stats`` counts candidate searches ("builds") and calls served from the stored candidates ("reuses");
    ``last_reason`` says why the last build happened (None after a reuse). Not thread-safe: the calculator calls
    it under its lock.
    """

    def __init__(self, skin: float) -> None:
        skin = float(skin)
        if not math.isfinite(skin) or skin <= 0:
            raise ValueError(f"skin must be a positive finite distance in Å, got {skin}")
        self.skin = skin
        self.stats: dict[str, int] = {"builds": 0, "reuses": 0}
        self.last_reason: str | None = None
        self.clear()

    def clear(self) -> None:
        """Forget the stored candidates (the next call rebuilds); ``stats`` are kept."""
        self._cutoff: float | None = None
        self._ref_pos: np.ndarray | None = None
        self._cell: np.ndarray | None = None
        self._pbc: np.ndarray | None = None
        self._numbers: np.ndarray | None = None
        # candidates grouped by target: target i, source j (E,) int64, images S (3, E) int64, S @ cell (3, E) Å
        self._i: Tensor | None = None
        self._j: Tensor | None = None
        self._shifts: Tensor | None = None
        self._offsets: Tensor | None = None

    @property
    def num_candidates(self) -> int:
        """Stored candidate pairs (both directions), 0 before the first call."""
        return 0 if self._i is None else int(self._i.numel())

    def _stale(self, pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, numbers: np.ndarray, cutoff: float) -> str:
        """Why the stored candidates cannot serve this call ("" when they can)."""
        if self._ref_pos is None:
            return "first call"
        if cutoff != self._cutoff:
            return "cutoff changed"
        if pos.shape != self._ref_pos.shape:
            return "atom count changed"
        if not np.array_equal(pbc, self._pbc):
            return "pbc changed"
        if not np.array_equal(cell, self._cell):
            return "cell changed"
        if not np.array_equal(numbers, self._numbers):
            return "atomic numbers changed"
        if len(pos):
            delta = pos - self._ref_pos
            moved_sq = float(np.einsum("ij,ij->i", delta, delta).max())
            if not moved_sq < (0.5 * self.skin) ** 2:  # NaN positions land here too (the rebuild raises)
                return f"an atom moved {math.sqrt(moved_sq):.3g} Å >= skin/2 = {0.5 * self.skin:.3g} Å"
        return ""

    def _search(self, pos: Tensor, cell: Tensor, pbc: Tensor, cutoff: float) -> Tensor:
        """Store every pair within cutoff + skin (exact duplicates too); returns their squared distances, Å²."""
        batch = torch.zeros(pos.shape[0], dtype=torch.long)
        reach = cutoff + self.skin + ROUNDING_MARGIN
        i, j, shifts, d2 = _vesin_pairs(pos, cell, pbc, batch, reach, include_overlaps=True)
        order = torch.argsort(i, stable=True)  # grouped by target: gathers of pos[i] then run in memory order
        self._i, self._j = i.index_select(0, order), j.index_select(0, order)
        self._shifts = _gather_rows(shifts.t().contiguous(), order)
        self._offsets = image_offsets(cell[0], self._shifts)
        return d2.index_select(0, order)

    def graph(self, atoms: Atoms, cutoff: float, max_neighbors: int | None = None, strict: bool = True) -> AtomGraph:
        """The recentred float64 radius graph of ``atoms`` (CPU), identical to a fresh ``radius_graph``.

        Args:
            atoms: one structure (positions Å, cell Å).
            cutoff: radius, Å; pairs with 0.01 Å < d <= cutoff become edges.
            max_neighbors, strict: as in ``radius_graph`` (fairchem's max-neighbour rules).

        Raises ValueError for what ``radius_graph`` refuses (non-positive cutoff, bad cell, NaN positions).
        """
        if not math.isfinite(cutoff) or cutoff <= 0:
            raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
        _check_max_neighbors(max_neighbors)
        cutoff = float(cutoff)
        pos = np.array(atoms.positions, dtype=np.float64)  # a copy: the graph must not alias the Atoms
        cell = np.array(atoms.cell.array, dtype=np.float64)
        pbc = np.array(atoms.pbc, dtype=bool)
        numbers = np.array(atoms.numbers)
        pos_t, cell_t, pbc_t = torch.from_numpy(pos), torch.from_numpy(cell[None]), torch.from_numpy(pbc[None])
        reason = self._stale(pos, cell, pbc, numbers, cutoff)
        if reason:
            check_cell(cell, pbc)
            if not np.all(np.isfinite(pos)):
                bad = np.where(~np.isfinite(pos).all(axis=1))[0]
                raise ValueError(f"structure: positions of atoms {bad.tolist()[:10]} are NaN or inf")
            self.clear()
            d2 = self._search(pos_t, cell_t, pbc_t, cutoff)
            self._cutoff, self._ref_pos, self._cell, self._pbc, self._numbers = cutoff, pos, cell, pbc, numbers
            self.stats["builds"] += 1
            self.last_reason = reason
            logger.debug(
                "neighbour candidates rebuilt (%s): %d pairs within %.3f Å", reason, d2.numel(), cutoff + self.skin
            )
        else:
            d2 = distances_sq_from_offsets(pos_t, self._i, self._j, self._offsets)
            self.stats["reuses"] += 1
            self.last_reason = None
        # radius_graph's steps on the vesin path: filter 1e-4 < d² <= cutoff², canonical sort, max-neighbour selection
        keep = torch.nonzero((d2 > MIN_DISTANCE_SQ) & (d2 <= cutoff**2)).squeeze(1)
        i, j, d2 = self._i.index_select(0, keep), self._j.index_select(0, keep), d2.index_select(0, keep)
        shifts = _gather_rows(self._shifts, keep)
        order = _sort_edges(i, d2, j, shifts.t())
        i, d2 = i.index_select(0, order), d2.index_select(0, order)
        if max_neighbors is not None:
            sel = _select_sorted(i, d2, pos.shape[0], int(max_neighbors), strict, NONSTRICT_TOLERANCE)
            if not bool(sel.all()):
                sel = torch.nonzero(sel).squeeze(1)
                order, i = order.index_select(0, sel), i.index_select(0, sel)
        j, shifts = j.index_select(0, order), _gather_rows(shifts, order)
        n = pos.shape[0]
        graph = AtomGraph(
            pos=pos_t,
            numbers=torch.tensor(numbers, dtype=torch.long),
            cell=cell_t,
            pbc=pbc_t,
            batch=torch.zeros(n, dtype=torch.long),
            natoms=torch.tensor([n], dtype=torch.long),
            tags=torch.tensor(atoms.get_tags(), dtype=torch.long),
            edge_index=torch.zeros((2, 0), dtype=torch.long),
            cell_offsets=torch.zeros((0, 3), dtype=torch.long),
            cutoff=cutoff,
        )
        return _recentered_offsets(graph, i, j, shifts)
