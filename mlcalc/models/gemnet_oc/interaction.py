"""GemNet-OC interaction block: triplet, quadruplet, atom-to-edge, edge-to-atom and atom-to-atom message
passing, followed by the edge and atom embedding updates. Module names follow fairchem's state_dict."""

from __future__ import annotations

import math

from torch import Tensor, nn

from mlcalc.models.gemnet_oc.indices import Quadruplets, Triplets
from mlcalc.models.gemnet_oc.layers import (
    PLAIN,
    Aggregation,
    Chunking,
    Dense,
    EdgeEmbedding,
    EfficientInteractionBilinear,
    NeighborBasis,
    ResidualLayer,
    ScaleFactor,
    map_rows,
    mul_fresh,
    run_chunks,
)
from mlcalc.models.gemnet_oc.output import AtomUpdateBlock
from mlcalc.nn.chunking import checkpoint
from mlcalc.nn.scatter import gather


class QuadrupletInteraction(nn.Module):
    """Message d -> b -> a <- c onto edge c -> a (and, symmetrically, a -> c)."""

    def __init__(
        self,
        emb_size_edge: int,
        emb_size_quad_in: int,
        emb_size_quad_out: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        emb_size_sbf: int,
        symmetric_mp: bool = True,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.symmetric_mp = symmetric_mp
        self.dense_db = Dense(emb_size_edge, emb_size_edge, activation=activation)
        self.mlp_rbf = Dense(emb_size_rbf, emb_size_edge, activation=None)
        self.scale_rbf = ScaleFactor()
        self.mlp_cbf = Dense(emb_size_cbf, emb_size_quad_in, activation=None)
        self.scale_cbf = ScaleFactor()
        self.mlp_sbf = EfficientInteractionBilinear(emb_size_quad_in, emb_size_sbf, emb_size_quad_out)
        self.scale_sbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_edge, emb_size_quad_in, activation=activation)
        self.up_projection_ca = Dense(emb_size_quad_out, emb_size_edge, activation=activation)
        if symmetric_mp:
            self.up_projection_ac = Dense(emb_size_quad_out, emb_size_edge, activation=activation)
        self.inv_sqrt_2 = 1 / math.sqrt(2.0)

    def forward(self, m: Tensor, bases: dict, quad: Quadruplets, id_swap: Tensor, chunking: Chunking = PLAIN) -> Tensor:
        """m: (E, emb_size_edge) main-edge embeddings -> (E, emb_size_edge)."""
        x_db = map_rows(self.project_db, [m, bases["rad"]], (), chunking)  # (E, quad_in), rbf(d_db)
        # cbf(d_ba, angle abd) per input triplet d -> b -> a: (T_in, quad_in)
        x_db = map_rows(self.triplet_rows, [quad.triplet_in.in_, bases["cir"]], (x_db,), chunking)
        # sbf(d_ca, angle cab, dihedral cabd) summed onto c -> a over quadruplets (rows x_db[trip_in_to_quad])
        x = self.mlp_sbf(bases["sph"], x_db, quad.agg, index=quad.trip_in_to_quad, chunking=chunking)
        x = self.scale_sbf_sum(x)
        if not self.symmetric_mp:
            return map_rows(self.up_projection_ca, [x], (), chunking)
        return map_rows(self.project_out, [x, gather(x, id_swap)], (), chunking)

    def project_db(self, m: Tensor, rad: Tensor) -> Tensor:
        """(E_chunk, emb_size_edge), (E_chunk, emb_size_rbf) -> (E_chunk, emb_size_quad_in)."""
        return self.down_projection(self.scale_rbf(mul_fresh(self.dense_db(m), self.mlp_rbf(rad))))

    def triplet_rows(self, edge: Tensor, cir: Tensor, x_db: Tensor) -> Tensor:
        """Input triplets with input edge ``edge`` (T_chunk,) and basis cir (T_chunk, emb_size_cbf)."""
        return self.scale_cbf(mul_fresh(gather(x_db, edge), self.mlp_cbf(cir)))

    def project_out(self, x: Tensor, x_swap: Tensor) -> Tensor:
        """Messages of edges c -> a and of their reverses (E_chunk, quad_out) -> (E_chunk, emb_size_edge)."""
        return self.up_projection_ca(x).add_(self.up_projection_ac(x_swap)).mul_(self.inv_sqrt_2)


class TripletInteraction(nn.Module):
    """Message b -> a <- c onto the output edge c -> a (or, with an atom aggregation, onto atom a)."""

    def __init__(
        self,
        emb_size_in: int,
        emb_size_out: int,
        emb_size_trip_in: int,
        emb_size_trip_out: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        symmetric_mp: bool = True,
        swap_output: bool = True,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.symmetric_mp = symmetric_mp
        self.swap_output = swap_output
        self.dense_ba = Dense(emb_size_in, emb_size_in, activation=activation)
        self.mlp_rbf = Dense(emb_size_rbf, emb_size_in, activation=None)
        self.scale_rbf = ScaleFactor()
        self.mlp_cbf = EfficientInteractionBilinear(emb_size_trip_in, emb_size_cbf, emb_size_trip_out)
        self.scale_cbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_in, emb_size_trip_in, activation=activation)
        self.up_projection_ca = Dense(emb_size_trip_out, emb_size_out, activation=activation)
        if symmetric_mp:
            self.up_projection_ac = Dense(emb_size_trip_out, emb_size_out, activation=activation)
        self.inv_sqrt_2 = 1 / math.sqrt(2.0)

    def forward(
        self,
        m: Tensor,
        bases: dict,
        trip: Triplets,
        id_swap: Tensor,
        expand_idx: Tensor | None = None,
        agg2: Aggregation | None = None,
        chunking: Chunking = PLAIN,
    ) -> Tensor:
        """m: input embeddings (edges, or atoms expanded to edges by ``expand_idx``); agg2 aggregates the output
        edges onto atoms. Returns (E, emb_size_out) or, with agg2, (N, emb_size_out)."""
        if expand_idx is None:
            x_ba = map_rows(self.project_in, [m, bases["rad"]], (), chunking)  # (E_in, trip_in)
        else:
            x_ba = map_rows(self.project_in_expanded, [expand_idx, bases["rad"]], (self.dense_ba(m),), chunking)
        # cbf(d_ca, angle cab), summed over the triplets of each output edge (rows x_ba[trip.in_])
        x = self.mlp_cbf(bases["cir"], x_ba, trip.agg, agg2, index=trip.in_, chunking=chunking)
        x = self.scale_cbf_sum(x)
        if self.symmetric_mp:
            return map_rows(self.project_out, [x, gather(x, id_swap)], (), chunking)
        if self.swap_output:
            x = gather(x, id_swap)
        return map_rows(self.up_projection_ca, [x], (), chunking)

    def project_in(self, m: Tensor, rad: Tensor) -> Tensor:
        """rbf(d_ba) message of input edges: (E_chunk, emb_size_in), (E_chunk, emb_size_rbf) -> (E_chunk, trip_in)."""
        return self.down_projection(self.scale_rbf(mul_fresh(self.dense_ba(m), self.mlp_rbf(rad))))

    def project_in_expanded(self, atom: Tensor, rad: Tensor, h_ba: Tensor) -> Tensor:
        """As ``project_in`` for input edges whose features are the rows ``atom`` (E_chunk,) of dense_ba(h)."""
        return self.down_projection(self.scale_rbf(mul_fresh(gather(h_ba, atom), self.mlp_rbf(rad))))

    def project_out(self, x: Tensor, x_swap: Tensor) -> Tensor:
        """Messages of edges c -> a and of their reverses (E_chunk, trip_out) -> (E_chunk, emb_size_out)."""
        return self.up_projection_ca(x).add_(self.up_projection_ac(x_swap)).mul_(self.inv_sqrt_2)


class PairInteraction(nn.Module):
    """Atom-to-atom message over the a2a graph with a bilinear radial layer."""

    def __init__(
        self,
        emb_size_atom: int,
        emb_size_pair_in: int,
        emb_size_pair_out: int,
        emb_size_rbf: int,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.bilinear = Dense(emb_size_rbf * emb_size_pair_in, emb_size_pair_out, activation=None)
        self.scale_rbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_atom, emb_size_pair_in, activation=activation)
        self.up_projection = Dense(emb_size_pair_out, emb_size_atom, activation=activation)
        self.inv_sqrt_2 = 1 / math.sqrt(2.0)

    def forward(
        self, h: Tensor, rad_basis: Tensor | NeighborBasis, src: Tensor, agg: Aggregation, chunking: Chunking = PLAIN
    ) -> Tensor:
        """h: (N, emb_size_atom); rad_basis: (N, emb_size_rbf, kmax) padded per atom, or a ``NeighborBasis`` built
        per chunk; src: (E_a2a,) source atoms; agg: a2a edges -> target atoms. Returns (N, emb_size_atom); the
        padded neighbour messages (N_chunk, kmax, pair_in) are built one chunk of target atoms at a time."""
        x = self.down_projection(h)  # (N, pair_in)

        def product(start: int, stop: int, rows: slice | Tensor, rad_basis: Tensor, x: Tensor) -> Tensor:
            x2 = agg.pad_rows(gather(x, src[rows]), start, stop, rows)  # (N_chunk, kmax, pair_in)
            return self.bilinear((rad_basis @ x2).flatten(1))

        if isinstance(rad_basis, NeighborBasis):
            basis = rad_basis

            def lazy_atoms(start: int, stop: int, row_start: int, row_stop: int, dist: Tensor, x: Tensor) -> Tensor:
                rows = agg.rows(row_start, row_stop)
                return product(start, stop, rows, basis.atoms(dist[rows], start, stop, rows), x)

            calls = agg.slot_calls([], [basis.dist, x])
            h_out = run_chunks(lazy_atoms, calls, agg.size, chunking)
        else:

            def atoms(start: int, stop: int, row_start: int, row_stop: int, rad_basis: Tensor, x: Tensor) -> Tensor:
                return product(start, stop, agg.rows(row_start, row_stop), rad_basis, x)

            h_out = run_chunks(atoms, agg.slot_calls([rad_basis], [x]), agg.size, chunking)
        return self.up_projection(self.scale_rbf_sum(h_out))


class InteractionBlock(nn.Module):
    """One GemNet-OC interaction block: edge messages (triplets, quadruplets, atom-to-edge), atom messages
    (edge-to-atom, atom-to-atom), residual updates of edges and atoms."""

    def __init__(
        self,
        emb_size_atom: int,
        emb_size_edge: int,
        emb_size_trip_in: int,
        emb_size_trip_out: int,
        emb_size_quad_in: int,
        emb_size_quad_out: int,
        emb_size_a2a_in: int,
        emb_size_a2a_out: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        emb_size_sbf: int,
        num_before_skip: int,
        num_after_skip: int,
        num_concat: int,
        num_atom: int,
        num_atom_emb_layers: int = 0,
        quad_interaction: bool = False,
        atom_edge_interaction: bool = False,
        edge_atom_interaction: bool = False,
        atom_interaction: bool = False,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        act = activation
        self.dense_ca = Dense(emb_size_edge, emb_size_edge, activation=act)
        trip_sizes = dict(
            emb_size_trip_in=emb_size_trip_in,
            emb_size_trip_out=emb_size_trip_out,
            emb_size_rbf=emb_size_rbf,
            emb_size_cbf=emb_size_cbf,
            activation=act,
        )
        self.trip_interaction = TripletInteraction(emb_size_edge, emb_size_edge, **trip_sizes)
        self.quad_interaction = (
            QuadrupletInteraction(
                emb_size_edge,
                emb_size_quad_in,
                emb_size_quad_out,
                emb_size_rbf,
                emb_size_cbf,
                emb_size_sbf,
                activation=act,
            )
            if quad_interaction
            else None
        )
        self.atom_edge_interaction = (
            TripletInteraction(emb_size_atom, emb_size_edge, **trip_sizes) if atom_edge_interaction else None
        )
        self.edge_atom_interaction = (
            TripletInteraction(emb_size_edge, emb_size_atom, symmetric_mp=False, swap_output=False, **trip_sizes)
            if edge_atom_interaction
            else None
        )
        self.atom_interaction = (
            PairInteraction(emb_size_atom, emb_size_a2a_in, emb_size_a2a_out, emb_size_rbf, activation=act)
            if atom_interaction
            else None
        )
        self.layers_before_skip = nn.ModuleList(
            [ResidualLayer(emb_size_edge, activation=act) for _ in range(num_before_skip)]
        )
        self.layers_after_skip = nn.ModuleList(
            [ResidualLayer(emb_size_edge, activation=act) for _ in range(num_after_skip)]
        )
        self.atom_emb_layers = nn.ModuleList(
            [ResidualLayer(emb_size_atom, activation=act) for _ in range(num_atom_emb_layers)]
        )
        self.atom_update = AtomUpdateBlock(emb_size_atom, emb_size_edge, emb_size_rbf, num_atom, activation=act)
        self.concat_layer = EdgeEmbedding(emb_size_atom, emb_size_edge, emb_size_edge, activation=act)
        self.residual_m = nn.ModuleList([ResidualLayer(emb_size_edge, activation=act) for _ in range(num_concat)])

        self.inv_sqrt_2 = 1 / math.sqrt(2.0)
        self.inv_sqrt_num_eint = 1 / math.sqrt(2.0 + quad_interaction + atom_edge_interaction)
        self.inv_sqrt_num_aint = 1 / math.sqrt(1.0 + edge_atom_interaction + atom_interaction)

    def forward(self, h: Tensor, m: Tensor, bases: dict, idx, chunking: Chunking = PLAIN) -> tuple[Tensor, Tensor]:
        """h: (N, emb_size_atom), m: (E, emb_size_edge); bases: the transformed bases (see GemNetOC.get_bases);
        idx: GemNetIndices; chunking: how the per-edge and padded computations run. Returns the updated (h, m)."""
        x = map_rows(self.dense_ca, [m], (), chunking)
        x = x.add_(self.trip_interaction(m, bases["e2e"], idx.trip_e2e, idx.id_swap, chunking=chunking))
        if self.quad_interaction is not None and "qint" in bases:  # no quadruplets: the message is exactly 0
            x = x.add_(self.quad_interaction(m, bases["qint"], idx.quad, idx.id_swap, chunking))
        if self.atom_edge_interaction is not None:
            x = x.add_(
                self.atom_edge_interaction(
                    h, bases["a2e"], idx.trip_a2e, idx.id_swap, expand_idx=idx.a2ee2a.src, chunking=chunking
                )
            )
        x = x.mul_(self.inv_sqrt_num_eint)

        # both atom messages read the incoming h
        h_new = h
        if self.edge_atom_interaction is not None:
            h_new = h_new + self.edge_atom_interaction(
                m, bases["e2a"], idx.trip_e2a, idx.id_swap, agg2=idx.a2ee2a_agg, chunking=chunking
            )
        if self.atom_interaction is not None:
            h_new = h_new + self.atom_interaction(h, bases["a2a"], idx.a2a.src, idx.a2a_agg, chunking)
        h = h_new * self.inv_sqrt_num_aint

        m = map_rows(self.edge_update, [x, m], (chunking.checkpoint,), chunking)

        for layer in self.atom_emb_layers:
            h = layer(h)
        h = (h + self.atom_update(h, m, bases["atom_update"], idx.main.dst, chunking)) * self.inv_sqrt_2

        terms = self.concat_layer.atom_terms(h)
        return h, map_rows(self.edge_output, [m, idx.main.src, idx.main.dst], terms, chunking)

    def edge_update(self, x: Tensor, m: Tensor, recompute: bool = False) -> Tensor:
        """Residual layers around the skip connection: message x and embedding m (E_chunk, emb_size_edge) -> the
        new embedding. ``recompute``: checkpoint each layer as well (the backward of a chunk then holds one
        layer's intermediates at a time instead of those of all four)."""
        for layer in self.layers_before_skip:
            x = checkpoint(layer, x, enabled=recompute)
        # x is fresh unless there is no layer (then it is the caller's tensor: not overwritten)
        m = (x.add_(m) if len(self.layers_before_skip) else x + m).mul_(self.inv_sqrt_2)
        for layer in self.layers_after_skip:
            m = checkpoint(layer, m, enabled=recompute)
        return m

    def edge_output(self, m: Tensor, src: Tensor, dst: Tensor, source_term: Tensor, target_term: Tensor) -> Tensor:
        """Embedding of edges (src, dst) from m (E_chunk, emb_size_edge) and the updated atoms' terms of the
        concatenation layer (``EdgeEmbedding.atom_terms``), through the residual layers, plus the skip."""
        m2 = self.concat_layer.edge_rows(m, src, dst, source_term, target_term)
        for layer in self.residual_m:
            m2 = layer(m2)
        return m2.add_(m).mul_(self.inv_sqrt_2)
