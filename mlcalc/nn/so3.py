"""Real spherical harmonics and S² grids in e3nn's conventions, in plain torch (no e3nn at run time).

Conventions (those of e3nn >= 0.2, which fairchem's eSCN/SCN use):

* The polar axis is **y**. A direction is ``(sin β sin α, cos β, sin β cos α)``.
* Coefficients of degree ``l`` are ordered ``m = -l .. l``; the flat layout over ``l = 0 .. lmax`` has
  ``(lmax + 1)**2`` entries, index ``l**2 + l + m``.
* ``Y_lm(α, β) = S_m(α) P_l^|m|(cos β)`` with ``S_m = √2 sin(|m| α)`` (m < 0), ``1`` (m = 0), ``√2 cos(m α)`` (m > 0)
  and ``P`` the associated Legendre functions without the Condon-Shortley phase, normalised so that the
  ``Y_lm`` are orthonormal on the unit sphere ("integral" normalisation). For ``l = 1`` this gives
  ``sqrt(3 / 4π) * (x, y, z) / r``.
* S² grid (``res_beta`` x ``res_alpha``): ``β_i = π (i + 0.5) / res_beta``, ``α_j = 2π j / res_alpha``;
  integration weights are the Kostelec-Rockmore quadrature weights (as e3nn's ``FromS2Grid``).

Public API:
    ``spherical_harmonics(lmax, vec, normalize)`` -> (..., (lmax+1)**2)
    ``to_grid_matrix(lmax, res_beta, res_alpha)`` / ``from_grid_matrix(...)`` -> (res_beta, res_alpha, (lmax+1)**2)
        (e3nn ``ToS2Grid`` / ``FromS2Grid`` with ``normalization="integral"``, laid out as fairchem's
        ``to_grid_mat`` / ``from_grid_mat``: ``grid[..., b, a, c] = sum_i to_grid[b, a, i] * coeffs[..., i, c]``)
    ``coefficient_lm(lmax)`` -> (l, m) index tensors of the flat layout.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import torch
from torch import Tensor

__all__ = [
    "coefficient_lm",
    "from_grid_matrix",
    "legendre",
    "quadrature_weights",
    "spherical_harmonics",
    "to_grid_matrix",
]


@cache
def _legendre_coefficients(l: int, m: int) -> tuple[float, ...]:
    """Coefficients ``c_p`` (p = 0 .. l-m) with ``P_l^m(z) = sin(β)^m * sum_p c_p z^p``, integral-normalised.

    ``P_l^m(z) = (1 - z²)^{m/2} / (2^l l!) d^{l+m}/dz^{l+m} (z² - 1)^l`` (Rodrigues, no Condon-Shortley phase),
    times ``sqrt((2l + 1) / (4π) (l - m)! / (l + m)!)``. Exact rational arithmetic, one rounding at the end.
    """
    n = l + m
    coeffs = [Fraction(0)] * (l - m + 1)
    for k in range(l + 1):
        power = 2 * k
        if power < n:
            continue
        term = math.comb(l, k) * (-1) ** (l - k) * math.factorial(power) // math.factorial(power - n)
        coeffs[power - n] += Fraction(term, 2**l * math.factorial(l))
    norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
    return tuple(float(c) * norm for c in coeffs)


def coefficient_lm(lmax: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Degree ``l`` and order ``m`` of every entry of the flat ``(lmax+1)**2`` layout (two int64 tensors)."""
    ls = torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])
    ms = torch.cat([torch.arange(-l, l + 1, dtype=torch.long) for l in range(lmax + 1)])
    return ls.to(device), ms.to(device)


def legendre(lmax: int, cos_beta: Tensor, sin_beta: Tensor) -> Tensor:
    """Normalised associated Legendre part ``P_l^|m|(cos β)`` for every (l, m) of the flat layout.

    ``cos_beta``, ``sin_beta``: (...). Returns (..., (lmax+1)**2), the same value for m and -m.
    """
    powers_z = [torch.ones_like(cos_beta)]
    for _ in range(lmax):
        powers_z.append(powers_z[-1] * cos_beta)
    powers_s = [torch.ones_like(sin_beta)]
    for _ in range(lmax):
        powers_s.append(powers_s[-1] * sin_beta)
    out = []
    for l in range(lmax + 1):
        per_m = []
        for m in range(l + 1):
            coeffs = _legendre_coefficients(l, m)
            poly = sum(c * powers_z[p] for p, c in enumerate(coeffs) if c != 0.0)
            per_m.append(poly * powers_s[m])
        out.extend(per_m[abs(m)] for m in range(-l, l + 1))
    return torch.stack(out, dim=-1)


def _alpha_factors(lmax: int, alpha: Tensor) -> Tensor:
    """``S_m(α)`` for m = -lmax .. lmax: (..., 2 lmax + 1)."""
    alpha = alpha.unsqueeze(-1)
    m_up = torch.arange(1, lmax + 1, dtype=alpha.dtype, device=alpha.device)
    m_down = torch.arange(lmax, 0, -1, dtype=alpha.dtype, device=alpha.device)
    return torch.cat(
        [math.sqrt(2) * torch.sin(m_down * alpha), torch.ones_like(alpha), math.sqrt(2) * torch.cos(m_up * alpha)],
        dim=-1,
    )


def spherical_harmonics(lmax: int, vec: Tensor, normalize: bool = True) -> Tensor:
    """Real spherical harmonics of degrees 0..lmax at Cartesian vectors ``vec`` (..., 3).

    With ``normalize=False`` the harmonics are the homogeneous polynomials ``|r|^l Y_lm(r̂)`` (as e3nn's
    ``spherical_harmonics(..., normalize=False)``). Returns (..., (lmax+1)**2), integral normalisation.
    """
    if vec.shape[-1] != 3:
        raise ValueError(f"spherical_harmonics expects vectors of shape (..., 3), got {tuple(vec.shape)}")
    if normalize:
        vec = vec / torch.linalg.vector_norm(vec, dim=-1, keepdim=True)
    x, y, z = vec.unbind(-1)
    r2 = x * x + y * y + z * z
    # (z + i x)^m = rho^m (cos mα + i sin mα)
    re, im = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(lmax):
        re_prev, im_prev = re[-1], im[-1]
        re.append(re_prev * z - im_prev * x)
        im.append(re_prev * x + im_prev * z)
    y_pow = [torch.ones_like(y)]
    r2_pow = [torch.ones_like(r2)]
    for _ in range(lmax):
        y_pow.append(y_pow[-1] * y)
        r2_pow.append(r2_pow[-1] * r2)
    out = []
    for l in range(lmax + 1):
        radial = []
        for m in range(l + 1):
            coeffs = _legendre_coefficients(l, m)
            # |r|^(l-m) P(y/|r|) is a polynomial in y and r²: sum_p c_p y^p (r²)^((l-m-p)/2)
            radial.append(sum(c * y_pow[p] * r2_pow[(l - m - p) // 2] for p, c in enumerate(coeffs) if c != 0.0))
        for m in range(-l, l + 1):
            if m < 0:
                out.append(math.sqrt(2) * radial[-m] * im[-m])
            elif m == 0:
                out.append(radial[0])
            else:
                out.append(math.sqrt(2) * radial[m] * re[m])
    return torch.stack(out, dim=-1)


def quadrature_weights(res_beta: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Kostelec-Rockmore quadrature weights for the ``res_beta`` latitudes (even), as e3nn (sum = 1/res_beta)."""
    if res_beta % 2:
        raise ValueError(f"res_beta must be even, got {res_beta}")
    b = res_beta // 2
    j = torch.arange(2 * b, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(b, dtype=torch.float64).unsqueeze(0)
    inner = (torch.sin((2 * j + 1) * (2 * k + 1) * math.pi / (4.0 * b)) / (2 * k + 1)).sum(dim=1)
    w = (2.0 / b) * torch.sin(math.pi * (2.0 * j[:, 0] + 1.0) / (4.0 * b)) * inner
    return (w / (2.0 * (2 * b) ** 2)).to(dtype)


def _grid_angles(res_beta: int, res_alpha: int) -> tuple[Tensor, Tensor]:
    betas = (torch.arange(res_beta, dtype=torch.float64) + 0.5) / res_beta * math.pi
    alphas = torch.arange(res_alpha, dtype=torch.float64) / res_alpha * 2 * math.pi
    return betas, alphas


def _check_grid(lmax: int, res_beta: int, res_alpha: int) -> None:
    if res_beta % 2 or lmax + 1 > res_beta // 2:
        raise ValueError(f"S2 grid: res_beta={res_beta} must be even and >= 2 (lmax + 1) = {2 * (lmax + 1)}")
    if res_alpha < 1:
        raise ValueError(f"S2 grid: res_alpha must be positive, got {res_alpha}")


@cache
def _to_grid_f64(lmax: int, res_beta: int, res_alpha: int) -> Tensor:
    _check_grid(lmax, res_beta, res_alpha)
    betas, alphas = _grid_angles(res_beta, res_alpha)
    shb = legendre(lmax, betas.cos(), betas.sin().abs())  # (b, i)
    sha = _alpha_factors(lmax, alphas)  # (a, 2 lmax + 1)
    _, ms = coefficient_lm(lmax)
    return shb[:, None, :] * sha[None, :, lmax + ms]


def to_grid_matrix(
    lmax: int, res_beta: int, res_alpha: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> Tensor:
    """Values of the (lmax+1)**2 harmonics on the grid: (res_beta, res_alpha, (lmax+1)**2). Computed in float64."""
    return _to_grid_f64(lmax, res_beta, res_alpha).to(device=device, dtype=dtype)


def from_grid_matrix(
    lmax: int, res_beta: int, res_alpha: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> Tensor:
    """Projection grid -> coefficients (quadrature), (res_beta, res_alpha, (lmax+1)**2), as e3nn's FromS2Grid."""
    qw = quadrature_weights(res_beta) * res_beta**2 / res_alpha
    mat = _to_grid_f64(lmax, res_beta, res_alpha) * (4 * math.pi) * qw[:, None, None]
    return mat.to(device=device, dtype=dtype)
