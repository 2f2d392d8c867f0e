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
