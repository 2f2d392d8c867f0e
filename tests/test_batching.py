"""InferenceServer: concurrent ASE simulations share one batched model; results equal the direct calculator's."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.optimize import BFGS

from mlcalc import load_calculator
from mlcalc.batching import InferenceServer

ROOT = Path(__file__).resolve().parents[1]
LJ = ROOT / "checkpoints" / "lj_argon.pt"
GEMNET = ROOT / "checkpoints" / "gemnet_oc-emt.pt"
TIMEOUT = 120


def _argon(seed: int):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 1, 1)
    atoms.rattle(0.15, seed=seed)
    return atoms


def _relax(atoms, calc, fmax=1e-3, steps=60):
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return opt.nsteps


def _run_threads(targets) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * len(targets)

    def wrap(k, fn):
        try:
            fn()
        except BaseException as err:  # noqa: BLE001
            errors[k] = err

    threads = [threading.Thread(target=wrap, args=(k, fn)) for k, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a simulation thread hung"
    return errors


def test_concurrent_relaxations_equal_sequential_ones_in_fewer_model_calls() -> None:
    calc = load_calculator(LJ, device="cpu", dtype="float64")
    starts = [_argon(seed) for seed in range(8)]
    direct = [a.copy() for a in starts]
    steps_direct = [_relax(a, calc) for a in direct]
    served = [a.copy() for a in starts]
    steps_served = [0] * len(served)
    with InferenceServer(calc, max_batch=8, max_wait_ms=20) as server:

        def job(k):
            steps_served[k] = _relax(served[k], server.calculator())

        errors = _run_threads([lambda k=k: job(k) for k in range(len(served))])
    assert errors == [None] * len(served)
    assert steps_served == steps_direct
    for a, b in zip(direct, served, strict=True):
        assert np.abs(a.positions - b.positions).max() < 1e-9
        assert abs(a.get_potential_energy() - b.calc.results["energy"]) < 1e-9
    calls = sum(steps_direct) + len(starts)  # one evaluation per step plus the first
    assert server.stats["structures"] == calls
    assert server.stats["batches"] < calls and server.stats["max_batch_seen"] > 1


def test_stress_and_md_through_the_proxy() -> None:
    from ase import units
    from ase.md.langevin import Langevin

    calc = load_calculator(LJ, device="cpu", dtype="float64")
    atoms = _argon(3)
    with InferenceServer(calc, max_batch=4, max_wait_ms=1) as server:
        atoms.calc = server.calculator()
        ref = atoms.copy()
        ref.calc = calc
        assert np.allclose(atoms.get_stress(), ref.get_stress(), atol=1e-12)
        dyn = Langevin(atoms, 2 * units.fs, temperature_K=80, friction=0.01, fixcm=False, rng=np.random.default_rng(0))
        dyn.run(10)
    assert np.isfinite(atoms.positions).all()


def test_an_error_reaches_only_its_own_simulation() -> None:
    calc = load_calculator(GEMNET, device="cpu", dtype="float32")
    good = [fcc111("Cu", (2, 2, 3), vacuum=6.0) for _ in range(3)]
    bad = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    bad[0].symbol = "U"  # not among the checkpoint's elements
    energies: dict[int, float] = {}
    barrier = threading.Barrier(4, timeout=TIMEOUT)
    with InferenceServer(calc, max_batch=4, max_wait_ms=200) as server:

        def job(k, atoms):
            atoms.calc = server.calculator()
            barrier.wait()
            energies[k] = atoms.get_potential_energy()

        errors = _run_threads([lambda k=k, a=a: job(k, a) for k, a in enumerate([*good, bad])])
    assert errors[:3] == [None] * 3 and isinstance(errors[3], ValueError) and "U" in str(errors[3])
    assert len(energies) == 3 and max(energies.values()) - min(energies.values()) < 1e-4


def test_close_never_hangs_and_fails_what_is_left() -> None:
    calc = load_calculator(LJ, device="cpu", dtype="float64")
    server = InferenceServer(calc, max_batch=2, max_wait_ms=0)
    server.close()  # never started
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(_argon(0))
    with InferenceServer(calc) as server:
        proxy = server.calculator()
    atoms = _argon(1)
    atoms.calc = proxy
    with pytest.raises(RuntimeError, match="closed"):
        atoms.get_potential_energy()


def test_bad_arguments() -> None:
    calc = load_calculator(LJ, device="cpu")
    with pytest.raises(ValueError, match="max_batch"):
        InferenceServer(calc, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        InferenceServer(calc, max_wait_ms=-1)
    with pytest.raises(TypeError, match="MLCalculator"):
        InferenceServer(object())  # type: ignore[arg-type]
