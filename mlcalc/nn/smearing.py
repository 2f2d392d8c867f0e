"""Distance expansions of eSCN and SCN (fairchem `GaussianSmearing` etc.): Gaussian, sigmoid, linear+sigmoid, SiLU.

Each maps distances (E,) in Å to features (E, num_output). ``offset`` is a persistent buffer (it is in fairchem's
state_dict); the width coefficient is a Python float computed in float64 from the same linspace.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _offsets(start: float, stop: float, num: int) -> tuple[Tensor, float]:
    """Float32 offsets (the checkpoint's dtype) and their spacing computed in float64."""
    if num < 2:
        raise ValueError(f"distance expansion needs at least 2 basis functions, got {num}")
    offset64 = torch.linspace(start, stop, num, dtype=torch.float64)
    return offset64.to(torch.float32), float(offset64[1] - offset64[0])


def exp_nonpositive(x: Tensor, inplace: bool = False) -> Tensor:
    """``exp(x)`` for the (very) negative exponents of Gaussian bases, with x clamped below at
    ``log(finfo(dtype).tiny) + 1`` first.

    Exponents near or below ``log(tiny)`` give subnormal or zero results, which x86 CPUs compute through a slow path
    (~10-30x per value; a 12 Å Gaussian basis of 128 functions has ~80 % of its values there). Clamped, they give
    ``e * tiny`` (3.2e-38 in float32, 6.0e-308 in float64) instead of a smaller number: values move by at most
    that, and the gradient (which the clamp sets to 0 there) by as little. ``inplace``: overwrite x (only when
    autograd does not need it).
    """
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0
    if inplace:
        return x.clamp_(min=floor).exp_()
    return torch.exp(torch.clamp(x, min=floor))


class GaussianSmearing(nn.Module):
    """``exp(-0.5 (d - mu_k)^2 / (width * spacing)^2)`` for evenly spaced centres mu_k."""

    def __init__(
        self, start: float = -5.0, stop: float = 5.0, num_gaussians: int = 50, basis_width_scalar: float = 1.0
    ) -> None:
        super().__init__()
        self.num_output = num_gaussians
        offset, spacing = _offsets(start, stop, num_gaussians)
        self.coeff = -0.5 / (basis_width_scalar * spacing) ** 2
        self.register_buffer("offset", offset)

    def forward(self, dist: Tensor) -> Tensor:
        diff = dist.view(-1, 1) - self.offset.view(1, -1)
        return exp_nonpositive(self.coeff * diff.pow(2))


class SigmoidSmearing(nn.Module):
    """``sigmoid(width / spacing * (d - mu_k))``."""

    def __init__(
        self, start: float = -5.0, stop: float = 5.0, num_sigmoid: int = 50, basis_width_scalar: float = 1.0
    ) -> None:
        super().__init__()
        self.num_output = num_sigmoid
        offset, spacing = _offsets(start, stop, num_sigmoid)
        self.coeff = basis_width_scalar / spacing
        self.register_buffer("offset", offset)

    def forward(self, dist: Tensor) -> Tensor:
        return torch.sigmoid(self.coeff * (dist.view(-1, 1) - self.offset.view(1, -1)))


class LinearSigmoidSmearing(SigmoidSmearing):
    """``sigmoid(t) + 0.001 t`` with ``t = width / spacing * (d - mu_k)``."""

    def forward(self, dist: Tensor) -> Tensor:
        t = self.coeff * (dist.view(-1, 1) - self.offset.view(1, -1))
        return torch.sigmoid(t) + 0.001 * t


class SiLUSmearing(nn.Module):
    """``silu(W [d, 1] + b)``: a learned expansion (no offsets)."""

    def __init__(
        self, start: float = -5.0, stop: float = 5.0, num_output: int = 50, basis_width_scalar: float = 1.0
    ) -> None:
        super().__init__()
        self.num_output = num_output
        self.fc1 = nn.Linear(2, num_output)
        self.act = nn.SiLU()

    def forward(self, dist: Tensor) -> Tensor:
        d = dist.view(-1, 1)
        return self.act(self.fc1(torch.cat([d, torch.ones_like(d)], dim=1)))


DISTANCE_EXPANSIONS: dict[str, type[nn.Module]] = {
    "gaussian": GaussianSmearing,
    "sigmoid": SigmoidSmearing,
    "linearsigmoid": LinearSigmoidSmearing,
    "silu": SiLUSmearing,
}
