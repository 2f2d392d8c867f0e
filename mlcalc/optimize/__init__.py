"""Batched structure relaxations: ``relax(structures, calc, optimizer="BFGS", ...)``.

ASE's FIRE, BFGS and LBFGS, one per-structure state each (``mlcalc.optimize.algorithms``), driven by one batched
model call per step with in-flight batching (``mlcalc.optimize.batched``).
"""

from mlcalc.optimize.algorithms import OPTIMIZERS, BFGSState, FIREState, LBFGSState, OptimizerState
from mlcalc.optimize.batched import DEFAULT_STEPS, relax

__all__ = ["DEFAULT_STEPS", "OPTIMIZERS", "BFGSState", "FIREState", "LBFGSState", "OptimizerState", "relax"]
