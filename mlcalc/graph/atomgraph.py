"""The ``AtomGraph`` container: atoms, cells and the periodic edge list, as torch tensors."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


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
        """Cartesian image shifts ``offsets @ cell`` (E, 3) in the dtype of ``pos`` (differentiable in cell)."""
        edge_index = self.edge_index if edge_index is None else edge_index
        cell_offsets = self.cell_offsets if cell_offsets is None else cell_offsets
        cell = self.cell.to(self.pos.dtype)[self.batch[edge_index[1]]]
        return torch.bmm(cell_offsets.to(self.pos.dtype).unsqueeze(1), cell).squeeze(1)

    def edge_vectors(self, edge_index: Tensor | None = None, cell_offsets: Tensor | None = None) -> Tensor:
        """Edge vectors ``pos[j] + offsets @ cell - pos[i]`` (E, 3), Å, pointing from target to source."""
        edge_index = self.edge_index if edge_index is None else edge_index
        cell_offsets = self.cell_offsets if cell_offsets is None else cell_offsets
        shift = self.offset_vectors(edge_index, cell_offsets)
        return self.pos[edge_index[0]] - self.pos[edge_index[1]] + shift

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
