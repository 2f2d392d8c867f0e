"""One calculator under concurrency (issue 8 items 7a, 7b): shared by threads, used by forked and spawned workers."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import sys
import threading

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ

from mlcalc import MLCalculator
from mlcalc.models import LennardJones

LJ = dict(sigma=2.3, epsilon=0.4, rc=5.5, ro=4.0)
#: a worker that has not answered by then is hung (a normal one answers in well under a second after start-up)
WORKER_TIMEOUT_S = 90


def lj_calc() -> MLCalculator:
    return MLCalculator(LennardJones(**LJ), device="cpu", dtype="float64")


def reference(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
    ref = atoms.copy()
    ref.calc = AseLJ(**LJ, smooth=True)
    return ref.get_potential_energy(), ref.get_forces(), ref.get_stress()


@pytest.fixture
def fast_thread_switching():
    """Switch threads every 10 µs (default 5 ms) so interleavings inside one ASE call become likely."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def test_threads_sharing_one_calculator_get_their_own_results(fast_thread_switching):
    calc = lj_calc()
    sizes = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2)]  # 1, 2, 4, 8 atoms: a swapped result has the wrong shape
    errors: list[str] = []
    barrier = threading.Barrier(len(sizes))

    def worker(k: int) -> None:
        atoms = bulk("Cu", "fcc", a=3.6) * sizes[k]
        atoms.calc = calc
        barrier.wait()
        for step in range(20):
            atoms.rattle(0.02, seed=100 * k + step)
            e_ref, f_ref, s_ref = reference(atoms)
            try:
                forces = atoms.get_forces()
                energy = atoms.get_potential_energy()
                stress = atoms.get_stress()
            except Exception as err:  # noqa: BLE001 - a crash from another thread's state is a failure too
                errors.append(f"thread {k} call {step}: {type(err).__name__}: {err}")
                continue
            if forces.shape != f_ref.shape or not np.allclose(forces, f_ref, atol=1e-8):
                errors.append(f"thread {k} call {step}: forces of shape {forces.shape}, expected {f_ref.shape}")
            elif abs(energy - e_ref) > 1e-8 or not np.allclose(stress, s_ref, atol=1e-8):
                errors.append(f"thread {k} call {step}: energy {energy} / stress differ from {e_ref}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not errors, f"{len(errors)} of {20 * len(sizes)} calls got wrong results: {errors[:5]}"


def test_threads_mixing_predict_and_atoms_calls(fast_thread_switching):
    calc = lj_calc()
    structs = [bulk("Cu", "fcc", a=3.6) * n for n in [(1, 1, 1), (2, 1, 1), (2, 2, 1)]]
    for k, a in enumerate(structs):
        a.rattle(0.03, seed=k)
    refs = [reference(a) for a in structs]
    errors: list[str] = []

    def via_predict() -> None:
        for _ in range(10):
            for r, (e, f, _s) in zip(calc.predict(structs), refs, strict=True):
                if abs(r["energy"] - e) > 1e-8 or r["forces"].shape != f.shape:
                    errors.append("predict")

    def via_atoms(k: int) -> None:
        atoms = structs[k].copy()
        atoms.calc = calc
        for step in range(10):
            atoms.positions[0, 0] += 1e-3 * (-1) ** step
            if atoms.get_forces().shape != (len(atoms), 3):
                errors.append(f"atoms {k}")

    threads = [threading.Thread(target=via_predict)] + [threading.Thread(target=via_atoms, args=(k,)) for k in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]


def test_calculator_pickles_and_copies_with_a_fresh_lock():
    import copy

    calc = lj_calc()
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    e = calc.get_potential_energy(atoms)
    for clone in (pickle.loads(pickle.dumps(calc)), copy.deepcopy(calc)):
        assert clone._lock is not calc._lock
        assert clone.get_potential_energy(atoms) == e


# -- processes -------------------------------------------------------------------------------------------------------
def _structure(seed: int) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)
    atoms.rattle(0.02, seed=seed)
    return atoms


def _worker_energy(calc: MLCalculator, seed: int, queue) -> None:
    """Run in a child process: one energy with the parent's calculator (inherited by fork, pickled by spawn)."""
    try:
        queue.put(("ok", calc.get_potential_energy(_structure(seed)), torch.get_num_threads()))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(err).__name__}: {err}", None))


@pytest.fixture
def two_torch_threads():
    """The parent uses more than one intra-op thread (the condition of the fork hang); restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)



def _join_or_kill(proc) -> bool:
    """Wait up to WORKER_TIMEOUT_S for a worker process; kill it if it is still running. True if it hung."""
    proc.join(WORKER_TIMEOUT_S)
    hung = proc.is_alive()
    if hung:
        proc.kill()
        proc.join()
    return hung

@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_started_after_the_parent_used_the_calculator_do_not_hang(method, two_torch_threads):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"start method {method} not available on this platform")
    calc = lj_calc()
    parent = _structure(0)
    parent.calc = calc
    parent.get_forces()  # parent ran torch on 2 intra-op threads: its OpenMP pool now exists
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker_energy, args=(calc, 1, queue))
    proc.start()
    hung = _join_or_kill(proc)
    assert not hung, f"{method} worker hung in its first torch op (killed after {WORKER_TIMEOUT_S} s)"
    assert proc.exitcode == 0, f"{method} worker exited with {proc.exitcode}"
    status, value, threads = queue.get(timeout=10)
    assert status == "ok", value
    assert value == pytest.approx(reference(_structure(1))[0], abs=1e-8)
    if method == "fork":
        assert threads == 1  # the child's own torch setting; the parent keeps its threads
    assert torch.get_num_threads() == 2


def test_fork_while_another_thread_is_inside_the_calculator():
    """The child gets a fresh lock: a lock held by a parent thread at fork time is never released in the child."""
    calc = lj_calc()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with calc._lock:
            held.set()
            release.wait(WORKER_TIMEOUT_S)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker_energy, args=(calc, 2, queue))
    try:
        proc.start()
        hung = _join_or_kill(proc)
    finally:
        release.set()
        holder.join()
    assert not hung, "forked worker deadlocked on the calculator lock"
    status, value, _ = queue.get(timeout=10)
    assert status == "ok", value
    assert value == pytest.approx(reference(_structure(2))[0], abs=1e-8)
