"""The calculator refuses a system whose estimated peak memory exceeds what the device has free."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from ase.build import bulk

import mlcalc.memory
from mlcalc import MLCalculator
from mlcalc.models.lennard_jones import LennardJones
from mlcalc.models.spherenet import SphereNet
from mlcalc.models.spherenet import model as spherenet_model
from mlcalc.models.spherenet.geometry import build_triplets


def test_available_bytes_cpu():
    available = mlcalc.memory.available_bytes("cpu")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/meminfo")
    assert available is not None and 0 < available < 1 << 50


def test_refuses_what_cannot_fit(monkeypatch):
    model = LennardJones(sigma=2.338, epsilon=0.4093, rc=5.0)
    model.estimate_memory = lambda graph: 10 * 1024**3 * graph.num_atoms  # 10 GiB per atom in float32
    monkeypatch.setattr(mlcalc.memory, "available_bytes", lambda device: 16 * 1024**3)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.calc = MLCalculator(model, device="cpu", dtype="float64")
    with pytest.raises(MemoryError, match=r"needs about 80\.0 GiB for 4 atoms .* 16\.0 GiB free on cpu"):
        atoms.get_potential_energy()
    single = atoms[:1].copy()
    single.calc = MLCalculator(model, device="cpu", dtype="float32")
    assert np.isfinite(single.get_potential_energy())  # 10 GiB <= 16 GiB: runs
    atoms.calc = MLCalculator(model, device="cpu", dtype="float64", check_memory=False)
    assert np.isfinite(atoms.get_potential_energy())


def test_spherenet_estimate_counts_the_triplets():
    """The estimate's cheap triplet count (from the degrees) is the model's own triplet count (to 1 %: under
    max_num_neighbors an edge's reverse is not always in the graph)."""
    model = SphereNet()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (4, 4, 4)
    atoms.rattle(0.05, seed=0)
    graph = MLCalculator(model, device="cpu").build_graph(atoms)
    idx_kj, _ = build_triplets(graph.edge_index, graph.cell_offsets, graph.num_atoms)
    base, per_triplet = spherenet_model.ESTIMATE_BASE_BYTES, spherenet_model.ESTIMATE_BYTES_PER_TRIPLET
    assert model.estimate_memory(graph) - base == pytest.approx(per_triplet * idx_kj.numel(), rel=1e-2)


def test_float64_doubles_the_estimate(monkeypatch):
    model = LennardJones(sigma=2.338, epsilon=0.4093, rc=5.0)
    model.estimate_memory = lambda graph: 8 * 1024**3
    monkeypatch.setattr(mlcalc.memory, "available_bytes", lambda device: 12 * 1024**3)
    atoms = bulk("Cu", "fcc", a=3.61)
    mlcalc.memory.check_fits(model, MLCalculator(model).build_graph(atoms), "cpu", torch.float32)
    with pytest.raises(MemoryError, match="16.0 GiB"):
        mlcalc.memory.check_fits(model, MLCalculator(model).build_graph(atoms), "cpu", torch.float64)


@pytest.mark.parametrize("family", ["spherenet", "escn", "scn", "gemnet_oc", "gemnet_oc_direct"])
def test_every_large_model_refuses_before_evaluating(family, monkeypatch):
    """With 1 MiB free, each graph model refuses a 32-atom cell with MemoryError before its forward runs."""
    from test_chunking_escn_scn import _escn, _scn
    from test_gemnet_oc_memory import small_model

    model = {
        "spherenet": lambda: SphereNet(num_layers=1),
        "escn": _escn,
        "scn": _scn,
        "gemnet_oc": lambda: small_model(direct=False),
        "gemnet_oc_direct": lambda: small_model(direct=True),
    }[family]()
    monkeypatch.setattr(mlcalc.memory, "available_bytes", lambda device: 1024**2)
    monkeypatch.setattr(type(model), "forward", lambda self, graph: pytest.fail("forward ran"))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    atoms.calc = MLCalculator(model, device="cpu")
    with pytest.raises(MemoryError, match=r"for 32 atoms in 1 structure\(s\) \(\d+ edges within"):
        atoms.get_forces()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "64"])
def test_chunk_size_must_be_a_positive_integer(bad):
    model = SphereNet(num_layers=1)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
        model.chunk_size = bad
    model.chunk_size = np.int64(7)
    assert model.chunk_size == 7 and type(model.chunk_size) is int
    model.chunk_size = None
    assert model.chunk_size is None


def test_first_direct_force_call_counts_the_packed_weights(monkeypatch):
    """A direct-force model's first float32 CPU call keeps prepacked copies of its linear weights
    (mlcalc.nn.linear): the check adds their bytes until they exist."""
    from test_gemnet_oc_memory import slab, small_model

    from mlcalc.calculator import evaluate_model
    from mlcalc.nn.linear import Linear, onednn_linear_available, pending_pack_bytes

    if not onednn_linear_available():
        pytest.skip("torch build without oneDNN linear")
    model = small_model(direct=True).float()
    weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Linear))
    assert pending_pack_bytes(model) == weights > 0
    graph = MLCalculator(model, device="cpu", dtype="float32").build_graph(slab())
    estimate = model.estimate_memory(graph)
    monkeypatch.setattr(mlcalc.memory, "available_bytes", lambda device: estimate + weights // 2)
    with pytest.raises(MemoryError):
        mlcalc.memory.check_fits(model, graph, "cpu", torch.float32)
    with torch.no_grad():
        evaluate_model(model, graph)  # packs them
    assert pending_pack_bytes(model) == 0
    mlcalc.memory.check_fits(model, graph, "cpu", torch.float32)  # fits now
