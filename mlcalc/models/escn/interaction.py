"""eSCN message passing: one ``LayerBlock`` = edge messages (``MessageBlock``) + point-wise update on the S² grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlcalc.models.escn.layers import EdgeBlock, SO2Block
from mlcalc.models.escn.layout import ESCNLayout, from_grid, to_grid
from mlcalc.nn.scatter import gather, scatter_sum


@dataclass
class EdgeFrames:
    """Wigner-D matrices of the edge frames per resolution (computed once per forward, shared by all layers).

    wigner[i]: (E, K_i, (lmax_i+1)**2), the rows |m| <= mmax_i of the block-diagonal D(edge_rot_mat);
    wigner_inv[i]: (E, (lmax_i+1)**2, K_i), its transpose. (Rotating l-block by l-block skips the zero blocks
    but is not faster on CPU: these small products are memory-bound.)
    """

    wigner: list[Tensor]
    wigner_inv: list[Tensor]

    def rotate(self, i: int, x: Tensor) -> Tensor:
        """Global coefficients (E, (lmax_i+1)**2, C) -> edge-frame reduced l-major (E, K_i, C)."""
        return torch.bmm(self.wigner[i], x)

    def rotate_inv(self, i: int, x: Tensor) -> Tensor:
        """Edge-frame reduced l-major (E, K_i, C) -> global coefficients (E, (lmax_i+1)**2, C)."""
        return torch.bmm(self.wigner_inv[i], x)


def split_resolutions(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """Split the coefficient axis (dim 1) into the per-resolution blocks."""
    return list(torch.split(x, sizes, dim=1))


class MessageBlock(nn.Module):
    """Messages into every target atom: (N, sum (lmax_i+1)², C) -> same shape, summed over incoming edges."""

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

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        edge_distance: Tensor,
        edge_index: Tensor,
        frames: EdgeFrames,
        layout: ESCNLayout,
    ) -> Tensor:
        x_edge = self.edge_block(edge_distance, atomic_numbers[edge_index[0]], atomic_numbers[edge_index[1]])
        x_source = self._to_edge_frame(gather(x, edge_index[0]), frames, layout)
        x_target = self._to_edge_frame(gather(x, edge_index[1]), frames, layout)
        msg = self.so2_block_source(x_source, x_edge, layout.m_sizes) + self.so2_block_target(
            x_target, x_edge, layout.m_sizes
        )
        msg = msg[:, layout.to_l]

        # point-wise non-linearity on the edge-frame grid, then back to the global frame
        out = []
        for i, part in enumerate(split_resolutions(msg, layout.reduced_sizes)):
            to_g, from_g = layout.act_grids[i]
            part = from_grid(from_g, self.act(to_grid(to_g, part)))
            out.append(frames.rotate_inv(i, part))
        msg = torch.cat(out, dim=1)
        return scatter_sum(msg, edge_index[1], x.shape[0])


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
        self.fc1_sphere = nn.Linear(2 * channels_all, channels_all, bias=False)
        self.fc2_sphere = nn.Linear(channels_all, channels_all, bias=False)
        self.fc3_sphere = nn.Linear(channels_all, channels_all, bias=False)

    def _grid(self, x: Tensor, layout: ESCNLayout) -> Tensor:
        """(N, sum full, C) -> (N, G, R * C): every resolution on the max-lmax grid, channels concatenated."""
        parts = split_resolutions(x, layout.num_coefficients)
        return torch.cat([to_grid(layout.node_to_grid[:, : p.shape[1]], p) for p in parts], dim=2)

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        edge_distance: Tensor,
        edge_index: Tensor,
        frames: EdgeFrames,
        layout: ESCNLayout,
    ) -> Tensor:
        x_message = self.message_block(x, atomic_numbers, edge_distance, edge_index, frames, layout)
        grid = torch.cat([self._grid(x, layout), self._grid(x_message, layout)], dim=2)
        grid = self.act(self.fc1_sphere(grid))
        grid = self.act(self.fc2_sphere(grid))
        grid = self.fc3_sphere(grid)
        channels = self.sphere_channels
        out = [
            from_grid(layout.node_from_grid[:, :size], grid[:, :, i * channels : (i + 1) * channels])
            for i, size in enumerate(layout.num_coefficients)
        ]
        return torch.cat(out, dim=1)
