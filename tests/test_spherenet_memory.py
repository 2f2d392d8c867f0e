"""SphereNet in runs of edges (``chunk_size``) with activation checkpointing: same numbers, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from mlcalc import MLCalculator
from mlcalc.calculator import evaluate_model
from mlcalc.models.spherenet import SphereNet
from mlcalc.models.spherenet.geometry import build_triplets
from mlcalc.nn.chunking import group_chunks
from mlcalc.testing import LiveTensorPeak


def copper(reps: int = 2) -> object:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (reps, reps, reps)
    atoms.rattle(0.1, seed=1)
    return atoms


def model(**kw) -> SphereNet:
    torch.manual_seed(0)
    return SphereNet(cutoff=3.0, num_layers=2, hidden_channels=32, int_emb_size=16, out_emb_channels=32, **kw).eval()


def results(m: SphereNet, atoms, chunk_size: int | None, checkpointing: bool) -> tuple:
    m.chunk_size, m.activation_checkpointing = chunk_size, checkpointing
    a = atoms.copy()
    a.calc = MLCalculator(m, device="cpu", dtype="float64")
    return a.get_potential_energy(), a.get_forces(), a.get_stress()


@pytest.mark.parametrize("use_torsion", [True, False])
def test_runs_equal_all_at_once(use_torsion):
    """32 rattled Cu atoms, ~4,000 triplets: runs of at most 500 triplets (ragged last run) with and without
    checkpointing give the one-run energy, forces and stress to float64 rounding."""
    m = model(use_torsion=use_torsion)
    atoms = copper()
    e0, f0, s0 = results(m, atoms, None, False)
    for chunk, ckpt in [(500, True), (500, False), (97, True)]:
        e, f, s = results(m, atoms, chunk, ckpt)
        assert e == pytest.approx(e0, abs=1e-10)
        np.testing.assert_allclose(f, f0, atol=1e-10)
        np.testing.assert_allclose(s, s0, atol=1e-12)


def test_group_chunks_cover_whole_groups():
    groups = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 3, 5])  # group 1 and 4 empty, group 3 above the limit
    chunks = group_chunks(groups, 7, max_rows=4)
    assert [(c.g0, c.g1, c.r0, c.r1) for c in chunks] == [(0, 2, 0, 3), (2, 3, 3, 5), (3, 4, 5, 10), (4, 7, 10, 11)]
    assert group_chunks(groups, 7, None) == group_chunks(groups, 7, 100)
    assert len(group_chunks(groups, 7, None, max_groups=3)) == 3


def test_peak_memory_bounded_by_the_run():
    """Energy + forces: the live-tensor peak with runs of 2,000 triplets is a fraction of the one-run peak (which
    holds every triplet's 294-wide torsion basis and its gradient)."""
    m = model()
    atoms = copper(4)  # 256 atoms, ~3 * 10^4 triplets
    calc = MLCalculator(m, device="cpu", dtype="float32")
    graph = calc.build_graph(atoms)
    peaks = {}
    for chunk in (None, 2000):
        m.chunk_size = chunk
        with LiveTensorPeak() as p:
            out = evaluate_model(m, graph)
        peaks[chunk] = (p.peak, out["forces"])
    assert peaks[2000][0] < peaks[None][0] / 4, peaks
    torch.testing.assert_close(peaks[2000][1], peaks[None][1], atol=1e-4, rtol=1e-4)


def test_checkpointed_memory_per_triplet():
    """Checkpointed (runs of 2,000 triplets), a triplet keeps only its indices, torsion reference and direction: the
    live-tensor peak grows by ~210 B per triplet from 256 to 500 atoms (it grew by ~430 B when the bases projected
    for all layers were kept with their gradient, 2 layers x 16 numbers x 2)."""
    m = model()
    m.chunk_size = 2000
    peaks = []
    for reps in (4, 5):
        graph = MLCalculator(m, device="cpu", dtype="float32").build_graph(copper(reps))
        num_triplets = group_chunks(
            build_triplets(graph.edge_index, graph.cell_offsets, graph.num_atoms)[1], graph.num_edges, None
        )[0].r1
        with LiveTensorPeak() as p:
            evaluate_model(m, graph)
        peaks.append((num_triplets, p.peak))
    (t0, p0), (t1, p1) = peaks
    assert (p1 - p0) / (t1 - t0) < 300, peaks


def test_chunked_calls_return_the_freed_heap_between_layers(monkeypatch):
    """A checkpointed (many-run) call hands the heap its runs fragmented back to the OS after every layer
    (``mlcalc.memory.release_free_heap``); a one-run call does not pay for it."""
    import mlcalc.models.spherenet.model as spherenet_model
    from mlcalc.memory import release_free_heap

    release_free_heap()  # callable on any platform (a no-op without glibc)
    calls = []
    monkeypatch.setattr(spherenet_model, "release_free_heap", lambda: calls.append(1))
    m = model()
    results(m, copper(2), 500, True)
    assert len(calls) == m.num_layers
    calls.clear()
    results(m, copper(2), None, True)
    assert calls == []
