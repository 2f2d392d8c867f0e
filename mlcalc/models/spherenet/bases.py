"""SphereNet bases: Bessel distance basis with envelope, spherical-Bessel x Y_l0 angle basis, x Y_lm torsion basis.

The spherical-Bessel / spherical-harmonic bases follow the normalisation and ordering of DIG's SphereNet (built there
with sympy at init) so that DIG / Geom3D weights mean the same here, but everything is evaluated directly in torch:

* radial part of order ``l``, root ``n``: ``sqrt(2) / |j_{l+1}(z_ln)| * j_l(z_ln * d / cutoff)``, ``z_ln`` the n-th
  positive zero of the spherical Bessel function ``j_l`` (computed once in float64 with scipy at init; DIG rounds
  them to float32, a relative difference of ~1e-7);
* real spherical harmonics ``Y_l0 = N_l0 P_l(cos t)``, ``Y_lm = sqrt(2) N_lm P_l^m(cos t) cos(m p)``,
  ``Y_l,-m = sqrt(2) N_lm P_l^m(cos t) sin(m p)`` (m > 0, Condon-Shortley phase included), evaluated as polynomials
  of the Cartesian direction ``(x, y, z) = (sin t cos p, sin t sin p, cos t)`` so that no acos/atan2 enters
  the differentiable path. Per degree l, DIG orders them m = 0, 1, ..., l, -l, ..., -1.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from torch import Tensor, nn

#: below this argument the spherical Bessel functions are summed as a power series, above it by upward recurrence
#: (both are accurate to < 1e-15 absolute in float64 on their side for l <= 6, checked against scipy).
_SERIES_SWITCH = 5.0
_SERIES_TERMS = 24
#: triplets per block of ``SphericalBasis.projected``: (L*L*K, block) temporaries of 4.8 MB at the defaults, below
#: glibc's largest mmap threshold (32 MiB) and cache-sized, so that freed blocks are reused instead of mapped anew
PROJECTION_BLOCK = 4096


def _jn_at(r: float, order: int) -> float:
    from scipy.special import spherical_jn

    return float(spherical_jn(order, r))


@cache
def spherical_bessel_zeros(num_orders: int, num_roots: int) -> np.ndarray:
    """First ``num_roots`` positive zeros of ``j_l`` for l < ``num_orders``, float64 array (num_orders, num_roots).

    Zeros of ``j_{l}`` interlace those of ``j_{l-1}``, so each root is bracketed by consecutive roots of the
    previous order (the same construction DIG uses, here in float64).
    """
    from scipy.optimize import brentq

    zeros = np.zeros((num_orders, num_roots))
    brackets = np.arange(1, num_roots + num_orders) * np.pi  # zeros of j_0
    zeros[0] = brackets[:num_roots]
    for order in range(1, num_orders):
        roots = np.array(
            [
                brentq(_jn_at, brackets[k], brackets[k + 1], args=(order,), xtol=1e-15, rtol=1e-15)
                for k in range(len(brackets) - 1)
            ]
        )
        zeros[order] = roots[:num_roots]
        brackets = roots
    return zeros


def spherical_bessel_normalizer(zeros: np.ndarray) -> np.ndarray:
    """DIG's normaliser ``1 / sqrt(j_{l+1}(z_ln)^2 / 2)`` for a zeros table (L, K); float64 (L, K)."""
    from scipy.special import spherical_jn

    orders = np.arange(zeros.shape[0])[:, None]
    return 1.0 / np.sqrt(0.5 * spherical_jn(orders + 1, zeros) ** 2)


def spherical_jn_table(x: Tensor, num_orders: int) -> Tensor:
    """``j_l(x[..., l, :])`` for each row l of ``x`` (..., num_orders, K): row l is evaluated at order l.

    Power series below ``_SERIES_SWITCH``, upward recurrence above (stable there), both differentiable and
    NaN-free (each branch sees a clamped argument).
    """
    order = torch.arange(num_orders, device=x.device, dtype=x.dtype).unsqueeze(-1)  # (L, 1)
    use_series = x < _SERIES_SWITCH
    # power series j_l(x) = x^l / (2l+1)!! * sum_k (-x^2/2)^k / (k! (2l+3)(2l+5)...(2l+2k+1))
    xs = torch.where(use_series, x, torch.zeros_like(x))
    half_sq = -0.5 * xs * xs
    term = torch.ones_like(xs)
    total = torch.ones_like(xs)
    for k in range(1, _SERIES_TERMS):
        term = term * half_sq / (k * (2 * order + 2 * k + 1))
        total = total + term
    double_fact = torch.tensor(
        [math.prod(range(1, 2 * n + 2, 2)) for n in range(num_orders)], dtype=x.dtype, device=x.device
    ).unsqueeze(-1)
    series = total * xs.pow(order) / double_fact
    # upward recurrence j_{n+1} = (2n+1)/x j_n - j_{n-1}
    xr = torch.where(use_series, torch.full_like(x, _SERIES_SWITCH), x)
    sin, cos = torch.sin(xr), torch.cos(xr)
    j_prev = sin / xr
    upward = j_prev
    if num_orders > 1:
        j_cur = sin / (xr * xr) - cos / xr
        upward = torch.where(order == 1, j_cur, upward)
        for n in range(1, num_orders - 1):
            j_prev, j_cur = j_cur, (2 * n + 1) / xr * j_cur - j_prev
            upward = torch.where(order == n + 1, j_cur, upward)
    return torch.where(use_series, series, upward)


def legendre_table(z: Tensor, num_degrees: int, zero_m_only: bool) -> list[list[Tensor]]:
    """``P[l][m]`` = associated Legendre polynomial without its ``(1 - z^2)^(m/2)`` factor (CS phase included).

    For ``zero_m_only`` only ``P[l][0]`` (the Legendre polynomials) is filled.
    """
    one = torch.ones_like(z)
    p: list[list[Tensor]] = [[one] + [None] * l for l in range(num_degrees)]  # type: ignore[list-item]
    if num_degrees > 1:
        p[1][0] = z
    for l in range(2, num_degrees):
        p[l][0] = ((2 * l - 1) * z * p[l - 1][0] - (l - 1) * p[l - 2][0]) / l
    if not zero_m_only:
        for m in range(1, num_degrees):
            p[m][m] = (1 - 2 * m) * p[m - 1][m - 1]
            if m + 1 < num_degrees:
                p[m + 1][m] = (2 * m + 1) * z * p[m][m]
            for l in range(m + 2, num_degrees):
                p[l][m] = ((2 * l - 1) * z * p[l - 1][m] - (l + m - 1) * p[l - 2][m]) / (l - m)
    return p


def sph_harm_prefactor(l: int, m: int) -> float:
    """``N_lm = sqrt((2l+1) (l-|m|)! / (4 pi (l+|m|)!))``."""
    m = abs(m)
    return math.sqrt((2 * l + 1) * math.factorial(l - m) / (4 * math.pi * math.factorial(l + m)))


def real_sph_harm_m0(z: Tensor, num_degrees: int, dim: int = -1) -> Tensor:
    """``Y_l0(cos t = z)`` for l < num_degrees, shape z.shape + (num_degrees,) (stacked along ``dim``)."""
    p = legendre_table(z, num_degrees, zero_m_only=True)
    return torch.stack([sph_harm_prefactor(l, 0) * p[l][0] for l in range(num_degrees)], dim=dim)


def real_sph_harm_dig(x: Tensor, y: Tensor, z: Tensor, num_degrees: int, dim: int = -1) -> Tensor:
    """All real ``Y_lm`` of the unit direction (x, y, z), l < num_degrees, shape (..., num_degrees**2) (stacked
    along ``dim``).

    Order per degree: m = 0, 1, ..., l, -l, ..., -1 (DIG's torsion basis order).
    """
    p = legendre_table(z, num_degrees, zero_m_only=False)
    cos_m = [torch.ones_like(x)]  # Re (x + i y)^m = sin^m t cos(m p)
    sin_m = [torch.zeros_like(x)]  # Im (x + i y)^m = sin^m t sin(m p)
    for m in range(1, num_degrees):
        cos_m.append(x * cos_m[m - 1] - y * sin_m[m - 1])
        sin_m.append(x * sin_m[m - 1] + y * cos_m[m - 1])
    out = []
    sqrt2 = math.sqrt(2.0)
    for l in range(num_degrees):
        out.append(sph_harm_prefactor(l, 0) * p[l][0])
        for m in range(1, l + 1):
            out.append(sqrt2 * sph_harm_prefactor(l, m) * cos_m[m] * p[l][m])
        for m in range(l, 0, -1):
            out.append(sqrt2 * sph_harm_prefactor(l, m) * sin_m[m] * p[l][m])
    return torch.stack(out, dim=dim)


class Envelope(nn.Module):
    """DimeNet polynomial envelope ``1/x + a x^(p-1) + b x^p + c x^(p+1)`` with p = exponent + 1 (x = d/cutoff).

    Zero with zero first and second derivative at x = 1.
    """

    def __init__(self, exponent: int) -> None:
        super().__init__()
        self.p = exponent + 1
        self.a = -(self.p + 1) * (self.p + 2) / 2
        self.b = self.p * (self.p + 2)
        self.c = -self.p * (self.p + 1) / 2

    def forward(self, x: Tensor) -> Tensor:
        x_p0 = x.pow(self.p - 1)
        x_p1 = x_p0 * x
        return 1.0 / x + self.a * x_p0 + self.b * x_p1 + self.c * x_p1 * x


class DistanceBasis(nn.Module):
    """``envelope(d/c) * sin(freq_n d/c)``, freq initialised to n*pi and trainable (DIG key ``freq``).

    Input distances (E,), Å; output (E, num_radial).
    """

    def __init__(self, num_radial: int, cutoff: float, envelope_exponent: int) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.envelope = Envelope(envelope_exponent)
        self.freq = nn.Parameter(torch.arange(1, num_radial + 1, dtype=torch.get_default_dtype()) * math.pi)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.freq.copy_(torch.arange(1, self.freq.numel() + 1, dtype=self.freq.dtype) * math.pi)

    def forward(self, dist: Tensor) -> Tensor:
        x = (dist / self.cutoff).unsqueeze(-1)
        return self.envelope(x) * torch.sin(self.freq * x)


class SphericalBasis(nn.Module):
    """Angle and torsion bases of SphereNet (parameter-free).

    ``radial(dist)`` -> (E, L, K) normalised spherical Bessel functions ``j_l(z_ln d / c)`` (no envelope, as DIG);
    ``angle(radial_kj, z)`` -> (T, L*K) with feature ``l*K + n`` = radial[l, n] * Y_l0;
    ``torsion(radial_kj, x, y, z)`` -> (T, L*L*K) with feature ``a*L*K + b*K + n`` = radial[b, n] * Y[a*L + b], Y the
    L*L harmonics in DIG order (this pairing of harmonic a*L+b with Bessel order b is DIG's layout, kept so that
    DIG's ``lin_t1`` weights apply).
    """

    def __init__(self, num_spherical: int, num_radial: int, cutoff: float) -> None:
        super().__init__()
        self.num_spherical = num_spherical
        self.num_radial = num_radial
        self.cutoff = float(cutoff)
        zeros = spherical_bessel_zeros(num_spherical, num_radial)
        self._zeros = zeros
        self._norm = spherical_bessel_normalizer(zeros)
        self._consts: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        # position of the m = 0 harmonic of each degree in the flat DIG order, for the torsion-averaged basis
        self._m0_index = [l * l for l in range(num_spherical)]

    def _constants(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._consts:
            self._consts[key] = (
                torch.tensor(self._zeros, dtype=like.dtype, device=like.device),
                torch.tensor(self._norm, dtype=like.dtype, device=like.device),
            )
        return self._consts[key]

    def radial(self, dist: Tensor) -> Tensor:
        zeros, norm = self._constants(dist)
        x = (dist / self.cutoff)[:, None, None] * zeros
        return norm * spherical_jn_table(x, self.num_spherical)

    def angle(self, radial_kj: Tensor, cos_angle: Tensor) -> Tensor:
        y = real_sph_harm_m0(cos_angle, self.num_spherical)  # (T, L)
        return (radial_kj * y.unsqueeze(-1)).flatten(1)

    def torsion(self, radial_kj: Tensor, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        n = self.num_spherical
        harm = real_sph_harm_dig(x, y, z, n).view(-1, n, n, 1)  # [a, b] = harmonic a*L + b
        return (radial_kj.unsqueeze(1) * harm).flatten(1)

    def torsion_averaged(self, radial_kj: Tensor, z: Tensor) -> Tensor:
        """The torsion basis averaged over the torsion angle in [0, 2 pi): only the m = 0 harmonics survive."""
        n = self.num_spherical
        y0 = real_sph_harm_m0(z, n)
        harm = z.new_zeros(z.shape[0], n * n)
        harm[:, self._m0_index] = y0
        return (radial_kj.unsqueeze(1) * harm.view(-1, n, n, 1)).flatten(1)

    def projected(
        self, radial_kj: Tensor, x: Tensor | None, y: Tensor | None, z: Tensor, w_angle: Tensor, w_torsion: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``angle(radial_kj, z) @ w_angle.T`` and ``torsion(radial_kj, x, y, z) @ w_torsion.T`` (``torsion_averaged``
        when x is None), (T, rows of the weight) each: the bases projected without holding them whole.

        Evaluated feature-major ((features, T) layout: contiguous broadcasts over the triplets) in blocks of
        ``PROJECTION_BLOCK`` triplets, so that the (L*L*K, block) basis and the same-sized gradients of its backward
        pass are ~5 MB temporaries reused from block to block (no page faults of fresh (T, L*L*K) mappings): ~3x
        faster than the (T, L*L*K) product and matmul at 65,536 triplets, and small next to the run's other tensors.
        The returned tensors are transposed views of (rows, T) ones. Same sums as unblocked, up to float rounding.
        """
        n, k = self.num_spherical, self.num_radial
        rad = radial_kj.reshape(-1, n * k).T.contiguous()  # (L*K, T)
        y0 = real_sph_harm_m0(z, n, dim=0)  # (L, T)
        if x is None:
            harm = z.new_zeros(n * n, z.shape[0])
            harm[self._m0_index] = y0
        else:
            harm = real_sph_harm_dig(x, y, z, n, dim=0)  # (L*L, T)
        s_parts, t_parts = [], []
        split = [t.split(PROJECTION_BLOCK, 1) for t in (rad, harm, y0)]
        blocks = zip(*split, strict=True)
        for r, h, h0 in blocks:
            r = r.view(n, k, -1)
            s_parts.append(w_angle @ (r * h0.unsqueeze(1)).view(n * k, -1))
            t_parts.append(w_torsion @ (h.view(n, n, 1, -1) * r.unsqueeze(0)).view(n * n * k, -1))
        return torch.cat(s_parts, 1).T, torch.cat(t_parts, 1).T
