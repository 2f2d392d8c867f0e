"""compile=True: torch.compile of the model forward with dynamic sizes; equal to eager, no recompiling per size."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from mlcalc import load_calculator

pytestmark = pytest.mark.slow
LJ = Path(__file__).resolve().parents[1] / "checkpoints" / "lj_argon.pt"


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_equals_eager_across_sizes_without_recompiling() -> None:
    import torch._dynamo

    eager = load_calculator(LJ, device="cpu", dtype="float64")
    compiled = load_calculator(LJ, device="cpu", dtype="float64", compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for k, reps in enumerate([(1, 1, 1), (2, 1, 1), (2, 2, 1), (3, 2, 2)]):
        atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * reps
        atoms.rattle(0.1, seed=k)
        a, b = eager.predict([atoms])[0], compiled.predict([atoms])[0]
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-10)
        assert np.abs(a["forces"] - b["forces"]).max() < 1e-10
        assert np.abs(a["stress"] - b["stress"]).max() < 1e-10
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= frames <= 2, f"{frames} graphs compiled for 4 sizes: sizes must be dynamic (measured: 1)"
    clone = pickle.loads(pickle.dumps(compiled))  # compiled code is not pickled; rebuilt on use
    assert clone._compiled_forward is None and clone.compile


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_gemnet_oc_compiled_equals_eager_without_recompiling() -> None:
    """GemNet-OC with quadruplets (a tagged slab), direct forces, float32: the compiled forward equals eager within
    float32 rounding, and later calls (new positions, a larger slab) compile nothing new."""
    import torch
    import torch._dynamo
    from test_gemnet_oc_memory import slab, small_model

    from mlcalc import MLCalculator

    model = small_model(direct=True).float()
    eager = MLCalculator(model, device="cpu")
    compiled = MLCalculator(model, device="cpu", compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    structures = [slab(), slab(), slab((3, 2, 3), seed=3)]
    structures[1].rattle(0.05, seed=7)
    graphs = []
    for atoms in structures:
        a, b = eager.predict([atoms])[0], compiled.predict([atoms])[0]
        scale = np.abs(a["forces"]).max()
        assert a["energy"] == pytest.approx(b["energy"], rel=1e-4, abs=1e-4)
        assert np.abs(a["forces"] - b["forces"]).max() < 1e-4 * scale
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1
    assert graphs[-1] == graphs[0], f"graphs compiled after each call: {graphs} (later calls must reuse them)"
