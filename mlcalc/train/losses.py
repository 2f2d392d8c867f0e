"""Normaliser fitting, the energy + force loss (fairchem's conventions) and validation metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mlcalc.train.batching import Batch, Sample
from mlcalc.train.config import TrainConfig

logger = logging.getLogger(__name__)


def composition_least_squares(numbers: Sequence[Sequence[int]], targets: Sequence[float]) -> dict[int, float]:
    """Per-element values (atomic number -> value) x minimising sum_s (sum_Z n_Z(s) x_Z - target_s)^2.

    numbers: the atomic numbers of each structure; targets: one value per structure (eV). Only elements that occur
    get a value. Raises ValueError for an empty set."""
    if len(numbers) == 0:
        raise ValueError("cannot fit per-element values on an empty set of structures")
    elements = sorted({int(z) for n in numbers for z in n})
    column = {z: k for k, z in enumerate(elements)}
    counts = torch.zeros((len(numbers), len(elements)), dtype=torch.float64)
    for row, n in enumerate(numbers):
        for z in n:
            counts[row, column[int(z)]] += 1
    y = torch.tensor([float(t) for t in targets], dtype=torch.float64)
    refs = torch.linalg.lstsq(counts, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return {z: float(refs[column[z]]) for z in elements}


def fit_element_energies(samples: Sequence[Sample]) -> dict[int, float]:
    """Per-element energies (atomic number -> eV): least squares of the training energies on the composition.

    Raises ValueError for an empty set."""
    if not samples:
        raise ValueError("cannot fit element references on an empty training set")
    return composition_least_squares([s.graph.numbers.tolist() for s in samples], [s.energy for s in samples])


def fit_normalizers(
    samples: Sequence[Sample], direct_forces: bool, element_references: dict[int, float] | None = None
) -> dict[str, tuple[float, float]]:
    """Energy and force normalisers ``{"energy": (mean, std), "forces": (0, std)}`` from training samples.

    Energy mean = mean total energy per structure (the calculator adds it once per structure, as fairchem does), or
    0 with ``element_references`` (then the spread is that of the energies minus their references).
    Force mean is 0 (a nonzero mean would break rotation equivariance); force std = RMS of the force components.
    Direct-force models: energy std = std of the energies. Gradient models (forces = -dE/dx): the calculator scales
    the energy gradient by the force std, so energy std = force std = the force RMS — one scale keeps forces the
    exact negative gradient of the energy (as fairchem's shared target_std / grad_target_std).

    Raises ValueError for an empty set or a degenerate (zero) spread.
    """
    if not samples:
        raise ValueError("cannot fit normalizers on an empty training set")
    energies = torch.tensor([s.energy for s in samples], dtype=torch.float64)
    forces = torch.cat([s.forces.detach().double().cpu().reshape(-1) for s in samples])
    e_mean = float(energies.mean())
    if element_references:  # the references carry the composition; the network learns an extensive residual
        ref = torch.tensor(
            [sum(element_references[int(z)] for z in s.graph.numbers.tolist()) for s in samples], dtype=torch.float64
        )
        energies, e_mean = energies - ref, 0.0
    f_rms = float(forces.pow(2).mean().sqrt())
    e_std = float(energies.std(unbiased=False)) if direct_forces else f_rms
    if len(samples) == 1 and direct_forces:
        e_std = 1.0
    if not (math.isfinite(e_std) and e_std > 0 and math.isfinite(f_rms) and f_rms > 0):
        raise ValueError(f"degenerate training labels: energy std {e_std}, force RMS {f_rms}")
    return {"energy": (e_mean, e_std), "forces": (0.0, f_rms)}


class LossSums:
    """Running sums for a loss / metrics over many batches, so the result does not depend on the batch size."""

    def __init__(self) -> None:
        self.energy_loss = 0.0
        self.force_loss = 0.0
        self.n_structures = 0
        self.n_force_terms = 0
        self.energy_abs = 0.0
        self.energy_per_atom_abs = 0.0
        self.force_abs = 0.0
        self.n_components = 0


def loss_terms(
    out: dict[str, Tensor], batch: Batch, config: TrainConfig, normalizers: dict
) -> tuple[Tensor, Tensor, int]:
    """(sum of energy loss terms, sum of force loss terms, number of force terms) in normalised units.

    Energy error (E_pred - E) / e_std, divided by natoms when ``energy_per_atom``; force error (F_pred - F) / f_std
    on all atoms or only free ones (``force_atoms``). l2mae = |error vector| per atom, mae = |component|, mse =
    component squared. The means are the sums divided by the structure / term counts.
    """
    e_std = normalizers.get("energy", (0.0, 1.0))[1]
    f_std = normalizers.get("forces", (0.0, 1.0))[1]
    e_err = (out["energy"] - batch.energy) / e_std
    if config.energy_per_atom:
        e_err = e_err / batch.natoms
    e_terms = e_err.abs() if config.energy_loss == "mae" else e_err.pow(2)
    f_err = (out["forces"] - batch.forces) / f_std
    if config.force_atoms == "free":
        f_err = f_err[batch.free]
    if config.force_loss == "l2mae":
        f_terms = torch.linalg.vector_norm(f_err, dim=1)
    elif config.force_loss == "mae":
        f_terms = f_err.abs().reshape(-1)
    else:
        f_terms = f_err.pow(2).reshape(-1)
    return e_terms.sum(), f_terms.sum(), int(f_terms.numel())


def combine(config: TrainConfig, energy_mean: Tensor | float, force_mean: Tensor | float) -> Tensor | float:
    """The total loss: energy_coefficient * energy term + force_coefficient * force term."""
    return config.energy_coefficient * energy_mean + config.force_coefficient * force_mean


def accumulate(sums: LossSums, out: dict[str, Tensor], batch: Batch, config: TrainConfig, normalizers: dict) -> None:
    """Add one batch's loss terms and absolute errors (eV, eV/atom, eV/Å over all atoms) to ``sums``."""
    e_sum, f_sum, n_f = loss_terms(out, batch, config, normalizers)
    sums.energy_loss += float(e_sum)
    sums.force_loss += float(f_sum)
    sums.n_force_terms += n_f
    sums.n_structures += int(batch.energy.numel())
    de = (out["energy"].detach() - batch.energy).abs()
    sums.energy_abs += float(de.sum())
    sums.energy_per_atom_abs += float((de / batch.natoms).sum())
    sums.force_abs += float((out["forces"].detach() - batch.forces).abs().sum())
    sums.n_components += int(batch.forces.numel())


def metrics(sums: LossSums, config: TrainConfig) -> dict[str, float]:
    """{'loss', 'energy_loss', 'force_loss', 'energy_mae' (eV), 'energy_per_atom_mae' (eV/atom), 'forces_mae'
    (eV/Å, mean over all force components)} of accumulated sums."""
    e_loss = sums.energy_loss / max(sums.n_structures, 1)
    f_loss = sums.force_loss / max(sums.n_force_terms, 1)
    return {
        "loss": float(combine(config, e_loss, f_loss)),
        "energy_loss": e_loss,
        "force_loss": f_loss,
        "energy_mae": sums.energy_abs / max(sums.n_structures, 1),
        "energy_per_atom_mae": sums.energy_per_atom_abs / max(sums.n_structures, 1),
        "forces_mae": sums.force_abs / max(sums.n_components, 1),
    }
