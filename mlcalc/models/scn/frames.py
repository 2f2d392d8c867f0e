"""Per-resolution spherical bookkeeping of SCN: coefficient layouts, edge-frame Wigner matrices, y-rotation taps.

fairchem's ``SphericalHarmonicsHelper`` rebuilds all of this on every call; here the position-independent parts
(tap and combination matrices, S^2 grids, sphere points) are built once in float64 and cached per (device, dtype),
and only the Wigner matrices of the edge frames are computed per call.

Layouts: a full coefficient vector has ``(lmax + 1)^2`` entries (l = 0..lmax, m = -l..l). The *reduced* layout
keeps, per l, the orders |m| <= min(l, mmax) — for mmax = 1: [l=0: m 0], then [m -1, 0, 1] for each l >= 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mlcalc.nn.wigner import wigner_D

_F64 = torch.float64


def _reduced_rows(lmax: int, mmax: int) -> list[tuple[int, int]]:
    """(l, m) of every entry of the reduced layout, in order."""
    return [(l, m) for l in range(lmax + 1) for m in range(-min(l, mmax), min(l, mmax) + 1)]


class SphericalResolution:
    """Static description of one SCN resolution (fairchem's ``SphericalHarmonicsHelper`` sizes and constants).

    Args:
        lmax: largest degree of this resolution.
        mmax: largest |m| kept in messages (0 or 1).
        num_taps: 1 for a single edge frame; any other value with mmax = 1 uses four frames rotated by
            0, 90, 180 and 270 degrees about the edge (fairchem's "taps").
        num_bands: bands of the S^2 grid used by the aggregation network (1 or 2).
    """

    def __init__(self, lmax: int, mmax: int, num_taps: int, num_bands: int) -> None:
        if mmax not in (0, 1):
            raise ValueError(f"SCN supports mmax 0 or 1, got {mmax}")
        if num_bands < 1 or lmax - (num_bands - 1) < 0:
            raise ValueError(f"num_bands={num_bands} needs 1 <= num_bands <= lmax + 1 (lmax={lmax})")
        self.lmax, self.mmax, self.num_taps, self.num_bands = lmax, mmax, num_taps, num_bands
        self.sphere_basis = (lmax + 1) ** 2
        self.rows = _reduced_rows(lmax, mmax)
        self.sphere_basis_reduce = len(self.rows)
        if mmax == 1 and num_taps != 1:
            self.y_rotations = [0.0, 0.5 * math.pi, math.pi, 1.5 * math.pi]
        else:
            self.y_rotations = [0.0]
        self.num_y_rotations = len(self.y_rotations)

    def tap_matrices(self) -> list[Tensor]:
        """Per degree l, (T * M_l, M_l) float64 (M_l = 2 min(l, mmax) + 1): the kept Wigner rows of every tap's
        frame from those of the unrotated frame.

        fairchem left-multiplies the edge frame by ``[[c, 0, -s], [0, 1, 0], [s, 0, c]]`` (a rotation by -theta
        about y, e3nn's polar axis), whose degree-l representation maps order m to ``cos(m theta)`` times row m
        plus ``sin(m theta)`` times row -m; it keeps the orders |m| <= mmax among themselves.
        """
        out = []
        for l in range(self.lmax + 1):
            mm = min(l, self.mmax)
            size = 2 * mm + 1
            mat = torch.zeros(self.num_y_rotations * size, size, dtype=_F64)
            for t, theta in enumerate(self.y_rotations):
                for k, m in enumerate(range(-mm, mm + 1)):
                    mat[t * size + k, k] = math.cos(m * theta)
                    if m != 0:
                        mat[t * size + k, mm - m] = math.sin(m * theta)
            out.append(mat)
        return out

    def combine_matrix(self) -> Tensor:
        """(T * R, R) float64: fairchem's ``mapping_y_rot``, the average of the taps' messages brought back to the
        unrotated frame (the identity for a single tap)."""
        size = self.sphere_basis_reduce
        if self.num_y_rotations == 1:
            return torch.eye(size, dtype=_F64)
        index = {lm: k for k, lm in enumerate(self.rows)}
        n = self.num_y_rotations
        out = torch.zeros(n * size, size, dtype=_F64)
        for t, theta in enumerate(self.y_rotations):
            base = t * size
            for l in range(self.lmax + 1):
                out[base + index[(l, 0)], index[(l, 0)]] = 1.0 / n
                if l == 0:
                    continue
                k_minus, k_plus = index[(l, -1)], index[(l, 1)]
                out[base + k_minus, k_minus] = math.cos(theta) / n
                out[base + k_plus, k_minus] = math.sin(theta) / n
                out[base + k_plus, k_plus] = math.cos(theta) / n
                out[base + k_minus, k_plus] = -math.sin(theta) / n
        return out

    def frames(self, alpha: Tensor, beta: Tensor, gamma: Tensor, taps: list[Tensor], edge_index: Tensor) -> EdgeFrames:
        """Wigner blocks of the edge frames (Euler angles (E,)) for every degree, tap-expanded (see EdgeFrames)."""
        wigner, wigner_inv = [], []
        for l, tap in enumerate(taps):
            mm = min(l, self.mmax)
            block = wigner_D(l, alpha, beta, gamma)[:, l - mm : l + mm + 1, :]  # (E, M_l, 2l+1)
            wigner.append(tap @ block)
            wigner_inv.append(block.transpose(1, 2).contiguous())
        return EdgeFrames(wigner, wigner_inv, edge_index)

    def rotate(self, frames: EdgeFrames, x: Tensor) -> Tensor:
        """Global coefficients (E, S, K) -> kept coefficients in every tap's edge frame (E, T, R, K)."""
        taps = self.num_y_rotations
        out = [
            (w @ x[:, l * l : (l + 1) ** 2]).view(x.shape[0], taps, w.shape[1] // taps, x.shape[2])
            for l, w in enumerate(frames.wigner)
        ]
        return torch.cat(out, dim=2)

    def rotate_back(self, frames: EdgeFrames, x: Tensor) -> Tensor:
        """Kept coefficients in the unrotated edge frame (E, R, K) -> global coefficients (E, S, K)."""
        out, row = [], 0
        for w in frames.wigner_inv:
            out.append(w @ x[:, row : row + w.shape[2]])
            row += w.shape[2]
        return torch.cat(out, dim=1)


@dataclass
class EdgeFrames:
    """Per-call rotation data of the edges of one resolution (E_r edges), block by degree l = 0..lmax.

    wigner: per l, (E_r, T * M_l, 2l + 1) kept rows (|m| <= mmax, M_l of them) of the Wigner matrix of every
        tap's frame, taps outermost.
    wigner_inv: per l, (E_r, 2l + 1, M_l) transpose of the unrotated frame's rows (back to the global frame).
    edge_index: (2, E_r) source/target atoms of these edges.
    """

    wigner: list[Tensor]
    wigner_inv: list[Tensor]
    edge_index: Tensor

    def slice(self, start: int, end: int) -> EdgeFrames:
        """The frames of this resolution's edges [start, end) (views, no copy)."""
        return EdgeFrames(
            [w[start:end] for w in self.wigner], [w[start:end] for w in self.wigner_inv], self.edge_index[:, start:end]
        )
