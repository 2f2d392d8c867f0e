"""Shared by the model benchmarks: per-call timing and fairchem 1.10's model with the same weights, when importable."""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ase import Atoms


def time_calls(fn: Callable[[Atoms], object], atoms: Atoms, repeats: int) -> tuple[float, float]:
    """(median, min) seconds per call of ``fn``; one warm-up call first, freshly perturbed positions on every call
    (so a calculator rebuilds its graph and recomputes)."""
    rng = np.random.default_rng(0)
    base = atoms.positions.copy()
    times = []
    for k in range(repeats + 1):
        atoms.positions = base + rng.normal(scale=1e-3, size=base.shape)
        t0 = time.perf_counter()
        fn(atoms)
        if k:  # the first call warms up
            times.append(time.perf_counter() - t0)
    atoms.positions = base
    return statistics.median(times), min(times)


def fairchem_runner(
    class_path: str, model: torch.nn.Module, dtype: torch.dtype, **overrides: Any
) -> Callable[[Atoms], float] | None:
    """A callable returning the raw energy (eV) of fairchem's model ``class_path`` (e.g.
    ``"fairchem.core.models.escn.escn.eSCN"``) built from ``model.hparams`` with ``model``'s weights and its own
    on-the-fly graph; None when fairchem is not importable."""
    try:
        from fairchem.core.datasets import data_list_collater
        from fairchem.core.preprocessing import AtomsToGraphs

        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - any import problem means: no side-by-side column
        return None
    ref = cls(**{**model.hparams, "otf_graph": True, **overrides})
    ref.load_state_dict(model.state_dict(), strict=True)  # identical parameter names
    ref = ref.to(dtype).eval()
    a2g = AtomsToGraphs(r_edges=False, r_pbc=True)

    def run(atoms: Atoms) -> float:
        batch = data_list_collater([a2g.convert(atoms)], otf_graph=True)
        batch.pos = batch.pos.to(dtype)
        batch.cell = batch.cell.to(dtype)
        with torch.no_grad():  # direct-force models; gradient models only need the energy here
            return float(ref(batch)["energy"].reshape(-1)[0])

    return run
