"""SCN building blocks: distance features, per-edge messages, and the interaction (edge) block.

Module and attribute names follow fairchem's ``models/scn/scn.py`` so that state_dict keys match. Shapes: N atoms,
E edges, C = sphere_channels_reduce, S = (lmax + 1)^2 coefficients, R = reduced coefficients, T = taps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlcalc.models.scn.frames import EdgeFrames, SphericalResolution
from mlcalc.nn.linear import Linear
from mlcalc.nn.scatter import gather


class DistanceBlock(nn.Module):
    """Edge features from the distance expansion and the source/target atomic numbers: (E, num_basis_functions)."""

    def __init__(
        self, in_channels: int, num_basis_functions: int, distance_expansion: nn.Module, max_num_elements: int
    ) -> None:
        super().__init__()
        self.distance_expansion = distance_expansion
        self.act = nn.SiLU()
        self.fc1_dist = Linear(in_channels, num_basis_functions)
        self.source_embedding = nn.Embedding(max_num_elements, num_basis_functions)
        self.target_embedding = nn.Embedding(max_num_elements, num_basis_functions)
        nn.init.uniform_(self.source_embedding.weight.data, -0.001, 0.001)
        nn.init.uniform_(self.target_embedding.weight.data, -0.001, 0.001)
        self.fc1_edge_attr = Linear(num_basis_functions, num_basis_functions)

    def forward(self, edge_distance: Tensor, source_element: Tensor, target_element: Tensor) -> Tensor:
        x_dist = self.fc1_dist(self.distance_expansion(edge_distance))
        x_edge = self.act(self.source_embedding(source_element) + self.target_embedding(target_element) + x_dist)
        return self.act(self.fc1_edge_attr(x_edge))


class MessageBlock(nn.Module):
    """Messages of one resolution: both end atoms rotated into the edge frame(s), an MLP gated by the edge
    features, the taps averaged, and the result rotated back. Returns (E_r, S_r, C)."""

    def __init__(
        self, sphere_channels_reduce: int, hidden_channels: int, num_basis_functions: int, sphharm: SphericalResolution
    ) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.hidden_channels = hidden_channels
        self.sphere_channels_reduce = sphere_channels_reduce
        self.sphharm = sphharm
        reduced = sphharm.sphere_basis_reduce * sphere_channels_reduce
        self.fc1_dist = Linear(num_basis_functions, hidden_channels)
        self.fc1_edge_proj = Linear(2 * reduced, hidden_channels)
        self.fc1_edge = Linear(hidden_channels, hidden_channels)
        self.fc2_edge = Linear(hidden_channels, reduced)

    def forward(self, x: Tensor, x_edge: Tensor, frames: EdgeFrames, combine: Tensor) -> Tensor:
        """x: (N, S_r, C) atom coefficients; x_edge: (E_r, num_basis_functions); combine: (T R, R)."""
        num_edges = frames.edge_index.shape[1]
        taps, reduce = self.sphharm.num_y_rotations, self.sphharm.sphere_basis_reduce
        channels = self.sphere_channels_reduce
        x_edge = self.act(self.fc1_dist(x_edge))
        # both end atoms in every tap's edge frame: (E, S, 2C) -> (E, T, R, 2C) -> (E T, [source (R, C), target (R, C)])
        ends = torch.cat([gather(x, frames.edge_index[0]), gather(x, frames.edge_index[1])], dim=2)
        ends = self.sphharm.rotate(frames, ends).view(num_edges, taps, reduce, 2, channels)
        ends = ends.permute(0, 1, 3, 2, 4).reshape(num_edges * taps, 2 * reduce * channels)
        msg = self.act(self.fc1_edge_proj(ends))
        msg = msg.view(num_edges, taps, self.hidden_channels) * x_edge.view(num_edges, 1, self.hidden_channels)
        msg = self.act(self.fc1_edge(msg.view(-1, self.hidden_channels)))
        msg = self.act(self.fc2_edge(msg))
        # average the taps (T R -> R), then rotate back to the global frame: (E, S, C)
        msg = torch.einsum("ekc,kr->erc", msg.view(num_edges, taps * reduce, channels), combine)
        return self.sphharm.rotate_back(frames, msg)


class EdgeBlock(nn.Module):
    """One SCN interaction: messages of every resolution summed on the target atoms, then (use_grid) a pointwise
    MLP on the S^2 grid of [previous, aggregated] signals. Returns the update (N, S, sphere_channels)."""

    def __init__(
        self,
        resolutions: list[SphericalResolution],
        sphere_channels: int,
        sphere_channels_reduce: int,
        hidden_channels_list: list[int],
        distance_expansion: nn.Module,
        num_gaussians: int,
        max_num_elements: int,
        num_basis_functions: int,
        use_grid: bool,
    ) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.sphere_channels = sphere_channels
        self.sphere_channels_reduce = sphere_channels_reduce
        self.use_grid = use_grid
        self.sphharm_list = resolutions
        self.distance_expansion = distance_expansion
        self.dist_block = DistanceBlock(num_gaussians, num_basis_functions, distance_expansion, max_num_elements)
        self.message_blocks = nn.ModuleList(
            MessageBlock(sphere_channels_reduce, hidden, num_basis_functions, res)
            for hidden, res in zip(hidden_channels_list, resolutions, strict=True)
        )
        if sphere_channels != sphere_channels_reduce:
            self.downsample = Linear(sphere_channels, sphere_channels_reduce, bias=False)
            self.upsample = Linear(sphere_channels_reduce, sphere_channels, bias=False)
        if use_grid:
            width = resolutions[0].num_bands * 2 * sphere_channels_reduce
            self.fc1_sphere = Linear(width, width)
            self.fc2_sphere = Linear(width, 2 * sphere_channels_reduce)
            self.fc3_sphere = Linear(2 * sphere_channels_reduce, sphere_channels_reduce)

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        edge_distance: Tensor,
        edge_index: Tensor,
        frames: list[EdgeFrames],
        bounds: list[int],
        consts: dict[str, Tensor | list[Tensor]],
        chunk_size: int | None = None,
        atom_chunk_size: int | None = None,
    ) -> Tensor:
        """x: (N, S, sphere_channels); edges grouped by resolution, resolution r = edges bounds[r]:bounds[r+1];
        edge_distance (E,) in Å. Messages are computed ``chunk_size`` edges at a time and summed into the atoms
        chunk by chunk; the grid MLP runs ``atom_chunk_size`` atoms at a time (None: all at once)."""
        num_atoms, basis = x.shape[0], self.sphharm_list[0].sphere_basis
        c_red = self.sphere_channels_reduce
        x_down = self.downsample(x.reshape(-1, self.sphere_channels)) if hasattr(self, "downsample") else x
        x_down = x_down.reshape(num_atoms, basis, c_red)

        x_new = x.new_zeros((num_atoms, basis, c_red))
        for r, block in enumerate(self.message_blocks):
            size = block.sphharm.sphere_basis
            first, last = bounds[r], bounds[r + 1]
            step = max(1, (last - first) if chunk_size is None else int(chunk_size))
            for start in range(first, last, step):
                end = min(start + step, last)
                index = edge_index[:, start:end]
                x_edge = self.dist_block(
                    edge_distance[start:end], gather(atomic_numbers, index[0]), gather(atomic_numbers, index[1])
                )
                chunk_frames = frames[r].slice(start - first, end - first)
                message = block(x_down[:, :size], x_edge, chunk_frames, consts["combine"][r])
                x_new[:, :size].index_add_(0, chunk_frames.edge_index[1], message)

        step = max(1, num_atoms if atom_chunk_size is None else int(atom_chunk_size))
        if step >= num_atoms:
            return self.node_update(x_down, x_new, consts)
        out = x.new_empty((num_atoms, basis, self.sphere_channels))
        for start in range(0, num_atoms, step):
            end = min(start + step, num_atoms)
            out[start:end] = self.node_update(x_down[start:end], x_new[start:end], consts)
        return out

    def node_update(self, x_down: Tensor, x_new: Tensor, consts: dict[str, Tensor | list[Tensor]]) -> Tensor:
        """Update (n, S, sphere_channels) from the previous (n, S, C) and aggregated (n, S, C) signals of n atoms
        (C = sphere_channels_reduce): the pointwise grid MLP (use_grid), then the upsampling."""
        num_atoms, basis, c_red = x_new.shape
        if self.use_grid:
            to_grid, from_grid = consts["to_grid"], consts["from_grid"]
            bands = self.sphharm_list[0].num_bands
            grid = [torch.einsum("gs,nsc->ngc", to_grid, v).reshape(-1, bands * c_red) for v in (x_down, x_new)]
            x_grid = self.act(self.fc1_sphere(torch.cat(grid, dim=1)))
            del grid
            x_grid = self.fc3_sphere(self.act(self.fc2_sphere(x_grid)))
            x_new = torch.einsum("sg,ngc->nsc", from_grid, x_grid.view(num_atoms, -1, c_red))

        if hasattr(self, "upsample"):
            x_new = self.upsample(x_new.reshape(-1, c_red))
        return x_new.reshape(num_atoms, basis, self.sphere_channels)
