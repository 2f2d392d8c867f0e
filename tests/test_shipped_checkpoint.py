"""The shipped checkpoints (checkpoints/gemnet_oc-emt.pt, spherenet-emt.pt) against their oracle, ASE's EMT.

The structures are adsorbate+slab systems in the style of the training data but built and labelled in the test
(EMT is cheap), so the check does not depend on the data-set file. Thresholds (force MAE 0.05 eV/Å, energy
10 meV/atom for GemNet-OC, 20 for SphereNet) are the model card's targets with a margin for single structures
(GemNet-OC measured: 0.004-0.018 eV/Å and 0.4-1.6 meV/atom), far below what an untrained or wrongly loaded
model gives (~0.5 eV/Å, ~100 meV/atom).
"""

from pathlib import Path

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from mlcalc import GemNetOCCalculator, SphereNetCalculator, load_calculator, load_model

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
#: file -> (calculator class, registry name, force MAE limit eV/Å, energy limit eV/atom)
SHIPPED = {
    "gemnet_oc-emt.pt": (GemNetOCCalculator, "gemnet_oc", 0.05, 0.01),
    "spherenet-emt.pt": (SphereNetCalculator, "spherenet", 0.05, 0.02),
}


def adsorbate_slab(builder, metal, adsorbate, site, seed):
    slab = builder(metal, (2, 2, 4), vacuum=8.0)
    layer = slab.get_tags()
    add_adsorbate(slab, adsorbate, 1.6, site)
    n = len(layer)
    slab.set_tags(np.concatenate([np.where(layer <= 2, 1, 0), np.full(len(slab) - n, 2)]))
    slab.set_constraint(FixAtoms(indices=np.where(layer >= 3)[0]))
    slab.rattle(0.05, seed=seed)
    return slab


SYSTEMS = [
    (fcc111, "Pt", "O", "fcc"),
    (fcc111, "Cu", "H", "hcp"),
    (fcc100, "Pd", "N", "hollow"),
    (fcc100, "Au", "C", "bridge"),
]


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    path = CHECKPOINTS / request.param
    assert path.exists(), f"checkpoints/{request.param} is shipped with the repository"
    return path, load_calculator(path, device="cpu", dtype="float32"), SHIPPED[request.param]


def test_loads_with_its_family_calculator_gradient_forces_stress_and_elements(shipped):
    path, calc, (cls, name, _, _) = shipped
    assert isinstance(calc, cls)
    model = load_model(path)
    assert model.registry_name == name and not model.direct_forces
    assert "stress" in calc.implemented_properties
    assert set(model.metadata["elements"]) == {"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt", "H", "C", "N", "O"}
    assert sum(p.stat().st_size for p in CHECKPOINTS.glob("*.pt")) < 40e6


@pytest.mark.parametrize("builder, metal, adsorbate, site", SYSTEMS)
def test_forces_and_energy_follow_emt(shipped, builder, metal, adsorbate, site):
    _, calc, (_, _, f_limit, e_limit) = shipped
    atoms = adsorbate_slab(builder, metal, adsorbate, site, seed=len(metal) + len(site))
    ref = atoms.copy()
    ref.calc = EMT()
    atoms.calc = calc
    f_err = np.abs(atoms.get_forces(apply_constraint=False) - ref.get_forces(apply_constraint=False))
    assert f_err.mean() < f_limit, f"force MAE {f_err.mean():.3f} eV/Å"
    e_err = abs(atoms.get_potential_energy() - ref.get_potential_energy()) / len(atoms)
    assert e_err < e_limit, f"energy error {1000 * e_err:.1f} meV/atom"


def test_stress_is_the_strain_derivative_of_the_energy(shipped):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.62, cubic=True)
    atoms.rattle(0.02, seed=0)
    atoms.calc = load_calculator(shipped[0], device="cpu", dtype="float64")
    stress = atoms.get_stress(voigt=False)
    cell0, vol, h = atoms.cell.array.copy(), atoms.get_volume(), 1e-5
    pos0 = atoms.get_scaled_positions()
    for i, j in [(0, 0), (1, 2)]:
        e = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[i, j] += sign * h / (2 if i != j else 1)
            eps[j, i] += sign * h / 2 if i != j else 0
            atoms.set_cell(cell0 @ eps, scale_atoms=False)
            atoms.set_scaled_positions(pos0)
            e.append(atoms.get_potential_energy())
        atoms.set_cell(cell0)
        atoms.set_scaled_positions(pos0)
        assert stress[i, j] == pytest.approx((e[0] - e[1]) / (2 * h) / vol, abs=1e-5)
