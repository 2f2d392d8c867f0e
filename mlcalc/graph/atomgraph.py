"""The ``AtomGraph`` container: atoms, cells and the periodic edge list, as torch tensors."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from mlcalc.graph.geometry import largest_circular_gap, lattice_frames
from mlcalc.nn.scatter import gather


@dataclass
class AtomGraph:
    """One or several structures and their radius graph.

    Attributes (N atoms, B structures, E edges):
        pos: (N, 3) Cartesian positions, Å.
        numbers: (N,) atomic numbers (int64).
        cell: (B, 3, 3) cell vectors as rows, Å (zero rows along non-periodic axes are allowed).
        pbc: (B, 3) bool periodicity per axis.
        batch: (N,) structure index of each atom (int64).
        natoms: (B,) atom count per structure (int64).
        tags: (N,) integer tags (ASE ``get_tags``; OC20: 0 subsurface, 1 surface, 2 adsorbate).
        edge_index: (2, E) int64; row 0 = source / neighbour j, row 1 = target / centre i; sorted by target.
        cell_offsets: (E, 3) int64 image of the source: edge vector = pos[j] + offsets @ cell - pos[i].
        cutoff: the radius (Å) the edges were built with.
    """

    pos: Tensor
    numbers: Tensor
    cell: Tensor
    pbc: Tensor
    batch: Tensor
    natoms: Tensor
    tags: Tensor
    edge_index: Tensor
    cell_offsets: Tensor
    cutoff: float = 0.0

    @property
    def num_atoms(self) -> int:
        return int(self.pos.shape[0])

    @property
    def num_graphs(self) -> int:
        return int(self.natoms.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def offset_vectors(self, edge_index: Tensor | None = None, cell_offsets: Tensor | None = None) -> Tensor:
        """Cartesian image shifts ``offsets @ cell`` (E, 3) in the dtype of ``pos`` (differentiable in cell).

        Multiplied out elementwise, not as a matrix product: TF32 / bfloat16 matmul precisions (CUDA "high" and
        "medium") would round the cell to 10 or 8 mantissa bits, moving edge vectors by ~1e-3 Å."""
        edge_index = self.edge_index if edge_index is None else edge_index
        cell_offsets = self.cell_offsets if cell_offsets is None else cell_offsets
        cell = gather(self.cell.to(self.pos.dtype), self.batch[edge_index[1]])  # deterministic backward
        return (cell_offsets.to(self.pos.dtype).unsqueeze(-1) * cell).sum(dim=1)

    def edge_vectors(self, edge_index: Tensor | None = None, cell_offsets: Tensor | None = None) -> Tensor:
        """Edge vectors ``pos[j] + offsets @ cell - pos[i]`` (E, 3), Å, pointing from target to source."""
        edge_index = self.edge_index if edge_index is None else edge_index
        cell_offsets = self.cell_offsets if cell_offsets is None else cell_offsets
        shift = self.offset_vectors(edge_index, cell_offsets)
        return gather(self.pos, edge_index[0]) - gather(self.pos, edge_index[1]) + shift

    def recentered(self) -> AtomGraph:
        """The same graph with every structure moved next to the origin; edge vectors unchanged.

        Per structure, in float64 and in the fractional coordinates of its completed cell: along a periodic
        axis each atom moves by whole lattice vectors n into the cell, cut at the widest empty arc of the
        structure's wrapped coordinates (so a molecule or slab straddling the cell boundary becomes contiguous);
        then the structure is translated rigidly so that its extent along every axis is centred on 0. The integer
        images follow the moves, ``cell_offsets' = S + n_j - n_i``, so every edge vector ``pos[j] + S @ cell -
        pos[i]`` is unchanged (up to float64 rounding of the absolute coordinates). Translations by lattice
        vectors and rigid shifts leave energies, -dE/dpos and the strain derivative unchanged, so forces and
        stress from autograd on the new ``pos`` are those of the input.

        Why: a float32 graph built from absolute coordinates (an unwrapped MD trajectory K cells away, a 1e4 Å
        box, a slab far from the origin) rounds each coordinate to ~|x| * 6e-8 Å before the edge vectors are
        formed; after recentring coordinates are at most about the cell (or the structure) in size. Call it on
        the float64 graph, before casting. Returns a new AtomGraph in the dtype of ``pos`` (differentiable in
        ``pos``); ``cell`` and everything else are shared.
        """
        if self.num_atoms == 0:
            return replace(self)
        pos = self.pos.to(torch.float64)
        full, inv, _ = lattice_frames(self.cell.detach(), self.pbc)
        batch, n_struct = self.batch, self.num_graphs
        periodic = self.pbc.to(torch.bool).index_select(0, batch)
        single = n_struct == 1
        frac = pos.detach() @ inv[0] if single else torch.einsum("nk,nke->ne", pos.detach(), inv.index_select(0, batch))
        image = torch.floor(frac).masked_fill_(~periodic, 0.0)
        frac = frac - image
        if bool(self.pbc.any()):  # cut every periodic circle at its widest gap: all axes at once
            group = (batch[:, None] * 3 + torch.arange(3, device=batch.device)).reshape(-1)
            _, move = largest_circular_gap(group, frac.reshape(-1), 3 * n_struct)
            move = move.view(-1, 3) & periodic
            image -= move.to(image.dtype)
            frac += move.to(frac.dtype)
        if single:
            centre = 0.5 * (frac.amin(dim=0) + frac.amax(dim=0))
            shift = (image + centre) @ full[0]
        else:
            big = torch.finfo(frac.dtype).max
            idx = batch[:, None].expand(-1, 3)
            lo = torch.full((n_struct, 3), big, dtype=frac.dtype, device=frac.device).scatter_reduce(
                0, idx, frac, "amin"
            )
            hi = torch.full_like(lo, -big).scatter_reduce(0, idx, frac, "amax")
            centre = torch.where(hi >= lo, 0.5 * (lo + hi), torch.zeros_like(lo))  # empty structures: 0
            shift = torch.einsum("nk,nke->ne", image + centre.index_select(0, batch), full.index_select(0, batch))
        n = image.long()
        src, dst = self.edge_index
        # S + n_j - n_i with 1-D index_select gathers (integers: the same values as the advanced-indexing form)
        offsets = n.index_select(0, src).sub_(n.index_select(0, dst)).add_(self.cell_offsets)
        return replace(self, pos=(pos - shift).to(self.pos.dtype), cell_offsets=offsets)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AtomGraph:
        """Copy with floating tensors cast to ``dtype`` and everything moved to ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                if dtype is not None and v.is_floating_point():
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device=device)
            kw[f.name] = v
        return replace(self, **kw)
