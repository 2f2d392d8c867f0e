"""Spherical Channel Network (SCN; Zitnick et al. 2022), reproducing fairchem-core 1.10's ``scn`` model.

Differences from fairchem that do not change the numbers:

* edge frames use the constant auxiliary vector of ``mlcalc.nn.wigner.edge_rot_mat`` instead of a random one;
* position-independent tensors (S^2 grid transforms, sphere points and their harmonics, tap / combination
  matrices) are computed once in float64 and cached per (device, dtype) instead of on every call;
* every work tensor follows the dtype of the graph (fairchem uses the global default dtype for several);
* the Wigner matrices of the rotated taps are obtained from the unrotated one by a fixed matrix.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from mlcalc.graph import AtomGraph
from mlcalc.models.base import MLModel, register_model
from mlcalc.models.scn import sphere
from mlcalc.models.scn.frames import EdgeFrames, SphericalResolution
from mlcalc.models.scn.layers import EdgeBlock
from mlcalc.nn.linear import Linear
from mlcalc.nn.scatter import gather, scatter_sum, segment_ranks
from mlcalc.nn.smearing import DISTANCE_EXPANSIONS
from mlcalc.nn.wigner import edge_rot_mat, rotation_to_euler

logger = logging.getLogger(__name__)

#: nearest neighbours of an atom handled at full resolution when num_resolutions = 2
NEAR_NEIGHBORS = 12


def _cast(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Tensors (possibly in nested lists) moved to device and dtype."""
    if isinstance(value, list):
        return [_cast(v, device, dtype) for v in value]
    return value.to(device=device, dtype=dtype)


@register_model("scn", "SphericalChannelNetwork")
class SCN(MLModel):
    """SCN with direct force prediction. Hyperparameters have fairchem's names and defaults.

    ``forward(graph)`` returns raw (normalised) ``{"energy": (B,), "forces": (N, 3)}`` in the dtype of graph.pos.
    Ignored fairchem arguments: use_pbc, use_pbc_single, otf_graph (the graph comes from the calculator),
    show_timing_info, direct_forces (SCN's forces are always direct).

    Attributes:
        chunk_size (edges, ``int | None``): number of edges whose messages are computed at once (per resolution);
            each chunk's messages are summed into the atoms before the next chunk is computed, so the per-edge
            tensors of a call (e.g. gathered and rotated coefficients) exist for one chunk at a time: about
            100 kB per edge at the OC20 sizes (lmax 6, mmax 1, 128 channels, float32). The atom-wise grid
            MLP of every interaction and the output heads take ``chunk_size // ATOMS_PER_EDGE_DIVISOR`` atoms at a
            time (an atom's grid tensors, 210 points x 256 channels, are about 6 times an edge's). None: all
            at once. Default ``DEFAULT_CHUNK_SIZE`` = 2048 edges, ~256 MB of transient tensors per chunk at those
            sizes. Not a hyperparameter and not in the state_dict; results do not depend on it beyond float
            rounding.
    """

    direct_forces = True
    supports_stress = False

    #: default ``chunk_size`` (edges)
    DEFAULT_CHUNK_SIZE = 2048
    #: atoms per chunk of the atom-wise loops = chunk_size // this
    ATOMS_PER_EDGE_DIVISOR = 6

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = True,
        regress_forces: bool = True,
        otf_graph: bool = False,
        max_num_neighbors: int = 20,
        cutoff: float = 8.0,
        max_num_elements: int = 90,
        num_interactions: int = 8,
        lmax: int = 6,
        mmax: int = 1,
        num_resolutions: int = 2,
        sphere_channels: int = 128,
        sphere_channels_reduce: int = 128,
        hidden_channels: int = 256,
        num_taps: int = -1,
        use_grid: bool = True,
        num_bands: int = 1,
        num_sphere_samples: int = 128,
        num_basis_functions: int = 128,
        distance_function: str = "gaussian",
        basis_width_scalar: float = 1.0,
        distance_resolution: float = 0.02,
        show_timing_info: bool = False,
        direct_forces: bool = True,
    ) -> None:
        super().__init__()
        self.capture_hparams(locals())
        if not regress_forces:
            raise ValueError("SCN: regress_forces=False is not supported (mlcalc's SCN predicts forces directly)")
        if distance_function not in DISTANCE_EXPANSIONS:
            raise ValueError(f"SCN: unknown distance_function {distance_function!r}; use {sorted(DISTANCE_EXPANSIONS)}")
        if num_resolutions not in (1, 2):
            raise ValueError(f"SCN: num_resolutions must be 1 or 2, got {num_resolutions}")
        if num_resolutions == 2 and lmax < 4:
            raise ValueError(f"SCN: num_resolutions=2 needs lmax >= 4 (far edges use max(4, lmax - 2)), got {lmax}")
        if cutoff <= 0 or max_num_neighbors < 1 or max_num_elements < 2:
            raise ValueError("SCN: cutoff, max_num_neighbors and max_num_elements must be positive")
        self.cutoff = float(cutoff)
        self.max_neighbors = int(max_num_neighbors)
        self.strict_max_neighbors = True
        self.max_num_elements = int(max_num_elements)
        self.max_elements = self.max_num_elements - 1  # atomic numbers index an embedding of this size
        self.lmax, self.mmax = lmax, mmax
        self.sphere_channels, self.sphere_channels_reduce = sphere_channels, sphere_channels_reduce
        self.num_sphere_samples = num_sphere_samples
        self.use_grid = use_grid
        self.num_resolutions = num_resolutions
        self.num_gaussians = int(cutoff / distance_resolution)
        self.sphere_basis = (lmax + 1) ** 2

        if num_resolutions == 1:
            hidden_list, lmax_list = [hidden_channels], [lmax]
            self.rank_cutoffs = [self.max_neighbors - 1]
        else:
            hidden_list, lmax_list = [hidden_channels, hidden_channels // 4], [lmax, max(4, lmax - 2)]
            self.rank_cutoffs = [NEAR_NEIGHBORS - 1, self.max_neighbors - 1]
        self.sphharm_list = [SphericalResolution(lm, mmax, num_taps, num_bands) for lm in lmax_list]

        self.act = nn.SiLU()
        self.sphere_embedding = nn.Embedding(self.max_num_elements, sphere_channels)
        self.distance_expansion = DISTANCE_EXPANSIONS[distance_function](
            0.0, cutoff, self.num_gaussians, basis_width_scalar
        )
        self.edge_blocks = nn.ModuleList(
            EdgeBlock(
                self.sphharm_list,
                sphere_channels,
                sphere_channels_reduce,
                hidden_list,
                self.distance_expansion,
                self.num_gaussians,
                self.max_num_elements,
                num_basis_functions,
                use_grid,
            )
            for _ in range(num_interactions)
        )
        self.energy_fc1 = Linear(sphere_channels, sphere_channels)
        self.energy_fc2 = Linear(sphere_channels, sphere_channels_reduce)
        self.energy_fc3 = Linear(sphere_channels_reduce, 1)
        self.force_fc1 = Linear(sphere_channels, sphere_channels)
        self.force_fc2 = Linear(sphere_channels, sphere_channels_reduce)
        self.force_fc3 = Linear(sphere_channels_reduce, 1)
        self._consts: dict[tuple[torch.device, torch.dtype], dict[str, Any]] = {}
        self.chunk_size: int | None = self.DEFAULT_CHUNK_SIZE

    @property
    def atom_chunk_size(self) -> int | None:
        """Atoms per chunk of the grid MLPs and output heads (None when ``chunk_size`` is None)."""
        if self.chunk_size is None:
            return None
        return max(1, int(self.chunk_size) // self.ATOMS_PER_EDGE_DIVISOR)

    # ------------------------------------------------------------------ constants
    def constants(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Position-independent tensors for (device, dtype), built once in float64 and cached."""
        key = (torch.device(device), dtype)
        if key not in self._consts:
            points = sphere.sphere_points(self.num_sphere_samples)
            res0 = self.sphharm_list[0]
            consts64: dict[str, Any] = {
                "points": points,
                "point_harmonics": sphere.sphere_point_harmonics(self.lmax, points),
                "tap": [res.tap_matrices() for res in self.sphharm_list],
                "combine": [res.combine_matrix() for res in self.sphharm_list],
            }
            if self.use_grid:
                consts64["to_grid"] = sphere.to_grid_matrix(res0.lmax, res0.num_bands)
                consts64["from_grid"] = sphere.from_grid_matrix(res0.lmax)
            self._consts[key] = {k: _cast(v, device, dtype) for k, v in consts64.items()}
        return self._consts[key]

    # ------------------------------------------------------------------ graph preparation
    def _edge_resolution(self, distance: Tensor, target: Tensor, num_atoms: int) -> Tensor:
        """Resolution of each edge from its distance rank among the target's edges; -1 beyond max_num_neighbors."""
        by_distance = torch.argsort(distance, stable=True)
        order = by_distance[torch.argsort(target[by_distance], stable=True)]
        rank = torch.empty_like(target)
        rank[order] = segment_ranks(target[order], num_atoms)
        resolution = torch.full_like(target, -1)
        for r in reversed(range(self.num_resolutions)):
            resolution = torch.where(rank <= self.rank_cutoffs[r], r, resolution)
        return resolution

    def _frames(
        self, edge_vec: Tensor, edge_index: Tensor, bounds: list[int], consts: dict[str, Any]
    ) -> list[EdgeFrames]:
        """Wigner matrices of the edge frames for every resolution (no gradient, as fairchem's detached frames)."""
        with torch.no_grad():
            alpha, beta, gamma = rotation_to_euler(edge_rot_mat(edge_vec))
            frames = []
            for r, res in enumerate(self.sphharm_list):
                sl = slice(bounds[r], bounds[r + 1])
                frames.append(res.frames(alpha[sl], beta[sl], gamma[sl], consts["tap"][r], edge_index[:, sl]))
        return frames

    # ------------------------------------------------------------------ forward
    def estimate_memory(self, graph: AtomGraph) -> int:
        """Peak bytes of one call (float32, resident memory): 0.65 GiB + 2,600 B per edge, fitted to
        ``benchmarks/memory.py`` on rattled fcc Cu with
        SCN t1-b1 (1,008 / 5,324 atoms, 40k / 213k edges: 0.74 / 1.14 GiB measured);
        the per-edge work runs ``chunk_size`` edges at a time, so larger models mostly add to the constant."""
        return int(0.65 * 1024**3 + 2600 * graph.num_edges)

    def forward(self, graph: AtomGraph) -> dict[str, Tensor]:
        pos = graph.pos
        dtype, device = pos.dtype, pos.device
        if self.sphere_embedding.weight.dtype != dtype:
            raise ValueError(f"SCN: graph dtype {dtype} differs from the model's {self.sphere_embedding.weight.dtype}")
        numbers = graph.numbers.long()
        if numbers.numel() and (int(numbers.min()) < 0 or int(numbers.max()) >= self.max_num_elements):
            raise ValueError(f"SCN: atomic numbers must be in [0, {self.max_num_elements - 1}] for this model")
        num_atoms = numbers.shape[0]
        consts = self.constants(device, dtype)

        edge_vec = graph.edge_vectors()
        distance = edge_vec.norm(dim=-1)
        resolution = self._edge_resolution(distance.detach(), graph.edge_index[1], num_atoms)
        groups = [torch.nonzero(resolution == r).squeeze(1) for r in range(self.num_resolutions)]
        order = torch.cat(groups)
        bounds = [0]
        for g in groups:
            bounds.append(bounds[-1] + int(g.numel()))
        edge_index, distance, edge_vec = graph.edge_index[:, order], gather(distance, order), gather(edge_vec, order)
        frames = self._frames(edge_vec, edge_index, bounds, consts)

        x = pos.new_zeros((num_atoms, self.sphere_basis, self.sphere_channels))
        x[:, 0, :] = self.sphere_embedding(numbers)
        chunk, atom_chunk = self.chunk_size, self.atom_chunk_size
        for i, block in enumerate(self.edge_blocks):
            update = block(x, numbers, distance, edge_index, frames, bounds, consts, chunk, atom_chunk)
            x = update if i == 0 else x + update
        del frames

        # output heads on the sphere points, atom_chunk atoms at a time
        step = max(1, num_atoms if atom_chunk is None else atom_chunk)
        heads = [self.heads(x[start : start + step], consts) for start in range(0, num_atoms, step)]
        if not heads:  # no atoms
            heads = [self.heads(x, consts)]
        node_energy = heads[0][0] if len(heads) == 1 else torch.cat([h[0] for h in heads])
        forces = heads[0][1] if len(heads) == 1 else torch.cat([h[1] for h in heads])
        energy = scatter_sum(node_energy, graph.batch, graph.num_graphs)
        return {"energy": energy, "forces": forces}

    def heads(self, x: Tensor, consts: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Per-atom raw energy (n,) and direct force (n, 3) of x (n, S, C), from its values at the sphere points."""
        num_atoms = x.shape[0]
        # sample the atoms' spherical functions at the sphere points: (n, P, C)
        x_points = torch.einsum("abc,pb->apc", x, consts["point_harmonics"]).reshape(-1, self.sphere_channels)
        node_energy = self.energy_fc3(self.act(self.energy_fc2(self.act(self.energy_fc1(x_points)))))
        node_energy = node_energy.view(num_atoms, self.num_sphere_samples).sum(dim=1) / self.num_sphere_samples

        force_mag = self.force_fc3(self.act(self.force_fc2(self.act(self.force_fc1(x_points)))))
        force_mag = force_mag.view(num_atoms, self.num_sphere_samples, 1)
        forces = (force_mag * consts["points"].view(1, -1, 3)).sum(dim=1) / self.num_sphere_samples
        return node_energy, forces
