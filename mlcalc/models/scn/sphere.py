"""SCN's fixed sphere quantities: sample points and the S^2 grid transforms, as float64 matrices.

fairchem's SCN builds these with e3nn (``ToS2Grid`` / ``FromS2Grid``, ``o3.spherical_harmonics``) on every call;
here they are built once from ``mlcalc.nn.so3`` (e3nn's conventions without e3nn) and cached by the model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlcalc.nn import so3

_F64 = torch.float64


def grid_resolution(lmax: int) -> tuple[int, int]:
    """SCN's grid (res_beta, res_alpha) = (2 (lmax + 1), 2 (lmax + 1) + 1)."""
    res_beta = 2 * (lmax + 1)
    return res_beta, res_beta + 1


def sphere_points(num_points: int) -> Tensor:
    """fairchem's ``CalcSpherePoints``: golden-spiral points, each scaled by its inverse local point density.

    Returns (num_points, 3) float64; the vectors are not unit length (the length is the point's weight).
    """
    golden_ratio = (1 + 5**0.5) / 2
    i = torch.arange(num_points, dtype=_F64).view(-1, 1)
    theta = 2 * math.pi * i / golden_ratio
    phi = torch.arccos(1 - 2 * (i + 0.5) / num_points)
    points = torch.cat([torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], dim=1)
    dist2 = ((points.view(1, -1, 3) - points.view(-1, 1, 3)) ** 2).sum(dim=2)
    scalar = 1.0 / torch.exp(-dist2 / (0.5 * 0.3)).sum(dim=1)
    scalar = num_points * scalar / scalar.sum()
    return points * scalar.view(-1, 1)


def sphere_point_harmonics(lmax: int, points: Tensor) -> Tensor:
    """e3nn ``o3.spherical_harmonics(range(lmax + 1), points, normalize=False)``: (P, (lmax + 1)^2), float64."""
    return so3.spherical_harmonics(lmax, points.to(_F64), normalize=False)


def to_grid_matrix(lmax: int, num_bands: int) -> Tensor:
    """SCN's ``ToGrid`` as one matrix: (res_beta * res_alpha * num_bands, (lmax + 1)^2), float64.

    Band b is e3nn's ``ToS2Grid(lmax - b, (res_beta, res_alpha), "integral")`` on the lmax grid (degrees above
    lmax - b dropped). Rows are ordered (beta, alpha, band), so ``(G @ x).view(-1, num_bands * C)`` lays out a
    grid point's bands side by side exactly as fairchem's ``ToGrid``.
    """
    res_beta, res_alpha = grid_resolution(lmax)
    grid = so3.to_grid_matrix(lmax, res_beta, res_alpha)  # (beta, alpha, i)
    degree, _ = so3.coefficient_lm(lmax)
    bands = [grid * (degree <= lmax - b).to(_F64) for b in range(num_bands)]
    return torch.stack(bands, dim=2).reshape(-1, (lmax + 1) ** 2)


def from_grid_matrix(lmax: int) -> Tensor:
    """SCN's ``FromGrid`` (e3nn ``FromS2Grid``, "integral") as one matrix: ((lmax + 1)^2, res_beta * res_alpha)."""
    res_beta, res_alpha = grid_resolution(lmax)
    return so3.from_grid_matrix(lmax, res_beta, res_alpha).reshape(res_beta * res_alpha, -1).T.contiguous()
