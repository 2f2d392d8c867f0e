"""Gaussian bases clamp their exponents above the subnormal range (``mlcalc.nn.smearing.exp_nonpositive``):
values and gradients move by at most e * finfo.tiny (bounded by 3 * tiny below, allowing for rounding)."""

from __future__ import annotations

import math

import pytest
import torch

from mlcalc.models.gemnet_oc.bases import GaussianBasis
from mlcalc.nn.smearing import GaussianSmearing, exp_nonpositive


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_move_by_at_most_e_tiny(dtype: torch.dtype) -> None:
    tiny = torch.finfo(dtype).tiny
    floor = math.log(tiny) + 1.0
    near = torch.tensor([floor - 1e-3, floor + 1e-3], dtype=dtype)
    x = torch.cat([torch.linspace(-1e4, 0.0, 20001, dtype=dtype), near])
    x = x.requires_grad_(True)
    ours = exp_nonpositive(x)
    exact = torch.exp(x)
    assert (ours - exact).abs().max().item() <= 3 * tiny
    # no argument reaches the subnormal range: every value is at least e * tiny (rounded)
    assert ours.min().item() >= 2 * tiny
    above = x.detach() > floor
    assert torch.equal(ours[above], exact[above])
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_exact,) = torch.autograd.grad(exact.sum(), x)
    assert (g_ours - g_exact).abs().max().item() <= 3 * tiny
    inplace = exp_nonpositive(x.detach().clone(), inplace=True)
    assert torch.equal(inplace, ours.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_bases_equal_the_formula(dtype: torch.dtype) -> None:
    d = torch.linspace(0.0, 12.0, 301, dtype=dtype)
    gemnet = GaussianBasis(0.0, 12.0, 128).to(dtype)
    exact = torch.exp(gemnet.coeff * (d[:, None] - gemnet.offset[None, :]) ** 2)
    tiny = torch.finfo(dtype).tiny
    with torch.no_grad():
        assert (gemnet(d) - exact).abs().max().item() <= 3 * tiny
    smearing = GaussianSmearing(0.0, 8.0, 600, 2.0).to(dtype)
    exact = torch.exp(smearing.coeff * (d[:, None] - smearing.offset[None, :]) ** 2)
    assert (smearing(d) - exact).abs().max().item() <= 3 * tiny
