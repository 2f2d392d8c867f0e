"""eSCN building blocks: edge embedding, SO(2) convolutions, output heads.

Module and parameter names follow fairchem's eSCN so that its state_dict loads unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlcalc.nn.linear import Linear


class EdgeBlock(nn.Module):
    """Invariant edge features (E, edge_channels) from distances (E,) and source/target atomic numbers (E,)."""

    def __init__(self, edge_channels: int, distance_expansion: nn.Module, max_num_elements: int, act: nn.Module):
        super().__init__()
        self.distance_expansion = distance_expansion
        self.act = act
        self.fc1_dist = Linear(distance_expansion.num_output, edge_channels)
        self.source_embedding = nn.Embedding(max_num_elements, edge_channels)
        self.target_embedding = nn.Embedding(max_num_elements, edge_channels)
        nn.init.uniform_(self.source_embedding.weight.data, -0.001, 0.001)
        nn.init.uniform_(self.target_embedding.weight.data, -0.001, 0.001)
        self.fc1_edge_attr = Linear(edge_channels, edge_channels)

    def forward(self, edge_distance: Tensor, source_element: Tensor, target_element: Tensor) -> Tensor:
        x_dist = self.fc1_dist(self.distance_expansion(edge_distance))
        x_edge = self.act(self.source_embedding(source_element) + self.target_embedding(target_element) + x_dist)
        return self.act(self.fc1_edge_attr(x_edge))


class SO2Conv(nn.Module):
    """SO(2) convolution of the ±m coefficients of one order m > 0 (complex product with edge-dependent weights).

    Input ``x_m`` (E, 2, F): [+m part, -m part], F = (#coefficients of order m) x sphere_channels;
    ``x_edge`` (E, edge_channels). Output (E, 2, F).
    """

    def __init__(
        self,
        m: int,
        sphere_channels: int,
        hidden_channels: int,
        edge_channels: int,
        lmax_list: list[int],
        mmax_list: list[int],
        act: nn.Module,
    ) -> None:
        super().__init__()
        self.m = m
        self.hidden_channels = hidden_channels
        self.act = act
        num_channels = sum(
            (lmax - m + 1) * sphere_channels for lmax, mmax in zip(lmax_list, mmax_list, strict=True) if mmax >= m
        )
        if num_channels <= 0:
            raise ValueError(f"SO2Conv: no coefficient of order m={m} for lmax_list={lmax_list}, mmax={mmax_list}")
        self.fc1_dist = Linear(edge_channels, 2 * hidden_channels)
        self.fc1_r = Linear(num_channels, hidden_channels, bias=False)
        self.fc2_r = Linear(hidden_channels, num_channels, bias=False)
        self.fc1_i = Linear(num_channels, hidden_channels, bias=False)
        self.fc2_i = Linear(hidden_channels, num_channels, bias=False)

    def forward(self, x_m: Tensor, x_edge: Tensor) -> Tensor:
        weights = self.act(self.fc1_dist(x_edge)).view(-1, 2, self.hidden_channels)
        x_r = self.fc2_r(self.fc1_r(x_m) * weights[:, 0:1, :])
        x_i = self.fc2_i(self.fc1_i(x_m) * weights[:, 1:2, :])
        real = x_r[:, 0] - x_i[:, 1]
        imag = x_r[:, 1] + x_i[:, 0]
        return torch.stack((real, imag), dim=1)


class SO2Block(nn.Module):
    """SO(2) convolutions for every order m of edge-frame coefficients in m-major layout.

    Input/output ``x`` (E, K, C) in the m-major reduced layout (see ``layout.py``), ``x_edge`` (E, edge_channels).
    """

    def __init__(
        self,
        sphere_channels: int,
        hidden_channels: int,
        edge_channels: int,
        lmax_list: list[int],
        mmax_list: list[int],
        act: nn.Module,
    ) -> None:
        super().__init__()
        self.act = act
        num_channels_m0 = sum((lmax + 1) * sphere_channels for lmax in lmax_list)
        self.fc1_dist0 = Linear(edge_channels, hidden_channels)
        self.fc1_m0 = Linear(num_channels_m0, hidden_channels, bias=False)
        self.fc2_m0 = Linear(hidden_channels, num_channels_m0, bias=False)
        self.so2_conv = nn.ModuleList(
            SO2Conv(m, sphere_channels, hidden_channels, edge_channels, lmax_list, mmax_list, act)
            for m in range(1, max(mmax_list) + 1)
        )

    def forward(self, x: Tensor, x_edge: Tensor, m_sizes: list[int]) -> Tensor:
        num_edges, _, channels = x.shape
        x_0 = x[:, : m_sizes[0]].reshape(num_edges, m_sizes[0] * channels)
        x_0 = self.fc2_m0(self.fc1_m0(x_0) * self.act(self.fc1_dist0(x_edge)))
        parts = [x_0.view(num_edges, m_sizes[0], channels)]
        offset = m_sizes[0]
        for m, conv in enumerate(self.so2_conv, start=1):
            size = 2 * m_sizes[m]
            x_m = x[:, offset : offset + size].reshape(num_edges, 2, m_sizes[m] * channels)
            parts.append(conv(x_m, x_edge).reshape(num_edges, size, channels))
            offset += size
        return torch.cat(parts, dim=1)


class EnergyBlock(nn.Module):
    """Per-atom energy from channel values at the sphere points: (N * P, C) -> (N, 1), mean over the P points."""

    def __init__(self, num_channels: int, num_sphere_samples: int, act: nn.Module) -> None:
        super().__init__()
        self.num_sphere_samples = num_sphere_samples
        self.act = act
        self.fc1 = Linear(num_channels, num_channels)
        self.fc2 = Linear(num_channels, num_channels)
        self.fc3 = Linear(num_channels, 1, bias=False)

    def point_values(self, x_pt: Tensor) -> Tensor:
        """Scalar per sphere point: (N * P, C) -> (N, P, 1)."""
        x_pt = self.fc3(self.act(self.fc2(self.act(self.fc1(x_pt)))))
        return x_pt.view(-1, self.num_sphere_samples, 1)

    def forward(self, x_pt: Tensor) -> Tensor:
        return torch.sum(self.point_values(x_pt), dim=1) / self.num_sphere_samples


class ForceBlock(EnergyBlock):
    """Per-atom force: scalar per sphere point times the point's vector, averaged: (N * P, C) -> (N, 3)."""

    def forward(self, x_pt: Tensor, sphere_points: Tensor) -> Tensor:  # type: ignore[override]
        forces = self.point_values(x_pt) * sphere_points.view(1, self.num_sphere_samples, 3)
        return torch.sum(forces, dim=1) / self.num_sphere_samples
