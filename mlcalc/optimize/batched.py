"""Batched relaxation of many structures with one model call per step and in-flight batching."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter
from tqdm.auto import tqdm

from mlcalc.calculator import NO_STRESS_DIRECT_MESSAGE, MLCalculator
from mlcalc.optimize.algorithms import OPTIMIZERS, OptimizerState, Target, gradient_norm

logger = logging.getLogger(__name__)

#: the ``steps`` default of ``relax`` (ASE's own default is unlimited)
DEFAULT_STEPS = 1000


@dataclass
class _Job:
    """One structure in flight: its working Atoms, what the optimizer moves, and the optimizer's state."""

    index: int
    atoms: Atoms
    target: Target
    state: OptimizerState
    nsteps: int = 0


def _optimizer_name(optimizer: Any) -> str:
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a name, one of {sorted(OPTIMIZERS)}; got {type(optimizer).__name__}")
    key = optimizer.strip().upper()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid ones: {', '.join(OPTIMIZERS)}")
    return key


def _validate(
    structures: Any, calc: Any, fmax: Any, steps: Any, batch_size: Any, cell_filter: Any
) -> tuple[list[Atoms], float, int, int, dict[str, Any] | None]:
    if not isinstance(calc, MLCalculator):
        raise TypeError(f"calc must be an mlcalc MLCalculator (e.g. load_calculator(...)), got {type(calc).__name__}")
    if isinstance(structures, Atoms) or isinstance(structures, (str, bytes)) or not isinstance(structures, Iterable):
        raise TypeError(
            f"relax takes a list of ase.Atoms, got {type(structures).__name__}; for one structure use "
            "relax([atoms], ...)"
        )
    atoms_list = list(structures)
    for k, a in enumerate(atoms_list):
        if not isinstance(a, Atoms):
            raise TypeError(f"structure {k} is a {type(a).__module__}.{type(a).__name__}, not an ase.Atoms")
    if isinstance(fmax, bool) or not isinstance(fmax, (int, float, np.integer, np.floating)):
        raise TypeError(f"fmax must be a number (eV/Å), got {type(fmax).__name__}")
    fmax = float(fmax)
    if not (math.isfinite(fmax) and fmax > 0):
        raise ValueError(f"fmax must be a positive, finite force in eV/Å, got {fmax}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an integer, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size is None:
        batch_size = calc.default_batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an integer, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if "forces" not in calc.implemented_properties:
        raise ValueError(f"this calculator cannot drive a relaxation: {calc._missing_property_message('forces')}")
    filter_kwargs: dict[str, Any] | None = None
    if cell_filter is not False and cell_filter is not None:
        if cell_filter is True:
            filter_kwargs = {}
        elif isinstance(cell_filter, Mapping):
            filter_kwargs = dict(cell_filter)
        else:
            raise TypeError(
                "cell_filter must be True/False or a dict of FrechetCellFilter arguments, got "
                f"{type(cell_filter).__name__}"
            )
        if "stress" not in calc.implemented_properties:
            message = NO_STRESS_DIRECT_MESSAGE if calc.model.direct_forces else calc._missing_property_message("stress")
            raise ValueError(f"cell_filter needs stress: {message}")
    for k, a in enumerate(atoms_list):
        try:
            calc.check_atoms(a)
        except ValueError as err:
            raise ValueError(f"structure {k}: {err}") from None
        if filter_kwargs is not None and a.cell.rank < 3:
            raise ValueError(
                f"structure {k}: cell_filter needs a 3-D periodic cell, this one has rank {a.cell.rank}"
            )
    return atoms_list, fmax, int(steps), int(batch_size), filter_kwargs


def _evaluate(calc: MLCalculator, atoms_list: list[Atoms]) -> list[dict[str, Any]]:
    """The calculator's own batched evaluation (one graph), atomic under its lock; float64 results per structure."""
    with calc._lock:
        return calc._predict_batch(atoms_list)


def relax(
    structures: Iterable[Atoms],
    calc: MLCalculator,
    optimizer: str = "BFGS",
    fmax: float = 0.05,
    steps: int = DEFAULT_STEPS,
    cell_filter: bool | Mapping[str, Any] = False,
    batch_size: int | None = None,
    progress: bool = True,
    optimizer_kwargs: Mapping[str, Any] | None = None,
) -> list[Atoms]:
    """Relax many structures together: one batched model call per step, in-flight batching.

    Each structure follows ASE's optimizer of the same name (``ase.optimize.FIRE``, ``BFGS``, ``LBFGS``) step for
    step, with ASE's defaults and its convergence test (largest per-atom norm of the constrained forces, ``atoms
    .get_forces()``, below ``fmax``; checked before each step, as ``Optimizer.run`` does), so a structure's final
    positions and step count are what ``ASE_OPTIMIZER(atoms).run(fmax, steps)`` with ``atoms.calc = calc`` gives, to
    rounding (the batched graph's sums may differ from a single structure's in the last bits). Constraints act
    through ASE itself (``set_positions`` applies them, ``get_forces`` zeroes fixed atoms' forces): FixAtoms atoms
    never move, and other ASE constraints work as in ASE.

    In-flight batching (after fairchem v1's batched LBFGS relaxations, ``fairchem.core.common.relaxation``, which
    here is extended to keep the batch full): at most ``batch_size`` structures are in the graph at a time; a
    structure that converges or reaches ``steps`` leaves after the evaluation that decided it, and the next waiting
    structure enters at the following model call. Optimizer state is per structure (numpy float64), so a
    structure's path does not depend on its batch mates. Forces come from ``calc``'s own graph and force path
    (``calc.build_graph`` + ``calc.evaluate`` via the batched ``predict`` code, under the calculator's lock).

    Args:
        structures: ase.Atoms objects (any iterable; not modified). Each keeps its constraints, tags, cell, pbc.
        calc: an mlcalc calculator (``mlcalc.load_calculator(...)``); float64 (``dtype="float64"``) for
            ASE-exact paths, float32 works the same way with float32 forces.
        optimizer: "FIRE", "BFGS" or "LBFGS" (case-insensitive).
        fmax: convergence threshold on the largest per-atom force norm, eV/Å (with a cell filter, on the filter's
            forces, whose last three rows are the scaled stress, as in ASE).
        steps: most optimizer steps per structure (ASE's ``run(steps=...)``; ASE's default is unlimited, this one
            is 1000). Evaluations per structure = steps taken + 1.
        cell_filter: True relaxes the cell too through ``ase.filters.FrechetCellFilter(atoms)`` (ASE's object, so
            its semantics are exact); a dict passes its arguments (``mask``, ``scalar_pressure``,
            ``hydrostatic_strain``, ``constant_volume``, ``exp_cell_factor``). Needs stress, i.e. a model whose
            forces are -dE/dx, and 3-D cells.
        batch_size: most structures per batched graph (default ``calc.default_batch_size``, 32).
        progress: show a tqdm bar of finished structures (only on a terminal: ``disable=None``).
        optimizer_kwargs: the ASE optimizer's parameters: FIRE ``dt, maxstep, dtmax, Nmin, finc, fdec, astart,
            fa, a, downhill_check``; BFGS ``maxstep, alpha``; LBFGS ``maxstep, memory, damping, alpha`` (line
            search, restart files, trajectories and logfiles are not offered).

    Returns:
        One ase.Atoms per input, in input order: a copy of the input with the relaxed positions (and cell), a
        ``SinglePointCalculator`` holding energy and free_energy (eV), forces ((n, 3) eV/Å, raw; ``get_forces()``
        applies the constraints as usual) and, for gradient-force models and 3-D cells, stress (Voigt, eV/Å³), all
        at the returned geometry; and ``info["relax_converged"]`` (bool), ``info["relax_steps"]`` (int, ASE's
        ``opt.nsteps``), ``info["relax_fmax"]`` (float, the final value of the convergence criterion, eV/Å).

    Raises:
        TypeError: ``structures`` is a single Atoms / not iterable, holds a non-Atoms, ``calc`` is not an
            MLCalculator, an optimizer parameter is unknown, or an argument has the wrong type.
        ValueError: unknown optimizer (the valid names are listed), ``fmax <= 0``, ``steps < 0``,
            ``batch_size < 1``, a structure the model cannot evaluate (named by index), an energy-only model,
            ``cell_filter`` with a direct-force model (no stress) or without a 3-D cell, bad optimizer parameters.

    An empty list gives []. A structure whose forces become non-finite stops there, unconverged (logged).
    Structures are validated once, before the first step (not after every step, as the calculator would).
    """
    name = _optimizer_name(optimizer)
    atoms_list, fmax, steps, batch_size, filter_kwargs = _validate(
        structures, calc, fmax, steps, batch_size, cell_filter
    )
    opt_params = dict(optimizer_kwargs or {})
    state_cls = OPTIMIZERS[name]
    n = len(atoms_list)
    if n == 0:
        return []
    # fail on bad parameters / filter arguments before any model call
    state_cls(3, **opt_params)
    if filter_kwargs is not None:
        FrechetCellFilter(atoms_list[0].copy(), **filter_kwargs)

    def start(index: int) -> _Job:
        atoms = atoms_list[index].copy()
        target: Target = atoms if filter_kwargs is None else FrechetCellFilter(atoms, **filter_kwargs)
        ndofs = 3 * len(target)
        return _Job(index, atoms, target, state_cls(ndofs, **opt_params))

    results: list[Atoms | None] = [None] * n
    waiting = deque(range(n))
    active: list[_Job] = []
    calls = 0
    evaluated = 0
    n_converged = 0
    with tqdm(total=n, desc=f"relax {name}", unit="structure", disable=None if progress else True) as bar:
        while waiting or active:
            while waiting and len(active) < batch_size:
                active.append(start(waiting.popleft()))
            outputs = _evaluate(calc, [job.atoms for job in active])
            calls += 1
            evaluated += len(active)
            still: list[_Job] = []
            for job, out in zip(active, outputs, strict=True):
                job.atoms.calc = SinglePointCalculator(job.atoms, **out)
                forces = np.asarray(job.target.get_forces(), dtype=np.float64).ravel()
                finite = bool(np.isfinite(forces).all())
                fnow = gradient_norm(forces) if finite else float("nan")
                converged = finite and fnow < fmax
                if converged or job.nsteps >= steps or not finite:
                    if not finite:
                        logger.warning(
                            "structure %d: non-finite forces after %d steps; stopped unconverged", job.index, job.nsteps
                        )
                    job.atoms.info["relax_converged"] = converged
                    job.atoms.info["relax_steps"] = job.nsteps
                    job.atoms.info["relax_fmax"] = fnow
                    results[job.index] = job.atoms
                    n_converged += converged
                    bar.update(1)
                    continue
                energy = job.target.get_potential_energy(force_consistent=True)
                job.state.step(job.target, forces, energy)
                job.nsteps += 1
                still.append(job)
            active = still
            bar.set_postfix(active=len(active), waiting=len(waiting), refresh=False)
    logger.info(
        "%s relaxed %d structures (%d converged) in %d batched model calls (%d structure evaluations, mean batch %.1f)",
        name, n, n_converged, calls, evaluated, evaluated / calls,
    )
    return results  # type: ignore[return-value]
