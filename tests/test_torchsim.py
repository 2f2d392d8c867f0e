"""TorchSim adapter (mlcalc.integrations.torchsim): conformance, batch == mlcalc per structure, runners finish."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule

ts = pytest.importorskip("torch_sim")

from mlcalc import load_calculator, tag_adsorbate_slab  # noqa: E402
from mlcalc.integrations.torchsim import MLCalcModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEMNET = ROOT / "checkpoints" / "gemnet_oc-emt.pt"
FIXTURE_DIRECT = ROOT / "tests" / "data" / "gemnet_oc_small_direct.pt"


def _systems() -> list:
    a = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    add_adsorbate(a, molecule("CO"), 1.9, "ontop")
    b = fcc100("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(b, "O", 1.3, "hollow")
    c = bulk("Ni", "fcc", a=3.55, cubic=True)
    out = []
    for k, atoms in enumerate((a, b, c)):
        if k < 2:
            tag_adsorbate_slab(atoms)
        atoms.rattle(0.03, seed=k)
        atoms.pbc = True  # TorchSim 0.3 keeps one pbc flag for all systems; OC20 slabs are 3-D periodic
        out.append(atoms)
    return out


def test_conformance_with_torchsims_validator() -> None:
    from torch_sim.models.interface import validate_model_outputs

    from mlcalc import MLCalculator
    from mlcalc.models import LennardJones

    lj = MLCalculator(LennardJones(sigma=2.2, epsilon=0.05, rc=5.0), device="cpu", dtype="float64")
    validate_model_outputs(MLCalcModel(lj), torch.device("cpu"), torch.float64)


def test_batch_of_different_systems_equals_mlcalc_per_structure() -> None:
    calc = load_calculator(GEMNET, device="cpu", dtype="float64")  # triplets only: tags do not matter
    model = MLCalcModel(calc)
    systems = _systems()
    state = ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float64)
    before = state.positions.clone()
    out = model.forward(state)
    assert torch.equal(state.positions, before)
    assert out["energy"].shape == (3,) and out["forces"].shape == (state.n_atoms, 3)
    assert out["stress"].shape == (3, 3, 3) and not out["energy"].requires_grad
    start = 0
    for k, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = calc
        n = len(atoms)
        assert abs(float(out["energy"][k]) - atoms.get_potential_energy()) < 1e-9
        assert np.abs(out["forces"][start : start + n].numpy() - atoms.get_forces()).max() < 1e-9
        assert np.abs(out["stress"][k].numpy() - atoms.get_stress(voigt=False)).max() < 1e-10
        start += n


def test_tags_given_to_the_adapter_reach_gemnet_oc() -> None:
    calc = load_calculator(FIXTURE_DIRECT, device="cpu", dtype="float64")
    systems = _systems()[:2]
    tags = [a.get_tags() for a in systems]
    state = ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float64)
    tagged = MLCalcModel(calc, tags=tags).forward(state)
    untagged = MLCalcModel(calc).forward(state)
    for k, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = calc
        assert abs(float(tagged["energy"][k]) - atoms.get_potential_energy()) < 1e-9
    assert not torch.allclose(tagged["energy"], untagged["energy"])  # quadruplets only with tags
    with pytest.raises(ValueError, match="stress"):
        MLCalcModel(calc, compute_stress=True)


def test_optimize_and_integrate_run() -> None:
    model = MLCalcModel(GEMNET, device="cpu", dtype=torch.float64)
    systems = _systems()
    relaxed = ts.optimize(system=systems, model=model, optimizer=ts.optimizers.fire, max_steps=300,
                          convergence_fn=ts.generate_force_convergence_fn(force_tol=0.05, include_cell_forces=False))
    forces = model.forward(relaxed)["forces"]
    assert forces.norm(dim=1).max() < 0.05 + 1e-9
    final = ts.integrate(system=systems, model=model, integrator=ts.nvt_langevin, n_steps=20, temperature=300.0,
                         timestep=0.001)
    assert torch.isfinite(final.positions).all() and final.n_systems == 3


def test_slab_pbc_lost_by_torchsim_is_warned_about_or_overridden(caplog) -> None:
    """TorchSim 0.3 turns a slab's [T, T, F] into pbc=False (a cluster); the adapter warns, and pbc= restores it."""
    calc = load_calculator(GEMNET, device="cpu", dtype="float64")
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)  # pbc [T, T, F], as ase.build makes it
    slab.rattle(0.02, seed=3)
    state = ts.io.atoms_to_state([slab], torch.device("cpu"), torch.float64)
    with caplog.at_level("WARNING"):
        cluster = MLCalcModel(calc).forward(state)
    assert "isolated cluster" in caplog.text
    fixed = MLCalcModel(calc, pbc=(True, True, False)).forward(state)
    ref = slab.copy()
    ref.calc = calc
    assert abs(float(fixed["energy"][0]) - ref.get_potential_energy()) < 1e-9
    assert abs(float(cluster["energy"][0]) - ref.get_potential_energy()) > 1e-3
