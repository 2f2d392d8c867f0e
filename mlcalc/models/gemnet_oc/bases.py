"""GemNet-OC basis functions: envelopes, radial bases, circular (one angle) and spherical (two angle) bases.

Distances are in Å; radial bases take the raw distance and scale it by ``1 / cutoff`` internally. Module and
buffer names follow fairchem so that checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy.special import binom
from torch import Tensor, nn

from mlcalc.models.gemnet_oc.layers import ScaleFactor, needs_grad
from mlcalc.nn.geometry import sqrt_one_minus_square
from mlcalc.nn.smearing import exp_nonpositive

#: attribute name fairchem uses for the cosine basis of CircularBasisLayer (part of state_dict keys)
COS_BASIS_NAME = "cos\u03c6_basis"


# ---------------------------------------------------------------------------------------------- envelopes
class PolynomialEnvelope(nn.Module):
    """Smooth cutoff ``1 + a x^p + b x^(p+1) + c x^(p+2)`` for scaled distance x < 1, else 0."""

    def __init__(self, exponent: int) -> None:
        super().__init__()
        if exponent <= 0:
            raise ValueError(f"polynomial envelope exponent must be positive, got {exponent}")
        self.p = float(exponent)
        self.a = -(self.p + 1) * (self.p + 2) / 2
        self.b = self.p * (self.p + 2)
        self.c = -self.p * (self.p + 1) / 2

    def forward(self, d_scaled: Tensor) -> Tensor:
        p = self.p
        env = 1 + self.a * d_scaled**p + self.b * d_scaled ** (p + 1) + self.c * d_scaled ** (p + 2)
        return torch.where(d_scaled < 1, env, torch.zeros_like(d_scaled))


class ExponentialEnvelope(nn.Module):
    """SpookyNet envelope ``exp(-x^2 / ((1 - x)(1 + x)))`` for x < 1, else 0."""

    def forward(self, d_scaled: Tensor) -> Tensor:
        inside = d_scaled < 1
        x = torch.where(inside, d_scaled, torch.zeros_like(d_scaled))  # keeps gradients finite outside
        env = torch.exp(-(x**2) / ((1 - x) * (1 + x)))
        return torch.where(inside, env, torch.zeros_like(d_scaled))


# ---------------------------------------------------------------------------------------------- radial functions
class GaussianBasis(nn.Module):
    """Gaussians ``exp(coeff (x - mu_k)^2)`` on a regular grid of ``num_gaussians`` centres in [start, stop]."""

    def __init__(self, start: float = 0.0, stop: float = 5.0, num_gaussians: int = 50, trainable: bool = False):
        super().__init__()
        offset = torch.linspace(start, stop, num_gaussians, dtype=torch.float32)
        if trainable:
            self.offset = nn.Parameter(offset, requires_grad=True)
        else:
            self.register_buffer("offset", offset)
        self.coeff = -0.5 / ((stop - start) / (num_gaussians - 1)) ** 2

    def forward(self, x: Tensor) -> Tensor:
        diff = x[:, None] - self.offset[None, :]
        if needs_grad(diff):
            return exp_nonpositive(self.coeff * torch.pow(diff, 2))
        return exp_nonpositive(diff.square_().mul_(self.coeff), inplace=True)  # same arithmetic, no temporaries


class SphericalBesselBasis(nn.Module):
    """First-order spherical Bessel functions ``sqrt(2/c^3) sin(f_k x) / x`` (x = d / cutoff)."""

    def __init__(self, num_radial: int, cutoff: float) -> None:
        super().__init__()
        self.norm_const = math.sqrt(2 / (cutoff**3))
        freqs = math.pi * torch.arange(1, num_radial + 1, dtype=torch.float32)
        self.frequencies = nn.Parameter(freqs, requires_grad=True)

    def forward(self, d_scaled: Tensor) -> Tensor:
        return self.norm_const / d_scaled[:, None] * torch.sin(self.frequencies * d_scaled[:, None])


class BernsteinBasis(nn.Module):
    """Bernstein polynomials of ``exp(-gamma x)`` (SpookyNet); gamma = softplus(pregamma) is trainable."""

    def __init__(self, num_radial: int, pregamma_initial: float = 0.45264) -> None:
        super().__init__()
        k = torch.arange(num_radial)
        prefactor = torch.tensor(binom(num_radial - 1, k.numpy()), dtype=torch.float32)
        self.register_buffer("prefactor", prefactor, persistent=False)
        self.pregamma = nn.Parameter(torch.tensor(pregamma_initial, dtype=torch.float32), requires_grad=True)
        self.softplus = nn.Softplus()
        self.register_buffer("exp1", k[None, :], persistent=False)
        self.register_buffer("exp2", (num_radial - 1 - k)[None, :], persistent=False)

    def forward(self, d_scaled: Tensor) -> Tensor:
        gamma = self.softplus(self.pregamma)
        exp_d = torch.exp(-gamma * d_scaled)[:, None]
        return self.prefactor * (exp_d**self.exp1) * ((1 - exp_d) ** self.exp2)


class RadialBasis(nn.Module):
    """Envelope times radial functions of ``d / cutoff``: (E,) distances in Å -> (E, num_radial)."""

    def __init__(
        self,
        num_radial: int,
        cutoff: float,
        rbf: dict | None = None,
        envelope: dict | None = None,
        scale_basis: bool = False,
    ) -> None:
        super().__init__()
        rbf = {"name": "gaussian"} if rbf is None else dict(rbf)
        envelope = {"name": "polynomial", "exponent": 5} if envelope is None else dict(envelope)
        self.inv_cutoff = 1 / cutoff
        self.scale_basis = scale_basis
        if scale_basis:
            self.scale_rbf = ScaleFactor()

        env_name = str(envelope.pop("name")).lower()
        if env_name == "polynomial":
            self.envelope = PolynomialEnvelope(**envelope)
        elif env_name == "exponential":
            self.envelope = ExponentialEnvelope(**envelope)
        else:
            raise ValueError(f"unknown envelope function {env_name!r} (known: polynomial, exponential)")

        rbf_name = str(rbf.pop("name")).lower()
        if rbf_name == "gaussian":
            self.rbf = GaussianBasis(start=0, stop=1, num_gaussians=num_radial, **rbf)
        elif rbf_name == "spherical_bessel":
            self.rbf = SphericalBesselBasis(num_radial=num_radial, cutoff=cutoff, **rbf)
        elif rbf_name == "bernstein":
            self.rbf = BernsteinBasis(num_radial=num_radial, **rbf)
        else:
            raise ValueError(f"unknown radial basis {rbf_name!r} (known: gaussian, spherical_bessel, bernstein)")

    def forward(self, d: Tensor) -> Tensor:
        d_scaled = d * self.inv_cutoff
        env = self.envelope(d_scaled)[:, None]
        rbf = self.rbf(d_scaled)
        out = env * rbf if needs_grad(rbf) else rbf.mul_(env)
        if self.scale_basis:
            out = self.scale_rbf(out)
        return out


# ---------------------------------------------------------------------------------------------- angular functions
def _sph_prefactor(l_deg: int, m: int) -> float:
    """Normalisation sqrt((2l+1)/(4 pi) (l-|m|)!/(l+|m|)!) of the spherical harmonic Y_lm."""
    m = abs(m)
    return ((2 * l_deg + 1) / (4 * math.pi) * math.factorial(l_deg - m) / math.factorial(l_deg + m)) ** 0.5


def zonal_harmonics(cos_angle: Tensor, num_l: int) -> Tensor:
    """Y_l0(cos) = sqrt((2l+1)/(4 pi)) P_l(cos) for l < num_l: (T,) -> (T, num_l)."""
    z = cos_angle
    legendre = [torch.ones_like(z), z]
    for l_deg in range(2, num_l):
        legendre.append(((2 * l_deg - 1) * z * legendre[-1] - (l_deg - 1) * legendre[-2]) / l_deg)
    return torch.stack([_sph_prefactor(l_deg, 0) * legendre[l_deg] for l_deg in range(num_l)], dim=1)


def real_spherical_harmonics(cos_theta: Tensor, phi: Tensor, num_l: int) -> Tensor:
    """Real spherical harmonics from cos(polar angle) and azimuth phi: (T,), (T,) -> (T, num_l**2).

    Per degree l the order is m = 0, 1, ..., l, -l, ..., -1 (fairchem's layout); m > 0 uses cos(m phi),
    m < 0 uses sin(|m| phi), both times sqrt(2) (-1)^m N_lm P_l|m| with the Condon-Shortley phase in P.
    sin(theta) = sqrt(1 - cos^2) has an infinite derivative at cos = +-1 (collinear bonds); its derivative is zero
    where a cosine cannot resolve the angle (``mlcalc.nn.geometry.sqrt_one_minus_square``), values are unchanged.
    """
    z = cos_theta
    sin_theta = sqrt_one_minus_square(z)
    # associated Legendre P[l][m] for 0 <= m <= l
    p: list[list[Tensor | None]] = [[None] * (l_deg + 1) for l_deg in range(num_l)]
    p[0][0] = torch.ones_like(z)
    for l_deg in range(1, num_l):
        p[l_deg][l_deg] = (1 - 2 * l_deg) * sin_theta * p[l_deg - 1][l_deg - 1]
    for m in range(num_l - 1):
        p[m + 1][m] = (2 * m + 1) * z * p[m][m]
    for l_deg in range(2, num_l):
        for m in range(l_deg - 1):
            p[l_deg][m] = ((2 * l_deg - 1) * z * p[l_deg - 1][m] - (l_deg + m - 1) * p[l_deg - 2][m]) / (l_deg - m)
    out = []
    for l_deg in range(num_l):
        out.append(_sph_prefactor(l_deg, 0) * p[l_deg][0])
        for m in range(1, l_deg + 1):
            out.append(2**0.5 * (-1) ** m * _sph_prefactor(l_deg, m) * p[l_deg][m] * torch.cos(m * phi))
        for m in range(l_deg, 0, -1):
            out.append(2**0.5 * (-1) ** m * _sph_prefactor(l_deg, m) * p[l_deg][m] * torch.sin(m * phi))
    return torch.stack(out, dim=1)


class CircularBasisLayer(nn.Module):
    """Radial basis of the edge distance and a basis of one angle's cosine (spherical_harmonics or gaussian)."""

    def __init__(self, num_spherical: int, radial_basis: RadialBasis, cbf: dict, scale_basis: bool = False):
        super().__init__()
        self.radial_basis = radial_basis
        self.num_spherical = num_spherical
        self.scale_basis = scale_basis
        if scale_basis:
            self.scale_cbf = ScaleFactor()
        cbf = dict(cbf)
        name = str(cbf.pop("name")).lower()
        self.cbf_name = name
        if name == "gaussian":
            self.add_module(COS_BASIS_NAME, GaussianBasis(start=-1, stop=1, num_gaussians=num_spherical, **cbf))
        elif name != "spherical_harmonics":
            raise ValueError(f"unknown circular basis {name!r} (known: spherical_harmonics, gaussian)")

    def cos_basis(self, cos_angle: Tensor) -> Tensor:
        if self.cbf_name == "gaussian":
            return getattr(self, COS_BASIS_NAME)(cos_angle)
        return zonal_harmonics(cos_angle, self.num_spherical)

    def angular(self, cos_angle: Tensor) -> Tensor:
        """(T,) cosines -> (T, num_spherical), scaled if scale_basis."""
        cir = self.cos_basis(cos_angle)
        return self.scale_cbf(cir) if self.scale_basis else cir

    def forward(self, d: Tensor, cos_angle: Tensor) -> tuple[Tensor, Tensor]:
        """(E,) distances, (T,) cosines -> (E, num_radial), (T, num_spherical)."""
        return self.radial_basis(d), self.angular(cos_angle)


class SphericalBasisLayer(nn.Module):
    """Radial basis and a two-angle basis (spherical_harmonics, legendre_outer or gaussian_outer)."""

    def __init__(self, num_spherical: int, radial_basis: RadialBasis, sbf: dict, scale_basis: bool = False):
        super().__init__()
        self.num_spherical = num_spherical
        self.radial_basis = radial_basis
        self.scale_basis = scale_basis
        if scale_basis:
            self.scale_sbf = ScaleFactor()
        sbf = dict(sbf)
        name = str(sbf.pop("name")).lower()
        self.sbf_name = name
        if name == "gaussian_outer":
            self.circular_basis = GaussianBasis(start=-1, stop=1, num_gaussians=num_spherical, **sbf)
        elif name not in ("spherical_harmonics", "legendre_outer"):
            raise ValueError(
                f"unknown spherical basis {name!r} (known: spherical_harmonics, legendre_outer, gaussian_outer)"
            )

    def angular(self, cos_angle: Tensor, dihedral: Tensor) -> Tensor:
        """(Q,) cos of the angle c-a-b and (Q,) dihedral angle (rad) -> (Q, num_spherical**2)."""
        n = self.num_spherical
        if self.sbf_name == "spherical_harmonics":
            return real_spherical_harmonics(cos_angle, dihedral, n)
        first, second = self._outer_factors(cos_angle, dihedral)
        outer = first[:, :, None] * second[:, None, :]
        return outer.reshape(cos_angle.shape[0], n * n)

    def _outer_factors(self, cos_angle: Tensor, dihedral: Tensor) -> tuple[Tensor, Tensor]:
        """The two (Q, num_spherical) factors of an outer-product basis (legendre_outer, gaussian_outer)."""
        basis: Callable[[Tensor], Tensor]
        if self.sbf_name == "legendre_outer":
            basis = lambda x: zonal_harmonics(x, self.num_spherical)  # noqa: E731
        else:
            basis = self.circular_basis
        return basis(cos_angle), basis(torch.cos(dihedral))

    def angular_factors(self, cos_angle: Tensor, dihedral: Tensor) -> tuple[Tensor, Tensor] | None:
        """For the outer-product bases (legendre_outer, gaussian_outer): the two factors (Q, num_spherical) whose
        outer product per row is ``angular`` (times the scale factor, applied to the first); None otherwise."""
        if self.sbf_name == "spherical_harmonics":
            return None
        first, second = self._outer_factors(cos_angle, dihedral)
        return (self.scale_sbf(first) if self.scale_basis else first), second

    def forward(self, d: Tensor, cos_angle: Tensor, dihedral: Tensor) -> tuple[Tensor, Tensor]:
        sph = self.angular(cos_angle, dihedral)
        if self.scale_basis:
            sph = self.scale_sbf(sph)
        return self.radial_basis(d), sph
