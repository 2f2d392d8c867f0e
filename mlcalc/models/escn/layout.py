"""Position-independent constants of eSCN: coefficient layouts (l-major <-> m-major) and S² grid matrices.

Coefficient layouts (per node, per channel):

* full, resolution i: ``(lmax_i + 1)**2`` coefficients, l-major (``l**2 + l + m``), resolutions concatenated;
* reduced (inside an edge frame): resolution i keeps ``|m| <= mmax_i``, still l-major, resolutions concatenated;
* m-major: the reduced coefficients regrouped as [m = 0 of every (resolution, l)], then for m = 1, 2, ...:
  [+m of every (resolution, l) with mmax_i >= m] followed by [-m of the same], as fairchem's ``CoefficientMapping``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlcalc.nn.so3 import coefficient_lm, from_grid_matrix, to_grid_matrix


def grid_resolution(lmax: int, mmax: int, resolution: int | None = None) -> tuple[int, int]:
    """(res_beta, res_alpha) of fairchem's ``SO3_Grid(lmax, mmax, resolution)``."""
    if resolution:
        return resolution, resolution
    res_alpha = 2 * (mmax + 1) + 1 if lmax == mmax else 2 * mmax + 1
    return 2 * (lmax + 1), res_alpha


def _reduced_index(lmax: int, mmax: int) -> Tensor:
    """Indices (into the l-major (lmax+1)**2 layout) of the coefficients with |m| <= mmax."""
    _, ms = coefficient_lm(lmax)
    return torch.nonzero(ms.abs() <= mmax).flatten()


def _grid_pair(lmax: int, mmax: int, resolution: int | None, dtype: torch.dtype, device: torch.device):
    """(to_grid, from_grid) matrices flattened to (res_beta * res_alpha, K), K = reduced coefficients."""
    res_beta, res_alpha = grid_resolution(lmax, mmax, resolution)
    idx = _reduced_index(lmax, mmax)
    to_g = to_grid_matrix(lmax, res_beta, res_alpha)[:, :, idx].reshape(res_beta * res_alpha, -1)
    from_g = from_grid_matrix(lmax, res_beta, res_alpha)[:, :, idx].reshape(res_beta * res_alpha, -1)
    return to_g.to(device=device, dtype=dtype), from_g.to(device=device, dtype=dtype)


@dataclass
class ESCNLayout:
    """Index maps and grid matrices for one (lmax_list, mmax_list) on one device/dtype.

    Attributes:
        num_coefficients: sizes of the full layout per resolution, ``(lmax_i + 1)**2``.
        reduced_sizes: sizes of the reduced layout per resolution.
        reduced_index: per resolution, indices of the reduced coefficients in that resolution's full layout.
        to_m: permutation (reduced -> m-major): ``x_m = x[:, to_m]``; ``to_l`` its inverse.
        m_sizes: number of +m (= number of -m) coefficients for m = 0 .. max(mmax).
        act_grids: per resolution (to_grid, from_grid) for the point-wise activation of the edge messages,
            (res_beta * res_alpha, reduced_size_i).
        node_to_grid / node_from_grid: grid of max(lmax) with mmax = lmax, (res_beta * res_alpha, (Lmax+1)**2);
            resolution i uses the first (lmax_i + 1)**2 columns.
    """

    num_coefficients: list[int]
    reduced_sizes: list[int]
    reduced_index: list[Tensor]
    to_m: Tensor
    to_l: Tensor
    m_sizes: list[int]
    act_grids: list[tuple[Tensor, Tensor]]
    node_to_grid: Tensor
    node_from_grid: Tensor

    @classmethod
    def build(
        cls,
        lmax_list: list[int],
        mmax_list: list[int],
        resolution: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> ESCNLayout:
        ls_all, ms_all = [], []
        reduced_index = []
        for lmax, mmax in zip(lmax_list, mmax_list, strict=True):
            ls, ms = coefficient_lm(lmax)
            idx = _reduced_index(lmax, mmax)
            reduced_index.append(idx.to(device))
            ls_all.append(ls[idx])
            ms_all.append(ms[idx])
        m_complex = torch.cat(ms_all)
        order, m_sizes = [], []
        for m in range(max(mmax_list) + 1):
            real = torch.nonzero(m_complex == m).flatten()
            order.append(real)
            m_sizes.append(int(real.numel()))
            if m > 0:
                order.append(torch.nonzero(m_complex == -m).flatten())
        to_m = torch.cat(order)
        to_l = torch.empty_like(to_m)
        to_l[to_m] = torch.arange(to_m.numel())

        lmax_all = max(lmax_list)
        node_to, node_from = _grid_pair(lmax_all, lmax_all, resolution, dtype, device)
        return cls(
            num_coefficients=[(lmax + 1) ** 2 for lmax in lmax_list],
            reduced_sizes=[int(i.numel()) for i in reduced_index],
            reduced_index=reduced_index,
            to_m=to_m.to(device),
            to_l=to_l.to(device),
            m_sizes=m_sizes,
            act_grids=[
                _grid_pair(lmax, mmax, resolution, dtype, device)
                for lmax, mmax in zip(lmax_list, mmax_list, strict=True)
            ],
            node_to_grid=node_to,
            node_from_grid=node_from,
        )


def to_grid(mat: Tensor, x: Tensor) -> Tensor:
    """Coefficients (Z, K, C) -> grid values (Z, G, C) with ``mat`` (G, K)."""
    return torch.matmul(mat, x)


def from_grid(mat: Tensor, grid: Tensor) -> Tensor:
    """Grid values (Z, G, C) -> coefficients (Z, K, C) with ``mat`` (G, K)."""
    return torch.matmul(mat.transpose(0, 1), grid)
