"""GemNet-OC atom update and output blocks (edge -> atom aggregation, per-block energy/force features)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from mlcalc.models.gemnet_oc.layers import (
    PLAIN,
    Chunking,
    Dense,
    ResidualLayer,
    ScaleFactor,
    map_rows,
    mul_fresh,
    scatter_rows,
)
from mlcalc.nn.linear import linear


def _mlp(units_in: int, units: int, n_hidden: int, activation: str | None) -> nn.ModuleList:
    """Optional Dense(units_in -> units) followed by ``n_hidden`` residual layers."""
    layers: list[nn.Module] = []
    if units_in != units:
        layers.append(Dense(units_in, units, activation=activation))
    layers += [ResidualLayer(units, n_layers=2, activation=activation) for _ in range(n_hidden)]
    return nn.ModuleList(layers)


class AtomUpdateBlock(nn.Module):
    """Sum of edge embeddings times a radial basis over each target atom, then an MLP: -> (N, emb_size_atom)."""

    def __init__(self, emb_size_atom: int, emb_size_edge: int, emb_size_rbf: int, n_hidden: int, activation=None):
        super().__init__()
        self.dense_rbf = Dense(emb_size_rbf, emb_size_edge, activation=None)
        self.scale_sum = ScaleFactor()
        self.layers = _mlp(emb_size_edge, emb_size_atom, n_hidden, activation)

    def edge_sum(self, m: Tensor, basis_rad: Tensor, idx_atom: Tensor, num_atoms: int, chunking: Chunking) -> Tensor:
        """sum over the edges of each atom of m * dense_rbf(basis_rad): (E, emb_size_edge) -> (N, emb_size_edge),
        in chunks of edges (the (E, emb_size_edge) product is never whole)."""

        def rows(m: Tensor, basis_rad: Tensor) -> Tensor:
            return mul_fresh(self.dense_rbf(basis_rad), m)

        return scatter_rows(rows, [m, basis_rad], idx_atom, num_atoms, chunking)

    def forward(self, h: Tensor, m: Tensor, basis_rad: Tensor, idx_atom: Tensor, chunking: Chunking = PLAIN) -> Tensor:
        """h: (N, emb_size_atom), m: (E, emb_size_edge), basis_rad: (E, emb_size_rbf), idx_atom: (E,) target atom
        of each edge -> (N, emb_size_atom)."""
        x = self.scale_sum(self.edge_sum(m, basis_rad, idx_atom, h.shape[0], chunking))
        for layer in self.layers:
            x = layer(x)
        return x


class OutputBlock(AtomUpdateBlock):
    """Atom update followed by the energy MLP (with a skip from h) and, for direct forces, the edge MLP.

    Returns per-atom energy features (N, emb_size_atom) and per-edge force features (E, emb_size_edge) or 0.
    ``seq_energy_pre`` is the same module list as ``layers`` (fairchem registers it under both names).
    """

    def __init__(
        self,
        emb_size_atom: int,
        emb_size_edge: int,
        emb_size_rbf: int,
        n_hidden: int,
        n_hidden_afteratom: int,
        activation: str | None = None,
        direct_forces: bool = True,
    ) -> None:
        super().__init__(emb_size_atom, emb_size_edge, emb_size_rbf, n_hidden, activation)
        self.direct_forces = direct_forces
        self.seq_energy_pre = self.layers
        if n_hidden_afteratom >= 1:
            self.seq_energy2 = _mlp(emb_size_atom, emb_size_atom, n_hidden_afteratom, activation)
        else:
            self.seq_energy2 = None
        self.inv_sqrt_2 = 1 / math.sqrt(2.0)
        if direct_forces:
            self.scale_rbf_F = ScaleFactor()
            self.seq_forces = _mlp(emb_size_edge, emb_size_edge, n_hidden, activation)
            self.dense_rbf_F = Dense(emb_size_rbf, emb_size_edge, activation=None)

    def forward(
        self,
        h: Tensor,
        m: Tensor,
        basis_rad: Tensor,
        idx_atom: Tensor,
        chunking: Chunking = PLAIN,
        force_weight: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | int]:
        """h: (N, emb_size_atom), m: (E, emb_size_edge), basis_rad: (E, emb_size_rbf), idx_atom: (E,) target atom.

        Returns the energy features (N, emb_size_atom) and the force features (E, emb_size_edge), or 0 without
        direct forces; with ``force_weight`` (F, emb_size_edge) the force features come projected, x_f @ W.T
        (E, F), one chunk of edges at a time (the global force MLP's first layer, applied block by block).
        """
        x_e = self.scale_sum(self.edge_sum(m, basis_rad, idx_atom, h.shape[0], chunking))
        for layer in self.seq_energy_pre:
            x_e = layer(x_e)
        if self.seq_energy2 is not None:
            x_e = (x_e + h) * self.inv_sqrt_2
            for layer in self.seq_energy2:
                x_e = layer(x_e)

        if not self.direct_forces:
            return x_e, 0
        return x_e, map_rows(self.force_rows, [m, basis_rad], (force_weight,), chunking)

    def force_rows(self, m: Tensor, basis_rad: Tensor, force_weight: Tensor | None = None) -> Tensor:
        """Force features of edges: (E_chunk, emb_size_edge), projected by force_weight.T when given."""
        x_f = m
        for layer in self.seq_forces:
            x_f = layer(x_f)
        x_f = self.scale_rbf_F(mul_fresh(self.dense_rbf_F(basis_rad), x_f))
        return x_f if force_weight is None else linear(x_f, force_weight)
