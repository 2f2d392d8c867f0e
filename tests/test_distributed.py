"""Ray scale-out (mlcalc.distributed): a local 2-CPU Ray cluster on loopback; results equal a serial run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

ray = pytest.importorskip("ray")

from mlcalc import load_calculator  # noqa: E402
from mlcalc.distributed import WorkerPool, predict_many, relax_many  # noqa: E402
from mlcalc.optimize import relax  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LJ = ROOT / "checkpoints" / "lj_argon.pt"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import os

    # Ray starts its workers at nice 15; on a busy CI machine that starves them, so run them at normal priority
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def _argon(n: int) -> list:
    out = []
    for seed in range(n):
        atoms = bulk("Ar", "fcc", a=5.3, cubic=True)
        atoms.rattle(0.2, seed=seed)
        out.append(atoms)
    return out


def test_relax_many_equals_a_serial_run_and_writes_the_database(tmp_path) -> None:
    from ase.db import connect

    structures = _argon(6)
    calc = load_calculator(LJ, device="cpu", dtype="float64")
    serial = relax(structures, calc, optimizer="BFGS", fmax=0.01, progress=False)
    db = tmp_path / "out.db"
    distributed = relax_many(structures, LJ, num_workers=2, chunk_size=2, device="cpu", dtype="float64",
                             optimizer="BFGS", fmax=0.01, db=db, progress=False)
    for a, b in zip(serial, distributed, strict=True):
        assert np.abs(a.positions - b.positions).max() < 1e-8
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-9)
        assert a.info["relax_steps"] == b.info["relax_steps"]
    rows = list(connect(db).select())
    assert [r.data["input_index"] for r in rows] == list(range(6))


@pytest.fixture(scope="module")
def pool():
    # half a CPU each: the pool leaves room for the pools that relax_many/predict_many start themselves
    with WorkerPool(LJ, num_workers=2, num_cpus_per_worker=0.5, device="cpu", dtype="float64") as p:
        yield p


def test_iter_predict_streams_in_input_order_and_equals_predict(pool) -> None:
    structures = _argon(5)
    serial = load_calculator(LJ, device="cpu", dtype="float64").predict(structures)
    got = list(pool.iter_predict(structures, chunk_size=2, progress=False))
    assert [i for i, _ in got] == list(range(5))
    for (_, r), s in zip(got, serial, strict=True):
        assert r["energy"] == pytest.approx(s["energy"], abs=1e-9)
        assert np.abs(r["forces"] - s["forces"]).max() < 1e-9


def test_model_errors_are_not_retried_and_name_the_structures(pool) -> None:
    structures = [*_argon(1), bulk("Cu", "fcc", a=3.6)]  # the LJ checkpoint lists only Ar
    with pytest.raises(ValueError, match=r"structures 1\.\.1.*Cu"):
        list(pool.iter_predict(structures, chunk_size=1, progress=False))


def test_resources_the_cluster_cannot_give_are_refused() -> None:
    with pytest.raises(ValueError, match="GPU"):
        WorkerPool(LJ, num_workers=1, num_gpus_per_worker=1, device="cpu")


def test_predict_many() -> None:
    structures = _argon(3)
    serial = load_calculator(LJ, device="cpu", dtype="float64").predict(structures)
    got = predict_many(structures, LJ, num_workers=1, device="cpu", dtype="float64", progress=False)
    assert [r["energy"] for r in got] == pytest.approx([r["energy"] for r in serial], abs=1e-9)


def test_a_killed_worker_is_replaced_and_its_chunk_resubmitted(pool) -> None:
    structures = _argon(8)
    serial = load_calculator(LJ, device="cpu", dtype="float64").predict(structures)
    first = pool.workers[0]
    results = {}
    for i, result in pool.iter_predict(structures, chunk_size=1, progress=False):
        if not results:
            ray.kill(first, no_restart=True)
        results[i] = result
    assert pool.workers[0] is not first
    assert sorted(results) == list(range(8))
    for i, r in results.items():
        assert r["energy"] == pytest.approx(serial[i]["energy"], abs=1e-9)
        assert np.abs(r["forces"] - serial[i]["forces"]).max() < 1e-9


def test_default_chunks_give_every_worker_work() -> None:
    from mlcalc.distributed import auto_chunk_size

    assert auto_chunk_size(4, 2) == 1 and auto_chunk_size(64, 2) == 8 and auto_chunk_size(10_000, 2) == 32
