"""mlcalc.nn.workspace: scratch buffers kept across calls, and GemNet-OC's use of them (no stale values)."""

from __future__ import annotations

import copy
import pickle
import threading

import torch

from mlcalc.nn.workspace import Workspace


def test_a_role_reuses_its_storage_and_grows_when_needed():
    ws = Workspace()
    a = ws.get("x", (10, 4), torch.float32, torch.device("cpu"))
    b = ws.get("x", (5, 8), torch.float32, torch.device("cpu"))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert b.shape == (5, 8) and b.is_contiguous()
    other = ws.get("y", (10, 4), torch.float32, torch.device("cpu"))
    assert other.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    bigger = ws.get("x", (100, 4), torch.float32, torch.device("cpu"))
    assert bigger.shape == (100, 4)
    assert ws.get("x", (10,), torch.float64, "cpu").dtype == torch.float64  # dtype is part of the key
    assert ws.nbytes() > 0
    ws.clear()
    assert ws.nbytes() == 0


def test_requests_above_the_bound_are_not_kept():
    ws = Workspace(max_bytes=1000)
    t = ws.get("x", (1000,), torch.float32, "cpu")
    assert t.shape == (1000,) and ws.nbytes() == 0


def test_threads_get_their_own_buffers():
    ws = Workspace()
    held = []  # the tensors stay alive, so no address can be reused between threads
    barrier = threading.Barrier(2)

    def work():
        held.append(ws.get("x", (64,), torch.float32, "cpu"))
        barrier.wait()  # both threads hold their buffer at once

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held.append(ws.get("x", (64,), torch.float32, "cpu"))
    assert len({t.untyped_storage().data_ptr() for t in held}) == 3


def test_copies_and_pickles_start_empty():
    ws = Workspace(max_bytes=12345)
    ws.get("x", (64,), torch.float32, "cpu")
    for clone in (copy.deepcopy(ws), pickle.loads(pickle.dumps(ws))):
        assert clone.max_bytes == 12345 and clone.nbytes() == 0


def test_gemnet_oc_calls_with_kept_buffers_equal_a_fresh_model():
    """Direct-force GemNet-OC keeps its padded operands across calls: a call after one on another structure
    (different sizes of every layout) gives the numbers of a fresh model, to float64 rounding."""
    from test_gemnet_oc_memory import slab, small_model

    from mlcalc import GemNetOCCalculator
    from mlcalc.calculator import evaluate_model

    model = small_model(direct=True)
    calc = GemNetOCCalculator(model, device="cpu", dtype="float64")
    first, second = calc.build_graph(slab((2, 2, 3), seed=1)), calc.build_graph(slab((3, 3, 3), seed=2))
    with torch.no_grad():
        evaluate_model(model, second)
        evaluate_model(model, first)
        assert model.scratch.nbytes() > 0
        warm = evaluate_model(model, second)
        fresh = evaluate_model(copy.deepcopy(model), second)
    for key in ("energy", "forces"):
        torch.testing.assert_close(warm[key], fresh[key], rtol=0, atol=1e-10)
