"""GemNet-OC (Gasteiger et al. 2022) in pure PyTorch, numerically equivalent to fairchem-core 1.10's ``gemnet_oc``.

The calculator builds one graph (the largest: cutoff_aint / max_neighbors_aint when an atom interaction is on,
else cutoff / max_neighbors); the model sub-selects the main, atom-edge and quadruplet graphs from it exactly as
fairchem does, symmetrises the main graph, builds triplet/quadruplet indices and returns raw (normalised)
outputs: energy (B,) and, with ``direct_forces``, forces (N, 3) in the dtype of the graph.

Two properties inherited from fairchem (reproduced for parity): the main graph is symmetrised by keeping the
edges with source index < target index, so when max_neighbors keeps an edge for only one of its two atoms the
result depends on the atom order; and the quadruplet dihedral angle is undefined where a bond is collinear with
the b-a axis. There the value is fairchem's (~pi/2) and the derivative zero (``mlcalc.nn.geometry``): exact along
collinear image chains (a, a + R, a + 2R); where only symmetry makes a row collinear (the layer rows of an ideal
fcc111 slab) the energy itself jumps when the row bends (~1e-2 eV), and the forces are the symmetric convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mlcalc.graph import AtomGraph
from mlcalc.memory import release_free_heap
from mlcalc.models.base import MLModel, register_model
from mlcalc.models.gemnet_oc import indices as ix
from mlcalc.models.gemnet_oc.bases import CircularBasisLayer, RadialBasis, SphericalBasisLayer
from mlcalc.models.gemnet_oc.buckets import BucketedBasis
from mlcalc.models.gemnet_oc.interaction import InteractionBlock
from mlcalc.models.gemnet_oc.layers import (
    PLAIN,
    Aggregation,
    AtomEmbedding,
    BasisEmbedding,
    Chunking,
    Dense,
    EdgeEmbedding,
    NeighborBasis,
    ResidualLayer,
    TripletBasis,
    dot_clamped,
    get_initializer,
    map_rows,
    needs_grad,
)
from mlcalc.models.gemnet_oc.output import OutputBlock
from mlcalc.models.gemnet_oc.scaling import apply_scale_dict, load_gemnet_state, read_scale_file
from mlcalc.nn.chunking import checkpoint
from mlcalc.nn.geometry import dihedral_angle
from mlcalc.nn.scatter import gather, scatter_mean, scatter_sum
from mlcalc.nn.workspace import Workspace


@dataclass
class GemNetIndices:
    """The graphs (``indices.Edges``) and interaction indices of one forward pass."""

    main: ix.Edges
    id_swap: Tensor
    trip_e2e: ix.Triplets
    a2a: ix.Edges | None = None
    a2ee2a: ix.Edges | None = None
    qint: ix.Edges | None = None
    quad: ix.Quadruplets | None = None
    trip_a2e: ix.Triplets | None = None
    trip_e2a: ix.Triplets | None = None
    a2ee2a_agg: Aggregation | None = None
    a2a_agg: Aggregation | None = None


def _angle(a: Tensor, b: Tensor) -> Tensor:
    """Angle (rad) between vectors a and b: atan2(max(|a x b|, 1e-9), a . b), finite derivatives at degeneracy."""
    return dihedral_angle(a, b, floor=1e-9)


def _isclose(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-8 + 1e-5 * abs(b)


#: default ``GemNetOC.chunk_size``: 32768 rows, i.e. 64 MiB per (rows, 512) float32 edge tensor
DEFAULT_CHUNK_SIZE = 2**15


class _ReleaseHeap(torch.autograd.Function):
    """Identity that calls ``mlcalc.memory.release_free_heap`` when it runs and when its gradient does."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        release_free_heap()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        release_free_heap()
        return grad


@register_model("gemnet_oc", "GemNetOC", "gemnet_oc_s2ef")
class GemNetOC(MLModel):
    """GemNet-OC with fairchem's hyperparameter names (see fairchem ``GemNetOC`` for their meaning).

    Cutoffs in Å. ``qint_tags``: atom tags (0 bulk, 1 surface, 2 adsorbate) whose edges take part in
    quadruplet interactions; with none such atom the quadruplet messages are zero. ``num_elements``: embedding
    rows, atomic numbers 1..num_elements. Graph-construction options of fairchem (use_pbc, otf_graph, ...) are
    accepted and ignored; ``scale_file`` is read if the file exists (.json/.pt), else the scale factors must come
    from the checkpoint (state_dict entries or ``scale_dict``, see ``load_checkpoint_state``).

    Memory (per-instance attributes, not hyperparameters; they change no result beyond rounding):

    - ``chunk_size`` (default ``DEFAULT_CHUNK_SIZE``; None = everything at once): rows per chunk of the large
      per-row computations: edges (or triplets, a2a edges) for the per-edge MLPs and bases. The padded bilinear
      layers take chunks of whole slots (output edges x triplets per edge, atoms x a2a neighbours) with as many
      values: chunk_size x emb_size_edge / emb_size_trip_in (aint_in, quad_in) padded rows, at least one slot.
      Only one chunk's intermediates exist at a time, so the transient memory of a call is bounded by about
      chunk_size x emb_size_edge values per live tensor instead of growing with the structure.
    - ``activation_checkpointing`` (default True; fairchem v2's name): while autograd records in eval mode
      (gradient forces and stress) and the call spans more than one chunk (``spans_chunks``; smaller calls keep
      their few activations and run at full speed), autograd keeps only the inputs of each block (edge
      embedding + first blocks, each interaction and output block), of each chunk and of each residual layer of
      the edge update, and recomputes the rest in the backward (``mlcalc.nn.chunking.checkpoint``): the memory
      of a call grows with about seven edge tensors (E, emb_size_edge) plus one chunk, instead of ~100 edge
      tensors. Costs about two more forwards per call. Off in training mode (``self.training``: the memory/speed
      trade-off of training is left to the caller) and under ``torch.compile`` (where chunking is off as well:
      the compiled graph keeps sizes symbolic).
    """

    def __init__(
        self,
        num_spherical: int,
        num_radial: int,
        num_blocks: int,
        emb_size_atom: int,
        emb_size_edge: int,
        emb_size_trip_in: int,
        emb_size_trip_out: int,
        emb_size_quad_in: int,
        emb_size_quad_out: int,
        emb_size_aint_in: int,
        emb_size_aint_out: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        emb_size_sbf: int,
        num_before_skip: int,
        num_after_skip: int,
        num_concat: int,
        num_atom: int,
        num_output_afteratom: int,
        num_atom_emb_layers: int = 0,
        num_global_out_layers: int = 2,
        regress_forces: bool = True,
        direct_forces: bool = False,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        scale_backprop_forces: bool = False,
        cutoff: float = 6.0,
        cutoff_qint: float | None = None,
        cutoff_aeaint: float | None = None,
        cutoff_aint: float | None = None,
        max_neighbors: int = 50,
        max_neighbors_qint: int | None = None,
        max_neighbors_aeaint: int | None = None,
        max_neighbors_aint: int | None = None,
        enforce_max_neighbors_strictly: bool = True,
        rbf: dict | None = None,
        rbf_spherical: dict | None = None,
        envelope: dict | None = None,
        cbf: dict | None = None,
        sbf: dict | None = None,
        extensive: bool = True,
        forces_coupled: bool = False,
        output_init: str = "HeOrthogonal",
        activation: str = "silu",
        quad_interaction: bool = False,
        atom_edge_interaction: bool = False,
        edge_atom_interaction: bool = False,
        atom_interaction: bool = False,
        scale_basis: bool = False,
        qint_tags: list[int] | None = None,
        num_elements: int = 83,
        otf_graph: bool = False,
        scale_file: str | None = None,
    ) -> None:
        super().__init__()
        self.capture_hparams(locals())
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        rbf = rbf or {"name": "gaussian"}
        rbf_spherical = rbf_spherical or rbf
        envelope = envelope or {"name": "polynomial", "exponent": 5}
        cbf = cbf or {"name": "spherical_harmonics"}
        sbf = sbf or {"name": "spherical_harmonics"}
        self.num_blocks = num_blocks
        self.extensive = extensive
        self.activation = activation
        self.use_quad = quad_interaction
        self.use_a2e = atom_edge_interaction
        self.use_e2a = edge_atom_interaction
        self.use_a2a = atom_interaction
        self.direct_forces = direct_forces
        self.regress_forces = bool(regress_forces)
        self.forces_coupled = forces_coupled
        self.max_elements = num_elements
        self.supports_stress = not direct_forces and self.regress_forces
        self.register_buffer("qint_tags", torch.tensor([0, 1, 2] if qint_tags is None else list(qint_tags)), False)
        self.uses_a2a_graph = atom_edge_interaction or edge_atom_interaction or atom_interaction
        self._set_cutoffs(cutoff, cutoff_qint, cutoff_aeaint, cutoff_aint)
        self._set_max_neighbors(max_neighbors, max_neighbors_qint, max_neighbors_aeaint, max_neighbors_aint)
        self.strict_max_neighbors = enforce_max_neighbors_strictly
        # the one graph the calculator builds
        self.cutoff = self.cutoff_aint if self.uses_a2a_graph else self.cutoff_main
        self.max_neighbors = self.max_neighbors_aint if self.uses_a2a_graph else self.max_neighbors_main

        self._init_bases(num_radial, num_spherical, rbf, rbf_spherical, envelope, cbf, sbf, scale_basis)
        self._init_shared_basis_layers(num_radial, num_spherical, emb_size_rbf, emb_size_cbf, emb_size_sbf)
        self.atom_emb = AtomEmbedding(emb_size_atom, num_elements)
        self.edge_emb = EdgeEmbedding(emb_size_atom, num_radial, emb_size_edge, activation=activation)
        self.int_blocks = nn.ModuleList(
            InteractionBlock(
                emb_size_atom, emb_size_edge, emb_size_trip_in, emb_size_trip_out, emb_size_quad_in,
                emb_size_quad_out, emb_size_aint_in, emb_size_aint_out, emb_size_rbf, emb_size_cbf, emb_size_sbf,
                num_before_skip, num_after_skip, num_concat, num_atom, num_atom_emb_layers,
                quad_interaction, atom_edge_interaction, edge_atom_interaction, atom_interaction, activation,
            )
            for _ in range(num_blocks)
        )  # fmt: skip
        self.out_blocks = nn.ModuleList(
            OutputBlock(emb_size_atom, emb_size_edge, emb_size_rbf, num_atom, num_output_afteratom, activation,
                        direct_forces)
            for _ in range(num_blocks + 1)
        )  # fmt: skip
        self.out_mlp_E = nn.Sequential(
            Dense(emb_size_atom * (num_blocks + 1), emb_size_atom, activation=activation),
            *[ResidualLayer(emb_size_atom, activation=activation) for _ in range(num_global_out_layers)],
        )
        self.out_energy = Dense(emb_size_atom, 1, bias=False, activation=None)
        if direct_forces:
            self.out_mlp_F = nn.Sequential(
                Dense(emb_size_edge * (num_blocks + 1), emb_size_edge, activation=activation),
                *[ResidualLayer(emb_size_edge, activation=activation) for _ in range(num_global_out_layers)],
            )
            self.out_forces = Dense(emb_size_edge, 1, bias=False, activation=None)
        init = get_initializer(output_init)
        self.out_energy.reset_parameters(init)
        if direct_forces:
            self.out_forces.reset_parameters(init)

        #: values per padded row of the padded layers (and of an edge row), for their chunk sizes
        self._pad_widths = {
            "edge": emb_size_edge, "trip": emb_size_trip_in, "quad": emb_size_quad_in, "a2a": emb_size_aint_in
        }  # fmt: skip
        self.chunk_size: int | None = DEFAULT_CHUNK_SIZE
        self.activation_checkpointing: bool = True
        #: scratch buffers of the padded layers kept across calls (not state; ``mlcalc.nn.workspace``)
        self.scratch = Workspace()

        self.scale_file = scale_file
        values = read_scale_file(scale_file)
        if values is not None:
            apply_scale_dict(self, values)

    # ------------------------------------------------------------------------------------------ set-up
    def _set_cutoffs(self, cutoff, cutoff_qint, cutoff_aeaint, cutoff_aint) -> None:
        self.cutoff_main = float(cutoff)
        use_ae = self.use_a2e or self.use_e2a
        self.cutoff_aeaint = float(cutoff_aeaint) if use_ae and cutoff_aeaint is not None else self.cutoff_main
        self.cutoff_qint = float(cutoff_qint) if self.use_quad and cutoff_qint is not None else self.cutoff_main
        if self.use_a2a and cutoff_aint is not None:
            self.cutoff_aint = float(cutoff_aint)
        else:
            self.cutoff_aint = max(self.cutoff_main, self.cutoff_aeaint, self.cutoff_qint)
        if max(self.cutoff_main, self.cutoff_aeaint, self.cutoff_qint) > self.cutoff_aint:
            raise ValueError("cutoff, cutoff_aeaint and cutoff_qint must not exceed cutoff_aint")
        if self.use_quad and not self.uses_a2a_graph and self.cutoff_qint > self.cutoff_main:
            raise ValueError("cutoff_qint must not exceed cutoff when no atom interaction is used")

    def _set_max_neighbors(self, max_neighbors, max_neighbors_qint, max_neighbors_aeaint, max_neighbors_aint) -> None:
        self.max_neighbors_main = int(max_neighbors)
        use_ae = self.use_a2e or self.use_e2a
        self.max_neighbors_aeaint = (
            int(max_neighbors_aeaint) if use_ae and max_neighbors_aeaint is not None else self.max_neighbors_main
        )
        self.max_neighbors_qint = (
            int(max_neighbors_qint) if self.use_quad and max_neighbors_qint is not None else self.max_neighbors_main
        )
        if self.use_a2a and max_neighbors_aint is not None:
            self.max_neighbors_aint = int(max_neighbors_aint)
        else:
            self.max_neighbors_aint = max(self.max_neighbors_main, self.max_neighbors_aeaint, self.max_neighbors_qint)
        if max(self.max_neighbors_main, self.max_neighbors_aeaint, self.max_neighbors_qint) > self.max_neighbors_aint:
            raise ValueError(
                "max_neighbors, max_neighbors_aeaint and max_neighbors_qint must not exceed max_neighbors_aint"
            )
        if self.use_quad and not self.uses_a2a_graph and self.max_neighbors_qint > self.max_neighbors_main:
            raise ValueError("max_neighbors_qint must not exceed max_neighbors when no atom interaction is used")

    def _init_bases(self, num_radial, num_spherical, rbf, rbf_spherical, envelope, cbf, sbf, scale_basis) -> None:
        # module registration order (and sharing) as in fairchem, so state_dict keys and scale paths agree
        def radial(cut: float, kind: dict) -> RadialBasis:
            return RadialBasis(num_radial, cut, rbf=kind, envelope=envelope, scale_basis=scale_basis)

        self.radial_basis = radial(self.cutoff_main, rbf)
        radial_spherical = radial(self.cutoff_main, rbf_spherical)
        if self.use_quad:
            self.cbf_basis_qint = CircularBasisLayer(
                num_spherical, radial(self.cutoff_qint, rbf_spherical), cbf, scale_basis
            )
            self.sbf_basis_qint = SphericalBasisLayer(num_spherical, radial_spherical, sbf, scale_basis)
        if self.use_a2e:
            self.radial_basis_aeaint = radial(self.cutoff_aeaint, rbf)
            self.cbf_basis_aeint = CircularBasisLayer(num_spherical, radial_spherical, cbf, scale_basis)
        if self.use_e2a:
            self.radial_basis_aeaint = radial(self.cutoff_aeaint, rbf)
            self.cbf_basis_eaint = CircularBasisLayer(
                num_spherical, radial(self.cutoff_aeaint, rbf_spherical), cbf, scale_basis
            )
        if self.use_a2a:
            self.radial_basis_aint = radial(self.cutoff_aint, rbf)
        self.cbf_basis_tint = CircularBasisLayer(num_spherical, radial_spherical, cbf, scale_basis)

    def _init_shared_basis_layers(self, num_radial, num_spherical, emb_rbf, emb_cbf, emb_sbf) -> None:
        if self.use_quad:
            self.mlp_rbf_qint = Dense(num_radial, emb_rbf, activation=None)
            self.mlp_cbf_qint = BasisEmbedding(num_radial, emb_cbf, num_spherical)
            self.mlp_sbf_qint = BasisEmbedding(num_radial, emb_sbf, num_spherical**2)
        if self.use_a2e:
            self.mlp_rbf_aeint = Dense(num_radial, emb_rbf, activation=None)
            self.mlp_cbf_aeint = BasisEmbedding(num_radial, emb_cbf, num_spherical)
        if self.use_e2a:
            self.mlp_rbf_eaint = Dense(num_radial, emb_rbf, activation=None)
            self.mlp_cbf_eaint = BasisEmbedding(num_radial, emb_cbf, num_spherical)
        if self.use_a2a:
            self.mlp_rbf_aint = BasisEmbedding(num_radial, emb_rbf)
        self.mlp_rbf_tint = Dense(num_radial, emb_rbf, activation=None)
        self.mlp_cbf_tint = BasisEmbedding(num_radial, emb_cbf, num_spherical)
        self.mlp_rbf_h = Dense(num_radial, emb_rbf, activation=None)
        self.mlp_rbf_out = Dense(num_radial, emb_rbf, activation=None)

    # ------------------------------------------------------------------------------------------ graphs
    def build_indices(self, graph: AtomGraph) -> GemNetIndices:
        """Sub-select the model's graphs from ``graph`` and build all interaction indices."""
        n = graph.num_atoms
        if graph.cutoff and graph.cutoff < self.cutoff - 1e-8:
            raise ValueError(f"the graph was built with cutoff {graph.cutoff} Å < the model's {self.cutoff} Å")
        full = ix.Edges.from_vectors(graph.edge_index[0], graph.edge_index[1], graph.cell_offsets, graph.edge_vectors())
        if graph.cutoff and not _isclose(graph.cutoff, self.cutoff):
            full = full.select(full.dist <= self.cutoff)
        strict = self.strict_max_neighbors
        main_sel = (self.cutoff_main, self.max_neighbors_main)
        if self.uses_a2a_graph:
            a2a = parent = full
            parent_sel = (self.cutoff_aint, self.max_neighbors_aint)
            main = ix.subselect(a2a, n, *main_sel, *parent_sel, strict)
            a2ee2a = ix.subselect(a2a, n, self.cutoff_aeaint, self.max_neighbors_aeaint, *parent_sel, strict)
        else:  # the calculator's graph is the main graph; qint is sub-selected from it
            a2a = a2ee2a = None
            main = parent = full
            parent_sel = main_sel
        qint = None
        if self.use_quad:
            qint = ix.subselect(parent, n, self.cutoff_qint, self.max_neighbors_qint, *parent_sel, strict)
            # only edges touching an atom tagged in qint_tags take part in quadruplets
            tagged = torch.isin(graph.tags, self.qint_tags.to(graph.tags.device))
            qint = qint.select(tagged[qint.src] | tagged[qint.dst])

        main, id_swap = ix.symmetrize(main)
        idx = GemNetIndices(main=main, id_swap=id_swap, trip_e2e=ix.get_triplets(main, n), a2a=a2a, a2ee2a=a2ee2a)
        aggs = [idx.trip_e2e.agg]
        if self.use_quad:
            idx.qint = qint
            idx.quad = ix.get_quadruplets(main, qint, n)
            aggs.append(idx.quad.agg)
        if self.use_a2e:
            idx.trip_a2e = ix.get_mixed_triplets(a2ee2a, main, n)
            aggs.append(idx.trip_a2e.agg)
        if self.use_e2a:
            idx.trip_e2a = ix.get_mixed_triplets(main, a2ee2a, n)
            idx.a2ee2a_agg = ix.neighbor_aggregation(a2ee2a, n)
            aggs += [idx.trip_e2a.agg, idx.a2ee2a_agg]
        if self.use_a2a:
            idx.a2a_agg = ix.neighbor_aggregation(a2a, n)
            aggs.append(idx.a2a_agg)
        ix.resolve_kmax(aggs)
        for agg in aggs:
            agg.pool = self.scratch
        rows = self.chunking().rows
        if rows is not None:  # a padded chunk holds as many values as an edge chunk: rows x emb_size_edge

            def budget(width: int) -> int:
                return max(1, rows * self._pad_widths["edge"] // width)

            layouts = [(idx.trip_e2e.agg, budget(self._pad_widths["trip"]))]
            if self.use_quad:
                layouts.append((idx.quad.agg, budget(self._pad_widths["quad"])))
            if self.use_a2e:
                layouts.append((idx.trip_a2e.agg, budget(self._pad_widths["trip"])))
            if self.use_e2a:
                layouts.append((idx.a2ee2a_agg, budget(self._pad_widths["trip"])))
            if self.use_a2a:
                layouts.append((idx.a2a_agg, budget(self._pad_widths["a2a"])))
            nested = [(idx.a2ee2a_agg, idx.trip_e2a.agg)] if self.use_e2a else []
            ix.plan_chunks(layouts, nested)
        return idx

    def chunking(self, idx: GemNetIndices | None = None) -> Chunking:
        """How this call runs (see the class docstring): ``chunk_size`` rows per chunk and, while autograd records
        in eval mode, activation checkpointing; everything at once under ``torch.compile``. Given the call's
        indices ``idx``, checkpointing is kept only if the call spans more than one chunk (``spans_chunks``)."""
        if torch.compiler.is_compiling():
            return PLAIN
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not self.training
        if recompute and idx is not None:
            recompute = self.spans_chunks(idx)
        return Chunking(self.chunk_size, recompute)

    def spans_chunks(self, idx: GemNetIndices) -> bool:
        """Whether any row-wise or padded computation of the call with indices ``idx`` takes more than one chunk
        of ``chunk_size`` rows. A call that fits in one chunk keeps its activations for the backward: they are
        small, and recomputing them would cost about two more forwards (2.5x the time of a 37-atom call of the
        shipped checkpoint)."""
        rows = self.chunk_size
        if rows is None:
            return False
        # rows of the row-wise maps (edges, and the quadruplets' input triplets); triplets and quadruplets
        # themselves are only handled through their padded layouts, chunked by ``agg.chunks``
        counts = [idx.main.num]
        if idx.a2ee2a is not None:
            counts.append(idx.a2ee2a.num)
        if idx.quad is not None:
            counts.append(idx.quad.triplet_in.out.numel())
        aggs = [idx.trip_e2e.agg]
        for name in ("quad", "trip_a2e", "trip_e2a"):
            part = getattr(idx, name, None)
            if part is not None:
                aggs.append(part.agg)
        for name in ("a2ee2a_agg", "a2a_agg"):
            if getattr(idx, name, None) is not None:
                aggs.append(getattr(idx, name))
        return max(counts) > rows or any(len(agg.chunk_list()) > 1 for agg in aggs)

    def get_bases(self, idx: GemNetIndices, chunking: Chunking | None = None) -> dict[str, Any]:
        """Raw bases of all graphs and their shared down-projections. Per-edge bases are computed in chunks
        (``chunking``, default ``self.chunking()``), so only their projections exist whole; the padded triplet and
        atom-to-atom bases (``TripletBasis``, ``NeighborBasis``) are built chunk by chunk where they are used."""
        ck = self.chunking() if chunking is None else chunking
        main, trip = idx.main, idx.trip_e2e
        rad_main = map_rows(self.radial_basis, [main.dist], (), ck)  # (E, num_radial)
        bases: dict[str, Any] = {"rad_main": rad_main}
        dense = {"tint": self.mlp_rbf_tint, "h": self.mlp_rbf_h, "out": self.mlp_rbf_out}
        if self.use_e2a:
            dense["eaint"] = self.mlp_rbf_eaint
        if self.use_quad:
            dense["qint"] = self.mlp_rbf_qint
        # (E, emb_size_rbf) each, from one pass over rad_main
        projected = map_rows(lambda r: tuple(layer(r) for layer in dense.values()), [rad_main], (), ck)
        rad = dict(zip(dense, projected, strict=True))
        bases["e2e"] = {
            "rad": rad["tint"],
            "cir": self._circular(self.cbf_basis_tint, self.mlp_cbf_tint, main, main, trip, ck),
        }
        if self.use_quad and idx.quad.out.numel() > 0:  # else the quadruplet message is 0 and skipped
            quad, qint = idx.quad, idx.qint
            # d -> b -> a
            v_ba = gather(qint.vector, quad.triplet_in.out)
            v_db = gather(main.vector, quad.triplet_in.in_)
            cos_abd = dot_clamped(v_ba, v_db)
            cross_db = gather(torch.cross(v_db, v_ba, dim=-1), quad.trip_in_to_quad)
            # c -> a <- b
            v_ca = gather(main.vector, quad.triplet_out.out)
            v_ba = gather(qint.vector, quad.triplet_out.in_)
            cos_cab_q = dot_clamped(v_ca, v_ba)
            cross_ca = gather(torch.cross(v_ca, v_ba, dim=-1), quad.trip_out_to_quad)
            dihedral = _angle(cross_ca, cross_db)  # c -> a - b <- d (half angle, parity ignored)
            rad_cir_q, cir_q = self.cbf_basis_qint(qint.dist, cos_abd)
            cos_cab_q = gather(cos_cab_q, quad.trip_out_to_quad)
            factors = None if needs_grad(dihedral) else self.sbf_basis_qint.angular_factors(cos_cab_q, dihedral)
            if factors is None:
                rad_sph_q, sph_q = self.sbf_basis_qint(main.dist, cos_cab_q, dihedral)
                sph = self.mlp_sbf_qint(rad_sph_q, sph_q, sph_agg=quad.agg)
            else:  # the outer product built in the padded layout: no (Q, n^2) tensor, one pass over the padding
                rad_sph_q = self.mlp_sbf_qint.project(self.sbf_basis_qint.radial_basis(main.dist))
                plan = quad.agg.bucket_plan()
                if plan is not None:  # one chunk: padded per bucket of similar quadruplet counts
                    sph = (rad_sph_q, BucketedBasis.outer_product(plan, *factors))
                else:
                    rows = slice(0, quad.out.shape[0])
                    first, second = (quad.agg.pad_gather(f, 0, quad.agg.size, rows) for f in factors)  # (E, kmax, n)
                    outer = (first[:, :, :, None] * second[:, :, None, :]).flatten(2)  # (E, kmax, n^2)
                    sph = (rad_sph_q, torch.transpose(outer, 1, 2))
            bases["qint"] = {
                "rad": rad["qint"],
                "cir": self.mlp_cbf_qint(rad_cir_q, cir_q, sph_outer=quad.triplet_in.out),
                "sph": sph,
            }
        if self.use_a2e:
            a2ee2a, trip = idx.a2ee2a, idx.trip_a2e
            bases["a2e"] = {
                "rad": map_rows(lambda d: self.mlp_rbf_aeint(self.radial_basis_aeaint(d)), [a2ee2a.dist], (), ck),
                "cir": self._circular(self.cbf_basis_aeint, self.mlp_cbf_aeint, main, a2ee2a, trip, ck),
            }
        if self.use_e2a:
            a2ee2a, trip = idx.a2ee2a, idx.trip_e2a
            bases["e2a"] = {
                "rad": rad["eaint"],
                "cir": self._circular(
                    self.cbf_basis_eaint, self.mlp_cbf_eaint, a2ee2a, main, trip, ck, rad_agg=idx.a2ee2a_agg
                ),
            }
        if self.use_a2a:
            a2a_basis = NeighborBasis(self.radial_basis_aint, self.mlp_rbf_aint, idx.a2a.dist, idx.a2a_agg)
            bases["a2a"] = a2a_basis.whole() if self._reuse_bases(ck, idx.a2a_agg) else a2a_basis
        bases["atom_update"] = rad["h"]
        bases["output"] = rad["out"]
        return bases

    @staticmethod
    def _reuse_bases(ck: Chunking, *aggs: Aggregation | None) -> bool:
        """Whether a lazily built basis is built once per call and kept (the layouts are one chunk each and
        nothing is recomputed): it is then the same for every interaction block, as in fairchem. Otherwise each
        block builds it chunk by chunk, so that no whole padded layout (nor its gradient) exists."""
        return not ck.checkpoint and all(a is None or len(a.chunk_list()) == 1 for a in aggs)

    @classmethod
    def _circular(
        cls,
        layer: CircularBasisLayer,
        emb: BasisEmbedding,
        graph_out: ix.Edges,
        graph_in: ix.Edges,
        trip: ix.Triplets,
        ck: Chunking,
        rad_agg: Aggregation | None = None,
    ) -> TripletBasis | tuple[Tensor, Tensor]:
        """Projected circular basis of triplets ``trip`` with output edges of graph_out and input edges of
        graph_in: built per chunk of output edges by the interaction that uses it, or, for one-chunk layouts
        (``_reuse_bases``), once: (rad_W1, sph), rad_W1 padded per atom with ``rad_agg`` if given."""
        basis = TripletBasis(
            layer, emb, graph_out.dist, graph_out.vector, graph_in.vector, trip.out, trip.in_, trip.agg
        )
        return basis.whole(rad_agg) if cls._reuse_bases(ck, trip.agg, rad_agg) else basis

    # ------------------------------------------------------------------------------------------ memory
    def estimate_memory(self, graph: AtomGraph) -> int:
        """Peak bytes of an energy + forces call (float32, resident memory), fitted to ``benchmarks/memory.py``.

        Base OC20 sizes on rattled fcc Cu (1,008 / 5,324 atoms, 0.62 / 3.3 million atom-interaction edges within
        12 Å): direct forces 3.6 GiB added at 5,324 atoms, gradient forces 1.7 / 4.8 / 16.4 GiB at 1,008 / 5,324 /
        19,652 atoms (0.62 / 3.3 / 12.1 million edges), so 0.5 GiB + 1.0 kB (direct) or 1.1 GiB + 1.5 kB (gradient,
        10-20 % above the three measurements) per edge of the calculator's graph. Without the atom-interaction graph
        the calculator's graph is the main graph (about 5 % as many edges, each carrying the work): 20 kB / 31 kB per
        edge. Per-edge costs scale with emb_size_edge / 512.
        """
        direct = self.direct_forces or not self.regress_forces
        base, per_edge = (0.5, 1000.0) if direct else (1.1, 1500.0)
        if not self.uses_a2a_graph:
            per_edge *= 20.4  # main edges are ~4.9 % of the a2a edges at the base cutoffs
        width = int(self.hparams.get("emb_size_edge", 512))
        return int(base * 1024**3 + per_edge * width / 512 * graph.num_edges)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, graph: AtomGraph) -> dict[str, Tensor]:
        """Raw energy (B,) and, with direct_forces, raw forces (N, 3), in the dtype of the graph."""
        z = graph.numbers.long()
        if z.numel() and not bool(((z >= 1) & (z <= self.max_elements)).all()):
            raise ValueError(f"GemNet-OC accepts atomic numbers 1..{self.max_elements}, got {sorted(set(z.tolist()))}")
        idx = self.build_indices(graph)
        ck = self.chunking(idx)
        bases = self.get_bases(idx, ck)
        main = idx.main

        # the global force MLP's first layer, W [x_f0 | x_f1 | ...], is applied block by block (sum of W_i x_fi)
        width = self.out_mlp_F[0].linear.in_features // (self.num_blocks + 1) if self.direct_forces else 0
        weights = [
            self.out_mlp_F[0].linear.weight[:, i * width : (i + 1) * width] if self.direct_forces else None
            for i in range(self.num_blocks + 1)
        ]

        def first_block(h: Tensor, rad_main: Tensor) -> tuple[Tensor, Tensor | int, Tensor, Tensor]:
            """Edge embedding, first output block, first interaction block: (x_e, x_f, h, m). One checkpointed
            piece, so the initial edge embeddings are recomputed rather than kept."""
            m = self.edge_emb(h, rad_main, main.edge_index, ck)
            x_e, x_f = self.out_blocks[0](h, m, bases["output"], main.dst, ck, weights[0])
            return x_e, x_f, *self.int_blocks[0](h, m, bases, idx, ck)

        # a call of many chunks hands the heap its chunks fragmented back after every block, in the forward and
        # (through the block outputs' gradients) in the backward: resident memory, not results
        trim = not torch.compiler.is_compiling() and self.spans_chunks(idx)
        # under activation checkpointing only the blocks' inputs are kept for the backward
        x_e, f_sum, h, m = checkpoint(first_block, self.atom_emb(z), bases["rad_main"], enabled=ck.checkpoint)
        xs_e = [x_e]
        for i, out_block in enumerate(self.out_blocks[1:]):
            if i > 0:
                h, m = checkpoint(self.int_blocks[i], h, m, bases, idx, ck, enabled=ck.checkpoint)
            if trim:
                m = _ReleaseHeap.apply(m)
            x_e, x_f = checkpoint(out_block, h, m, bases["output"], main.dst, ck, weights[i + 1], enabled=ck.checkpoint)
            xs_e.append(x_e)
            if self.direct_forces:
                f_sum = f_sum + x_f if needs_grad(f_sum) else f_sum.add_(x_f)

        e_atom = self.out_energy(self.out_mlp_E(torch.cat(xs_e, dim=-1)))  # (N, 1)
        reduce = scatter_sum if self.extensive else scatter_mean
        out = {"energy": reduce(e_atom, graph.batch, graph.num_graphs).squeeze(1)}
        if self.direct_forces and self.regress_forces:
            f_st = map_rows(self._force_head, [f_sum], (), ck)  # (E, 1)
            if self.forces_coupled:  # |F_st| = |F_ts|
                f_st = (f_st + gather(f_st, idx.id_swap)) / 2
            out["forces"] = scatter_sum(f_st * main.vector, main.dst, graph.num_atoms)
        return out

    def _force_head(self, f_sum: Tensor) -> Tensor:
        """The global force MLP after its first linear map, and the output layer: (E_chunk, emb_size_edge) ->
        (E_chunk, 1)."""
        x = self.out_mlp_F[0].activate(f_sum)
        for layer in self.out_mlp_F[1:]:
            x = layer(x)
        return self.out_forces(x)

    # ------------------------------------------------------------------------------------------ checkpoints
    def load_checkpoint_state(self, state_dict: dict[str, Tensor], scale_dict: dict[str, float] | None = None) -> None:
        """Load fairchem weights; scale factors from ``<path>.scale_factor`` entries and/or ``scale_dict``."""
        load_gemnet_state(self, state_dict, scale_dict)
