"""eSCN message passing: one ``LayerBlock`` = edge messages (``MessageBlock``) + point-wise update on the S² grid.

Both parts can run in chunks (``chunk_size``): the messages over consecutive slices of the edge list, each
slice's messages summed into the atoms before the next slice is computed, and the grid update over consecutive
slices of the atoms. The sums are the same (up to float rounding); only one chunk's per-edge (per-atom grid)
tensors exist at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlcalc.models.escn.layers import EdgeBlock, SO2Block
from mlcalc.models.escn.layout import ESCNLayout, from_grid, to_grid
from mlcalc.nn.linear import Linear
from mlcalc.nn.scatter import gather


@dataclass
class EdgeFrames:
    """Wigner-D matrices of the edge frames per resolution (computed once per forward, shared by all layers).

    wigner[i]: (E, K_i, (lmax_i+1)**2), the rows |m| <= mmax_i of the block-diagonal D(edge_rot_mat); its
    transpose (a view) rotates back. (Rotating l-block by l-block skips the zero blocks but is not faster on CPU:
    these small products are memory-bound.)
    """

    wigner: list[Tensor]

    def rotate(self, i: int, x: Tensor) -> Tensor:
        """Global coefficients (E, (lmax_i+1)**2, C) -> edge-frame reduced l-major (E, K_i, C)."""
        return torch.bmm(self.wigner[i], x)

    def rotate_inv(self, i: int, x: Tensor) -> Tensor:
        """Edge-frame reduced l-major (E, K_i, C) -> global coefficients (E, (lmax_i+1)**2, C)."""
        return torch.bmm(self.wigner[i].transpose(1, 2), x)

    def slice(self, start: int, end: int) -> EdgeFrames:
        """The frames of edges [start, end) (views, no copy)."""
        return EdgeFrames([w[start:end] for w in self.wigner])


def split_resolutions(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """Split the coefficient axis (dim 1) into the per-resolution blocks."""
    return list(torch.split(x, sizes, dim=1))


class MessageBlock(nn.Module):
    """Messages into every target atom: (N, sum (lmax_i+1)², C) -> same shape, summed over incoming edges.

    ``forward(..., chunk_size)`` computes the messages of at most ``chunk_size`` edges at a time (None: all edges at
    once) and adds each chunk into the atoms with ``index_add_``.
    """

    def __init__(
        self,
        layer_idx: int,
        sphere_channels: int,
        hidden_channels: int,
        edge_channels: int,
        lmax_list: list[int],
        mmax_list: list[int],
        distance_expansion: nn.Module,
        max_num_elements: int,
        act: nn.Module,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.act = act
        self.edge_block = EdgeBlock(edge_channels, distance_expansion, max_num_elements, act)
        self.so2_block_source = SO2Block(sphere_channels, hidden_channels, edge_channels, lmax_list, mmax_list, act)
        self.so2_block_target = SO2Block(sphere_channels, hidden_channels, edge_channels, lmax_list, mmax_list, act)

    def _to_edge_frame(self, x: Tensor, frames: EdgeFrames, layout: ESCNLayout) -> Tensor:
        """Node coefficients gathered per edge (E, sum full, C) -> edge-frame, reduced, m-major (E, K, C)."""
        parts = split_resolutions(x, layout.num_coefficients)
        rotated = torch.cat([frames.rotate(i, p) for i, p in enumerate(parts)], dim=1)
        return rotated[:, layout.to_m]

    def edge_messages(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        edge_distance: Tensor,
        edge_index: Tensor,
        frames: EdgeFrames,
        layout: ESCNLayout,
    ) -> Tensor:
        """Message of every edge in the global frame, (E, sum (lmax_i+1)², C), for x (N, sum (lmax_i+1)², C),
        atomic_numbers (N,), edge_distance (E,) in Å, edge_index (2, E) and the frames of these E edges."""
        x_edge = self.edge_block(
            edge_distance, gather(atomic_numbers, edge_index[0]), gather(atomic_numbers, edge_index[1])
        )
        x_source = self._to_edge_frame(gather(x, edge_index[0]), frames, layout)
        x_target = self._to_edge_frame(gather(x, edge_index[1]), frames, layout)
        msg = self.so2_block_source(x_source, x_edge, layout.m_sizes)
        del x_source
        msg = msg + self.so2_block_target(x_target, x_edge, layout.m_sizes)
        del x_target
        msg = msg[:, layout.to_l]

        # point-wise non-linearity on the edge-frame grid, then back to the global frame
        out = []
        for i, part in enumerate(split_resolutions(msg, layout.reduced_sizes)):
            to_g, from_g = layout.act_grids[i]
            part = from_grid(from_g, self.act(to_grid(to_g, part)))
            out.append(frames.rotate_inv(i, part))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        edge_distance: Tensor,
        edge_index: Tensor,
        frames: EdgeFrames,
        layout: ESCNLayout,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Sum of the messages (N, sum (lmax_i+1)², C) into each target atom, ``chunk_size`` edges at a time."""
        num_edges = edge_index.shape[1]
        step = max(1, num_edges if chunk_size is None else int(chunk_size))
        out = x.new_zeros(x.shape)
        for start in range(0, num_edges, step):
            end = min(start + step, num_edges)
            index = edge_index[:, start:end]
            msg = self.edge_messages(
                x, atomic_numbers, edge_distance[start:end], index, frames.slice(start, end), layout
            )
            out.index_add_(0, index[1], msg)
        return out


class LayerBlock(nn.Module):
    """One eSCN layer: messages, then a point-wise MLP on the grid values of [x, messages]; returns the update."""

    def __init__(
        self,
        layer_idx: int,
        sphere_channels: int,
        hidden_channels: int,
        edge_channels: int,
        lmax_list: list[int],
        mmax_list: list[int],
        distance_expansion: nn.Module,
        max_num_elements: int,
        act: nn.Module,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.act = act
        self.sphere_channels = sphere_channels
        channels_all = len(lmax_list) * sphere_channels
        self.message_block = MessageBlock(
            layer_idx,
            sphere_channels,
            hidden_channels,
            edge_channels,
            lmax_list,
            mmax_list,
            distance_expansion,
            max_num_elements,
            act,
        )
        self.fc1_sphere = Linear(2 * channels_all, channels_all, bias=False)
        self.fc2_sphere = Linear(channels_all, channels_all, bias=False)
        self.fc3_sphere = Linear(channels_all, channels_all, bias=False)

    def _grid(self, x: Tensor, layout: ESCNLayout) -> Tensor:
        """(N, sum full, C) -> (N, G, R * C): every resolution on the max-lmax grid, channels concatenated."""
        parts = split_resolutions(x, layout.num_coefficients)
        return torch.cat([to_grid(layout.node_to_grid[:, : p.shape[1]], p) for p in parts], dim=2)

    def node_update(self, x: Tensor, x_message: Tensor, layout: ESCNLayout) -> Tensor:
        """Point-wise MLP on the grid values of [x, x_message] (both (n, sum full, C)) -> update (n, sum full, C)."""
        grid = torch.cat([self._grid(x, layout), self._grid(x_message, layout)], dim=2)
        grid = self.act(self.fc1_sphere(grid))
        grid = self.act(self.fc2_sphere(grid))
        grid = self.fc3_sphere(grid)
        channels = self.sphere_channels
        out = [
            from_grid(layout.node_from_grid[:, :size], grid[:, :, i * channels : (i + 1) * channels])
            for i, size in enumerate(layout.num_coefficients)
        ]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        edge_distance: Tensor,
        edge_index: Tensor,
        frames: EdgeFrames,
        layout: ESCNLayout,
        chunk_size: int | None = None,
        atom_chunk_size: int | None = None,
    ) -> Tensor:
        """Update (N, sum full, C) of x (N, sum full, C): messages ``chunk_size`` edges at a time, then the grid MLP
        ``atom_chunk_size`` atoms at a time (None: all at once)."""
        x_message = self.message_block(x, atomic_numbers, edge_distance, edge_index, frames, layout, chunk_size)
        num_atoms = x.shape[0]
        step = max(1, num_atoms if atom_chunk_size is None else int(atom_chunk_size))
        if step >= num_atoms:
            return self.node_update(x, x_message, layout)
        out = torch.empty_like(x)
        for start in range(0, num_atoms, step):
            end = min(start + step, num_atoms)
            out[start:end] = self.node_update(x[start:end], x_message[start:end], layout)
        return out
