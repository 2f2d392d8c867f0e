"""Element references and held-out evaluation, with ASE's LennardJones as the exact oracle."""

import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.calculators.lj import LennardJones as AseLJ
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from mlcalc import MLCalculator, load_model, save_model
from mlcalc.models import LennardJones
from mlcalc.train.evaluate import fit_element_references, heldout_errors, relaxation_benchmark

SIGMA, EPS, RC = 2.3, 0.4, 5.5
OFFSETS = {29: 0.3, 47: -0.25, 79: 1.1}  # eV per atom, the "unknown" references to recover


def oracle():
    return AseLJ(sigma=SIGMA, epsilon=EPS, rc=RC, ro=0.66 * RC, smooth=True)


def model():
    return LennardJones(sigma=SIGMA, epsilon=EPS, rc=RC, ro=0.66 * RC)


def labelled(offsets=OFFSETS, n=8):
    """Mixed Cu/Ag/Au cells labelled by ASE's LJ plus per-element offsets (forces unchanged by offsets)."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.3, cubic=True) * (1, 1, 2)
        atoms.numbers = rng.choice([29, 47, 79], size=len(atoms))
        atoms.rattle(0.05, seed=k)
        atoms.calc = oracle()
        e = atoms.get_potential_energy() + sum(offsets.get(int(z), 0.0) for z in atoms.numbers)
        f = atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
        out.append(atoms)
    return out


def test_element_references_shift_energy_only_and_round_trip(tmp_path):
    atoms = labelled(n=1)[0].copy()
    plain = MLCalculator(model(), device="cpu", dtype="float64")
    m = model()
    m.element_references = dict(OFFSETS)
    shifted = MLCalculator(m, device="cpu", dtype="float64")
    expected = sum(OFFSETS[int(z)] for z in atoms.numbers)
    (r0,), (r1,) = plain.predict([atoms]), shifted.predict([atoms])
    assert r1["energy"] - r0["energy"] == pytest.approx(expected, abs=1e-10)
    np.testing.assert_allclose(r1["forces"], r0["forces"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(r1["stress"], r0["stress"], rtol=0, atol=1e-12)
    save_model(m, tmp_path / "refs.pt")
    back = load_model(tmp_path / "refs.pt")
    assert back.element_references == OFFSETS
    assert MLCalculator(back, device="cpu", dtype="float64").predict([atoms])[0]["energy"] == pytest.approx(
        r1["energy"], abs=1e-10
    )


def test_missing_element_reference_is_a_clear_error():
    m = model()
    m.element_references = {29: 0.3}
    atoms = bulk("Ag", "fcc", a=4.1)
    atoms.calc = MLCalculator(m, device="cpu", dtype="float64")
    with pytest.raises(ValueError, match="no element reference energy for Ag"):
        atoms.get_potential_energy()


def test_fitted_references_recover_the_offsets_and_remove_the_energy_error():
    data = labelled()
    calc = MLCalculator(model(), device="cpu", dtype="float64")
    before = heldout_errors(calc, data)
    assert before["energy_mae"] > 0.5 and before["forces_mae"] < 1e-8
    refs = fit_element_references(calc, data)
    assert set(refs) == set(OFFSETS)
    for z, e in OFFSETS.items():
        assert refs[z] == pytest.approx(e, abs=1e-8)
    calc.model.element_references = refs
    after = heldout_errors(calc, data)
    assert after["energy_mae"] < 1e-8 and after["energy_per_atom_mae"] < 1e-9
    assert after["n_structures"] == len(data) and after["n_atoms"] == sum(len(a) for a in data)


def test_relaxation_benchmark_against_the_oracle_matches():
    slab = fcc111("Cu", (2, 2, 3), a=3.3, vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 3]))
    slab.rattle(0.05, seed=3)
    calc = MLCalculator(model(), device="cpu", dtype="float64")
    (res,) = relaxation_benchmark(calc, [slab], oracle, fmax=0.01, steps=200, names=["Cu111"])
    assert res.model_converged and res.reference_converged and res.name == "Cu111"
    assert abs(res.energy_error) < 1e-6 and abs(res.structure_error) < 1e-6
    assert res.model_steps == res.reference_steps
    assert set(res.as_dict()) >= {"energy_error", "structure_error", "model_energy"}


def test_training_fits_element_energies_and_a_zero_energy_mean():
    """Energies exactly linear in the composition: the references recover the per-element energies, the energy
    normaliser's mean becomes 0 (an extensive residual) and its spread is that of the residuals."""
    from types import SimpleNamespace

    import torch

    from mlcalc.train.losses import fit_element_energies, fit_normalizers

    per_element = {1: -1.5, 8: -4.25, 29: -3.0}
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(12):
        numbers = torch.tensor(rng.choice([1, 8, 29], size=int(rng.integers(2, 9))))
        energy = sum(per_element[int(z)] for z in numbers) + 0.01 * rng.standard_normal()
        samples.append(SimpleNamespace(graph=SimpleNamespace(numbers=numbers), energy=energy,
                                       forces=torch.ones(len(numbers), 3)))
    refs = fit_element_energies(samples)
    for z, e in per_element.items():
        assert refs[z] == pytest.approx(e, abs=0.02)
    norm = fit_normalizers(samples, direct_forces=True, element_references=refs)
    assert norm["energy"][0] == 0.0 and 0 < norm["energy"][1] < 0.05
    plain = fit_normalizers(samples, direct_forces=True)
    assert plain["energy"][1] > 1.0  # without references the spread is that of the total energies
