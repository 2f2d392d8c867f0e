"""TorchSim (``torch-sim-atomistic``, extra ``torchsim``): every mlcalc model as a ``ModelInterface``.

    import torch_sim as ts
    from mlcalc.integrations.torchsim import MLCalcModel

    model = MLCalcModel("checkpoints/gemnet_oc-emt.pt", dtype=torch.float64)   # or a calculator, model or name
    relaxed = ts.optimize(system=[slab1, slab2], model=model, optimizer=ts.frechet_cell_fire)
    final = ts.integrate(system=slabs, model=model, integrator=ts.nvt_langevin, n_steps=100,
                         temperature=300, timestep=0.002)

The adapter turns each TorchSim state into the batched graph of the wrapped calculator (``build_graph``: the same
validation, recentring and neighbour search) and evaluates it through mlcalc's one force/stress path
(``evaluate_model``), so a batch of different systems through TorchSim gives mlcalc's own per-structure numbers.
Outputs: energy (n_systems,) eV, forces (n_atoms, 3) eV/Å, stress (n_systems, 3, 3) eV/Å³ with ASE's sign
(1/V dE/dε) for gradient-force models; direct-force models (eSCN, SCN, most released GemNet-OC) have no stress, so
cell relaxations and NPT need a gradient-force checkpoint.

Periodicity: TorchSim 0.3 keeps one ``pbc`` flag for the whole state: ``ts.io.atoms_to_state`` turns an ase.build
slab's ``[True, True, False]`` into ``False``, i.e. an isolated cluster, which silently gives wrong energies for
slabs. Give slabs ``pbc=True`` with vacuum along c (as OC20 does) before building the state, or pass
``MLCalcModel(..., pbc=(True, True, False))`` to override the state's flag; the adapter warns once when a state
without pbc has 3-D cells. TorchSim's optimizers ignore ASE constraints (FixAtoms) and stop on an energy criterion
unless given ``convergence_fn=ts.generate_force_convergence_fn(force_tol=0.05, include_cell_forces=False)``.

Tags: TorchSim states carry none. GemNet-OC's OC20/OC22 checkpoints build quadruplets only on atoms tagged 1 or 2;
pass ``tags`` (one array per system, or one flat array) or set ``state.tags``; without them every atom has tag 0
(the calculator logs its one warning).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms

from mlcalc.calculator import MLCalculator, load_calculator
from mlcalc.models.base import MLModel

try:  # the optional extra
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mlcalc.integrations.torchsim needs TorchSim: pip install 'mlcalc[torchsim]' (torch-sim-atomistic)"
    ) from err

logger = logging.getLogger(__name__)


class MLCalcModel(ModelInterface):
    """A TorchSim ``ModelInterface`` for any mlcalc model (GemNet-OC, eSCN, SCN, SphereNet, Lennard-Jones).

    Args:
        model: an ``MLCalculator``, an ``MLModel``, a checkpoint path or a released checkpoint name.
        device: torch device ("auto": cuda when available; ignored when ``model`` is a calculator).
        dtype: float32 or float64 (ignored when ``model`` is a calculator, whose dtype is used).
        compute_stress: None (default: whenever the model has stress, i.e. gradient forces) or a bool; True on a
            model without stress raises ValueError.
        tags: optional OC20 tags (ints) for GemNet-OC: a flat array over all atoms of the states to come, or a list
            with one array per system. ``state.tags`` (if set) wins.
        pbc: periodicity used for every system instead of the state's single flag (e.g. ``(True, True, False)``
            for slabs); None uses the state's.

    Raises:
        ValueError: stress asked of a direct-force model, or forces asked of an energy-only model.
    """

    def __init__(
        self,
        model: MLCalculator | MLModel | str | os.PathLike,
        device: torch.device | str = "auto",
        dtype: torch.dtype | str = torch.float64,
        compute_stress: bool | None = None,
        compute_forces: bool = True,
        tags: Sequence[Any] | np.ndarray | None = None,
        pbc: bool | Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        calc = model if isinstance(model, MLCalculator) else load_calculator(model, device=device, dtype=dtype)
        self.calc = calc
        self._device = calc.device
        self._dtype = calc.dtype
        has_stress = "stress" in calc.implemented_properties
        has_forces = "forces" in calc.implemented_properties
        if compute_stress and not has_stress:
            raise ValueError(calc._missing_property_message("stress"))
        if compute_forces and not has_forces:
            raise ValueError(calc._missing_property_message("forces"))
        self._compute_stress = has_stress if compute_stress is None else bool(compute_stress)
        self._compute_forces = bool(compute_forces)
        self._tags = tags
        self._pbc = None if pbc is None else np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
        self._warned_pbc = False
        self._memory_scales_with = "n_atoms_x_density"

    @property
    def model(self) -> MLModel:
        """The wrapped mlcalc model."""
        return self.calc.model

    def _tags_for(self, state: Any, n_atoms: int, system_idx: np.ndarray) -> np.ndarray:
        tags = getattr(state, "tags", None)
        if tags is None:
            tags = self._tags
        if tags is None:
            return np.zeros(n_atoms, dtype=int)
        if isinstance(tags, torch.Tensor):
            tags = tags.detach().cpu().numpy()
        if isinstance(tags, (list, tuple)) and tags and np.ndim(tags[0]) == 1:
            tags = np.concatenate([np.asarray(t) for t in tags])
        tags = np.asarray(tags, dtype=int).reshape(-1)
        if tags.shape[0] != n_atoms:
            raise ValueError(f"tags have {tags.shape[0]} entries for {n_atoms} atoms")
        return tags

    def to_atoms(self, state: Any) -> list[Atoms]:
        """The systems of a TorchSim state as ase.Atoms (float64 positions and cells, pbc, tags)."""
        if isinstance(state, dict):
            state = ts.SimState(**state, masses=torch.ones_like(state["positions"][:, 0]))
        pos = state.positions.detach().to("cpu", torch.float64).numpy()
        cell = state.row_vector_cell.detach().to("cpu", torch.float64).numpy()
        numbers = state.atomic_numbers.detach().cpu().numpy()
        system_idx = state.system_idx.detach().cpu().numpy()
        pbc = np.broadcast_to(np.asarray(torch.as_tensor(state.pbc).cpu().numpy(), dtype=bool), (3,))
        if self._pbc is not None:
            pbc = self._pbc
        elif not pbc.any() and not self._warned_pbc and (np.abs(np.linalg.det(cell)) > 1e-6).any():
            self._warned_pbc = True
            logger.warning(
                "the TorchSim state has pbc=False but 3-D cells: every system is evaluated as an isolated cluster. "
                "TorchSim keeps one pbc flag (ase.build slabs' [True, True, False] become False); for slabs set "
                "atoms.pbc = True before building the state, or pass MLCalcModel(..., pbc=(True, True, False))."
            )
        tags = self._tags_for(state, len(numbers), system_idx)
        n_systems = int(cell.shape[0])
        out = []
        for b in range(n_systems):
            mask = system_idx == b
            out.append(Atoms(numbers=numbers[mask], positions=pos[mask], cell=cell[b], pbc=pbc, tags=tags[mask]))
        return out

    def forward(self, state: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energy (n_systems,), forces (n_atoms, 3) and, when computed, stress (n_systems, 3, 3), on the state's
        device and in the model's dtype; detached. The state is not modified."""
        atoms_list = self.to_atoms(state)
        for k, atoms in enumerate(atoms_list):
            try:
                self.calc.check_atoms(atoms)
            except ValueError as err:
                raise ValueError(f"system {k}: {err}") from None
        device = state["positions"].device if isinstance(state, dict) else state.positions.device
        with self.calc._lock:
            for atoms in atoms_list:
                self.calc._warn_if_untagged(atoms)
            graph = self.calc.build_graph(atoms_list)
            out = self.calc.evaluate(graph, stress=self._compute_stress)
        result = {"energy": out["energy"].detach().to(device=device, dtype=self._dtype)}
        if self._compute_forces and "forces" in out:
            result["forces"] = out["forces"].detach().to(device=device, dtype=self._dtype)
        if self._compute_stress:
            result["stress"] = out["stress"].detach().to(device=device, dtype=self._dtype)
        return result
