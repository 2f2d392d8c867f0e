"""Held-out evaluation of a trained checkpoint against its reference (EMT for mlcalc's data set).

``heldout_errors`` gives energy and force MAEs over labelled structures; ``relaxation_benchmark`` relaxes starting
structures with the model and with the reference calculator (BFGS, same start, same fmax) and compares the
relaxed energies, the measure the model cards report (in the spirit of OC20's IS2RS/AdsorbML evaluations: does an
ML relaxation end where the reference one does?).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.optimize import BFGS

from mlcalc.train.data import labels
from mlcalc.train.losses import composition_least_squares

logger = logging.getLogger(__name__)


def heldout_errors(calc, structures: Sequence[Atoms], batch_size: int = 16) -> dict[str, float]:
    """Mean absolute errors of ``calc`` (an MLCalculator) on labelled structures.

    Returns energy_mae (eV per structure), energy_per_atom_mae (eV/atom), forces_mae (eV/Å, mean over all force
    components, as fairchem's ``forces_mae``), forces_l2_mae (eV/Å, mean over atoms of |ΔF|), n_structures, n_atoms.
    Raises ValueError for structures without energy and force labels.
    """
    if not structures:
        raise ValueError("heldout_errors needs at least one labelled structure")
    e_err, e_atom_err, f_abs, f_l2 = [], [], [], []
    for atoms, res in zip(structures, calc.predict(structures, batch_size=batch_size), strict=True):
        energy, forces = labels(atoms)
        e_err.append(abs(res["energy"] - energy))
        e_atom_err.append(abs(res["energy"] - energy) / len(atoms))
        diff = res["forces"] - forces
        f_abs.append(np.abs(diff).ravel())
        f_l2.append(np.linalg.norm(diff, axis=1))
    return {
        "energy_mae": float(np.mean(e_err)),
        "energy_per_atom_mae": float(np.mean(e_atom_err)),
        "forces_mae": float(np.concatenate(f_abs).mean()),
        "forces_l2_mae": float(np.concatenate(f_l2).mean()),
        "n_structures": len(structures),
        "n_atoms": int(sum(len(a) for a in structures)),
    }


@dataclass
class RelaxationResult:
    """One start relaxed twice. Energies in eV; ``cross`` is the reference energy of the model's relaxed structure."""

    name: str
    n_atoms: int
    model_energy: float
    model_steps: int
    model_converged: bool
    reference_energy: float
    reference_steps: int
    reference_converged: bool
    cross_energy: float

    @property
    def energy_error(self) -> float:
        """Model's relaxed energy minus the reference's relaxed energy (eV)."""
        return self.model_energy - self.reference_energy

    @property
    def structure_error(self) -> float:
        """Reference energy of the model's relaxed structure minus the reference minimum (eV; ≥ 0 up to fmax)."""
        return self.cross_energy - self.reference_energy

    def as_dict(self) -> dict:
        return {**asdict(self), "energy_error": self.energy_error, "structure_error": self.structure_error}


def _relax(atoms: Atoms, calc: Calculator, fmax: float, steps: int) -> tuple[float, int, bool]:
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    return float(atoms.get_potential_energy()), int(opt.nsteps), converged


def relaxation_benchmark(
    calc: Calculator,
    starts: Sequence[Atoms],
    reference: Callable[[], Calculator],
    fmax: float = 0.05,
    steps: int = 300,
    names: Sequence[str] | None = None,
) -> list[RelaxationResult]:
    """Relax every start with ``calc`` and with ``reference()`` (a fresh reference calculator per structure).

    Both use ASE's BFGS from the same positions with the start's constraints (FixAtoms of the slab). Returns one
    RelaxationResult per start, in input order.
    """
    results = []
    for k, start in enumerate(starts):
        name = names[k] if names is not None else str(start.info.get("system", k))
        t0 = time.perf_counter()
        model_atoms, ref_atoms = start.copy(), start.copy()
        e_model, n_model, ok_model = _relax(model_atoms, calc, fmax, steps)
        e_ref, n_ref, ok_ref = _relax(ref_atoms, reference(), fmax, steps)
        model_atoms.calc = reference()
        cross = float(model_atoms.get_potential_energy())
        results.append(RelaxationResult(name, len(start), e_model, n_model, ok_model, e_ref, n_ref, ok_ref, cross))
        logger.info("%s: model %.4f eV (%d steps), reference %.4f eV (%d steps), %.1f s", name, e_model, n_model,
                    e_ref, n_ref, time.perf_counter() - t0)
    return results


def relaxation_starts(db_path: str, split: str = "test") -> list[Atoms]:
    """The initial structure (frame 0 of the relax trajectory) of every adsorbate+slab system of a split."""
    from mlcalc.train.data import read_db

    rows = read_db(db_path, f"split={split},kind=relax,frame=0")
    return [a for a in rows if a.info.get("adsorbate", "none") != "none" and a.info.get("facet") != "bulk"]


def fit_element_references(calc, structures: Sequence[Atoms], batch_size: int = 16) -> dict[int, float]:
    """Per-element energy references (atomic number -> eV) fitted to the residual energy of ``calc``'s model.

    Least squares over the labelled structures: ``sum_Z n_Z(structure) * ref_Z ~= E_label - E_model`` where E_model
    is the model's energy without references. Adding them to the model (``model.element_references``) removes the
    part of its energy error that is linear in the composition (fairchem's ``elementrefs`` play the same role).
    Only elements present in ``structures`` get a reference. Raises ValueError for an empty list.
    """
    if not structures:
        raise ValueError("fit_element_references needs at least one labelled structure")
    model = calc.model
    saved = dict(getattr(model, "element_references", {}) or {})
    model.element_references = {}
    try:
        results = calc.predict(structures, batch_size=batch_size)
    finally:
        model.element_references = saved
    residual = [labels(atoms)[0] - res["energy"] for atoms, res in zip(structures, results, strict=True)]
    return composition_least_squares([atoms.numbers.tolist() for atoms in structures], residual)
