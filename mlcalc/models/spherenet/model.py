"""Periodic SphereNet potential on the ordinary (periodic) edge list."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcalc.graph import AtomGraph
from mlcalc.memory import release_free_heap
from mlcalc.models.base import MLModel, register_model
from mlcalc.models.spherenet.bases import DistanceBasis, SphericalBasis
from mlcalc.models.spherenet.blocks import NUM_EMBEDDINGS, InitBlock, UpdateE, UpdateV
from mlcalc.models.spherenet.geometry import (
    build_triplets,
    half_plane_classes,
    torsion_reference,
    triplet_directions,
)
from mlcalc.nn.chunking import assemble_rows, checkpoint, group_chunks, split_rows
from mlcalc.nn.scatter import gather, scatter_sum

logger = logging.getLogger(__name__)

#: activation checkpointing starts above this many runs (~265 Cu atoms at the default chunk_size): below it, keeping
#: the activations costs at most ~2 GB and saves the ~35 % of time the recomputation takes
CHECKPOINT_MIN_RUNS = 4

#: ``SphereNet.estimate_memory``: resident bytes of an energy + forces call = base + bytes per triplet
ESTIMATE_BASE_BYTES = 1024**3
ESTIMATE_BYTES_PER_TRIPLET = 520

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"swish": F.silu, "silu": F.silu}


def _assemble(parts: Iterable[Any], bounds: list[tuple[int, int]], size: int) -> Any:
    """The outputs of runs (one tensor or a tuple each, ``bounds[r]`` = their rows [start, stop)) as tensors of
    ``size`` rows, equal to their ``torch.cat`` (``mlcalc.nn.chunking.assemble_rows``: no run output outlives its
    run; kept for a cat they grew glibc's heap by ~10 MB per layer and run). ``parts`` should be a generator, so
    that each run's outputs are freed before the next run is computed. One run: its outputs as they are.
    """
    if len(bounds) == 1:
        return next(iter(parts))
    return assemble_rows(((start, stop, part) for (start, stop), part in zip(bounds, parts, strict=True)), size)


class Embeddings(nn.Module):
    """Holder of the bases, named as DIG's ``emb`` module (its only parameter: ``dist_emb.freq``)."""

    def __init__(self, num_spherical: int, num_radial: int, cutoff: float, envelope_exponent: int) -> None:
        super().__init__()
        self.dist_emb = DistanceBasis(num_radial, cutoff, envelope_exponent)
        self.spherical = SphericalBasis(num_spherical, num_radial, cutoff)


@register_model("spherenet", "SphereNet", "SphereNetPeriodic")
class SphereNet(MLModel):
    """SphereNet (Liu et al., "Spherical Message Passing for 3D Molecular Graphs") as a periodic potential.

    Works directly on the periodic edge list (edge vectors ``pos[j] + offsets @ cell - pos[i]``): no image atoms,
    sum aggregation everywhere, energy per structure (B,) = sum of per-atom outputs of all blocks. Forces and
    stress are gradients of the energy (``direct_forces = False``), taken by the calculator. Units: Å, and
    whatever energy unit the weights were trained in.

    Hyperparameters (names and defaults as DIG / Geom3D / STK_search): cutoff 5.0 Å, num_layers 4,
    hidden_channels 128, out_channels 1 (must be 1 for a potential), int_emb_size 64, basis_emb_size_dist /
    _angle / _torsion 8, out_emb_channels 256, num_spherical 7, num_radial 6, envelope_exponent 5,
    num_before_skip 1, num_after_skip 2, num_output_layers 3, act "swish", output_init "GlorotOrthogonal" or
    "zeros", use_node_features True; energy_and_force is accepted and ignored (forces always come from autograd).
    ``max_num_neighbors`` (default 32, as DIG's radius_graph; None = all) sets the nearest-neighbour limit.

    use_torsion: True is the faithful SphereNet. The torsion of triplet k->j->i is measured against a reference
    neighbour of j chosen discretely (the next half-plane counter-clockwise about j->i), so the energy is a
    DISCONTINUOUS function of the positions: it jumps whenever a neighbour crosses k's half-plane, enters or leaves
    the cutoff as a reference, or passes through the j->i axis (swaps of reference order at equal azimuth are
    continuous). Measured in float64 with random default-size weights (max_num_neighbors=None), moving one atom
    0.3 Å in 1 mÅ steps: in ethanol (|E| ~ 0.5-1.1) single switch events jump by 3e-3 to 1.3e-2, i.e. 1-14x the
    smooth energy change of a whole 1 mÅ step; in a 4-atom fcc Cu cell (|E| ~ 1.5, ~80 switches per step) up to
    1.7e-3. NVE (velocity Verlet, 8 rattled Cu atoms, energies scaled by 0.1 so T stays ~550 K): the total energy
    drifts by 1.5e-3 in 200 x 1 fs with steps of up to 8e-4, against 5.8e-6 (and 1.4e-6 at 0.5 fs, the dt^2 law)
    without torsion; halving dt does not cure the torsion model. Use it for single points, relaxations and
    reproducing trained SphereNet weights, not for energy-conserving MD.
    use_torsion=False replaces the torsion basis by its average over the torsion angle in [0, 2 pi): only the
    m = 0 harmonics survive, ``tbf[a, b, n] = radial_bn(d_kj) * Y_l0(angle)`` where harmonic a*L+b is Y_l0, else
    0 (see ``SphericalBasis.torsion_averaged``). All parameters (lin_t1, lin_t2 included) keep their meaning and
    shapes; the energy is then C^2 in the positions (envelope at the cutoff) and NVE conserves energy.
    The reference choice uses an angular tolerance (sqrt of machine epsilon): lattice coincidences (a candidate
    exactly coplanar with k, common in small cells even when rattled) then do not depend on rounding, and a 2x2x2
    supercell reproduces 8x the energy to ~1e-15 relative with torsion as without (with a zero tolerance, i.e.
    rounding decides as in DIG, a rattled 3-atom cell was off by 4.6e-3 relative).
    max_num_neighbors truncation (nearest-k, DIG's default 32) is a further discontinuity whenever the k-th and
    (k+1)-th neighbours swap, and breaks supercell consistency on ties: use None for MD.

    Weights: ``load_state_dict`` accepts DIG's / Geom3D's molecular SphereNet state_dict unchanged (identical key
    names: ``init_e.emb.weight`` (95, H), ``init_e.lin_rbf_0.*``, ``init_e.lin.*``, ``init_e.lin_rbf_1.weight``,
    ``init_v.lin_up.*``, ``init_v.lins.{k}.*``, ``init_v.lin.weight``, ``emb.dist_emb.freq``,
    ``update_es.{n}.{lin_rbf1, lin_rbf2, lin_sbf1, lin_sbf2, lin_t1, lin_t2, lin_rbf, lin_kj, lin_ji, lin_down,
    lin_up, lin}.*``, ``update_es.{n}.layers_before_skip.{k}.lin{1,2}.*``, ``update_es.{n}.layers_after_skip...``,
    ``update_vs.{n}.*`` as init_v); the only mapping is that a ``module.`` prefix must be stripped (the
    checkpoint reader does). The parameter-free DIG modules (emb.angle_emb, emb.torsion_emb, update_us) have no
    keys. DIG's basis functions are matched exactly in normalisation and ordering (see bases.py), DIG's
    triplet torsion bug (the triplet's own k left among the reference candidates) is not reproduced.
    """

    direct_forces = False
    max_elements = NUM_EMBEDDINGS - 1

    def __init__(
        self,
        energy_and_force: bool = False,
        cutoff: float = 5.0,
        num_layers: int = 4,
        hidden_channels: int = 128,
        out_channels: int = 1,
        int_emb_size: int = 64,
        basis_emb_size_dist: int = 8,
        basis_emb_size_angle: int = 8,
        basis_emb_size_torsion: int = 8,
        out_emb_channels: int = 256,
        num_spherical: int = 7,
        num_radial: int = 6,
        envelope_exponent: int = 5,
        num_before_skip: int = 1,
        num_after_skip: int = 2,
        num_output_layers: int = 3,
        act: str | Callable[[Tensor], Tensor] = "swish",
        output_init: str = "GlorotOrthogonal",
        use_node_features: bool = True,
        use_extra_node_feature: bool = False,
        extra_node_feature_dim: int = 1,
        use_torsion: bool = True,
        max_num_neighbors: int | None = 32,
    ) -> None:
        super().__init__()
        self.capture_hparams(locals())
        if cutoff <= 0:
            raise ValueError(f"SphereNet: cutoff must be positive, got {cutoff}")
        if out_channels != 1:
            raise ValueError(f"SphereNet: a potential needs out_channels=1 (one energy), got {out_channels}")
        if use_extra_node_feature:
            raise ValueError("SphereNet: use_extra_node_feature=True is not supported (atom graphs carry no features)")
        if output_init not in ("GlorotOrthogonal", "zeros"):
            raise ValueError(f"SphereNet: output_init must be 'GlorotOrthogonal' or 'zeros', got {output_init!r}")
        if max_num_neighbors is not None and max_num_neighbors < 1:
            raise ValueError(f"SphereNet: max_num_neighbors must be >= 1 or None, got {max_num_neighbors}")
        if num_spherical < 1 or num_radial < 1 or num_layers < 0:
            raise ValueError("SphereNet: num_spherical and num_radial must be >= 1 and num_layers >= 0")
        if isinstance(act, str):
            if act.lower() not in _ACTIVATIONS:
                raise ValueError(f"SphereNet: unknown activation {act!r}; known: {sorted(_ACTIVATIONS)}")
            act_fn = _ACTIVATIONS[act.lower()]
        elif callable(act):
            act_fn = act
        else:
            raise ValueError(f"SphereNet: act must be a name or a callable, got {act!r}")
        if energy_and_force:
            logger.debug("SphereNet: energy_and_force is ignored; forces are always -dE/dpos from the calculator")

        self.cutoff = float(cutoff)
        self.max_neighbors = max_num_neighbors
        self.strict_max_neighbors = True
        self.use_torsion = bool(use_torsion)
        self.num_layers = num_layers
        self.basis_emb_size_angle = basis_emb_size_angle
        self.basis_emb_size_torsion = basis_emb_size_torsion
        #: triplets evaluated at once (whole edges per run; edges per run at most chunk_size // 4); None = all
        self.chunk_size: int | None = 65536
        #: recompute each run in the backward pass instead of keeping its activations (inference, more than
        #: CHECKPOINT_MIN_RUNS runs); each layer then rebuilds the triplet bases of each run from their directions
        self.activation_checkpointing = True

        self.init_e = InitBlock(num_radial, hidden_channels, act_fn, use_node_features)
        self.init_v = UpdateV(hidden_channels, out_emb_channels, out_channels, num_output_layers, act_fn, output_init)
        self.emb = Embeddings(num_spherical, num_radial, self.cutoff, envelope_exponent)
        self.update_vs = nn.ModuleList(
            UpdateV(hidden_channels, out_emb_channels, out_channels, num_output_layers, act_fn, output_init)
            for _ in range(num_layers)
        )
        self.update_es = nn.ModuleList(
            UpdateE(
                hidden_channels,
                int_emb_size,
                basis_emb_size_dist,
                basis_emb_size_angle,
                basis_emb_size_torsion,
                num_spherical,
                num_radial,
                num_before_skip,
                num_after_skip,
                act_fn,
            )
            for _ in range(num_layers)
        )

    def reset_parameters(self) -> None:
        """Re-draw all weights with DIG's initialisation (uses the global torch RNG; never called in inference)."""
        self.init_e.reset_parameters()
        self.init_v.reset_parameters()
        self.emb.dist_emb.reset_parameters()
        for block in (*self.update_es, *self.update_vs):
            block.reset_parameters()

    def _check(self, graph: AtomGraph) -> None:
        numbers = graph.numbers
        if numbers.numel() and (int(numbers.min()) < 0 or int(numbers.max()) > self.max_elements):
            raise ValueError(
                f"SphereNet: atomic numbers must lie in [0, {self.max_elements}], "
                f"got {int(numbers.min())}..{int(numbers.max())}"
            )
        if graph.num_edges and graph.cutoff and graph.cutoff > self.cutoff + 1e-12:
            raise ValueError(f"SphereNet: graph built with cutoff {graph.cutoff} > model cutoff {self.cutoff}")

    def geometry(self, graph: AtomGraph) -> dict[str, Any]:
        """Edge distances, triplets and the bases (rbf (E, R), sbf (T, L*R), tbf (T, L*L*R)) of a graph."""
        vec = graph.edge_vectors()
        dist = vec.norm(dim=-1)
        idx_kj, idx_ji = build_triplets(graph.edge_index, graph.cell_offsets, graph.num_atoms)
        ref = torsion_reference(vec, idx_kj, idx_ji) if self.use_torsion else None
        z, x, y = triplet_directions(vec, dist, idx_kj, idx_ji, ref)
        basis = self.emb.spherical
        radial_kj = gather(basis.radial(dist), idx_kj)
        sbf = basis.angle(radial_kj, z)
        tbf = basis.torsion(radial_kj, x, y, z) if ref is not None else basis.torsion_averaged(radial_kj, z)
        rbf = self.emb.dist_emb(dist)
        return {"rbf": rbf, "sbf": sbf, "tbf": tbf, "idx_kj": idx_kj, "idx_ji": idx_ji, "reference": ref}

    def estimate_memory(self, graph: AtomGraph) -> int:
        """Peak bytes of an energy + forces call (float32, resident memory): ``ESTIMATE_BASE_BYTES`` (1.0 GiB) +
        ``ESTIMATE_BYTES_PER_TRIPLET`` (520 B) per triplet, fitted to ``benchmarks/memory.py`` on rattled fcc Cu
        with DIG's default sizes (1,008 / 5,324 atoms, 1.0 / 5.3 million triplets: 1.43 / 3.31 GiB measured on
        Linux with glibc, the fit 1.49 / 3.56 GiB). Without glibc's ``malloc_trim`` (``release_free_heap``) the
        resident memory of a large call is ~40 % higher than this."""
        if graph.num_edges == 0:
            return 0
        src, dst = graph.edge_index[0], graph.edge_index[1]
        degree = torch.bincount(dst, minlength=graph.num_atoms)
        triplets = int(degree[src].sum()) - graph.num_edges  # the reverse edge of each edge is no triplet
        return int(ESTIMATE_BASE_BYTES + ESTIMATE_BYTES_PER_TRIPLET * max(triplets, 0))

    def forward(self, graph: AtomGraph) -> dict[str, Tensor]:
        """Energy per structure (B,), in the dtype of ``graph.pos``.

        Evaluated in runs of whole edges (all triplets into an edge j->i together) of at most ``chunk_size``
        triplets: the torsion references, triplet bases and messages of one run at a time. With more than
        ``CHECKPOINT_MIN_RUNS`` runs and gradients recorded outside training, each run's work is checkpointed
        (recomputed in the backward pass) when ``activation_checkpointing`` is on, so the memory of an energy +
        forces call grows linearly with the triplets (``mlcalc.nn.chunking``): a triplet then keeps only its indices,
        torsion reference and direction (3 numbers and their gradient), and each layer rebuilds the angle and torsion
        bases of a run from the directions (``_layer_update``; keeping the bases projected for all layers instead
        cost 0.5 kB per triplet with their gradient, 2.7 GB at 5,324 Cu atoms). Without checkpointing the bases are
        built once per run and projected at once by every layer's ``lin_sbf1`` / ``lin_t1`` (T x 8 numbers per
        layer are kept instead of the T x L*L*R torsion basis). The sums are the same as ``geometry`` +
        ``UpdateE.forward`` on all edges at once, up to float rounding.
        """
        self._check(graph)
        vec = graph.edge_vectors()
        dist = vec.norm(dim=-1)
        j, i = graph.edge_index[0], graph.edge_index[1]
        num_atoms, num_graphs, num_edges = graph.num_atoms, graph.num_graphs, dist.shape[0]
        idx_kj, idx_ji = build_triplets(graph.edge_index, graph.cell_offsets, num_atoms)
        limit = self.chunk_size
        runs = group_chunks(idx_ji, num_edges, limit, None if limit is None else max(1, limit // 4))
        ckpt = self.activation_checkpointing and not self.training and len(runs) > CHECKPOINT_MIN_RUNS

        # per run: triplet indices local to the run, and either the bases projected for all layers (kept with
        # their gradient: T x 64 numbers and as many gradients at the defaults) or, checkpointed, only the triplet
        # directions (T x 3), from which each layer's checkpointed update rebuilds the bases of the run
        kj_runs, ji_runs, proj_runs = [], [], []
        # (E, L, R), recomputed run by run in the backward pass (it keeps ~20 such tensors for its gradient)
        edge_rows = [(run.g0, run.g1) for run in runs]
        radial = _assemble(
            (checkpoint(self.emb.spherical.radial, d, enabled=ckpt) for d in split_rows(dist, runs)),
            edge_rows,
            num_edges,
        )
        for run in runs if self.num_layers else []:
            kj, ji = idx_kj[run.r0 : run.r1], idx_ji[run.r0 : run.r1]
            ref = classes = None
            if self.use_torsion:
                ref = torsion_reference(vec.detach(), kj, ji)
                classes = half_plane_classes(vec.detach(), kj, ji)
            if ckpt:
                proj_runs.append(checkpoint(self._directions, vec, dist, kj, ji, ref, classes, enabled=True))
            else:
                proj_runs.append(self._projected_bases(vec, dist, radial, kj, ji, ref, classes))
            kj_runs.append(kj)
            ji_runs.append(ji - run.g0)

        rbf = self.emb.dist_emb(dist)
        rbf_runs = split_rows(rbf, runs)
        i_runs, j_runs = split_rows(i, runs), split_rows(j, runs)
        numbers = graph.numbers
        e1, e2 = _assemble(
            (
                checkpoint(self.init_e, numbers, r, a, b, enabled=ckpt)
                for r, a, b in zip(rbf_runs, i_runs, j_runs, strict=True)
            ),
            edge_rows,
            num_edges,
        )
        v = self.init_v((e1, e2), i, num_atoms)
        del e2
        n_a, n_t = self.basis_emb_size_angle, self.basis_emb_size_torsion
        for layer, (update_e, update_v) in enumerate(zip(self.update_es, self.update_vs, strict=True)):
            x1_runs = split_rows(e1, runs)
            x_kj = _assemble(
                (checkpoint(update_e.down, x, r, enabled=ckpt) for x, r in zip(x1_runs, rbf_runs, strict=True)),
                edge_rows,
                num_edges,
            )
            s_cols = slice(layer * n_a, (layer + 1) * n_a)
            t_cols = slice(self.num_layers * n_a + layer * n_t, self.num_layers * n_a + (layer + 1) * n_t)
            if ckpt:
                update = partial(self._layer_update, update_e)
                out = (
                    checkpoint(update, x_kj, d, radial, kj, ji, x, r, enabled=True)
                    for d, kj, ji, x, r in zip(proj_runs, kj_runs, ji_runs, x1_runs, rbf_runs, strict=True)
                )
            else:
                out = (
                    update_e.edge_update(x_kj, p[:, s_cols], p[:, t_cols], kj, ji, x, r)
                    for p, kj, ji, x, r in zip(proj_runs, kj_runs, ji_runs, x1_runs, rbf_runs, strict=True)
                )
            e1, e2 = _assemble(out, edge_rows, num_edges)
            v = v + update_v((e1, e2), i, num_atoms)
            del out, x_kj, e2, x1_runs
            if ckpt:  # a chunked call: return the heap its runs fragmented (resident memory, not results)
                release_free_heap()
        energy = scatter_sum(v[:, 0], graph.batch, num_graphs)
        return {"energy": energy.to(graph.pos.dtype)}

    def _projected_bases(
        self,
        vec: Tensor,
        dist: Tensor,
        radial: Tensor,
        idx_kj: Tensor,
        idx_ji: Tensor,
        ref: Tensor | None,
        classes: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """Angle and torsion bases of some triplets projected by every layer's lin_sbf1 and lin_t1.

        vec (E, 3), dist (E,), radial (E, L, R) of all edges; idx_kj, idx_ji (T',) global edge indices of whole
        groups of triplets (all triplets of each edge j->i), ref (T',) their torsion references and ``classes``
        their ``half_plane_classes``, both local to these triplets. Returns (T', num_layers * (angle + torsion
        basis_emb_size)): all layers' angle projections, then all layers' torsion projections.
        """
        basis = self.emb.spherical
        z, x, y = triplet_directions(vec, dist, idx_kj, idx_ji, ref, classes)
        radial_kj = gather(radial, idx_kj)
        w_s = torch.cat([u.lin_sbf1.weight for u in self.update_es])
        w_t = torch.cat([u.lin_t1.weight for u in self.update_es])
        return torch.cat(basis.projected(radial_kj, x, y, z, w_s, w_t), dim=1)

    def _directions(
        self, vec: Tensor, dist: Tensor, idx_kj: Tensor, idx_ji: Tensor, ref: Tensor | None, classes: Any
    ) -> Tensor:
        """Direction of k in the frame of each triplet (``triplet_directions``): (T', 3) columns z, x, y, or (T', 1)
        z alone without torsion."""
        z, x, y = triplet_directions(vec, dist, idx_kj, idx_ji, ref, classes)
        return z.unsqueeze(1) if x is None else torch.stack([z, x, y], dim=1)

    def _layer_update(
        self,
        update_e: UpdateE,
        x_kj: Tensor,
        directions: Tensor,
        radial: Tensor,
        idx_kj: Tensor,
        idx_ji: Tensor,
        x1: Tensor,
        rbf: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """``update_e.edge_update`` of a run of edges with the run's bases rebuilt from the triplet ``directions``
        (``_directions``) and ``radial`` (E, L, R) of all edges; idx_kj global, idx_ji local to the run."""
        basis = self.emb.spherical
        radial_kj = gather(radial, idx_kj)
        z = directions[:, 0]
        x, y = (directions[:, 1], directions[:, 2]) if directions.shape[1] == 3 else (None, None)
        sbf1, t1 = basis.projected(radial_kj, x, y, z, update_e.lin_sbf1.weight, update_e.lin_t1.weight)
        return update_e.edge_update(x_kj, sbf1, t1, idx_kj, idx_ji, x1, rbf)
