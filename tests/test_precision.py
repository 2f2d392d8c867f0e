"""Per-calculator matmul precision: set only while the calculator evaluates, restored after, never leaked."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111

from mlcalc import load_calculator
from mlcalc.calculator import matmul_precision

ROOT = Path(__file__).resolve().parents[1]
GEMNET = ROOT / "checkpoints" / "gemnet_oc-emt.pt"


def _slab():
    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.2, "fcc")
    slab.rattle(0.05, seed=1)
    return slab


def test_precision_is_per_instance_and_restored() -> None:
    assert torch.get_float32_matmul_precision() == "highest"
    seen = []

    medium = load_calculator(GEMNET, device="cpu", matmul_precision="medium")
    original = medium.model.forward

    def spy(graph):
        seen.append(torch.get_float32_matmul_precision())
        return original(graph)

    medium.model.forward = spy
    atoms = _slab()
    atoms.calc = medium
    atoms.get_forces()
    assert seen == ["medium"] and torch.get_float32_matmul_precision() == "highest"
    assert medium.info["matmul_precision"] == "medium"


def test_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError), matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
        raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == "highest"


def test_medium_stays_close_to_highest_and_highest_is_unchanged() -> None:
    """bfloat16 matmuls (float32 accumulation) move energies and forces by little; a "highest" calculator used
    between "medium" calls in other threads is bit-identical to one used alone."""
    slab = _slab()
    ref = load_calculator(GEMNET, device="cpu")
    medium = load_calculator(GEMNET, device="cpu", matmul_precision="medium")
    e_ref, f_ref = ref.predict([slab])[0]["energy"], ref.predict([slab])[0]["forces"]
    e_med, f_med = medium.predict([slab])[0]["energy"], medium.predict([slab])[0]["forces"]
    assert abs(e_med - e_ref) < 0.05 and np.abs(f_med - f_ref).max() < 0.05
    results = []

    def hammer():
        for _ in range(5):
            medium.predict([slab])

    t = threading.Thread(target=hammer)
    t.start()
    for _ in range(5):
        results.append(ref.predict([slab])[0])
    t.join(60)
    for r in results:
        assert r["energy"] == e_ref and np.array_equal(r["forces"], f_ref)
    assert torch.get_float32_matmul_precision() == "highest"


def test_bad_precision() -> None:
    with pytest.raises(ValueError, match="matmul_precision"):
        load_calculator(GEMNET, device="cpu", matmul_precision="low")
