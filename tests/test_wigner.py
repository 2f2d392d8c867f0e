"""Shared SO(3) code: real spherical harmonics, S² grids, Wigner-D matrices, eSCN/SCN edge frames.

Oracles: e3nn (test-only dependency), analytic properties (orthogonality, homomorphism, l = 1 = rotation matrix,
quadrature exactness) and the known closed forms of J_1, J_2 (fairchem's Jd.pt).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from scipy.spatial.transform import Rotation

from mlcalc.nn import so3
from mlcalc.nn.wigner import (
    AUX_VECTOR,
    angles_to_matrix,
    edge_rot_mat,
    j_matrix,
    rotation_to_euler,
    rotation_to_wigner,
    wigner_D,
    xyz_to_angles,
)

F64 = torch.float64


def random_rotations(n: int, seed: int) -> torch.Tensor:
    return torch.tensor(Rotation.random(n, random_state=seed).as_matrix(), dtype=F64)


@contextlib.contextmanager
def e3nn_float64():
    """e3nn builds some internals in the default dtype; compare with it in float64 and restore the default after."""
    o3 = pytest.importorskip("e3nn.o3")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield o3
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------ spherical harmonics
@pytest.mark.parametrize("normalize", [True, False])
def test_spherical_harmonics_match_e3nn(normalize: bool) -> None:
    vec = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 1.7
    ours = so3.spherical_harmonics(8, vec, normalize=normalize)
    with e3nn_float64() as o3:
        ref = o3.spherical_harmonics(list(range(9)), vec, normalize=normalize)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_spherical_harmonics_l1_and_orthonormality() -> None:
    vec = torch.tensor([[0.3, -1.2, 0.7]], dtype=F64)
    unit = vec / vec.norm()
    sh = so3.spherical_harmonics(1, vec)
    assert torch.allclose(sh[0, 1:], math.sqrt(3 / (4 * math.pi)) * unit[0], atol=1e-15)
    # integral normalisation: the grid quadrature integrates Y_i Y_j exactly -> identity
    lmax = 6
    to_g = so3.to_grid_matrix(lmax, 2 * (lmax + 1), 2 * lmax + 1).reshape(-1, (lmax + 1) ** 2)
    from_g = so3.from_grid_matrix(lmax, 2 * (lmax + 1), 2 * lmax + 1).reshape(-1, (lmax + 1) ** 2)
    gram = from_g.T @ to_g
    assert torch.allclose(gram, torch.eye((lmax + 1) ** 2, dtype=F64), atol=1e-13)


def test_spherical_harmonics_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        so3.spherical_harmonics(2, torch.zeros(4, 2))


# ------------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("lmax,res_beta,res_alpha", [(4, 10, 5), (4, 10, 11), (6, 14, 15), (6, 14, 5), (2, 6, 7)])
def test_grids_match_e3nn(lmax: int, res_beta: int, res_alpha: int) -> None:
    with e3nn_float64() as o3:
        to_ref = o3.ToS2Grid(lmax, (res_beta, res_alpha), normalization="integral", dtype=F64)
        from_ref = o3.FromS2Grid((res_beta, res_alpha), lmax, normalization="integral", dtype=F64)
        to_mat = torch.einsum("mbi,am->bai", to_ref.shb, to_ref.sha)
        from_mat = torch.einsum("am,mbi->bai", from_ref.sha, from_ref.shb)
    assert torch.allclose(so3.to_grid_matrix(lmax, res_beta, res_alpha), to_mat, rtol=0, atol=1e-14)
    assert torch.allclose(so3.from_grid_matrix(lmax, res_beta, res_alpha), from_mat, rtol=0, atol=1e-15)


def test_grid_rejects_bad_resolution() -> None:
    with pytest.raises(ValueError, match="res_beta"):
        so3.to_grid_matrix(4, 9, 9)
    with pytest.raises(ValueError, match="res_beta"):
        so3.to_grid_matrix(4, 8, 9)


# ------------------------------------------------------------------------------------------------ Wigner
def test_j_matrices_closed_form() -> None:
    """J_1 and J_2 of fairchem's Jd.pt (= e3nn 0.4) in closed form; all J symmetric and involutive."""
    j1 = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    assert torch.allclose(j_matrix(1), j1, rtol=0, atol=1e-15)
    h = math.sqrt(3) / 2
    j2 = torch.tensor(
        [[0, 0, 0, -1, 0], [0, 1, 0, 0, 0], [0, 0, -0.5, 0, -h], [-1, 0, 0, 0, 0], [0, 0, -h, 0, 0.5]], dtype=F64
    )
    assert torch.allclose(j_matrix(2), j2, rtol=0, atol=1e-15)
    for l in range(11):
        j = j_matrix(l)
        eye = torch.eye(2 * l + 1, dtype=F64)
        assert torch.allclose(j, j.T, atol=1e-14) and torch.allclose(j @ j, eye, atol=1e-13)


def test_j_matrix_cached_per_dtype() -> None:
    assert j_matrix(3, torch.float32) is j_matrix(3, torch.float32)
    assert j_matrix(3, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("l", range(9))
def test_wigner_matches_e3nn(l: int) -> None:
    g = torch.Generator().manual_seed(l)
    alpha, beta, gamma = (torch.rand(16, dtype=F64, generator=g) * 2 * math.pi for _ in range(3))
    with e3nn_float64() as o3:
        ref = o3.wigner_D(l, alpha, beta, gamma)
    assert torch.allclose(wigner_D(l, alpha, beta, gamma), ref, rtol=0, atol=5e-14)


@pytest.mark.parametrize("l", [1, 2, 4, 6, 10])
def test_wigner_orthogonal_homomorphism_and_harmonics(l: int) -> None:
    rots = random_rotations(8, seed=l)
    r1, r2 = rots[:4], rots[4:]
    d1 = rotation_to_wigner(r1, l, start_lmax=l)
    d2 = rotation_to_wigner(r2, l, start_lmax=l)
    d12 = rotation_to_wigner(r1 @ r2, l, start_lmax=l)
    eye = torch.eye(2 * l + 1, dtype=F64)
    assert torch.allclose(d1 @ d1.transpose(1, 2), eye.expand_as(d1), atol=1e-13)
    assert torch.allclose(d12, d1 @ d2, atol=1e-12)
    # Y(R r) = D(R) Y(r)
    vec = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = so3.spherical_harmonics(l, vec)[:, l * l :]
    y_rot = so3.spherical_harmonics(l, torch.einsum("rij,nj->rni", r1, vec))[..., l * l :]
    assert torch.allclose(y_rot, torch.einsum("rij,nj->rni", d1, y), atol=1e-12)


def test_wigner_l1_is_the_rotation_matrix() -> None:
    rots = random_rotations(10, seed=3)
    alpha, beta, gamma = rotation_to_euler(rots)
    assert torch.allclose(angles_to_matrix(alpha, beta, gamma), rots, atol=1e-14)
    assert torch.allclose(wigner_D(1, alpha, beta, gamma), rots, atol=1e-14)
    blocks = rotation_to_wigner(rots, 2)
    assert blocks.shape == (10, 9, 9)
    assert torch.allclose(blocks[:, 1:4, 1:4], rots, atol=1e-14)
    # recomputed floats: a few float64 ulps, never bit for bit (SIMD paths differ between CPUs)
    tol = 8 * torch.finfo(blocks.dtype).eps
    torch.testing.assert_close(blocks[:, 0, 0], torch.ones(10, dtype=blocks.dtype), rtol=0, atol=tol)
    assert blocks[:, 0, 1:].abs().max() <= tol and blocks[:, 1:4, 4:].abs().max() <= tol


def test_euler_conventions_match_e3nn() -> None:
    rots = random_rotations(10, seed=5)
    xyz = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    with e3nn_float64() as o3:
        a_ref, b_ref = o3.xyz_to_angles(xyz)
        m_ref = o3.angles_to_matrix(a_ref, b_ref, a_ref * 0.3)
    a, b = xyz_to_angles(xyz)
    assert torch.allclose(a, a_ref, atol=1e-15) and torch.allclose(b, b_ref, atol=1e-15)
    assert torch.allclose(angles_to_matrix(a, b, a * 0.3), m_ref, atol=1e-15)
    assert rotation_to_wigner(rots.float(), 3).dtype == torch.float32


# ------------------------------------------------------------------------------------------- edge frames
def test_edge_rot_mat_is_a_frame_of_the_edge() -> None:
    vec = torch.randn(200, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    rot = edge_rot_mat(vec)
    eye = torch.eye(3, dtype=F64).expand(200, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-14)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(200, dtype=F64), atol=1e-14)
    unit = vec / vec.norm(dim=1, keepdim=True)
    assert torch.allclose(rot @ unit.unsqueeze(-1), torch.tensor([0.0, 1.0, 0.0], dtype=F64).view(1, 3, 1), atol=1e-14)


def _expected_aux(unit: torch.Tensor) -> torch.Tensor:
    """The auxiliary vector chosen by the documented rule, computed independently per edge in Python."""
    a = torch.tensor(AUX_VECTOR, dtype=F64)
    a = a / a.norm()
    b = torch.stack([-a[1], a[0], a[2]])
    c = torch.stack([a[0], -a[2], a[1]])
    out = []
    for u in unit:
        v = b if abs(float(a @ u)) > abs(float(b @ u)) else a
        v = c if abs(float(v @ u)) > abs(float(c @ u)) else v
        out.append(v)
    return torch.stack(out)


def test_edge_rot_mat_aux_choice_and_ties() -> None:
    """Third row = -ŷ where ẑ ∝ x̂ × aux: the auxiliary vector lies in the (x̂, ŷ) plane with ŷ·aux < 0...

    checked directly: rot[:, 0] ∝ x̂ × aux. Edges along x and z are exact ties (|a_x| = |c_x|, |a_z| = |b_z|),
    kept on the earlier candidate by the strict comparison.
    """
    vec = torch.cat(
        [
            torch.randn(100, 3, dtype=F64, generator=torch.Generator().manual_seed(4)),
            torch.tensor(
                [[2.5, 0.0, 0.0], [-2.5, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, -3.0], [0.0, 1.0, 0.0]], dtype=F64
            ),
        ]
    )
    unit = vec / vec.norm(dim=1, keepdim=True)
    aux = _expected_aux(unit)
    z = torch.cross(unit, aux, dim=1)
    z = z / z.norm(dim=1, keepdim=True)
    rot = edge_rot_mat(vec)
    assert torch.allclose(rot[:, 0], z, atol=1e-14)
    assert torch.allclose(rot[:, 1], unit, atol=1e-15)


def test_edge_rot_mat_deterministic_and_seed_independent() -> None:
    vec = torch.randn(50, 3, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(1)
    r1 = edge_rot_mat(vec)
    torch.manual_seed(2)
    r2 = edge_rot_mat(vec)
    assert torch.equal(r1, r2) and r1.dtype == torch.float32


def test_edge_rot_mat_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="overlap"):
        edge_rot_mat(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        edge_rot_mat(torch.zeros(3))
    assert edge_rot_mat(torch.zeros(0, 3)).shape == (0, 3, 3)
