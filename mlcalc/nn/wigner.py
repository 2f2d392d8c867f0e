"""Wigner-D matrices and eSCN/SCN edge frames, with fairchem's (e3nn 0.4) conventions, in plain torch.

Basis: real spherical harmonics of ``mlcalc.nn.so3`` (e3nn convention: polar axis y, ``m = -l..l``; for l = 1 the
basis is (x, y, z)), so ``wigner_D(1, α, β, γ) == angles_to_matrix(α, β, γ)`` and, for any rotation R,
``Y(R r) = D(R) Y(r)``.

API (all functions follow the dtype/device of their tensor inputs; nothing uses a global RNG):

``wigner_D(l, alpha, beta, gamma) -> (..., 2l+1, 2l+1)``
    ``D_l(R_y(α) R_x(β) R_y(γ)) = Y(α) J Y(β) J Y(γ)`` with ``Y(θ)`` the rotation about the y axis (e3nn 0.4 /
    fairchem ``_z_rot_mat``) and ``J_l`` (``j_matrix``) the representation of the axis swap x <-> -y.
``j_matrix(l, dtype, device) -> (2l+1, 2l+1)``
    Computed (not loaded) from the harmonics; cached per (l, dtype, device). Equals fairchem's ``Jd.pt``.
``angles_to_matrix(alpha, beta, gamma) -> (..., 3, 3)``; ``xyz_to_angles(xyz) -> (alpha, beta)``   (as e3nn.o3)
``rotation_to_euler(rot) -> (alpha, beta, gamma)``
    fairchem's conversion ``RotationToWignerDMatrix`` uses: ``rot = angles_to_matrix(alpha, beta, gamma)``.
``rotation_to_wigner(rot, lmax, start_lmax=0) -> (E, S, S)``
    block-diagonal ``D_l(rot)`` for l = start_lmax .. lmax, S = (lmax+1)² - start_lmax²; as fairchem's
    ``RotationToWignerDMatrix(rot, start_lmax, lmax)`` (eSCN ``SO3_Rotation`` and SCN ``SphericalHarmonicsHelper``).
``edge_rot_mat(edge_vec) -> (E, 3, 3)``
    fairchem's ``_init_edge_rot_mat`` (identical in eSCN and SCN) with the constant auxiliary vector
    ``AUX_VECTOR = (0.3, -0.5, 0.8)`` (normalised) instead of ``rand_like - 0.5``. Rows are (ẑ, x̂, -ŷ) of the
    edge frame; ``rot @ unit(edge_vec) = (0, 1, 0)``. Detached (fairchem detaches it too).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from mlcalc.nn.so3 import from_grid_matrix, spherical_harmonics

__all__ = [
    "AUX_VECTOR",
    "angles_to_matrix",
    "edge_rot_mat",
    "j_matrix",
    "matrix_x",
    "matrix_y",
    "rotation_to_euler",
    "rotation_to_wigner",
    "wigner_D",
    "xyz_to_angles",
]

#: Constant auxiliary vector of the edge frames (normalised before use); replaces fairchem's random one.
AUX_VECTOR: tuple[float, float, float] = (0.3, -0.5, 0.8)

# x <-> -y swap: an improper orthogonal map whose representation J satisfies J Y_y(θ) J = Y_x(θ) for every l.
_SWAP_XY = ((0.0, -1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, 1.0))


@cache
def _j_matrix_f64(l: int) -> Tensor:
    """``J_l`` with ``Y_l(S r) = J_l Y_l(r)`` (S = x <-> -y swap), float64.

    ``J_ij = ∫ Y_i(S r) Y_j(r) dΩ``, evaluated with the S² grid quadrature, which is exact for these
    degree-2l polynomials on a (2l + 2) x (2l + 1) grid.
    """
    if l < 0:
        raise ValueError(f"degree l must be >= 0, got {l}")
    res_beta, res_alpha = 2 * (l + 1), 2 * l + 1
    betas = (torch.arange(res_beta, dtype=torch.float64) + 0.5) / res_beta * math.pi
    alphas = torch.arange(res_alpha, dtype=torch.float64) / res_alpha * 2 * math.pi
    b, a = torch.meshgrid(betas, alphas, indexing="ij")
    pts = torch.stack([b.sin() * a.sin(), b.cos(), b.sin() * a.cos()], dim=-1).reshape(-1, 3)
    start = l * l
    weights = from_grid_matrix(l, res_beta, res_alpha).reshape(-1, (l + 1) ** 2)[:, start:]  # Y_j(r_k) w_k
    swap = torch.tensor(_SWAP_XY, dtype=torch.float64)
    y_swapped = spherical_harmonics(l, pts @ swap.T)[:, start:]
    j = y_swapped.T @ weights
    j = torch.where(j.abs() < 1e-14, torch.zeros_like(j), j)
    return j.contiguous()


_J_CACHE: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def j_matrix(l: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """The (2l+1, 2l+1) matrix ``J_l`` of fairchem's ``Jd.pt`` (symmetric, orthogonal, J² = 1), cached."""
    device = torch.device(device if device is not None else "cpu")
    key = (l, dtype, device)
    j = _J_CACHE.get(key)
    if j is None:
        j = _j_matrix_f64(l).to(device=device, dtype=dtype)
        _J_CACHE[key] = j
    return j


def _y_rotation(angle: Tensor, l: int) -> Tensor:
    """Representation of the rotation by ``angle`` about the y axis for degree l: (..., 2l+1, 2l+1)."""
    out = angle.new_zeros((*angle.shape, 2 * l + 1, 2 * l + 1))
    inds = torch.arange(2 * l + 1, device=angle.device)
    reversed_inds = torch.arange(2 * l, -1, -1, device=angle.device)
    freq = torch.arange(l, -l - 1, -1, dtype=angle.dtype, device=angle.device)
    out[..., inds, reversed_inds] = torch.sin(freq * angle[..., None])
    out[..., inds, inds] = torch.cos(freq * angle[..., None])
    return out


def wigner_D(l: int, alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """Wigner-D matrix of degree ``l`` for the rotation ``R_y(α) R_x(β) R_y(γ)``: (..., 2l+1, 2l+1)."""
    alpha, beta, gamma = torch.broadcast_tensors(alpha, beta, gamma)
    j = j_matrix(l, alpha.dtype, alpha.device)
    return _y_rotation(alpha, l) @ j @ _y_rotation(beta, l) @ j @ _y_rotation(gamma, l)


def matrix_x(angle: Tensor) -> Tensor:
    """Rotation matrices about x: (..., 3, 3)."""
    c, s = angle.cos(), angle.sin()
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([torch.stack([o, z, z], -1), torch.stack([z, c, -s], -1), torch.stack([z, s, c], -1)], -2)


def matrix_y(angle: Tensor) -> Tensor:
    """Rotation matrices about y: (..., 3, 3)."""
    c, s = angle.cos(), angle.sin()
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)


def angles_to_matrix(alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """``R_y(α) R_x(β) R_y(γ)``: (..., 3, 3)."""
    alpha, beta, gamma = torch.broadcast_tensors(alpha, beta, gamma)
    return matrix_y(alpha) @ matrix_x(beta) @ matrix_y(gamma)


def xyz_to_angles(xyz: Tensor) -> tuple[Tensor, Tensor]:
    """Angles (α, β) of the direction ``xyz`` (..., 3): ``unit(xyz) = R_y(α) R_x(β) e_y``."""
    xyz = xyz / torch.linalg.vector_norm(xyz, dim=-1, keepdim=True).clamp_min(1e-12)
    xyz = xyz.clamp(-1, 1)
    beta = torch.acos(xyz[..., 1])
    alpha = torch.atan2(xyz[..., 0], xyz[..., 2])
    return alpha, beta


def rotation_to_euler(rot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Euler angles (α, β, γ) of rotation matrices (..., 3, 3) with ``rot = angles_to_matrix(α, β, γ)``."""
    y_image = rot @ rot.new_tensor([0.0, 1.0, 0.0])
    alpha, beta = xyz_to_angles(y_image)
    rest = angles_to_matrix(alpha, beta, torch.zeros_like(alpha)).transpose(-1, -2) @ rot
    gamma = torch.atan2(rest[..., 0, 2], rest[..., 0, 0])
    return alpha, beta, gamma


def rotation_to_wigner(rot: Tensor, lmax: int, start_lmax: int = 0) -> Tensor:
    """Block-diagonal Wigner-D matrices of ``rot`` (E, 3, 3) for l = start_lmax..lmax: (E, S, S), detached."""
    if rot.dim() != 3 or rot.shape[-2:] != (3, 3):
        raise ValueError(f"rotation_to_wigner expects (E, 3, 3) matrices, got {tuple(rot.shape)}")
    alpha, beta, gamma = rotation_to_euler(rot.detach())
    size = (lmax + 1) ** 2 - start_lmax**2
    out = rot.new_zeros((rot.shape[0], size, size))
    start = 0
    for l in range(start_lmax, lmax + 1):
        end = start + 2 * l + 1
        out[:, start:end, start:end] = wigner_D(l, alpha, beta, gamma)
        start = end
    return out


def edge_rot_mat(edge_vec: Tensor) -> Tensor:
    """Rotation matrices (E, 3, 3) of fairchem's eSCN/SCN edge frames with the constant auxiliary vector.

    ``edge_vec``: (E, 3) edge vectors (Å), non-zero. The auxiliary vector a and its two 90° copies
    b = (-a_y, a_x, a_z), c = (a_x, -a_z, a_y) are compared by |·x̂|: b replaces a if |a·x̂| > |b·x̂|, then c
    replaces the current one if |current·x̂| > |c·x̂| (strict, so ties keep the earlier vector).
    """
    if edge_vec.dim() != 2 or edge_vec.shape[1] != 3:
        raise ValueError(f"edge_rot_mat expects edge vectors of shape (E, 3), got {tuple(edge_vec.shape)}")
    edge_vec = edge_vec.detach()
    dist = torch.sqrt(torch.sum(edge_vec**2, dim=1))
    if dist.numel() and bool((dist < 1e-4).any()):
        raise ValueError(f"edge_rot_mat: edge vector of length {float(dist.min()):.3g} Å (< 1e-4); atoms overlap")
    norm_x = edge_vec / dist.view(-1, 1)

    aux = torch.tensor(AUX_VECTOR, dtype=edge_vec.dtype, device=edge_vec.device)
    aux = aux / torch.sqrt(torch.sum(aux**2))
    aux_b = torch.stack([-aux[1], aux[0], aux[2]])
    aux_c = torch.stack([aux[0], -aux[2], aux[1]])
    aux, aux_b, aux_c = (v.expand_as(edge_vec) for v in (aux, aux_b, aux_c))

    dot_b = torch.abs(torch.sum(aux_b * norm_x, dim=1)).view(-1, 1)
    dot_c = torch.abs(torch.sum(aux_c * norm_x, dim=1)).view(-1, 1)
    dot = torch.abs(torch.sum(aux * norm_x, dim=1)).view(-1, 1)
    vec2 = torch.where(dot > dot_b, aux_b, aux)
    dot = torch.abs(torch.sum(vec2 * norm_x, dim=1)).view(-1, 1)
    vec2 = torch.where(dot > dot_c, aux_c, vec2)

    norm_z = torch.cross(norm_x, vec2, dim=1)
    norm_z = norm_z / torch.sqrt(torch.sum(norm_z**2, dim=1, keepdim=True))
    norm_z = norm_z / torch.sqrt(torch.sum(norm_z**2, dim=1)).view(-1, 1)  # second normalisation as fairchem
    norm_y = torch.cross(norm_x, norm_z, dim=1)
    norm_y = norm_y / torch.sqrt(torch.sum(norm_y**2, dim=1, keepdim=True))
    return torch.stack([norm_z, norm_x, -norm_y], dim=1)
