"""SphereNet blocks: edge initialisation (``init``), edge update (``update_e``) and node output (``update_v``).

Attribute names follow DIG's SphereNet so that its state_dict keys load unchanged. Shapes: E edges, T triplets,
N atoms, H = hidden_channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mlcalc.nn.init import init_skipped
from mlcalc.nn.scatter import gather, scatter_sum

Activation = Callable[[Tensor], Tensor]

#: rows of DIG's atom embedding (index = atomic number)
NUM_EMBEDDINGS = 95


def glorot_orthogonal_(weight: Tensor, scale: float = 2.0) -> None:
    """Orthogonal init rescaled to variance ``scale / (fan_in + fan_out)`` (DimeNet's GlorotOrthogonal); a no-op
    inside ``mlcalc.nn.init.skip_init()``."""
    if init_skipped():
        return
    with torch.no_grad():
        nn.init.orthogonal_(weight)
        weight.mul_(math.sqrt(scale / ((weight.size(0) + weight.size(1)) * weight.var())))


class ResidualLayer(nn.Module):
    """``x + act(lin2(act(lin1(x))))``."""

    def __init__(self, hidden_channels: int, act: Activation) -> None:
        super().__init__()
        self.act = act
        self.lin1 = nn.Linear(hidden_channels, hidden_channels)
        self.lin2 = nn.Linear(hidden_channels, hidden_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin1, self.lin2):
            glorot_orthogonal_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.lin2(self.act(self.lin1(x))))


class InitBlock(nn.Module):
    """Initial edge features from the two atom embeddings and the distance basis (DIG ``init``).

    Returns ``(e1, e2)``, both (E, H): e1 the edge state, e2 = lin_rbf_1(rbf) * e1 the distance-gated message.
    """

    def __init__(self, num_radial: int, hidden_channels: int, act: Activation, use_node_features: bool = True) -> None:
        super().__init__()
        self.act = act
        self.use_node_features = use_node_features
        if use_node_features:
            self.emb = nn.Embedding(NUM_EMBEDDINGS, hidden_channels)
        else:
            self.node_embedding = nn.Parameter(torch.empty(hidden_channels))
        self.lin_rbf_0 = nn.Linear(num_radial, hidden_channels)
        self.lin = nn.Linear(3 * hidden_channels, hidden_channels)
        self.lin_rbf_1 = nn.Linear(num_radial, hidden_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.use_node_features:
            nn.init.uniform_(self.emb.weight, -math.sqrt(3), math.sqrt(3))
        else:
            nn.init.normal_(self.node_embedding)
        self.lin_rbf_0.reset_parameters()
        self.lin.reset_parameters()
        glorot_orthogonal_(self.lin_rbf_1.weight)

    def forward(self, numbers: Tensor, rbf: Tensor, i: Tensor, j: Tensor) -> tuple[Tensor, Tensor]:
        if self.use_node_features:
            x = self.emb(numbers)
        else:
            x = self.node_embedding.unsqueeze(0).expand(numbers.shape[0], -1)
        rbf0 = self.act(self.lin_rbf_0(rbf))
        e1 = self.act(self.lin(torch.cat([gather(x, i), gather(x, j), rbf0], dim=-1)))
        return e1, self.lin_rbf_1(rbf) * e1


class UpdateE(nn.Module):
    """Edge update from triplet messages (DIG ``update_e``).

    For edge j->i: sum over triplets k->j->i of ``down(kj) * sbf(angle) * tbf(torsion)``, projected up, added to
    the edge's own transform, residual stack; returns the new ``(e1, e2)``.
    """

    def __init__(
        self,
        hidden_channels: int,
        int_emb_size: int,
        basis_emb_size_dist: int,
        basis_emb_size_angle: int,
        basis_emb_size_torsion: int,
        num_spherical: int,
        num_radial: int,
        num_before_skip: int,
        num_after_skip: int,
        act: Activation,
    ) -> None:
        super().__init__()
        self.act = act
        self.lin_rbf1 = nn.Linear(num_radial, basis_emb_size_dist, bias=False)
        self.lin_rbf2 = nn.Linear(basis_emb_size_dist, hidden_channels, bias=False)
        self.lin_sbf1 = nn.Linear(num_spherical * num_radial, basis_emb_size_angle, bias=False)
        self.lin_sbf2 = nn.Linear(basis_emb_size_angle, int_emb_size, bias=False)
        self.lin_t1 = nn.Linear(num_spherical * num_spherical * num_radial, basis_emb_size_torsion, bias=False)
        self.lin_t2 = nn.Linear(basis_emb_size_torsion, int_emb_size, bias=False)
        self.lin_rbf = nn.Linear(num_radial, hidden_channels, bias=False)
        self.lin_kj = nn.Linear(hidden_channels, hidden_channels)
        self.lin_ji = nn.Linear(hidden_channels, hidden_channels)
        self.lin_down = nn.Linear(hidden_channels, int_emb_size, bias=False)
        self.lin_up = nn.Linear(int_emb_size, hidden_channels, bias=False)
        self.layers_before_skip = nn.ModuleList(ResidualLayer(hidden_channels, act) for _ in range(num_before_skip))
        self.lin = nn.Linear(hidden_channels, hidden_channels)
        self.layers_after_skip = nn.ModuleList(ResidualLayer(hidden_channels, act) for _ in range(num_after_skip))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin_rbf1, self.lin_rbf2, self.lin_sbf1, self.lin_sbf2, self.lin_t1, self.lin_t2):
            glorot_orthogonal_(lin.weight)
        for lin in (self.lin_kj, self.lin_ji, self.lin):
            glorot_orthogonal_(lin.weight)
            nn.init.zeros_(lin.bias)
        glorot_orthogonal_(self.lin_down.weight)
        glorot_orthogonal_(self.lin_up.weight)
        glorot_orthogonal_(self.lin_rbf.weight)
        for layer in (*self.layers_before_skip, *self.layers_after_skip):
            layer.reset_parameters()

    def forward(
        self, e: tuple[Tensor, Tensor], rbf: Tensor, sbf: Tensor, tbf: Tensor, idx_kj: Tensor, idx_ji: Tensor
    ) -> tuple[Tensor, Tensor]:
        """All edges at once: e (E, H) x2, rbf (E, R), sbf (T, L*R), tbf (T, L*L*R), triplet indices (T,)."""
        x_kj = self.down(e[0], rbf)
        return self.edge_update(x_kj, self.lin_sbf1(sbf), self.lin_t1(tbf), idx_kj, idx_ji, e[0], rbf)

    def down(self, x1: Tensor, rbf: Tensor) -> Tensor:
        """The message of each edge k->j before the triplet product: (E', H), (E', R) -> (E', int_emb_size).
        Edge-local (any subset of edges)."""
        x_kj = self.act(self.lin_kj(x1)) * self.lin_rbf2(self.lin_rbf1(rbf))
        return self.act(self.lin_down(x_kj))

    def edge_update(
        self, x_kj: Tensor, sbf1: Tensor, t1: Tensor, idx_kj: Tensor, idx_ji: Tensor, x1: Tensor, rbf: Tensor
    ) -> tuple[Tensor, Tensor]:
        """New (e1, e2) of a run of edges j->i from the triplets into them.

        x_kj (E, int_emb_size): ``down`` of all edges; sbf1 / t1 (T', basis_emb_size_angle / _torsion): the
        triplets' bases projected by ``lin_sbf1`` / ``lin_t1``; idx_kj (T',) into x_kj; idx_ji (T',) into the run's
        edges (0..E'-1); x1 (E', H), rbf (E', R) of the run. Returns two (E', H).
        """
        x_ji = self.act(self.lin_ji(x1))
        msg = gather(x_kj, idx_kj) * self.lin_sbf2(sbf1) * self.lin_t2(t1)
        x_kj = self.act(self.lin_up(scatter_sum(msg, idx_ji, x1.shape[0])))
        e1 = x_ji + x_kj
        for layer in self.layers_before_skip:
            e1 = layer(e1)
        e1 = self.act(self.lin(e1)) + x1
        for layer in self.layers_after_skip:
            e1 = layer(e1)
        return e1, self.lin_rbf(rbf) * e1


class UpdateV(nn.Module):
    """Per-atom output: sum of the incoming e2 over edges into each atom, then an MLP (DIG ``update_v``).

    Returns (N, out_channels).
    """

    def __init__(
        self,
        hidden_channels: int,
        out_emb_channels: int,
        out_channels: int,
        num_output_layers: int,
        act: Activation,
        output_init: str,
    ) -> None:
        super().__init__()
        self.act = act
        self.output_init = output_init
        self.lin_up = nn.Linear(hidden_channels, out_emb_channels, bias=True)
        self.lins = nn.ModuleList(nn.Linear(out_emb_channels, out_emb_channels) for _ in range(num_output_layers))
        self.lin = nn.Linear(out_emb_channels, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        glorot_orthogonal_(self.lin_up.weight)
        for lin in self.lins:
            glorot_orthogonal_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.output_init == "zeros":
            nn.init.zeros_(self.lin.weight)
        else:
            glorot_orthogonal_(self.lin.weight)

    def forward(self, e: tuple[Tensor, Tensor], i: Tensor, num_nodes: int) -> Tensor:
        v = self.lin_up(scatter_sum(e[1], i, num_nodes))
        for lin in self.lins:
            v = self.act(lin(v))
        return self.lin(v)
