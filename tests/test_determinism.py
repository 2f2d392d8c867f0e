"""Same-process repeatability on CPU with several threads: repeated calls on the same Atoms give bit-identical results.

Advanced indexing ``x[index]`` backpropagates through ``index_put_(accumulate=True)``, which torch runs with
unordered atomic float32 adds on CPU when it has more than one thread; the models gather with
``mlcalc.nn.scatter.gather`` (``index_select``, backward ``index_add_`` in a fixed order) instead. Exact equality
is the right check here: the same input in the same process must give the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule

from mlcalc import load_model
from mlcalc.calculator import GemNetOCCalculator, MLCalculator, SphereNetCalculator
from mlcalc.models.spherenet import SphereNet
from mlcalc.nn.scatter import gather

DATA = Path(__file__).parent / "data"
REPEATS = 10

SPHERENET_SMALL = dict(
    hidden_channels=16, int_emb_size=8, basis_emb_size_dist=4, basis_emb_size_angle=4, basis_emb_size_torsion=4,
    out_emb_channels=16, num_spherical=4, num_radial=4, num_layers=2, num_output_layers=2, cutoff=4.0,
    max_num_neighbors=None,
)  # fmt: skip


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's intra-op pool with ``n`` threads inside the block, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def co_on_cu111() -> Atoms:
    """38 atoms: a rattled 3x3x4 Cu(111) slab (top layer tagged 1) with CO tagged 2 (GemNet-OC quadruplets on)."""
    slab = fcc111("Cu", (3, 3, 4), vacuum=6.0, a=3.6)
    top = slab.positions[:, 2] > slab.positions[:, 2].max() - 1.0
    add_adsorbate(slab, molecule("CO"), 1.9, "fcc")
    slab.set_tags(np.concatenate([np.where(top, 1, 0), [2, 2]]))
    slab.rattle(0.05, seed=1)
    return slab


def repeated_results(calc: MLCalculator, atoms: Atoms, repeats: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Forces and stress of ``repeats`` fresh evaluations of the same structure."""
    atoms = atoms.copy()
    atoms.calc = calc
    out = []
    for _ in range(repeats):
        calc.reset()
        out.append((atoms.get_forces().copy(), atoms.get_stress().copy()))
    return out


def spherenet_model() -> SphereNet:
    torch.manual_seed(0)
    return SphereNet(**SPHERENET_SMALL).eval()


@pytest.mark.parametrize("family", ["gemnet_oc_grad", "spherenet"])
def test_repeated_calls_are_bit_identical_with_two_threads(family):
    if family == "gemnet_oc_grad":
        calc = GemNetOCCalculator(load_model(DATA / "gemnet_oc_small_grad.pt"), device="cpu", dtype="float32")
    else:
        calc = SphereNetCalculator(spherenet_model(), device="cpu", dtype="float32")
    with torch_threads(2):
        results = repeated_results(calc, co_on_cu111(), REPEATS)
    forces0, stress0 = results[0]
    assert np.isfinite(forces0).all() and np.abs(forces0).max() > 0
    for k, (forces, stress) in enumerate(results[1:], start=1):
        assert np.array_equal(forces, forces0), f"call {k}: forces differ by {np.abs(forces - forces0).max():.3g}"
        assert np.array_equal(stress, stress0), f"call {k}: stress differs by {np.abs(stress - stress0).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_equals_indexing_and_its_backward_is_repeatable(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 8, dtype=dtype, generator=g, requires_grad=True)
    index = torch.randint(0, 50, (600, 70), generator=g)  # 2-D index, many repeats: 42,000 rows of 32 values
    weight = torch.randn(600, 70, 4, 8, dtype=dtype, generator=g)
    out = gather(x, index)
    assert torch.equal(out, x[index])
    with torch_threads(2):
        grads = [torch.autograd.grad((gather(x, index) * weight).sum(), x)[0] for _ in range(5)]
    x64 = x.detach().double().requires_grad_(True)
    reference = torch.autograd.grad((x64[index] * weight.double()).sum(), x64)[0]
    atol = 1e-3 if dtype == torch.float32 else 1e-10  # sums of ~840 terms of size ~1
    torch.testing.assert_close(grads[0].double(), reference, rtol=0.0, atol=atol)
    assert all(torch.equal(gr, grads[0]) for gr in grads[1:])
