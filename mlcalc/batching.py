"""Many concurrent ASE simulations, one batched model: ``InferenceServer``.

Each simulation (an ASE optimizer, MD integrator or NEB image running in its own thread) gets a lightweight proxy
calculator from ``server.calculator()``. A proxy's calculation becomes a request on the server's queue; one worker
thread takes up to ``max_batch`` waiting requests (waiting at most ``max_wait_ms`` for more to arrive after the
first), evaluates them as one batched graph through the wrapped calculator's ``predict`` (its one force/stress path,
so results equal the direct calculator's) and hands each result back to the thread that asked. The idea is fairchem
v2's ``InferenceBatcher`` (many concurrent ASE simulations feeding one batched model), built here on the standard
library's threads and queues.

    with InferenceServer(calc, max_batch=16, max_wait_ms=5) as server:
        threads = [threading.Thread(target=relax, args=(atoms, server.calculator())) for atoms in structures]
        ...

Errors stay with their simulation: a structure the calculator refuses (unknown element, overlapping atoms) raises in
the thread that submitted it only, and if a whole batch fails each request is retried alone so that only the
offending one sees the exception. Leaving the ``with`` block (or ``close()``) stops the worker; requests still
waiting then fail with RuntimeError in their threads, and nothing blocks forever.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from mlcalc.calculator import MLCalculator

logger = logging.getLogger(__name__)

_STOP = object()


class InferenceServer:
    """Merge the calculations of many concurrent simulations into batched model evaluations.

    Args:
        calc: the calculator that does the work (any ``MLCalculator``; its device, dtype and model are used).
        max_batch: most structures per batched evaluation (>= 1).
        max_wait_ms: after the first request of a batch arrives, how long (ms) the worker waits for more before it
            evaluates what it has (>= 0). Small values favour latency, larger ones fuller batches.

    Attributes:
        stats: ``{"batches": n, "structures": m, "max_batch_seen": k}`` counters (for throughput reports and tests).

    Raises:
        TypeError: ``calc`` is not an MLCalculator. ValueError: max_batch < 1 or max_wait_ms < 0.
    """

    def __init__(self, calc: MLCalculator, max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        if not isinstance(calc, MLCalculator):
            raise TypeError(f"InferenceServer needs an mlcalc MLCalculator, got {type(calc).__name__}")
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.calc = calc
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.stats = {"batches": 0, "structures": 0, "max_batch_seen": 0}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = threading.Event()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> InferenceServer:
        """Start the worker thread (done by ``with``); idempotent."""
        with self._start_lock:
            if self._closed.is_set():
                raise RuntimeError("this InferenceServer was closed; create a new one")
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="mlcalc-inference-server", daemon=True)
                self._worker.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests not yet evaluated fail with RuntimeError. Never waits longer than ``timeout``
        seconds for a batch in progress."""
        self._closed.set()
        self._queue.put(_STOP)
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)
            if self._worker.is_alive():
                logger.warning("InferenceServer worker still busy after %.0f s; leaving it (daemon thread)", timeout)
        self._fail_pending()

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- clients --------------------------------------------------------------------------------------------
    def calculator(self) -> ServerCalculator:
        """A new proxy calculator for one simulation (one per thread; cheap)."""
        return ServerCalculator(self)

    def submit(self, atoms: Atoms) -> Future:
        """Queue one structure (copied); the Future gives the calculator's result dict (as ``predict``)."""
        if self._closed.is_set():
            raise RuntimeError("InferenceServer is closed")
        if self._worker is None:
            self.start()
        future: Future = Future()
        self._queue.put((atoms.copy(), future))
        if self._closed.is_set():  # closed while we queued: make sure nobody waits for a worker that is gone
            self._fail_pending()
        return future

    # -- worker ---------------------------------------------------------------------------------------------
    def _collect(self, first: tuple[Atoms, Future]) -> tuple[list[tuple[Atoms, Future]], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            batch, stop = self._collect(item)
            self._evaluate(batch)
            if stop:
                break
        self._fail_pending()

    def _evaluate(self, batch: list[tuple[Atoms, Future]]) -> None:
        live = [(a, f) for a, f in batch if f.set_running_or_notify_cancel()]
        valid: list[tuple[Atoms, Future]] = []
        for atoms, future in live:  # refusals reach their own simulation only
            try:
                self.calc.check_atoms(atoms)
            except BaseException as err:  # noqa: BLE001 - handed to the submitting thread
                future.set_exception(err)
            else:
                valid.append((atoms, future))
        if not valid:
            return
        try:
            results = self.calc.predict([a for a, _ in valid], batch_size=len(valid))
        except BaseException as err:  # noqa: BLE001 - isolate the failing structure by evaluating one by one
            if len(valid) == 1:
                valid[0][1].set_exception(err)
                return
            logger.info("batched evaluation failed (%s); evaluating the %d structures one by one", err, len(valid))
            for atoms, future in valid:
                try:
                    future.set_result(self.calc.predict([atoms], batch_size=1)[0])
                except BaseException as one_err:  # noqa: BLE001
                    future.set_exception(one_err)
            return
        self.stats["batches"] += 1
        self.stats["structures"] += len(valid)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(valid))
        for (_, future), result in zip(valid, results, strict=True):
            future.set_result(result)

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].set_exception(RuntimeError("InferenceServer was closed before this calculation ran"))


class ServerCalculator(Calculator):
    """ASE calculator that sends its calculations to an ``InferenceServer`` (from ``server.calculator()``).

    Same properties and results (energy, free_energy, forces, stress where the wrapped calculator gives them) as the
    server's calculator; any ASE driver works unchanged. Blocks the calling thread until its result is ready.
    """

    def __init__(self, server: InferenceServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server = server
        self.implemented_properties = list(server.calc.implemented_properties)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        properties = ["energy"] if properties is None else list(properties)
        super().calculate(atoms, properties, system_changes)
        self.server.calc.require_properties(properties)
        try:
            result = self.server.submit(self.atoms).result()
        except BaseException:
            self.atoms = None
            self.results = {}
            raise
        if "stress" in properties and "stress" not in result:
            self.results = {}
            raise PropertyNotImplementedError("stress needs a 3-D cell (nonzero volume)")
        self.results = dict(result)
