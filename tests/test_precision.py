"""Per-calculator matmul precision: set only while the calculator evaluates, restored after, never leaked."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111

from mlcalc import MLCalculator, load_calculator
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


# ------------------------------------------------------------------------------------- bfloat16 linears on CPUs
def test_bfloat16_linears_numerics() -> None:
    """In the mode, F.linear is a bfloat16 product (its values are bfloat16 numbers, within bfloat16 rounding of the
    exact product) plus the float32 bias; other matrix products are untouched."""
    from mlcalc.precision import Bfloat16Linears

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(64, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    with Bfloat16Linears():
        plain = torch.nn.functional.linear(x, w)
        biased = torch.nn.functional.linear(x, w, b)
        other = x @ w.T  # not a linear layer
    assert plain.dtype == torch.float32 and torch.equal(plain, plain.bfloat16().float())  # bfloat16 values
    exact = (x.double() @ w.double().T).float()
    scale = float(exact.abs().max())
    torch.testing.assert_close(plain, exact, rtol=0, atol=0.02 * scale)  # inputs and product rounded to 8 bits
    torch.testing.assert_close(biased - plain, b.expand_as(plain), rtol=0, atol=1e-6 * scale)
    full = torch.nn.functional.linear(x, w)
    assert not torch.equal(full, full.bfloat16().float())  # float32 outside the mode
    torch.testing.assert_close(other, exact, rtol=1e-5, atol=1e-5 * scale)


def _mm_dtypes(calc, atoms) -> set:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                seen.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    with Spy():
        calc.predict([atoms])
    return seen


def test_medium_runs_linears_in_bfloat16_on_cpu() -> None:
    from torch.overrides import _get_current_function_mode_stack

    from mlcalc.precision import cpu_has_bfloat16

    slab = _slab()
    highest = load_calculator(GEMNET, device="cpu")
    medium = load_calculator(GEMNET, device="cpu", matmul_precision="medium")
    assert torch.bfloat16 not in _mm_dtypes(highest, slab)
    if not cpu_has_bfloat16():
        pytest.skip("this CPU has no native bfloat16: medium leaves CPU matmuls in float32")
    assert torch.bfloat16 in _mm_dtypes(medium, slab)
    assert _get_current_function_mode_stack() == []  # nothing left active after the evaluation


def test_medium_under_activation_checkpointing() -> None:
    """Checkpointed runs are recomputed in the backward pass with the linears still in bfloat16 (same metadata as the
    forward), and medium stays close to highest (SphereNet, 256 atoms in runs of 2,000 triplets)."""
    from test_spherenet_memory import copper, model

    m = model()
    m.chunk_size = 2000
    atoms = copper(4)
    out = {}
    for precision in ("highest", "medium"):
        a = atoms.copy()
        a.calc = MLCalculator(m, device="cpu", matmul_precision=precision)
        out[precision] = a.get_forces()
    scale = np.abs(out["highest"]).max()
    assert np.abs(out["medium"] - out["highest"]).max() < 0.05 * scale


def test_bfloat16_products_flag_is_per_thread_and_scoped() -> None:
    from mlcalc.precision import Bfloat16Linears, bfloat16_products

    assert not bfloat16_products()
    seen = []
    with Bfloat16Linears():
        assert bfloat16_products()
        worker = threading.Thread(target=lambda: seen.append(bfloat16_products()))
        worker.start()
        worker.join()
        with Bfloat16Linears():  # nested (activation-checkpoint recomputation)
            assert bfloat16_products()
        assert bfloat16_products()
    assert seen == [False]  # another thread is not in the mode
    assert not bfloat16_products()
    with pytest.raises(RuntimeError), Bfloat16Linears():
        raise RuntimeError("left by an exception")
    assert not bfloat16_products()


def test_medium_runs_gemnet_padded_products_in_bfloat16() -> None:
    """GemNet-OC's padded bilinear products (bmm) follow the linears into bfloat16 under medium, float32 otherwise,
    and the forces stay within bfloat16 rounding of highest."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mlcalc.precision import cpu_has_bfloat16

    def bmm_dtypes(calc, atoms) -> set:
        seen = set()

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.bmm.default:
                    seen.add(args[0].dtype)
                return func(*args, **(kwargs or {}))

        with Spy():
            out = calc.predict([atoms])[0]
        return seen, out["forces"]

    slab = _slab()
    dtypes, f_high = bmm_dtypes(load_calculator(GEMNET, device="cpu"), slab)
    assert dtypes == {torch.float32}
    if not cpu_has_bfloat16():
        pytest.skip("this CPU has no native bfloat16: medium leaves CPU matmuls in float32")
    dtypes, f_medium = bmm_dtypes(load_calculator(GEMNET, device="cpu", matmul_precision="medium"), slab)
    assert torch.bfloat16 in dtypes
    assert np.abs(f_medium - f_high).max() < 0.05 * np.abs(f_high).max()
    # direct forces (no autograd: the padded messages are gathered into reused buffers), quadruplets on
    from test_gemnet_oc_memory import slab as tagged_slab
    from test_gemnet_oc_memory import small_model

    model = small_model(direct=True).float()
    with torch.no_grad():  # weights of std 0.1, not 0.3: a random model then does not amplify bfloat16 rounding
        for p in model.parameters():
            p.mul_(1 / 3)
    atoms = tagged_slab()
    dtypes, f_high = bmm_dtypes(MLCalculator(model, device="cpu"), atoms)
    assert dtypes == {torch.float32}
    dtypes, f_medium = bmm_dtypes(MLCalculator(model, device="cpu", matmul_precision="medium"), atoms)
    assert torch.bfloat16 in dtypes
    assert np.abs(f_medium - f_high).max() < 0.05 * np.abs(f_high).max()
