"""Relaxations and single points across processes, GPUs and nodes with Ray (extra ``ray``).

    import ray
    from mlcalc.distributed import relax_many

    ray.init()                          # local machine; ray.init(address="auto") joins a running cluster
    relaxed = relax_many(structures, "GemNet-OC-S2EF-OC20-All+MD", num_workers=8, num_gpus_per_worker=1,
                         optimizer="BFGS", fmax=0.05, batch_size=32)

Each worker is a Ray actor that loads the model once and relaxes the chunks it is given with mlcalc's batched,
in-flight relaxation (``mlcalc.optimize.relax``, one batched graph per step). Results come back in input order
(``iter_relax_many`` yields them as soon as every earlier one is done, so they can go to an ASE database while the
rest runs; ``db=`` does that). A chunk whose worker dies (node lost, out of memory, killed) is given to a fresh
worker, up to ``max_retries`` times; an exception raised by the model on a structure (an element it does not
know, overlapping atoms) is not retried and reaches the caller with the structure's index.

Multi-node: start a Ray cluster (``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the others,
or a cluster launcher), then call ``ray.init(address="auto")`` and the same ``relax_many``. A checkpoint given as a
local file is read once on the driver and shipped through Ray's object store, so worker nodes need neither the
file nor network access; a released checkpoint name is fetched by each node into its own cache. Ray's scheduler
places the actors (``num_gpus_per_worker``, ``num_cpus_per_worker``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

logger = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("mlcalc.distributed needs Ray: pip install 'mlcalc[ray]'") from err
    return ray


class _Worker:
    """Ray actor body: one calculator per worker process, loaded once."""

    def __init__(self, checkpoint: Any, device: str, dtype: str, threads: int) -> None:
        import torch

        from mlcalc.calculator import load_calculator

        torch.set_num_threads(max(1, int(threads)))
        if isinstance(checkpoint, bytes):  # a file shipped through the object store
            fd, name = tempfile.mkstemp(suffix=".pt")
            with os.fdopen(fd, "wb") as fh:
                fh.write(checkpoint)
            try:
                self.calc = load_calculator(name, device=device, dtype=dtype)
            finally:
                Path(name).unlink(missing_ok=True)
        else:
            self.calc = load_calculator(checkpoint, device=device, dtype=dtype)

    def pid(self) -> int:
        return os.getpid()

    def relax(self, structures: list[Atoms], options: dict[str, Any]) -> list[Atoms]:
        from mlcalc.optimize import relax

        return relax(structures, self.calc, progress=False, **options)

    def predict(self, structures: list[Atoms], batch_size: int | None) -> list[dict[str, Any]]:
        return self.calc.predict(structures, batch_size=batch_size)


class WorkerPool:
    """A set of Ray actors, each holding one model; ``relax``/``predict`` stream results back in input order.

    Args:
        checkpoint: checkpoint path (shipped to the workers through the object store) or a released name.
        num_workers: actors to start (>= 1).
        num_gpus_per_worker, num_cpus_per_worker: Ray resources per actor (GPUs may be fractional).
        device: the workers' torch device ("auto": cuda when the actor has a GPU).
        dtype: "float32" (default) or "float64".
        max_retries: how often a chunk is resubmitted after its worker died.

    Use as a context manager (``with WorkerPool(...) as pool:``) or call ``shutdown()``; ``ray.init`` must have
    been called (else a local Ray is started with default settings).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        num_workers: int = 2,
        num_gpus_per_worker: float = 0.0,
        num_cpus_per_worker: float = 1.0,
        device: str = "auto",
        dtype: str = "float32",
        max_retries: int = 2,
    ) -> None:
        ray = _ray()
        if int(num_workers) < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if num_gpus_per_worker < 0 or num_cpus_per_worker <= 0:
            raise ValueError("num_gpus_per_worker must be >= 0 and num_cpus_per_worker > 0")
        if int(max_retries) < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not ray.is_initialized():
            logger.info("ray is not initialised; starting a local Ray")
            ray.init()
        total = ray.cluster_resources()
        for key, need in (("CPU", num_cpus_per_worker), ("GPU", num_gpus_per_worker)):
            if need > total.get(key, 0.0):
                raise ValueError(
                    f"each worker asks for {need:g} {key}, but the Ray cluster has {total.get(key, 0.0):g} in all; "
                    f"the workers could never start (lower num_{key.lower()}s_per_worker or add nodes)"
                )
        path = Path(os.fspath(checkpoint))
        payload: Any = ray.put(path.read_bytes()) if path.is_file() else os.fspath(checkpoint)
        if not path.is_file():
            from mlcalc import pretrained

            pretrained.info(os.fspath(checkpoint))  # a registry name, or a KeyError naming close ones, now
        self._payload = payload
        self._options = dict(num_gpus=num_gpus_per_worker, num_cpus=num_cpus_per_worker)
        self._actor_cls = ray.remote(_Worker)
        self._init_args = (device, dtype, max(1, int(num_cpus_per_worker)))
        self.max_retries = int(max_retries)
        self.workers = [self._new_worker() for _ in range(int(num_workers))]

    def _new_worker(self) -> Any:
        return self._actor_cls.options(**self._options).remote(self._payload, *self._init_args)

    def shutdown(self) -> None:
        ray = _ray()
        for w in self.workers:
            ray.kill(w)
        self.workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- scheduling -----------------------------------------------------------------------------------------
    def _stream(
        self, structures: Sequence[Atoms], chunk_size: int, method: str, args: tuple, progress: bool
    ) -> Iterator[tuple[int, Any]]:
        ray = _ray()
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
        from tqdm.auto import tqdm

        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunks = [list(range(s, min(s + chunk_size, len(structures)))) for s in range(0, len(structures), chunk_size)]
        pending = list(range(len(chunks)))[::-1]  # stack: next chunk at the end
        retries = [0] * len(chunks)
        running: dict[Any, tuple[int, int]] = {}  # ref -> (chunk, worker slot)
        done: dict[int, list[Any]] = {}
        next_out = 0
        idle = list(range(len(self.workers)))

        def submit(slot: int) -> None:
            c = pending.pop()
            worker = self.workers[slot]
            ref = getattr(worker, method).remote([structures[i] for i in chunks[c]], *args)
            running[ref] = (c, slot)

        with tqdm(total=len(structures), unit="structure", disable=None if progress else True) as bar:
            while next_out < len(chunks):
                while pending and idle:
                    submit(idle.pop())
                ready, _ = ray.wait(list(running), num_returns=1)
                ref = ready[0]
                c, slot = running.pop(ref)
                try:
                    done[c] = ray.get(ref)
                    idle.append(slot)
                    bar.update(len(chunks[c]))
                except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                    if isinstance(err, RayTaskError):  # an exception raised by the model code: not retried
                        raise self._task_error(err, chunks[c]) from None
                    retries[c] += 1
                    if retries[c] > self.max_retries:
                        raise RuntimeError(
                            f"structures {chunks[c][0]}..{chunks[c][-1]}: worker died {retries[c]} times ({err})"
                        ) from err
                    logger.warning("worker %d died (%s); restarting it and resubmitting chunk %d", slot, err, c)
                    self.workers[slot] = self._new_worker()
                    pending.append(c)
                    idle.append(slot)
                except RayTaskError as err:
                    raise self._task_error(err, chunks[c]) from None
                while next_out in done:
                    yield from zip(chunks[next_out], done.pop(next_out), strict=True)
                    next_out += 1

    @staticmethod
    def _task_error(err: Any, indices: list[int]) -> Exception:
        cause = err.as_instanceof_cause() if hasattr(err, "as_instanceof_cause") else err
        base = getattr(err, "cause", None)
        message = f"structures {indices[0]}..{indices[-1]}: {base if base is not None else cause}"
        if isinstance(base, (ValueError, TypeError, KeyError)):
            return type(base)(message)
        return RuntimeError(message)

    def iter_relax(
        self, structures: Iterable[Atoms], chunk_size: int = 8, progress: bool = True, **relax_options: Any
    ) -> Iterator[tuple[int, Atoms]]:
        """(index, relaxed Atoms) in input order, each as soon as it and every earlier one are done.

        ``relax_options`` go to ``mlcalc.optimize.relax`` (optimizer, fmax, steps, cell_filter, batch_size,
        optimizer_kwargs)."""
        items = _as_atoms_list(structures)
        yield from self._stream(items, chunk_size, "relax", (dict(relax_options),), progress)

    def iter_predict(
        self, structures: Iterable[Atoms], chunk_size: int = 32, batch_size: int | None = None, progress: bool = True
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, result dict as ``MLCalculator.predict``) in input order."""
        items = _as_atoms_list(structures)
        yield from self._stream(items, chunk_size, "predict", (batch_size,), progress)


def _as_atoms_list(structures: Iterable[Any]) -> list[Atoms]:
    from mlcalc.structures import as_atoms

    if isinstance(structures, Atoms):
        raise TypeError("expected a list of structures, got one Atoms; wrap it in a list")
    return [as_atoms(s) for s in structures]


def auto_chunk_size(n_structures: int, num_workers: int) -> int:
    """Structures per task so that every worker gets work (about 4 chunks each), between 1 and 32."""
    return max(1, min(32, -(-n_structures // max(1, 4 * int(num_workers)))))


def _write(db: Any, atoms: Atoms, index: int) -> None:
    db.write(atoms, data={"input_index": index})


def relax_many(
    structures: Iterable[Atoms],
    checkpoint: str | os.PathLike,
    num_workers: int = 2,
    num_gpus_per_worker: float = 0.0,
    num_cpus_per_worker: float = 1.0,
    chunk_size: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    max_retries: int = 2,
    db: str | os.PathLike | None = None,
    progress: bool = True,
    **relax_options: Any,
) -> list[Atoms]:
    """Relax many structures on Ray workers; the relaxed Atoms (as ``mlcalc.optimize.relax`` returns them:
    energies, forces, ``info["relax_converged"]``/step count) in input order.

    Args:
        structures: ase.Atoms (or pymatgen) structures.
        checkpoint: checkpoint file or released name; loaded once per worker.
        num_workers, num_gpus_per_worker, num_cpus_per_worker, device, dtype, max_retries: see ``WorkerPool``.
        chunk_size: structures per task (each task is one in-flight batched relaxation on a worker); default
            ``auto_chunk_size``: enough chunks for every worker (at least 4 each), at most 32 structures.
        db: an ASE database file (``ase.db.connect``) the results are written to as they arrive, in input order,
            with ``data={"input_index": i}``.
        progress: tqdm bar on a terminal.
        relax_options: ``optimizer``, ``fmax``, ``steps``, ``cell_filter``, ``batch_size``, ``optimizer_kwargs``.

    Raises:
        ValueError/TypeError/KeyError from the model or options (with the structures' indices); RuntimeError when a
        chunk's worker died more than ``max_retries`` times.
    """
    items = _as_atoms_list(structures)
    chunk_size = auto_chunk_size(len(items), num_workers) if chunk_size is None else chunk_size
    out: list[Atoms | None] = [None] * len(items)
    connection = None
    if db is not None:
        from ase.db import connect

        connection = connect(os.fspath(db))
    with WorkerPool(checkpoint, num_workers, num_gpus_per_worker, num_cpus_per_worker, device, dtype,
                    max_retries) as pool:
        for i, atoms in pool.iter_relax(items, chunk_size=chunk_size, progress=progress, **relax_options):
            out[i] = atoms
            if connection is not None:
                _write(connection, atoms, i)
    return out  # type: ignore[return-value]


def predict_many(
    structures: Iterable[Atoms],
    checkpoint: str | os.PathLike,
    num_workers: int = 2,
    num_gpus_per_worker: float = 0.0,
    num_cpus_per_worker: float = 1.0,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    max_retries: int = 2,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Single points (energy, forces, stress where available; ``MLCalculator.predict``'s dicts) of many
    structures on Ray workers, in input order. Arguments as ``relax_many``; ``batch_size`` structures per graph."""
    items = _as_atoms_list(structures)
    chunk_size = auto_chunk_size(len(items), num_workers) if chunk_size is None else chunk_size
    out: list[dict[str, Any] | None] = [None] * len(items)
    with WorkerPool(checkpoint, num_workers, num_gpus_per_worker, num_cpus_per_worker, device, dtype,
                    max_retries) as pool:
        for i, result in pool.iter_predict(items, chunk_size=chunk_size, batch_size=batch_size, progress=progress):
            out[i] = result
    return out  # type: ignore[return-value]
