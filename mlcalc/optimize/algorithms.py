"""Per-structure optimizer states: ASE's FIRE, BFGS and LBFGS, step for step, in numpy float64.

Each class holds the state of ONE structure's relaxation and takes one step from forces that were computed
elsewhere (by ``relax``'s batched model evaluation), so many structures can share one model call per step. The
arithmetic is ASE's own (``ase.optimize.fire.FIRE``, ``ase.optimize.bfgs.BFGS`` with ``ase._4.optimize.bfgs
.BFGSMethod``, ``ase.optimize.lbfgs.LBFGS`` with ``ase._4.optimize.lbfgs.LBFGSMethod``, ASE 3.23-3.29), in the same
order of operations, with ASE's defaults; a single structure therefore follows ASE's trajectory to rounding.

Coordinates go through a ``Target``: an ``ase.Atoms`` or an ASE filter (``FrechetCellFilter``) whose
``get_positions`` / ``set_positions`` / ``get_forces`` / ``get_potential_energy`` are used exactly as ASE's
optimizers use them (``set_positions`` applies the constraints, e.g. FixAtoms keeps fixed atoms in place;
``get_forces`` returns constrained forces). A degree-of-freedom vector is the flattened (n, 3) positions array
(n = atoms, plus 3 cell rows with a cell filter), in Å (cell rows: ASE's scaled log-deformation).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Protocol

import numpy as np

logger = logging.getLogger(__name__)


class Target(Protocol):
    """What the optimizers move: ``ase.Atoms`` or an ASE filter (``FrechetCellFilter``)."""

    def get_positions(self) -> np.ndarray: ...

    def set_positions(self, new: np.ndarray) -> None: ...


def get_x(target: Target) -> np.ndarray:
    """The flat (3n,) coordinate vector of ``target`` (a new array), as ASE's ``Optimizable.get_x``."""
    return np.asarray(target.get_positions(), dtype=np.float64).ravel()


def set_x(target: Target, x: np.ndarray) -> None:
    """Set the flat coordinate vector (constraints applied by ``set_positions``), as ASE's ``Optimizable.set_x``."""
    target.set_positions(x.reshape(-1, 3))


def gradient_norm(vector: np.ndarray) -> float:
    """Largest per-row (per-atom, per-cell-row) Euclidean norm of a flat (3n,) vector: ASE's ``gradient_norm``."""
    return float(np.linalg.norm(vector.reshape(-1, 3), axis=1).max())


class OptimizerState:
    """One structure's optimizer state. Subclasses implement ASE's ``step``.

    Args:
        ndofs: number of degrees of freedom (3 x rows of the target's positions).
        **params: the ASE optimizer's keyword arguments listed in ``params`` (unknown names raise TypeError).
    """

    name: ClassVar[str] = ""
    #: ASE's keyword arguments of this optimizer and their ASE defaults
    params: ClassVar[dict[str, Any]] = {}

    def __init__(self, ndofs: int, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise TypeError(
                f"{self.name} got unknown optimizer parameter(s) {unknown}; it accepts {sorted(self.params)}"
            )
        self.ndofs = int(ndofs)
        values = {**self.params, **params}
        for key, value in values.items():
            setattr(self, key, value)
        self._check()

    def _check(self) -> None:
        maxstep = float(self.maxstep)  # type: ignore[attr-defined]
        if not np.isfinite(maxstep) or maxstep <= 0:
            raise ValueError(f"{self.name}: maxstep must be a positive number of Å, got {maxstep}")

    def step(self, target: Target, forces: np.ndarray, energy: float) -> None:
        """Move ``target`` by one step.

        Args:
            target: the Atoms or filter, whose calculator holds the results at its current coordinates.
            forces: (ndofs,) float64, the target's (constrained) forces at its current coordinates, eV/Å
                (the negative gradient; for a cell filter the last 9 entries are the cell "forces").
            energy: the target's energy at its current coordinates, eV (FIRE's downhill check uses it).
        """
        raise NotImplementedError


class FIREState(OptimizerState):
    """ASE's FIRE (``ase.optimize.FIRE``; Bitzek et al., PRL 97, 170201 (2006)), ASE's defaults.

    The step is capped by the norm of the whole displacement vector (``maxstep``, Å), as ASE does. With
    ``downhill_check`` an uphill step is undone (positions reset, velocity zeroed) using the energy already known at
    the reset positions, as ASE's recomputed one is for a deterministic calculator.
    """

    name = "FIRE"
    params: ClassVar[dict[str, Any]] = {
        "dt": 0.1, "maxstep": 0.2, "dtmax": 1.0, "Nmin": 5, "finc": 1.1, "fdec": 0.5, "astart": 0.1,
        "fa": 0.99, "a": 0.1, "downhill_check": False,
    }

    def __init__(self, ndofs: int, **params: Any) -> None:
        super().__init__(ndofs, **params)
        self.vel: np.ndarray | None = None
        self.Nsteps = 0
        self.e_last: float | None = None
        self.r_last: np.ndarray | None = None

    def step(self, target: Target, forces: np.ndarray, energy: float) -> None:
        gradient = forces  # ASE's name for the negative gradient in FIRE.step
        if self.vel is None:
            self.vel = np.zeros(self.ndofs)
            if self.downhill_check:
                self.e_last = energy
                self.r_last = get_x(target)
        else:
            is_uphill = False
            if self.downhill_check:
                if energy > self.e_last:
                    set_x(target, self.r_last)
                    is_uphill = True
                else:
                    self.e_last = energy
                self.r_last = get_x(target)
            vf = np.vdot(gradient, self.vel)
            grad2 = np.vdot(gradient, gradient)
            if vf > 0.0 and not is_uphill:
                self.vel = (1.0 - self.a) * self.vel + self.a * gradient / np.sqrt(grad2) * np.sqrt(
                    np.vdot(self.vel, self.vel)
                )
                if self.Nsteps > self.Nmin:
                    self.dt = min(self.dt * self.finc, self.dtmax)
                    self.a *= self.fa
                self.Nsteps += 1
            else:
                self.vel[:] *= 0.0
                self.a = self.astart
                self.dt *= self.fdec
                self.Nsteps = 0
        self.vel += self.dt * gradient
        dr = self.dt * self.vel
        normdr = np.sqrt(np.vdot(dr, dr))
        if normdr > self.maxstep:
            dr = self.maxstep * dr / normdr
        r = get_x(target)
        set_x(target, r + dr)


class BFGSState(OptimizerState):
    """ASE's BFGS (``ase.optimize.BFGS``): dense Hessian, initial ``alpha`` x identity (eV/Å²), ASE's defaults.

    Step = -V (g V / |w|) from the Hessian's eigen-decomposition, scaled as a whole so that no atom (row) moves
    more than ``maxstep`` Å (ASE's ``determine_step``). Memory (3n)² float64 per structure, as in ASE.
    """

    name = "BFGS"
    params: ClassVar[dict[str, Any]] = {"maxstep": 0.2, "alpha": 70.0}

    def __init__(self, ndofs: int, **params: Any) -> None:
        super().__init__(ndofs, **params)
        if self.maxstep > 1.0:
            logger.warning("BFGS: you are using a *very* large value for the maximum step size: %.1f Å", self.maxstep)
        self.hessian: np.ndarray | None = None
        self.pos0: np.ndarray | None = None
        self.gradient0: np.ndarray | None = None

    def _update(self, pos: np.ndarray, gradient: np.ndarray) -> None:
        if self.hessian is None:
            self.hessian = np.eye(self.ndofs) * self.alpha
            return
        dpos = pos - self.pos0
        if np.abs(dpos).max() < 1e-7:  # same configuration again
            return
        dgradient = gradient - self.gradient0
        a = dpos @ dgradient
        dg = self.hessian @ dpos
        b = dpos @ dg
        self.hessian += np.outer(dgradient, dgradient) / a - np.outer(dg, dg) / b

    def step(self, target: Target, forces: np.ndarray, energy: float) -> None:
        gradient = -forces
        pos = get_x(target)
        self._update(pos, gradient)
        self.pos0 = pos
        self.gradient0 = gradient.copy()
        omega, vectors = np.linalg.eigh(self.hessian)
        dpos = -vectors @ (gradient @ vectors / np.fabs(omega))
        steplength = gradient_norm(dpos)
        if steplength >= self.maxstep:
            dpos *= self.maxstep / steplength
        set_x(target, pos + dpos)


class LBFGSState(OptimizerState):
    """ASE's LBFGS (``ase.optimize.LBFGS``, no line search): ``memory`` (s, y, rho) pairs, initial inverse Hessian
    1/``alpha`` x identity, step x ``damping``, scaled so that no atom (row) moves more than ``maxstep`` Å."""

    name = "LBFGS"
    params: ClassVar[dict[str, Any]] = {"maxstep": 0.2, "memory": 100, "damping": 1.0, "alpha": 70.0}

    def __init__(self, ndofs: int, **params: Any) -> None:
        super().__init__(ndofs, **params)
        if self.maxstep > 1.0:
            raise ValueError(
                f"LBFGS: maxstep {self.maxstep:.1f} Å is much too large (ASE refuses values above 1.0 Å)"
            )
        if int(self.memory) < 1:
            raise ValueError(f"LBFGS: memory must be a positive integer, got {self.memory}")
        self.memory = int(self.memory)
        self.inverse_h0 = np.full(self.ndofs, 1.0 / self.alpha)  # diagonal of ASE's sparse H0
        self.iteration = 0
        self.s: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.rho: list[float] = []
        self.r0: np.ndarray | None = None
        self.f0: np.ndarray | None = None

    def _update(self, pos: np.ndarray, gradient: np.ndarray) -> None:
        s0 = pos - self.r0
        self.s.append(s0)
        y0 = gradient - (-self.f0)
        self.y.append(y0)
        self.rho.append(1.0 / np.dot(y0, s0))
        if self.iteration > self.memory:
            self.s.pop(0)
            self.y.pop(0)
            self.rho.pop(0)

    def _compute_step(self, gradient: np.ndarray) -> np.ndarray:
        loopmax = min(self.memory, self.iteration)
        a = np.empty(loopmax, dtype=np.float64)
        q = gradient.copy()
        for i in range(loopmax - 1, -1, -1):
            a[i] = self.rho[i] * np.dot(self.s[i], q)
            q -= a[i] * self.y[i]
        z = self.inverse_h0 * q
        for i in range(loopmax):
            b = self.rho[i] * np.dot(self.y[i], z)
            z += self.s[i] * (a[i] - b)
        self.iteration += 1
        return -z

    def step(self, target: Target, forces: np.ndarray, energy: float) -> None:
        pos = get_x(target)
        if self.iteration > 0:
            self._update(pos, -forces)
        dr = self._compute_step(-forces)
        longest = gradient_norm(dr)
        if longest >= self.maxstep:
            dr *= self.maxstep / longest
        dr = dr * self.damping
        set_x(target, pos + dr)
        self.r0 = pos
        self.f0 = forces.copy()


#: optimizer name -> state class
OPTIMIZERS: dict[str, type[OptimizerState]] = {"FIRE": FIREState, "BFGS": BFGSState, "LBFGS": LBFGSState}
