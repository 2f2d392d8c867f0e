"""GemNet-OC memory bounds: chunked execution (``chunk_size``) and activation checkpointing change no number (float64,
to rounding) and bound what a call holds: the largest tensor of a no-grad forward and the peak of live tensors of a
gradient-force call."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc111
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

import mlcalc.models.gemnet_oc  # noqa: F401  (registers the model)
from mlcalc import GemNetOCCalculator
from mlcalc.calculator import evaluate_model
from mlcalc.models.gemnet_oc import GemNetOC
from mlcalc.testing import LiveTensorPeak

#: all four interactions, quadruplets on for tags 1 and 2; small widths so that a call takes well under a second
SMALL = dict(
    num_spherical=3, num_radial=8, num_blocks=2, emb_size_atom=8, emb_size_edge=16, emb_size_trip_in=16,
    emb_size_trip_out=4, emb_size_quad_in=4, emb_size_quad_out=4, emb_size_aint_in=16, emb_size_aint_out=4,
    emb_size_rbf=4, emb_size_cbf=4, emb_size_sbf=4, num_before_skip=1, num_after_skip=2, num_concat=1, num_atom=1,
    num_output_afteratom=1, num_atom_emb_layers=1, num_global_out_layers=1, cutoff=5.0, cutoff_qint=4.0,
    cutoff_aeaint=4.5, cutoff_aint=6.0, max_neighbors=20, max_neighbors_qint=8, max_neighbors_aeaint=12,
    max_neighbors_aint=40, quad_interaction=True, atom_edge_interaction=True, edge_atom_interaction=True,
    atom_interaction=True, qint_tags=[1, 2], sbf={"name": "legendre_outer"},
)  # fmt: skip
#: rows per chunk for the equality tests: many chunks (edges, triplets, atoms), the last one ragged
SMALL_CHUNK = 37


def small_model(direct: bool) -> GemNetOC:
    """Random weights (scale factors 1), float64, eval mode (the calculator's mode)."""
    torch.manual_seed(0)
    model = GemNetOC.from_config(dict(SMALL, direct_forces=direct)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 0:
                p.normal_(0.0, 0.3)
    return model


def slab(size: tuple[int, int, int] = (2, 2, 3), seed: int = 1):
    """Cu(111) of ``size`` (default 2x2x3: 13 atoms) with an O adsorbate; top layer tagged 1, O tagged 2
    (quadruplets on); rattled with ``seed``."""
    atoms = fcc111("Cu", size=size, vacuum=6.0, a=3.61)
    add_adsorbate(atoms, "O", 1.2, "fcc")
    tags = np.zeros(len(atoms), dtype=int)
    tags[(size[2] - 1) * size[0] * size[1] :] = 1
    tags[-1] = 2
    atoms.set_tags(tags)
    atoms.rattle(0.05, seed=seed)
    return atoms


def call(model: GemNetOC, graph, chunk_size: int | None, checkpointing: bool, stress: bool = False) -> dict:
    model.chunk_size, model.activation_checkpointing = chunk_size, checkpointing
    return evaluate_model(model, graph, stress=stress)


@pytest.fixture(scope="module")
def slab_graphs():
    """The slab's graph for each model variant, and the same graph with its edges in reverse order (targets not
    ascending: the layouts then chunk through a sort order instead of row ranges)."""
    out = {}
    for direct in (False, True):
        model = small_model(direct)
        graph = GemNetOCCalculator(model, device="cpu", dtype="float64").build_graph(slab())
        rev = torch.arange(graph.edge_index.shape[1] - 1, -1, -1)
        shuffled = dataclasses.replace(graph, edge_index=graph.edge_index[:, rev], cell_offsets=graph.cell_offsets[rev])
        out[direct] = (model, graph, shuffled)
    return out


# ------------------------------------------------------------------------------------------------ same numbers
@pytest.mark.parametrize("direct", [False, True], ids=["gradient", "direct"])
@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_chunked_and_checkpointed_equal_plain(slab_graphs, direct, order):
    model, graph, shuffled = slab_graphs[direct]
    g = graph if order == "sorted" else shuffled
    idx = model.build_indices(g)
    assert idx.quad.out.numel() > 0 and idx.trip_e2a.out.numel() > 0  # every interaction has work
    stress = not direct
    ref = call(model, g, None, False, stress)
    model.chunk_size = SMALL_CHUNK
    idx = model.build_indices(g)
    # several chunks, the last one smaller, for the edge-wise maps and for a padded layout
    assert idx.main.num > 3 * SMALL_CHUNK and idx.main.num % SMALL_CHUNK != 0
    assert len(idx.a2a_agg.chunks) > 3
    # targets ascending: the edge -> atom layer runs edges and triplets by ranges; else through a sort order
    assert (idx.a2ee2a_agg.inner_rows is not None) == (order == "sorted")
    assert (idx.a2a_agg.order is None) == (order == "sorted")
    for checkpointing in (False, True):
        got = call(model, g, SMALL_CHUNK, checkpointing, stress)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-10, msg=key)
    if order == "unsorted":  # and the permuted graph is the same structure
        sorted_ref = call(model, graph, None, False, stress)
        for key in ref:
            torch.testing.assert_close(ref[key], sorted_ref[key], rtol=0, atol=1e-10)


def test_checkpointing_is_off_in_training_and_without_autograd(slab_graphs):
    model, graph, _ = slab_graphs[False]
    model.chunk_size, model.activation_checkpointing = 1000, True
    assert model.chunking().checkpoint
    with torch.no_grad():
        assert not model.chunking().checkpoint
    model.train()
    try:
        assert not model.chunking().checkpoint
    finally:
        model.eval()
    model.activation_checkpointing = False
    assert not model.chunking().checkpoint and model.chunking().rows == 1000


def test_checkpointing_only_when_the_call_spans_chunks(slab_graphs, monkeypatch):
    """A call that fits in one chunk keeps its activations (recomputing them would only cost time); a call of
    several chunks is checkpointed."""
    from mlcalc.nn import chunking as chunking_module

    model, graph, _ = slab_graphs[False]
    entered = []
    original = chunking_module._torch_checkpoint

    def counting(*args, **kwargs):
        entered.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(chunking_module, "_torch_checkpoint", counting)
    model.activation_checkpointing = True
    for chunk, spans in [(None, False), (100_000, False), (SMALL_CHUNK, True)]:
        model.chunk_size = chunk
        with torch.no_grad():
            idx = model.build_indices(graph)
        assert model.spans_chunks(idx) is spans
        assert model.chunking(idx).checkpoint is spans
        entered.clear()
        evaluate_model(model, graph)
        assert bool(entered) is spans


def test_parameter_gradients_of_force_loss_unchanged_by_chunking(slab_graphs):
    """Training differentiates the forces (create_graph): chunked, eval-mode checkpointed and plain agree."""
    model, graph, _ = slab_graphs[False]
    grads = []
    for chunk, checkpointing in [(None, False), (100, False), (100, True)]:
        model.chunk_size, model.activation_checkpointing = chunk, checkpointing
        model.zero_grad()
        out = evaluate_model(model, graph, create_graph=True)
        (out["forces"].square().sum() + out["energy"].sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-10, atol=1e-10)  # some entries are ~1e5


# ------------------------------------------------------------------------------------------------ memory
class LargestTensor(TorchDispatchMode):
    """Largest floating-point tensor (bytes) any op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def record(t: torch.Tensor) -> None:
            if t.is_floating_point():
                self.largest = max(self.largest, t.numel() * t.element_size())

        tree_map_only(torch.Tensor, record, out)
        return out


@pytest.fixture(scope="module")
def bulk_graph():
    """108-atom rattled fcc Cu: ~2000 main edges, ~40 a2a neighbours and ~20 triplets per edge."""
    model = small_model(True)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    atoms.rattle(0.05, seed=2)
    return GemNetOCCalculator(model, device="cpu", dtype="float64").build_graph(atoms)


def test_chunked_forward_creates_no_large_tensor(bulk_graph):
    """Without autograd the padded layouts (edges x triplets per edge, atoms x a2a neighbours) and the raw bases
    (a2a edges x num_radial) dominate the largest tensor; in chunks none of them exists whole."""
    model = small_model(True)
    largest = {}
    for chunk in (None, 256):
        model.chunk_size = chunk
        with torch.no_grad(), LargestTensor() as mode:
            evaluate_model(model, bulk_graph)
        largest[chunk] = mode.largest
    a2a_edges = model.build_indices(bulk_graph).a2a.num
    assert largest[None] >= a2a_edges * SMALL["num_radial"] * 8  # the whole raw a2a basis
    assert largest[256] * 4 < largest[None], largest


def test_checkpointing_lowers_the_peak_of_a_gradient_call(bulk_graph):
    """Gradient forces: autograd keeps every intermediate of every block until the backward; with checkpointing
    it keeps block inputs and recomputes one chunk at a time (live tensor bytes, allocator-independent)."""
    model = small_model(False)
    peak = {}
    for chunk, checkpointing in [(None, False), (1024, True)]:
        model.chunk_size, model.activation_checkpointing = chunk, checkpointing
        with LiveTensorPeak() as mode:
            out = evaluate_model(model, bulk_graph)
        assert torch.isfinite(out["forces"]).all()
        peak[checkpointing] = mode.peak
    assert peak[True] * 3 < peak[False], peak


def test_chunked_calls_return_the_freed_heap_between_blocks(slab_graphs, monkeypatch):
    """A call of many chunks hands its fragmented heap back after every block, forward and backward
    (``mlcalc.memory.release_free_heap``); a one-chunk call does not pay for it."""
    import mlcalc.models.gemnet_oc.model as gemnet_model

    calls = []
    monkeypatch.setattr(gemnet_model, "release_free_heap", lambda: calls.append(1))
    model, graph, _ = slab_graphs[False]
    model.activation_checkpointing = True
    model.chunk_size = SMALL_CHUNK
    evaluate_model(model, graph)  # gradient forces: forward and backward
    assert len(calls) == 2 * model.num_blocks
    calls.clear()
    model.chunk_size = None
    evaluate_model(model, graph)
    assert calls == []
