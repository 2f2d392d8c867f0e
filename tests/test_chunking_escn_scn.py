"""eSCN / SCN ``chunk_size``: chunked message passing equals the all-at-once forward, and bounds the largest tensor."""

from __future__ import annotations

import pytest
import torch
from ase import Atoms
from ase.build import bulk
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from mlcalc.graph import AtomGraph, radius_graph
from mlcalc.models.base import MLModel
from mlcalc.models.escn import ESCN
from mlcalc.models.scn import SCN

CUTOFF = 5.0  # Å


def _escn() -> ESCN:
    """Small random eSCN with two resolutions (covers the per-resolution concatenations)."""
    torch.manual_seed(0)
    model = ESCN(
        num_layers=2,
        lmax_list=[3, 2],
        mmax_list=[2, 1],
        sphere_channels=32,
        hidden_channels=16,
        edge_channels=16,
        cutoff=CUTOFF,
        max_neighbors=20,
        num_sphere_samples=16,
    )
    return model.double().eval()


def _scn() -> SCN:
    """Small random SCN with two resolutions, four taps and down/up-sampling."""
    torch.manual_seed(0)
    model = SCN(
        num_interactions=2,
        lmax=4,
        mmax=1,
        num_taps=-1,
        num_resolutions=2,
        sphere_channels=24,
        sphere_channels_reduce=16,
        hidden_channels=16,
        num_basis_functions=8,
        num_sphere_samples=16,
        cutoff=CUTOFF,
        max_num_neighbors=20,
    )
    return model.double().eval()


MODELS = {"escn": _escn, "scn": _scn}


def _copper(seed: int = 0) -> Atoms:
    """16 rattled fcc Cu atoms in a periodic cell (~300 edges within 5 Å, 20 neighbours at most)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    atoms.rattle(0.05, seed=seed)
    return atoms


def _graph(model: MLModel, atoms: Atoms) -> AtomGraph:
    return radius_graph(atoms, model.cutoff, model.max_neighbors, True, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunked_equals_unchunked(name: str) -> None:
    """chunk_size 7 (many edge chunks with a ragged last one, one-atom chunks) vs None: same energy and forces."""
    model = MODELS[name]()
    graph = _graph(model, _copper())
    num_edges = graph.edge_index.shape[1]
    assert num_edges % 7 != 0 and num_edges > 100
    with torch.no_grad():
        model.chunk_size = None
        ref = model(graph)
        model.chunk_size = 7
        assert model.atom_chunk_size == 1
        out = model(graph)
    assert torch.allclose(out["energy"], ref["energy"], rtol=0, atol=1e-10)
    assert torch.allclose(out["forces"], ref["forces"], rtol=0, atol=1e-10)
    assert ref["forces"].abs().max() > 1e-6  # not trivially zero


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunked_gradients_equal_unchunked(name: str) -> None:
    """Autograd through the chunked loops (as in training, create_graph=True): same parameter gradients."""
    model = MODELS[name]()
    graph = _graph(model, _copper(seed=1))
    grads = {}
    for chunk in (None, 7):
        model.chunk_size = chunk
        model.zero_grad(set_to_none=True)
        out = model(graph)
        loss = out["energy"].sum() + (out["forces"] ** 2).sum()
        params = [p for p in model.parameters() if p.requires_grad]
        grads[chunk] = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    for a, b in zip(grads[None], grads[7], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=0, atol=1e-10)


class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point tensor (numel) that an op creates (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def record(t: torch.Tensor) -> None:
            if t.is_floating_point() and not t._is_view() and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)

        tree_map_only(torch.Tensor, record, out)
        return out


def _largest(model: MLModel, graph: AtomGraph, chunk: int | None) -> int:
    model.chunk_size = chunk
    with torch.no_grad():
        model(graph)  # constants built outside the measurement
        with LargestTensor() as mode:
            model(graph)
    return mode.largest


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunking_bounds_the_largest_tensor(name: str) -> None:
    """Without chunking, the per-edge message tensors (O(E S C)) are the largest of a forward, several times what
    the call keeps for all edges or atoms anyway (the edge frames' Wigner blocks, O(E S); the atom states,
    O(N S C)). With a small chunk, no tensor exceeds those or one chunk's share of the per-edge tensors."""
    model = MODELS[name]()
    graph = _graph(model, _copper())
    num_edges, num_atoms = graph.edge_index.shape[1], graph.pos.shape[0]
    if isinstance(model, ESCN):
        layout = model.layout(graph.pos.device, graph.pos.dtype)
        frames = max(k * s for k, s in zip(layout.reduced_sizes, layout.num_coefficients, strict=True))
        states = sum(layout.num_coefficients) * model.sphere_channels
    else:
        frames = (2 * model.lmax + 1) ** 2  # Wigner matrices of degree lmax, computed for a resolution's edges
        states = model.sphere_basis * model.sphere_channels
    kept = max(num_edges * frames, num_atoms * states)

    unchunked = _largest(model, graph, None)
    assert unchunked >= 4 * kept, (unchunked, kept)
    per_edge = unchunked / num_edges  # width of the largest per-edge tensor
    for chunk in (4, 16):
        # what is kept anyway, or a per-edge tensor of one chunk (margin 2)
        assert _largest(model, graph, chunk) <= max(kept, 2 * chunk * per_edge), chunk
