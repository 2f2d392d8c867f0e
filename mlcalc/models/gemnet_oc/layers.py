"""GemNet-OC building blocks: scaled activations, dense/residual layers, scale factors, embeddings and the
efficient (padded-matmul) bilinear layers. Parameter names follow fairchem's state_dict."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlcalc.nn.init import init_skipped
from mlcalc.nn.scatter import gather


# ---------------------------------------------------------------------------------------------- initialisers
def he_orthogonal_init(tensor: Tensor) -> Tensor:
    """Semi-orthogonal matrix, standardised per output row, with variance 1 / fan_in (in place); returned as is
    inside ``mlcalc.nn.init.skip_init()``."""
    if init_skipped():
        return tensor
    with torch.no_grad():
        nn.init.orthogonal_(tensor)
        fan_in = tensor.shape[:-1].numel() if tensor.dim() == 3 else tensor.shape[1]
        axis = [0, 1] if tensor.dim() == 3 else 1
        var, mean = torch.var_mean(tensor, dim=axis, unbiased=True, keepdim=True)
        tensor.copy_((tensor - mean) / (var + 1e-6) ** 0.5 * (1 / fan_in) ** 0.5)
    return tensor


def get_initializer(name: str):
    """Weight initialiser for the output layers ("HeOrthogonal" or "zeros")."""
    key = name.lower()
    if key == "heorthogonal":
        return he_orthogonal_init
    if key == "zeros":
        return nn.init.zeros_
    raise ValueError(f"unknown output_init {name!r} (known: HeOrthogonal, zeros)")


# ---------------------------------------------------------------------------------------------- basic layers
def needs_grad(x: Tensor) -> bool:
    """Whether autograd records operations on x (else in-place arithmetic on temporaries is safe)."""
    return torch.is_grad_enabled() and x.requires_grad


class ScaledSiLU(nn.Module):
    """SiLU(x) / 0.6, roughly variance preserving."""

    def __init__(self) -> None:
        super().__init__()
        self.scale_factor = 1 / 0.6
        self._activation = nn.SiLU()

    def forward(self, x: Tensor, fresh: bool = False) -> Tensor:
        """``fresh``: x is a temporary no one else reads; without autograd it is then overwritten (no new buffer,
        same arithmetic)."""
        if fresh and not needs_grad(x):
            return nn.functional.silu(x, inplace=True).mul_(self.scale_factor)
        # in place on the fresh SiLU output (its backward needs only x): saves a large temporary
        return self._activation(x).mul_(self.scale_factor)


class Dense(nn.Module):
    """Linear layer (``.linear``) followed by an optional scaled SiLU."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activation: str | None = None):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.reset_parameters()
        act = activation.lower() if isinstance(activation, str) else activation
        if act in ("silu", "swish"):
            self._activation: nn.Module = ScaledSiLU()
        elif act is None:
            self._activation = nn.Identity()
        else:
            raise ValueError(f"unknown activation {activation!r} (GemNet-OC supports silu/swish or None)")

    def reset_parameters(self, initializer=he_orthogonal_init) -> None:
        initializer(self.linear.weight)
        if self.linear.bias is not None:
            with torch.no_grad():
                self.linear.bias.fill_(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.linear(x))

    def activate(self, x: Tensor) -> Tensor:
        """The activation of a fresh pre-activation x (may overwrite x when no gradient is recorded)."""
        if isinstance(self._activation, ScaledSiLU):
            return self._activation(x, fresh=True)
        return x


class ResidualLayer(nn.Module):
    """``(x + MLP(x)) / sqrt(2)`` with ``n_layers`` bias-free Dense layers (``.dense_mlp``)."""

    def __init__(self, units: int, n_layers: int = 2, activation: str | None = None) -> None:
        super().__init__()
        self.dense_mlp = nn.Sequential(*[Dense(units, units, activation=activation) for _ in range(n_layers)])
        self.inv_sqrt_2 = 1 / math.sqrt(2)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.dense_mlp) == 0:
            return (x + x) * self.inv_sqrt_2
        # in place on the fresh MLP output (same arithmetic as (x + mlp(x)) / sqrt(2))
        return self.dense_mlp(x).add_(x).mul_(self.inv_sqrt_2)


class ScaleFactor(nn.Module):
    """Fitted multiplicative constant (``.scale_factor``, not trainable). A value of 0 means 'not fitted' = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.tensor(0.0), requires_grad=False)

    def forward(self, x: Tensor, ref: Tensor | None = None) -> Tensor:  # ref kept for fairchem's call signature
        s = self.scale_factor
        return x * torch.where(s == 0, torch.ones_like(s), s)


# ---------------------------------------------------------------------------------------------- padded aggregation
@dataclass
class Aggregation:
    """Row -> (slot, position) map for a zero-padded dense layout of a ragged grouping.

    outer: (R,) output slot of each row (edge or atom), ascending. inner: (R,) position of the row inside its
    slot. size: number of slots. kmax: largest group size (the padded width); the index builders leave it at -1
    and ``indices.resolve_kmax`` fills all of them with one device sync.
    """

    outer: Tensor
    inner: Tensor
    size: int
    kmax: int

    def pad(self, x: Tensor) -> Tensor:
        """(R, ...) -> (size, kmax, ...), zeros where a slot has fewer rows."""
        out = x.new_zeros((self.size, self.kmax, *x.shape[1:]))
        out[self.outer, self.inner] = x
        return out

    def pad_columns(self, x: Tensor) -> Tensor:
        """(R, C) -> (size, C, kmax), contiguous (the transpose of ``pad``, laid out for matmul)."""
        out = x.new_zeros((self.size, x.shape[1], self.kmax))
        out[self.outer, :, self.inner] = x
        return out


class BasisEmbedding(nn.Module):
    """Projects a radial basis with a weight tensor, ready for the efficient bilinear layers.

    With ``num_spherical``: weight (num_radial, num_spherical, emb_size_interm); else (emb_size_interm,
    num_radial).
    """

    def __init__(self, num_radial: int, emb_size_interm: int, num_spherical: int | None = None) -> None:
        super().__init__()
        self.num_radial = num_radial
        self.num_spherical = num_spherical
        if num_spherical is None:
            self.weight = nn.Parameter(torch.empty(emb_size_interm, num_radial))
        else:
            self.weight = nn.Parameter(torch.empty(num_radial, num_spherical, emb_size_interm))
        he_orthogonal_init(self.weight)

    def forward(
        self,
        rad_basis: Tensor,
        sph_basis: Tensor | None = None,
        rad_agg: Aggregation | None = None,
        sph_outer: Tensor | None = None,
        sph_agg: Aggregation | None = None,
    ):
        """
        rad_basis: (E, num_radial) raw radial basis; sph_basis: (T, num_spherical) raw angular basis.
        rad_agg: pads the projected radial basis per atom -> (N, emb_size_interm, kmax * num_spherical).
        sph_outer: edge of each angular row; without sph_agg returns the per-row product (T, emb_size_interm).
        sph_agg: pads the angular basis per edge -> returns (rad_W1, (E, num_spherical, kmax)).
        """
        num_edges = rad_basis.shape[0]
        if self.num_spherical is not None:
            rad_w1 = rad_basis @ self.weight.reshape(self.weight.shape[0], -1)
            # fairchem's layout: (num_spherical * interm) values read as (interm, num_spherical)
            rad_w1 = rad_w1.reshape(num_edges, self.weight.shape[2], self.num_spherical)
        else:
            rad_w1 = rad_basis @ self.weight.T  # (E, interm)

        if rad_agg is not None:
            padded = rad_agg.pad(rad_w1)  # (N, kmax, interm, ...)
            padded = torch.transpose(padded, 1, 2)  # (N, interm, kmax, ...)
            rad_w1 = padded.flatten(2)  # (N, interm, kmax * num_spherical)

        if sph_basis is None:
            return rad_w1
        if sph_agg is None:
            return (gather(rad_w1, sph_outer) @ sph_basis[:, :, None]).squeeze(-1)  # (T, interm)
        sph2 = sph_agg.pad_columns(sph_basis)  # (E, num_spherical, kmax)
        return rad_w1, sph2


class EfficientInteractionBilinear(nn.Module):
    """Bilinear layer of (radial x angular basis) and neighbour embeddings, summed over neighbours, via padded
    matrix products: out[e] = W . vec(sum_s rad_W1[e,:,s] sum_k sph[e,s,k] m[k,:])."""

    def __init__(self, emb_size_in: int, emb_size_interm: int, emb_size_out: int) -> None:
        super().__init__()
        self.emb_size_in = emb_size_in
        self.emb_size_interm = emb_size_interm
        self.emb_size_out = emb_size_out
        self.bilinear = Dense(emb_size_in * emb_size_interm, emb_size_out, bias=False, activation=None)

    def forward(
        self, basis: tuple[Tensor, Tensor], m: Tensor, agg: Aggregation, agg2: Aggregation | None = None
    ) -> Tensor:
        """basis: (rad_W1, sph) from BasisEmbedding; m: (T, emb_size_in) per triplet/quadruplet;
        agg: triplets -> output edges; agg2 (optional): output edges -> atoms. Returns (E or N, emb_size_out)."""
        rad_w1, sph = basis
        m_padded = agg.pad(m)  # (E, kmax, emb_in)
        sph_m = torch.matmul(sph, m_padded)  # (E, num_spherical, emb_in)
        if agg2 is not None:
            sph_m_padded = agg2.pad(sph_m)  # (N, kmax2, num_spherical, emb_in)
            sph_m_padded = sph_m_padded.flatten(1, 2)  # (N, kmax2 * num_spherical, emb_in)
            rad_w1_sph_m = rad_w1 @ sph_m_padded  # (N, interm, emb_in)
        else:
            rad_w1_sph_m = torch.matmul(rad_w1, sph_m)  # (E, interm, emb_in)
        return self.bilinear(rad_w1_sph_m.flatten(1))


# ---------------------------------------------------------------------------------------------- embeddings
class AtomEmbedding(nn.Module):
    """Element embedding: row Z-1 of ``embeddings.weight`` (num_elements, emb_size)."""

    def __init__(self, emb_size: int, num_elements: int) -> None:
        super().__init__()
        self.emb_size = emb_size
        self.embeddings = nn.Embedding(num_elements, emb_size)
        nn.init.uniform_(self.embeddings.weight, a=-math.sqrt(3), b=math.sqrt(3))

    def forward(self, z: Tensor) -> Tensor:
        return self.embeddings(z - 1)


class EdgeEmbedding(nn.Module):
    """Edge embedding Dense([h_source, h_target, m]) for edges given as (2, E) [source, target].

    Computed as W_s h[source] + W_t h[target] + W_m m with the atom terms projected per atom before the gather
    (N << E rows), the same linear map as the concatenated product.
    """

    def __init__(self, atom_features: int, edge_features: int, out_features: int, activation: str | None = None):
        super().__init__()
        self.atom_features = atom_features
        self.dense = Dense(2 * atom_features + edge_features, out_features, activation=activation, bias=False)

    def forward(self, h: Tensor, m: Tensor, edge_index: Tensor) -> Tensor:
        weight = self.dense.linear.weight  # (out, 2 A + E_in): [W_s | W_t | W_m]
        a = self.atom_features
        x = nn.functional.linear(m, weight[:, 2 * a :])
        x = x.add_(gather(nn.functional.linear(h, weight[:, :a]), edge_index[0]))  # x is fresh: in place
        x = x.add_(gather(nn.functional.linear(h, weight[:, a : 2 * a]), edge_index[1]))
        return self.dense.activate(x)
