"""Calculator core: validation, dtype/device per instance, caching, batching, no global state."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.lj import LennardJones as AseLJ

from mlcalc import MLCalculator
from mlcalc.models import LennardJones


def lj(**kw):
    return LennardJones(sigma=2.3, epsilon=0.4, rc=5.5, ro=4.0)


def calc(dtype="float64"):
    return MLCalculator(lj(), device="cpu", dtype=dtype)


@pytest.mark.parametrize(
    "atoms, message",
    [
        (Atoms(), "empty"),
        (Atoms("CuX", positions=[[0, 0, 0], [2, 0, 0]]), "X"),
        (Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]]), "NaN"),
        (Atoms("H2", positions=[[0, 0, 0], [1.5, 0, 0]], cell=[3, 3, 0], pbc=True), "axis 2"),
        (Atoms("H3", positions=[[0, 0, 0], [1.5, 0, 0], [1.55, 0, 0]]), "atoms 1 and 2"),
        (Atoms("H2", positions=[[0, 0, 0], [2.0, 0, 0]], cell=[2.04, 5, 5], pbc=True), "closer than"),
    ],
)
def test_bad_input_gives_clear_error(atoms, message):
    atoms.calc = calc()
    with pytest.raises(ValueError, match=message):
        atoms.get_potential_energy()


def test_element_out_of_model_range_names_element_and_index():
    m = lj()
    m.max_elements = 83
    atoms = Atoms("CuUCu", positions=[[0, 0, 0], [2.5, 0, 0], [5, 0, 0]])
    atoms.calc = MLCalculator(m, device="cpu")
    with pytest.raises(ValueError, match=r"U .*indices \[1\].*1\.\.83"):
        atoms.get_potential_energy()


def test_isolated_atom_has_zero_energy_and_forces():
    atoms = Atoms("Cu", positions=[[1, 2, 3]], cell=[20, 20, 20], pbc=True)
    atoms.calc = calc()
    assert atoms.get_potential_energy() == 0.0
    assert atoms.get_forces().shape == (1, 3) and not atoms.get_forces().any()
    assert not atoms.get_stress().any()


def test_results_are_float64_numpy_and_free_energy_equals_energy():
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    atoms.rattle(0.05, seed=0)
    atoms.calc = calc("float32")
    e = atoms.get_potential_energy()
    assert isinstance(e, float)
    assert atoms.get_potential_energy(force_consistent=True) == e
    assert atoms.get_forces().dtype == np.float64 and atoms.get_stress().dtype == np.float64
    assert atoms.get_stress().shape == (6,)


def test_recomputes_only_when_atoms_change(monkeypatch):
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    c = calc()
    atoms.calc = c
    n = {"calls": 0}
    orig = c.evaluate

    def counting(*a, **k):
        n["calls"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(c, "evaluate", counting)
    atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_stress()
    assert n["calls"] == 1
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert n["calls"] == 2
    atoms.set_tags([1] * len(atoms))
    atoms.get_forces()
    assert n["calls"] == 3


def test_dtype_is_per_instance_and_global_state_untouched():
    default = torch.get_default_dtype()
    model = lj()
    c64 = MLCalculator(model, device="cpu", dtype=torch.float64)
    c32 = MLCalculator(model, device="cpu", dtype="float32")
    assert torch.get_default_dtype() == default
    assert c64.dtype == torch.float64 and c32.dtype == torch.float32
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    e64 = c64.get_potential_energy(atoms)
    e32 = c32.get_potential_energy(atoms)
    assert e64 == pytest.approx(e32, rel=1e-5)
    assert torch.get_default_dtype() == default
    with pytest.raises(ValueError, match="float32"):
        MLCalculator(model, dtype="float16")


def test_gradient_model_lists_stress_and_stress_needs_a_cell():
    c = calc()
    assert set(c.implemented_properties) == {"energy", "free_energy", "forces", "stress"}
    mol = molecule("H2O")
    mol.calc = c
    mol.get_forces()
    with pytest.raises(PropertyNotImplementedError):
        mol.get_stress()


def test_batched_predict_equals_single_calls():
    structs = [bulk("Cu", "fcc", a=3.6) * (2, 2, 2), fcc111("Cu", (2, 2, 3), vacuum=5.0), molecule("CH4")]
    for k, a in enumerate(structs):
        a.rattle(0.05, seed=k)
    c = calc()
    batched = c.predict(structs)
    for a, r in zip(structs, batched, strict=True):
        ref = a.copy()
        ref.calc = AseLJ(sigma=2.3, epsilon=0.4, rc=5.5, ro=4.0, smooth=True)
        assert r["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(r["forces"], ref.get_forces(), atol=1e-8)


def test_checkpoint_path_and_unknown_model_type_are_checked(tmp_path):
    with pytest.raises(TypeError, match="MLModel"):
        MLCalculator(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError):
        MLCalculator(tmp_path / "missing.pt")


def test_auto_device_is_cpu_without_cuda():
    c = MLCalculator(lj(), device="auto")
    assert c.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            MLCalculator(lj(), device="cuda")
