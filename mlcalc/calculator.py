"""ASE calculators: MLCalculator (any mlcalc model) and the named calculators of each model family."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from mlcalc.checkpoint import load_model
from mlcalc.graph import AtomGraph, check_cell, radius_graph
from mlcalc.models.base import MLModel
from mlcalc.structures import as_atoms

logger = logging.getLogger(__name__)

#: atoms closer than this (Å) are rejected as unphysical input
MIN_INTERATOMIC_DISTANCE = 0.1

OC20_ENERGY_NOTE = (
    "Checkpoints trained on OC20 S2EF predict adsorption-referenced energies (total energy minus the clean slab "
    "and gas-phase references of the training data), not DFT total energies; compare energies only between "
    "structures with the same composition and reference."
)
DIRECT_FORCES_NOTE = (
    "This checkpoint predicts forces directly (not as -dE/dx): fine for BFGS/FIRE relaxations and thermostatted "
    "MD, but forces are not energy-conserving, so NVE MD drifts and no stress is available."
)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32/float64 or the strings 'float32'/'float64' (also 'fp32'/'fp64', 'single'/'double')."""
    if isinstance(dtype, str):
        table = {
            "float32": torch.float32, "fp32": torch.float32, "single": torch.float32, "float": torch.float32,
            "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
        }
        key = dtype.lower().removeprefix("torch.")
        if key not in table:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        return table[key]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def resolve_device(device: torch.device | str) -> torch.device:
    """'auto' picks cuda when available, else cpu; anything torch.device accepts otherwise."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch reports no CUDA device; use device='cpu' or 'auto'")
    return dev


def validate_atoms(atoms: Atoms, max_atomic_number: int = 118) -> None:
    """Raise ValueError naming the problem for input no model can evaluate sensibly."""
    if len(atoms) == 0:
        raise ValueError("the Atoms object is empty (0 atoms)")
    numbers = np.asarray(atoms.numbers)
    bad = np.where((numbers < 1) | (numbers > max_atomic_number))[0]
    if bad.size:
        names = sorted({chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in numbers[bad]})
        raise ValueError(
            f"element(s) {', '.join(names)} (atom indices {bad.tolist()[:10]}) outside the model's range "
            f"Z = 1..{max_atomic_number}"
        )
    pos = np.asarray(atoms.positions, dtype=np.float64)
    finite = np.isfinite(pos).all(axis=1)
    if not finite.all():
        raise ValueError(f"positions of atoms {np.where(~finite)[0].tolist()[:10]} are NaN or inf")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    check_cell(np.asarray(atoms.cell.array, dtype=np.float64), pbc, "Atoms")
    if len(atoms) > 1 or pbc.any():
        import vesin

        box = atoms.cell.array if pbc.any() else np.zeros((3, 3))
        # a cut-off of 1 Å keeps the cell list coarse (a 0.1 Å grid over a slab box would be huge)
        nl = vesin.NeighborList(cutoff=1.0, full_list=False)
        i, j, s, d = nl.compute(pos, box, [bool(p) for p in pbc], "ijSd")
        self_zero = (i == j) & (np.abs(s).sum(axis=1) == 0)
        close = (d < MIN_INTERATOMIC_DISTANCE) & ~self_zero
        if close.any():
            k = int(np.argmin(np.where(close, d, np.inf)))
            raise ValueError(
                f"atoms {int(i[k])} and {int(j[k])} are {d[k]:.4f} Å apart (image {s[k].tolist()}), closer than "
                f"{MIN_INTERATOMIC_DISTANCE} Å: the structure is unphysical (duplicated atom?)"
            )


class MLCalculator(Calculator):
    """ASE calculator for any mlcalc model.

    Args:
        model: an ``MLModel`` instance or the path of a checkpoint (fairchem v1 or mlcalc format).
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        dtype: torch.float32 (default) or torch.float64 (or the strings); per instance, never global.

    Results (ASE units, float64 numpy): energy and free_energy (eV), forces (N, 3) eV/Å, and for models whose
    forces are -dE/dx, stress (Voigt xx yy zz yz xz xy, eV/Å³) from the strain derivative when the cell is 3-D.
    The model is copied when it must change device or dtype, so one model can serve several calculators.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]
    #: registry names a named calculator accepts (empty: any model)
    model_names: ClassVar[tuple[str, ...]] = ()
    extra_notes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: MLModel | str | os.PathLike,
        device: torch.device | str = "auto",
        dtype: torch.dtype | str = torch.float32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model)
        if not isinstance(model, MLModel):
            raise TypeError(f"model must be an mlcalc MLModel or a checkpoint path, got {type(model).__name__}")
        if self.model_names and model.registry_name.lower() not in {n.lower() for n in self.model_names}:
            raise ValueError(
                f"{type(self).__name__} expects a {'/'.join(self.model_names)} model, got {model.registry_name!r}"
            )
        if _needs_copy(model, self.device, self.dtype):
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        self.implemented_properties = list(model.implemented_properties)
        notes = list(self.extra_notes)
        if model.direct_forces and self.extra_notes:
            notes.append(DIRECT_FORCES_NOTE)
        self.info: dict[str, Any] = {
            "model": model.registry_name,
            "checkpoint": getattr(model, "checkpoint_path", None),
            "cutoff": model.cutoff,
            "max_neighbors": model.max_neighbors,
            "direct_forces": model.direct_forces,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "implemented_properties": list(self.implemented_properties),
            "normalizers": dict(getattr(model, "normalizers", {})),
            "notes": notes,
        }

    # -- graph ---------------------------------------------------------------------------------------------
    def build_graph(self, atoms: Atoms | list[Atoms]) -> AtomGraph:
        """The graph the model asks for, on this calculator's device and dtype."""
        m = self.model
        graph = radius_graph(atoms, m.cutoff, m.max_neighbors, m.strict_max_neighbors, dtype=torch.float64)
        return graph.to(device=self.device, dtype=self.dtype)

    def check_atoms(self, atoms: Atoms) -> None:
        """ValueError for input the model cannot evaluate (empty, unknown elements, NaN, bad cell, overlaps)."""
        validate_atoms(atoms, self.model.max_elements)

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's change detection plus tags (GemNet-OC's quadruplet graph depends on them)."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and "tags" not in changes:
            old, new = self.atoms.get_tags(), atoms.get_tags()
            if old.shape != new.shape or not np.array_equal(old, new):
                changes.append("tags")
        return changes

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, graph: AtomGraph, stress: bool = False) -> dict[str, torch.Tensor]:
        """Denormalised energy (B,) eV, forces (N, 3) eV/Å and, if asked and possible, stress (B, 3, 3) eV/Å³."""
        m = self.model
        e_mean, e_std = m.normalizers.get("energy", (0.0, 1.0))
        f_mean, f_std = m.normalizers.get("forces", (0.0, 1.0))
        if m.direct_forces:
            with torch.no_grad():
                out = m(graph)
            return {"energy": out["energy"] * e_std + e_mean, "forces": out["forces"] * f_std + f_mean}
        with torch.enable_grad():
            pos = graph.pos.detach().requires_grad_(True)
            inputs = [pos]
            if stress:
                strain = torch.zeros((graph.num_graphs, 3, 3), dtype=pos.dtype, device=pos.device, requires_grad=True)
                sym = 0.5 * (strain + strain.transpose(1, 2))
                eye = torch.eye(3, dtype=pos.dtype, device=pos.device)
                deform = eye + sym
                pos_s = torch.bmm(pos.unsqueeze(1), deform[graph.batch]).squeeze(1)
                cell_s = torch.bmm(graph.cell, deform)
                inputs.append(strain)
            else:
                pos_s, cell_s = pos, graph.cell
            g = replace(graph, pos=pos_s, cell=cell_s)
            raw = m(g)["energy"]
            grads = torch.autograd.grad(raw.sum(), inputs, allow_unused=True)
        dpos = grads[0] if grads[0] is not None else torch.zeros_like(pos)
        result = {"energy": raw.detach() * e_std + e_mean, "forces": -dpos * f_std + f_mean}
        if stress:
            dstrain = grads[1] if grads[1] is not None else torch.zeros_like(strain)
            volume = torch.linalg.det(graph.cell).abs()
            result["stress"] = dstrain * e_std / volume.view(-1, 1, 1)
        return result

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        properties = properties or ["energy"]
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self.check_atoms(atoms)
        for p in properties:
            if p not in self.implemented_properties:
                raise PropertyNotImplementedError(f"{p!r} is not available from this model: {self.info['notes']}")
        want_stress = "stress" in self.implemented_properties and atoms.cell.rank == 3
        if "stress" in properties and not want_stress:
            raise PropertyNotImplementedError("stress needs a 3-D cell (nonzero volume)")
        graph = self.build_graph(atoms)
        out = self.evaluate(graph, stress=want_stress)
        energy = float(out["energy"].double().sum().item())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().double().cpu().numpy().copy(),
        }
        if want_stress:
            s = out["stress"][0].detach().double().cpu().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(s)

    def predict(self, structures: list[Atoms]) -> list[dict[str, Any]]:
        """Evaluate several structures (Atoms or pymatgen) in one batched graph; per-structure float64 results."""
        structures = [as_atoms(s) for s in structures]
        for a in structures:
            self.check_atoms(a)
        graph = self.build_graph(list(structures))
        stress = "stress" in self.implemented_properties and all(a.cell.rank == 3 for a in structures)
        out = self.evaluate(graph, stress=stress)
        forces = out["forces"].detach().double().cpu().numpy()
        bounds = np.cumsum([0] + [len(a) for a in structures])
        results = []
        for k in range(len(structures)):
            e = float(out["energy"][k].double().item())
            r = {"energy": e, "free_energy": e, "forces": forces[bounds[k] : bounds[k + 1]].copy()}
            if stress:
                r["stress"] = full_3x3_to_voigt_6_stress(out["stress"][k].detach().double().cpu().numpy())
            results.append(r)
        return results


def _needs_copy(model: MLModel, device: torch.device, dtype: torch.dtype) -> bool:
    tensors = list(model.parameters()) + [b for b in model.buffers()]
    for t in tensors:
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return True
        if t.is_floating_point() and t.dtype != dtype:
            return True
    return False


class GemNetOCCalculator(MLCalculator):
    """GemNet-OC (fairchem v1 checkpoints, e.g. ``gemnet_oc_base_s2ef_all_md.pt``) as an ASE calculator.

    Same arguments as MLCalculator. Energies and forces are denormalised exactly as fairchem does. OC20 energies
    are adsorption energies. Direct-force checkpoints (``direct_forces: True``, most released ones) are not
    energy-conserving (fine for BFGS and thermostatted MD, drift in NVE) and have no stress; gradient-force
    checkpoints give forces = -dE/dx and stress.
    """

    model_names = ("gemnet_oc",)
    extra_notes = (OC20_ENERGY_NOTE,)


class ESCNCalculator(MLCalculator):
    """eSCN (fairchem v1 checkpoints) as an ASE calculator: energy, free_energy, forces (direct head, no stress).

    Edge frames use a constant auxiliary vector instead of fairchem's random one, so results are deterministic.
    OC20 energies are adsorption energies; direct forces are not energy-conserving (NVE drifts).
    """

    model_names = ("escn",)
    extra_notes = (OC20_ENERGY_NOTE,)


class SCNCalculator(MLCalculator):
    """SCN (fairchem v1 checkpoints) as an ASE calculator: energy, free_energy, forces (direct head, no stress).

    Deterministic edge frames as for eSCN. SCN is only approximately rotation-equivariant. OC20 energies are
    adsorption energies; direct forces are not energy-conserving (NVE drifts).
    """

    model_names = ("scn",)
    extra_notes = (OC20_ENERGY_NOTE,)


class SphereNetCalculator(MLCalculator):
    """Periodic SphereNet as an ASE calculator: energy, free_energy, forces = -dE/dx and stress."""

    model_names = ("spherenet",)
