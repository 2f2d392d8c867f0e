"""The shipped checkpoints (checkpoints/*-emt.pt: GemNet-OC, eSCN, SCN, SphereNet) against their oracle, ASE's EMT.

The structures are adsorbate+slab systems in the style of the training data but built and labelled in the test
(EMT is cheap), so the check does not depend on the data-set file. Thresholds (force MAE 0.05 eV/Å for the
gradient-force models and 0.1 for the direct-force eSCN/SCN, energy 10/20/20/40 meV/atom for GemNet-OC, SphereNet,
eSCN, SCN) are the model cards' numbers with a margin for single structures. Measured on these four systems:
GemNet-OC 0.002-0.014 eV/Å and 0.1-1.6 meV/atom; SphereNet 0.003-0.018, 0.6-7.8; eSCN 0.005-0.062, 1.7-6.9;
SCN 0.007-0.071, 4.5-23.8 (N in the Pd(100) hollow is the hardest). An untrained or wrongly loaded model gives
~0.5 eV/Å and ~100 meV/atom.
"""

from pathlib import Path

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from mlcalc import (
    ESCNCalculator,
    GemNetOCCalculator,
    SCNCalculator,
    SphereNetCalculator,
    load_calculator,
    load_model,
)

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
#: file -> (calculator class, registry name, force MAE limit eV/Å, energy limit eV/atom, direct forces)
SHIPPED = {
    "gemnet_oc-emt.pt": (GemNetOCCalculator, "gemnet_oc", 0.05, 0.01, False),
    "spherenet-emt.pt": (SphereNetCalculator, "spherenet", 0.05, 0.02, False),
    "escn-emt.pt": (ESCNCalculator, "escn", 0.1, 0.02, True),
    "scn-emt.pt": (SCNCalculator, "scn", 0.1, 0.04, True),
}
GRADIENT = sorted(k for k, v in SHIPPED.items() if not v[4])


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


def test_loads_with_its_family_calculator_force_kind_and_elements(shipped):
    path, calc, (cls, name, _, _, direct) = shipped
    assert isinstance(calc, cls)
    model = load_model(path)
    assert model.registry_name == name and model.direct_forces == direct
    assert ("stress" in calc.implemented_properties) != direct  # eSCN/SCN: direct forces, as their released models
    assert set(model.metadata["elements"]) == {"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt", "H", "C", "N", "O"}
    assert sum(p.stat().st_size for p in CHECKPOINTS.glob("*.pt")) < 40e6


@pytest.mark.parametrize("builder, metal, adsorbate, site", SYSTEMS)
def test_forces_and_energy_follow_emt(shipped, builder, metal, adsorbate, site):
    _, calc, (_, _, f_limit, e_limit, _) = shipped
    atoms = adsorbate_slab(builder, metal, adsorbate, site, seed=len(metal) + len(site))
    ref = atoms.copy()
    ref.calc = EMT()
    atoms.calc = calc
    f_err = np.abs(atoms.get_forces(apply_constraint=False) - ref.get_forces(apply_constraint=False))
    assert f_err.mean() < f_limit, f"force MAE {f_err.mean():.3f} eV/Å"
    e_err = abs(atoms.get_potential_energy() - ref.get_potential_energy()) / len(atoms)
    assert e_err < e_limit, f"energy error {1000 * e_err:.1f} meV/atom"


@pytest.mark.parametrize("name", GRADIENT)
def test_stress_is_the_strain_derivative_of_the_energy(name):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.62, cubic=True)
    atoms.rattle(0.02, seed=0)
    atoms.calc = load_calculator(CHECKPOINTS / name, device="cpu", dtype="float64")
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
