"""Training samples (graphs built once by the calculator), batches, and the differentiable evaluation.

Graphs come from ``MLCalculator.build_graph`` — the inference path — one structure at a time, and are
concatenated per batch; ``collate`` gives exactly the graph ``radius_graph`` builds for the list (edges sorted by
target, so a batch's edge list is the structures' lists one after the other). ``evaluate_for_training`` is
the calculator's ``evaluate_model`` with ``create_graph=True``, so forces = -dE/dx can be trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms
from torch import Tensor

from mlcalc.calculator import evaluate_model
from mlcalc.graph import AtomGraph
from mlcalc.train.data import labels


@dataclass
class Sample:
    """One labelled structure: its graph (on the training device and dtype), energy (eV), forces (N, 3) eV/Å,
    free (N,) bool (atoms not fixed by FixAtoms)."""

    graph: AtomGraph
    energy: float
    forces: Tensor
    free: Tensor


@dataclass
class Batch:
    """Several samples: one graph, energy (B,), natoms (B,) float, forces (N, 3), free (N,) bool."""

    graph: AtomGraph
    energy: Tensor
    natoms: Tensor
    forces: Tensor
    free: Tensor


def free_mask(atoms: Atoms) -> np.ndarray:
    """(N,) bool: True for atoms not fixed by a FixAtoms constraint."""
    free = np.ones(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            free[constraint.index] = False
    return free


def make_samples(structures: Sequence[Atoms], calc) -> list[Sample]:
    """Samples of labelled structures, graphs built by ``calc.build_graph`` (an MLCalculator) on its device/dtype.

    Raises ValueError (from the calculator's checks) for structures the model cannot evaluate, or missing labels.
    """
    out = []
    for k, atoms in enumerate(structures):
        try:
            calc.check_atoms(atoms)
        except ValueError as err:
            raise ValueError(f"training structure {k} ({atoms.get_chemical_formula()}): {err}") from None
        energy, forces = labels(atoms)
        graph = calc.build_graph(atoms)
        out.append(
            Sample(
                graph=graph,
                energy=energy,
                forces=torch.as_tensor(forces, dtype=graph.pos.dtype, device=graph.pos.device),
                free=torch.as_tensor(free_mask(atoms), device=graph.pos.device),
            )
        )
    return out


def collate_graphs(graphs: Sequence[AtomGraph]) -> AtomGraph:
    """One batched AtomGraph of several (single- or multi-structure) graphs with the same cutoff."""
    if len(graphs) == 1:
        return graphs[0]
    atom_offsets, graph_offsets, a, b = [], [], 0, 0
    for g in graphs:
        atom_offsets.append(a)
        graph_offsets.append(b)
        a += g.num_atoms
        b += g.num_graphs
    return AtomGraph(
        pos=torch.cat([g.pos for g in graphs]),
        numbers=torch.cat([g.numbers for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        batch=torch.cat([g.batch + o for g, o in zip(graphs, graph_offsets, strict=True)]),
        natoms=torch.cat([g.natoms for g in graphs]),
        tags=torch.cat([g.tags for g in graphs]),
        edge_index=torch.cat([g.edge_index + o for g, o in zip(graphs, atom_offsets, strict=True)], dim=1),
        cell_offsets=torch.cat([g.cell_offsets for g in graphs]),
        cutoff=graphs[0].cutoff,
    )


def collate(samples: Sequence[Sample]) -> Batch:
    """A Batch of samples (same device and dtype)."""
    graph = collate_graphs([s.graph for s in samples])
    dtype, device = graph.pos.dtype, graph.pos.device
    return Batch(
        graph=graph,
        energy=torch.tensor([s.energy for s in samples], dtype=dtype, device=device),
        natoms=graph.natoms.to(dtype),
        forces=torch.cat([s.forces for s in samples]),
        free=torch.cat([s.free for s in samples]),
    )


def evaluate_for_training(model, graph: AtomGraph, stress: bool = False) -> dict[str, Tensor]:
    """Denormalised energy (B,) eV, forces (N, 3) eV/Å (and stress (B, 3, 3) eV/Å³) that gradients flow through.

    Exactly ``mlcalc.calculator.evaluate_model(model, graph, stress, create_graph=True)``: the calculator's own
    force/stress path, with the autograd graph kept so the force loss can be back-propagated to the parameters.
    """
    return evaluate_model(model, graph, stress=stress, create_graph=True)
