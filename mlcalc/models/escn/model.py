"""eSCN (Passaro & Zitnick 2023, "Reducing SO(3) convolutions to SO(2)"), fairchem-core 1.10 compatible.

Direct forces (no stress). Energies are raw model outputs (fairchem's x0.001 included); the calculator
denormalises them. Edge frames use mlcalc's constant auxiliary vector (``mlcalc.nn.wigner.edge_rot_mat``),
so results are deterministic and independent of the global torch RNG.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mlcalc.graph import AtomGraph
from mlcalc.models.base import MLModel, register_model
from mlcalc.models.escn.interaction import EdgeFrames, LayerBlock
from mlcalc.models.escn.layers import EnergyBlock, ForceBlock
from mlcalc.models.escn.layout import ESCNLayout
from mlcalc.nn.scatter import scatter_sum
from mlcalc.nn.smearing import DISTANCE_EXPANSIONS
from mlcalc.nn.so3 import spherical_harmonics
from mlcalc.nn.wigner import edge_rot_mat, rotation_to_wigner


def sphere_points(num_points: int) -> Tensor:
    """fairchem's ``CalcSpherePoints`` (float32, same operations): golden-spiral points on the unit sphere scaled by
    an inverse local density, (P, 3). Their mean is not exactly zero (~4e-5 for P = 128)."""
    golden = (1 + 5**0.5) / 2
    i = torch.arange(num_points).view(-1, 1)
    theta = 2 * math.pi * i.float() / golden
    phi = torch.arccos(1 - 2 * (i.float() + 0.5) / num_points)
    points = torch.cat([theta.cos() * phi.sin(), theta.sin() * phi.sin(), phi.cos()], dim=1)
    dist2 = torch.sum((points.view(1, -1, 3) - points.view(-1, 1, 3)) ** 2, dim=2)
    scalar = 1.0 / torch.sum(torch.exp(-dist2 / (0.5 * 0.3)), dim=1)
    scalar = num_points * scalar / torch.sum(scalar)
    return points * scalar.view(-1, 1)


@register_model("escn", "eSCN")
class ESCN(MLModel):
    """Equivariant Spherical Channel Network with fairchem's hyperparameter names.

    Args:
        max_neighbors, cutoff (Å): graph definition (strict k-nearest truncation, as fairchem).
        max_num_elements: atomic numbers must be < this.
        num_layers: message-passing layers.
        lmax_list, mmax_list: max degree / order per resolution.
        sphere_channels: channels per resolution; hidden_channels: SO(2) convolution width;
        edge_channels: invariant edge feature size; num_sphere_samples: points of the output heads.
        distance_function: "gaussian", "sigmoid", "linearsigmoid" or "silu"; basis_width_scalar,
            distance_resolution (Å): distance basis (cutoff / distance_resolution functions).
        regress_forces: True: forces from the direct force head; False: an energy-only model (IS2RE, e.g. ODAC's
            ``eSCN-IS2RE-ODAC``) without a force head, whose forces are not available (the edge frames are
            detached, as in fairchem, so -dE/dx of it would not be its force either).
        resolution: S² grid resolution override (None: fairchem's per-(lmax, mmax) default).
        use_pbc, use_pbc_single, otf_graph, show_timing_info, activation_checkpoint: accepted, ignored.

    Attributes:
        chunk_size (edges, ``int | None``): number of edges whose messages are computed at once;
            each chunk's messages are summed into the atoms before the next chunk is computed, so the per-edge
            tensors of a call (e.g. gathered and rotated coefficients) exist for one chunk at a time: about
            110 kB per edge at the OC20 sizes (lmax 6, mmax 2, 128 channels, float32). The atom-wise grid
            MLP of every layer and the output heads take ``chunk_size // ATOMS_PER_EDGE_DIVISOR`` atoms at a
            time (an atom's grid tensors, 210 points x 256 channels, are about 4 times an edge's). None: all
            at once. Default ``DEFAULT_CHUNK_SIZE`` = 2048 edges, ~256 MB of transient tensors per chunk at those
            sizes. Not a hyperparameter and not in the state_dict; results do not depend on it beyond float
            rounding.

    forward(graph) -> {"energy": (B,), "forces": (N, 3)} raw (normalised) outputs in the dtype of graph.pos
    (energy only when ``regress_forces`` is False).
    """

    direct_forces = True
    supports_stress = False

    #: default ``chunk_size`` (edges)
    DEFAULT_CHUNK_SIZE = 2048
    #: atoms per chunk of the atom-wise loops = chunk_size // this
    ATOMS_PER_EDGE_DIVISOR = 4

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        regress_forces: bool = True,
        otf_graph: bool = False,
        max_neighbors: int = 40,
        cutoff: float = 8.0,
        max_num_elements: int = 90,
        num_layers: int = 8,
        lmax_list: list[int] | None = None,
        mmax_list: list[int] | None = None,
        sphere_channels: int = 128,
        hidden_channels: int = 256,
        edge_channels: int = 128,
        num_sphere_samples: int = 128,
        distance_function: str = "gaussian",
        basis_width_scalar: float = 1.0,
        distance_resolution: float = 0.02,
        show_timing_info: bool = False,
        resolution: int | None = None,
        activation_checkpoint: bool | None = False,
    ) -> None:
        super().__init__()
        lmax_list = [6] if lmax_list is None else [int(v) for v in lmax_list]
        mmax_list = [2] if mmax_list is None else [int(v) for v in mmax_list]
        self.capture_hparams(locals())
        if len(lmax_list) != len(mmax_list) or not lmax_list:
            raise ValueError(f"lmax_list {lmax_list} and mmax_list {mmax_list} must be non-empty and equally long")
        if any(m < 0 or m > lmax for lmax, m in zip(lmax_list, mmax_list, strict=True)):
            raise ValueError(f"need 0 <= mmax <= lmax per resolution, got lmax {lmax_list}, mmax {mmax_list}")
        if distance_function not in DISTANCE_EXPANSIONS:
            raise ValueError(
                f"distance_function must be one of {sorted(DISTANCE_EXPANSIONS)}, got {distance_function!r}"
            )
        if cutoff <= 0 or num_layers < 1 or max_num_elements < 1:
            raise ValueError(
                "need cutoff > 0, num_layers >= 1, max_num_elements >= 1; "
                f"got {cutoff}, {num_layers}, {max_num_elements}"
            )

        self.cutoff = float(cutoff)
        self.max_neighbors = int(max_neighbors)
        self.strict_max_neighbors = True
        self.regress_forces = bool(regress_forces)
        self.max_num_elements = int(max_num_elements)
        self.max_elements = self.max_num_elements - 1
        self.num_layers = int(num_layers)
        self.lmax_list, self.mmax_list = lmax_list, mmax_list
        self.num_resolutions = len(lmax_list)
        self.sphere_channels = int(sphere_channels)
        self.sphere_channels_all = self.num_resolutions * self.sphere_channels
        self.num_sphere_samples = int(num_sphere_samples)
        self.resolution = resolution
        self.act = nn.SiLU()

        self.sphere_embedding = nn.Embedding(self.max_num_elements, self.sphere_channels_all)
        num_basis = int(cutoff / distance_resolution)
        self.distance_expansion = DISTANCE_EXPANSIONS[distance_function](0.0, cutoff, num_basis, basis_width_scalar)
        self.layer_blocks = nn.ModuleList(
            LayerBlock(
                i,
                self.sphere_channels,
                hidden_channels,
                edge_channels,
                lmax_list,
                mmax_list,
                self.distance_expansion,
                self.max_num_elements,
                self.act,
            )
            for i in range(self.num_layers)
        )
        self.energy_block = EnergyBlock(self.sphere_channels_all, self.num_sphere_samples, self.act)
        if self.regress_forces:  # energy-only (IS2RE) models have no force head, as in fairchem
            self.force_block = ForceBlock(self.sphere_channels_all, self.num_sphere_samples, self.act)

        # fairchem stores these (fixed) values as parameters, so they are part of its state_dict
        points = sphere_points(self.num_sphere_samples)
        self.sphere_points = nn.Parameter(points, requires_grad=False)
        self.sphharm_weights = nn.ParameterList(
            nn.Parameter(spherical_harmonics(lmax, points.double(), normalize=False).float(), requires_grad=False)
            for lmax in lmax_list
        )
        self._layouts: dict[tuple[torch.device, torch.dtype], ESCNLayout] = {}
        self.chunk_size: int | None = self.DEFAULT_CHUNK_SIZE

    @property
    def atom_chunk_size(self) -> int | None:
        """Atoms per chunk of the grid MLPs and output heads (None when ``chunk_size`` is None)."""
        if self.chunk_size is None:
            return None
        return max(1, int(self.chunk_size) // self.ATOMS_PER_EDGE_DIVISOR)

    def layout(self, device: torch.device, dtype: torch.dtype) -> ESCNLayout:
        """Position-independent index maps and grid matrices, built once per (device, dtype)."""
        key = (torch.device(device), dtype)
        layout = self._layouts.get(key)
        if layout is None:
            layout = ESCNLayout.build(self.lmax_list, self.mmax_list, self.resolution, dtype, key[0])
            self._layouts[key] = layout
        return layout

    def edge_frames(self, edge_vec: Tensor, layout: ESCNLayout) -> EdgeFrames:
        """Wigner-D matrices of the edge frames per resolution (detached, as fairchem), for edge_vec (E, 3) in Å.

        Built ``chunk_size`` edges at a time: the full (E, S, S) Wigner matrices are never held for all edges."""
        num_edges = edge_vec.shape[0]
        lmax = max(self.lmax_list)
        rotate = [
            edge_vec.new_empty((num_edges, int(idx.numel()), size))
            for size, idx in zip(layout.num_coefficients, layout.reduced_index, strict=True)
        ]
        step = max(1, num_edges if self.chunk_size is None else int(self.chunk_size))
        for start in range(0, num_edges, step):
            end = min(start + step, num_edges)
            wigner = rotation_to_wigner(edge_rot_mat(edge_vec[start:end]), lmax)
            for out, size, idx in zip(rotate, layout.num_coefficients, layout.reduced_index, strict=True):
                out[start:end] = wigner[:, idx, :size]
        return EdgeFrames(rotate)

    def heads(self, x: Tensor, layout: ESCNLayout) -> tuple[Tensor, Tensor | None]:
        """Per-atom raw energy (n,) and direct force (n, 3) (None without a force head) of x (n, sum full, C), from
        the channel values at the sphere points (n * P, R * C)."""
        dtype = x.dtype
        parts = torch.split(x, layout.num_coefficients, dim=1)
        x_pt = torch.cat(
            [torch.einsum("abc,pb->apc", p, w.to(dtype)) for p, w in zip(parts, self.sphharm_weights, strict=True)],
            dim=2,
        ).reshape(-1, self.sphere_channels_all)
        node_energy = self.energy_block(x_pt).view(-1)
        if not self.regress_forces:
            return node_energy, None
        return node_energy, self.force_block(x_pt, self.sphere_points.to(dtype))

    def estimate_memory(self, graph: AtomGraph) -> int:
        """Peak bytes of one call (float32, resident memory): 0.6 GiB + 11,500 B per edge, fitted to
        ``benchmarks/memory.py`` on rattled fcc Cu with
        eSCN L6-M2-Lay12 (1,008 / 5,324 atoms, 20k / 106k edges: 0.82 / 1.72 GiB measured);
        the per-edge work runs ``chunk_size`` edges at a time, so larger models mostly add to the constant."""
        return int(0.6 * 1024**3 + 11500 * graph.num_edges)

    def _check_input(self, graph: AtomGraph) -> None:
        numbers = graph.numbers
        if numbers.numel() and (int(numbers.min()) < 0 or int(numbers.max()) >= self.max_num_elements):
            raise ValueError(
                f"eSCN accepts atomic numbers 0..{self.max_num_elements - 1}; "
                f"got {int(numbers.min())}..{int(numbers.max())}"
            )

    def forward(self, graph: AtomGraph) -> dict[str, Tensor]:
        """Raw energy (B,) and direct forces (N, 3) in the dtype of ``graph.pos``."""
        self._check_input(graph)
        pos = graph.pos
        dtype, device = pos.dtype, pos.device
        layout = self.layout(device, dtype)
        numbers = graph.numbers.long()
        edge_index = graph.edge_index
        edge_vec = graph.edge_vectors()
        edge_distance = torch.linalg.vector_norm(edge_vec, dim=-1)
        frames = self.edge_frames(edge_vec, layout)

        # l = 0 coefficient of every resolution from the atomic-number embedding
        num_atoms = pos.shape[0]
        emb = self.sphere_embedding(numbers).to(dtype).view(num_atoms, self.num_resolutions, self.sphere_channels)
        parts = []
        for i, size in enumerate(layout.num_coefficients):
            part = emb.new_zeros((num_atoms, size, self.sphere_channels))
            part[:, 0] = emb[:, i]
            parts.append(part)
        x = torch.cat(parts, dim=1)

        chunk, atom_chunk = self.chunk_size, self.atom_chunk_size
        for i, block in enumerate(self.layer_blocks):
            update = block(x, numbers, edge_distance, edge_index, frames, layout, chunk, atom_chunk)
            x = update if i == 0 else x + update
        del frames

        # output heads on the channel values at the sphere points, atom_chunk atoms at a time
        step = max(1, num_atoms if atom_chunk is None else atom_chunk)
        heads = [self.heads(x[start : start + step], layout) for start in range(0, num_atoms, step)]
        if not heads:  # no atoms
            heads = [self.heads(x, layout)]
        node_energy = heads[0][0] if len(heads) == 1 else torch.cat([h[0] for h in heads])
        energy = scatter_sum(node_energy, graph.batch, graph.num_graphs) * 0.001
        if not self.regress_forces:
            return {"energy": energy}
        forces = heads[0][1] if len(heads) == 1 else torch.cat([h[1] for h in heads])
        return {"energy": energy, "forces": forces}
