"""GemNet-OC interaction block: triplet, quadruplet, atom-to-edge, edge-to-atom and atom-to-atom message
passing, followed by the edge and atom embedding updates. Module names follow fairchem's state_dict."""

from __future__ import annotations

import math

from torch import Tensor, nn

from mlcalc.models.gemnet_oc.indices import Quadruplets, Triplets
from mlcalc.models.gemnet_oc.layers import (
    Aggregation,
    Dense,
    EdgeEmbedding,
    EfficientInteractionBilinear,
    ResidualLayer,
    ScaleFactor,
)
from mlcalc.models.gemnet_oc.output import AtomUpdateBlock
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

    def forward(self, m: Tensor, bases: dict, quad: Quadruplets, id_swap: Tensor) -> Tensor:
        """m: (E, emb_size_edge) main-edge embeddings -> (E, emb_size_edge)."""
        x_db = self.dense_db(m)
        x_db = self.scale_rbf(x_db * self.mlp_rbf(bases["rad"]))  # rbf(d_db)
        x_db = self.down_projection(x_db)
        x_db = gather(x_db, quad.triplet_in.in_)  # (T_in, quad_in)
        x_db = self.scale_cbf(x_db * self.mlp_cbf(bases["cir"]))  # cbf(d_ba, angle abd)
        x_db = gather(x_db, quad.trip_in_to_quad)  # (Q, quad_in)
        x = self.mlp_sbf(bases["sph"], x_db, quad.agg)  # sbf(d_ca, angle cab, dihedral cabd) summed onto c -> a
        x = self.scale_sbf_sum(x)
        if not self.symmetric_mp:
            return self.up_projection_ca(x)
        x_ca = self.up_projection_ca(x)
        x_ac = gather(self.up_projection_ac(x), id_swap)
        return x_ca.add_(x_ac).mul_(self.inv_sqrt_2)  # x_ca is fresh: in place


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
    ) -> Tensor:
        """m: input embeddings (edges, or atoms expanded to edges by ``expand_idx``); agg2 aggregates the output
        edges onto atoms. Returns (E, emb_size_out) or, with agg2, (N, emb_size_out)."""
        x_ba = self.dense_ba(m)
        if expand_idx is not None:
            x_ba = gather(x_ba, expand_idx)
        x_ba = self.scale_rbf(x_ba * self.mlp_rbf(bases["rad"]))  # rbf(d_ba)
        x_ba = self.down_projection(x_ba)
        x_ba = gather(x_ba, trip.in_)
        x = self.mlp_cbf(bases["cir"], x_ba, trip.agg, agg2)  # cbf(d_ca, angle cab)
        x = self.scale_cbf_sum(x)
        if self.symmetric_mp:
            x_ca = self.up_projection_ca(x)
            x_ac = gather(self.up_projection_ac(x), id_swap)
            return x_ca.add_(x_ac).mul_(self.inv_sqrt_2)  # x_ca is fresh: in place
        if self.swap_output:
            x = gather(x, id_swap)
        return self.up_projection_ca(x)


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

    def forward(self, h: Tensor, rad_basis: Tensor, src: Tensor, agg: Aggregation) -> Tensor:
        """h: (N, emb_size_atom); rad_basis: (N, emb_size_rbf, kmax) padded per atom -> (N, emb_size_atom)."""
        x_ba = gather(self.down_projection(h), src)  # (E_a2a, pair_in)
        x2 = agg.pad(x_ba)  # (N, kmax, pair_in)
        h_out = self.bilinear((rad_basis @ x2).flatten(1))
        h_out = self.scale_rbf_sum(h_out)
        return self.up_projection(h_out)


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

    def forward(self, h: Tensor, m: Tensor, bases: dict, idx) -> tuple[Tensor, Tensor]:
        """h: (N, emb_size_atom), m: (E, emb_size_edge); bases: the transformed bases (see GemNetOC.get_bases);
        idx: GemNetIndices. Returns the updated (h, m)."""
        x_ca_skip = self.dense_ca(m)
        x_e2e = self.trip_interaction(m, bases["e2e"], idx.trip_e2e, idx.id_swap)
        x = x_ca_skip.add_(x_e2e)  # fresh tensors: in place (same sums as fairchem)
        if self.quad_interaction is not None and "qint" in bases:  # no quadruplets: the message is exactly 0
            x = x.add_(self.quad_interaction(m, bases["qint"], idx.quad, idx.id_swap))
        if self.atom_edge_interaction is not None:
            x = x.add_(
                self.atom_edge_interaction(h, bases["a2e"], idx.trip_a2e, idx.id_swap, expand_idx=idx.a2ee2a.src)
            )
        x = x.mul_(self.inv_sqrt_num_eint)

        # both atom messages read the incoming h
        h_new = h
        if self.edge_atom_interaction is not None:
            h_new = h_new + self.edge_atom_interaction(m, bases["e2a"], idx.trip_e2a, idx.id_swap, agg2=idx.a2ee2a_agg)
        if self.atom_interaction is not None:
            h_new = h_new + self.atom_interaction(h, bases["a2a"], idx.a2a.src, idx.a2a_agg)
        h = h_new * self.inv_sqrt_num_aint

        for layer in self.layers_before_skip:
            x = layer(x)
        m = x.add_(m).mul_(self.inv_sqrt_2)  # x is fresh here
        for layer in self.layers_after_skip:
            m = layer(m)

        for layer in self.atom_emb_layers:
            h = layer(h)
        h = (h + self.atom_update(h, m, bases["atom_update"], idx.main.dst)) * self.inv_sqrt_2

        m2 = self.concat_layer(h, m, idx.main.edge_index)
        for layer in self.residual_m:
            m2 = layer(m2)
        m = m2.add_(m).mul_(self.inv_sqrt_2)
        return h, m
