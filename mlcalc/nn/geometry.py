"""Angles whose derivatives stay finite at degenerate geometry (collinear or coplanar bonds).

Perfect lattices put many bond pairs exactly on a line and many quadruplets exactly in a plane, and periodic images of
one atom along a lattice vector (a, a + R, a + 2R) are collinear for *every* position and strain. There the textbook
formulas differentiate ``atan2(|u x v|, u . v)`` or ``sqrt(1 - cos^2)`` at a point where they have infinite or
undefined slope. The functions here keep the forward values bit for bit (so checkpoints reproduce their reference
numbers) and only decide what autograd sees where the value is decided by rounding noise:

* a quantity below the noise level of its dtype (``noise_tolerance``) is treated as exactly zero, i.e. the
  derivative is taken along the degenerate set, where the angle is constant;
* the remaining one-sided kinks (|y| of a signed quantity y that rounding leaves at +-noise) get the zero
  derivative, the symmetric limit that central finite differences approach.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dihedral_angle", "noise_tolerance", "sqrt_one_minus_square"]

#: rounding noise of a cross product or dot product of unit vectors built from edge vectors is a few to ~20 machine
#: epsilons (positions up to tens of Å, bonds of a few Å); this factor keeps the tolerance well above that.
NOISE_FACTOR = 1024


def noise_tolerance(dtype: torch.dtype, factor: float = NOISE_FACTOR) -> float:
    """``factor`` machine epsilons of ``dtype``: 2.3e-13 in float64, 1.2e-4 in float32 (default factor 1024)."""
    return factor * torch.finfo(dtype).eps


def dihedral_angle(cross_a: Tensor, cross_b: Tensor, floor: float = 1e-9, tol: float | None = None) -> Tensor:
    """Unsigned angle (rad, in [0, pi]) between ``cross_a`` and ``cross_b`` (..., 3): ``atan2(max(|a x b|, floor),
    a . b)``, the value fairchem's GemNet-OC uses for its quadruplet dihedral.

    ``cross_a``, ``cross_b`` are cross products of unit vectors with the common axis (``v_ca x v_ba`` and
    ``v_db x v_ba``), so their norms are the sines of the two bond angles and ``tol`` (default
    ``noise_tolerance(dtype)``) is an absolute tolerance on them.

    Degenerate pairs (|a| <= tol or |b| <= tol: one bond collinear with the axis) have no dihedral; the value there
    is ``atan2(floor, a . b)``, within 1e-7 of pi/2 in float64 (kept for parity), and exactly pi/2 in lower precision
    (where the noise of ``a . b`` exceeds ``floor`` and would make the value random). Autograd sees a constant
    there: on collinear image chains (a, a + R, a + 2R) the pair stays degenerate under every displacement and
    strain, so this is the exact derivative; at a symmetric but breakable collinearity the angle has no limit
    (it depends on the direction of the displacement) and zero is the symmetric choice. Without this the floor
    made d(angle)/d(a . b) = -1/floor = -1e9 there.

    Nearly coplanar pairs (|a x b| <= max(floor, tol |a| |b|)): the value is unchanged; the derivative through
    |a x b| (a kink of the unsigned angle, a noise-driven sign) is zero, the central limit. In float64 this band is
    exactly fairchem's clamp, so derivatives there are those of the implemented function.
    Elsewhere value and derivative are those of the formula above.
    """
    if tol is None:
        tol = noise_tolerance(cross_a.dtype)
    norm_a = torch.linalg.vector_norm(cross_a, dim=-1)
    norm_b = torch.linalg.vector_norm(cross_b, dim=-1)
    degenerate = (norm_a <= tol) | (norm_b <= tol)
    a = torch.where(degenerate.unsqueeze(-1), cross_a.detach(), cross_a)
    b = torch.where(degenerate.unsqueeze(-1), cross_b.detach(), cross_b)
    y = torch.linalg.vector_norm(torch.cross(a, b, dim=-1), dim=-1)  # norm backward at 0 is 0 (no NaN)
    band = torch.clamp(tol * norm_a.detach() * norm_b.detach(), min=floor)
    y = torch.where(y > band, y, y.detach()).clamp(min=floor)
    x = torch.sum(a * b, dim=-1)
    if torch.finfo(x.dtype).eps > 1e-12:  # float32 and below: |x| ~ 1e-7 noise >> floor, use the float64 limit
        x = torch.where(degenerate, torch.zeros_like(x), x)
    return torch.atan2(y, x)


def sqrt_one_minus_square(z: Tensor, tol: float | None = None) -> Tensor:
    """``(1 - z^2) ** 0.5`` (sine from a cosine z in [-1, 1]) with a finite derivative at z = +-1.

    The derivative ``-z / sqrt(1 - z^2)`` is infinite at z = +-1 (exactly collinear bonds) and dominated by rounding
    where ``1 - z^2 <= tol`` (default 16 machine epsilons: angles below ~6e-8 rad in float64, ~1.4e-3 in float32,
    which a cosine cannot resolve). There it is zero: exact along collinear image chains, and the central
    finite-difference limit of the cone sin(angle) = |u x v| at a breakable collinearity. Values are unchanged.
    """
    if tol is None:
        tol = noise_tolerance(z.dtype, factor=16)
    s2 = 1 - z**2
    resolved = s2 > tol
    smooth = torch.where(resolved, s2, torch.ones_like(s2)) ** 0.5
    return torch.where(resolved, smooth, s2.detach().clamp(min=0) ** 0.5)
