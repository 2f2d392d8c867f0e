"""The calculator's own contract (issue 8 item 5): input types, stress availability, elements, dtype/device,
GemNet-OC tags, non-checkpoint files, predict."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.lj import LennardJones as AseLJ
from ase.io import read, write

from mlcalc import GemNetOCCalculator, MLCalculator, save_model
from mlcalc.models import LennardJones

DATA = Path(__file__).parent / "data"
ARGON = Path(__file__).parents[1] / "checkpoints" / "lj_argon.pt"
LJ = dict(sigma=2.3, epsilon=0.4, rc=5.5, ro=4.0)


def lj_calc(**kw) -> MLCalculator:
    return MLCalculator(LennardJones(**LJ), device="cpu", dtype="float64", **kw)


def reference(atoms: Atoms) -> Atoms:
    ref = atoms.copy()
    ref.calc = AseLJ(**LJ, smooth=True)
    return ref


def cu(n=(2, 2, 2), seed=0) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6) * n
    atoms.rattle(0.05, seed=seed)
    return atoms


# -- input types and state -----------------------------------------------------------------------------------------
def test_pymatgen_structure_is_converted_and_later_atoms_calls_still_work():
    from pymatgen.io.ase import AseAtomsAdaptor

    c = lj_calc()
    atoms = cu()
    structure = AseAtomsAdaptor.get_structure(atoms)
    e_pmg = c.get_potential_energy(structure)
    assert e_pmg == pytest.approx(reference(atoms).get_potential_energy(), abs=1e-8)
    other = cu((1, 2, 2), seed=3)
    assert c.get_potential_energy(other) == pytest.approx(reference(other).get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(c.get_forces(other), reference(other).get_forces(), atol=1e-8)
    assert isinstance(c.atoms, Atoms)


def test_unknown_input_type_is_a_type_error_and_leaves_state_intact():
    c = lj_calc()
    atoms = cu()
    e = c.get_potential_energy(atoms)
    for junk in (np.zeros((4, 3)), {"numbers": [29]}, "Cu.cif"):
        with pytest.raises(TypeError, match="ase.Atoms"):
            c.get_potential_energy(junk)
    assert c.atoms == atoms and c.results["energy"] == e
    assert c.get_potential_energy(atoms) == e


def test_failed_calculation_leaves_no_stale_state():
    c = lj_calc()
    good = cu()
    bad = good.copy()
    bad.positions[1] = bad.positions[0] + 0.01
    with pytest.raises(ValueError, match="closer than"):
        c.get_potential_energy(bad)
    assert c.atoms is None and c.results == {}
    assert c.get_potential_energy(good) == pytest.approx(reference(good).get_potential_energy(), abs=1e-8)


def test_failed_direct_calculate_never_hands_out_the_previous_results():
    c = lj_calc()
    good = cu()
    c.get_potential_energy(good)
    bad = cu(seed=1)
    bad.symbols[0] = "X"
    with pytest.raises(ValueError, match="X"):
        c.calculate(bad, ["energy"])
    with pytest.raises(ValueError, match="X"):  # not good's energy from the cache
        c.get_potential_energy(bad)


def test_refused_stress_keeps_the_cached_results(monkeypatch):
    c = lj_calc()
    mol = molecule("CH4")
    mol.calc = c
    forces = mol.get_forces()
    monkeypatch.setattr(c, "evaluate", lambda *a, **k: pytest.fail("recomputed"))
    with pytest.raises(PropertyNotImplementedError, match="3-D cell"):
        mol.get_stress()
    np.testing.assert_array_equal(mol.get_forces(), forces)


# -- stress ----------------------------------------------------------------------------------------------------------
def test_direct_force_model_says_why_there_is_no_stress():
    atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0, periodic=True)
    atoms.set_tags([1] * len(atoms))
    atoms.calc = GemNetOCCalculator(DATA / "gemnet_oc_small_direct.pt", device="cpu")
    atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError, match=r"directly.*direct_forces=True.*gradient-force"):
        atoms.get_stress()


def test_gradient_model_without_3d_cell_says_so():
    mol = molecule("CH4")
    mol.calc = lj_calc()
    with pytest.raises(PropertyNotImplementedError, match="3-D cell"):
        mol.get_stress()


# -- elements, dtype, device -----------------------------------------------------------------------------------------
def test_checkpoint_element_list_is_enforced():
    c = MLCalculator(ARGON, device="cpu", dtype="float64")
    assert c.info["elements"] == ["Ar"]
    argon = bulk("Ar", "fcc", a=5.3)
    argon.calc = c
    assert np.isfinite(argon.get_potential_energy())
    mixed = bulk("Ar", "fcc", a=5.3, cubic=True)
    mixed.symbols[1] = "Cu"
    mixed.calc = c
    with pytest.raises(ValueError, match=r"Cu \(atom indices \[1\]\).*\['Ar'\]"):
        mixed.get_potential_energy()
    with pytest.raises(ValueError, match=r"structure 1: .*Cu"):
        c.predict([argon, mixed])


def test_saved_element_list_accepts_symbols_and_numbers(tmp_path):
    save_model(LennardJones(**LJ), tmp_path / "cu.pt", elements=[29, "Ni"])
    c = MLCalculator(tmp_path / "cu.pt", device="cpu")
    assert c.info["elements"] == ["Ni", "Cu"]
    c.get_potential_energy(cu())
    with pytest.raises(ValueError, match="Ag"):
        c.get_potential_energy(bulk("Ag"))


def test_fairchem_checkpoint_keeps_the_z_range_check():
    c = MLCalculator(DATA / "escn_small.pt", device="cpu")
    assert c.info["elements"] is None
    zmax = c.model.max_elements
    atoms = Atoms(numbers=[1, zmax + 1], positions=[[0, 0, 0], [2.5, 0, 0]])
    with pytest.raises(ValueError, match=rf"indices \[1\].*1\.\.{zmax}"):
        c.get_potential_energy(atoms)


@pytest.mark.parametrize(
    "dtype, expected",
    [(np.float64, torch.float64), (np.float32, torch.float32), (np.dtype("float64"), torch.float64),
     ("np.float64", torch.float64), (torch.float64, torch.float64)],
)
def test_numpy_dtypes_are_accepted(dtype, expected):
    assert MLCalculator(LennardJones(**LJ), device="cpu", dtype=dtype).dtype == expected


def test_bad_dtype_and_device_get_clear_errors():
    with pytest.raises(ValueError, match="float32 or float64"):
        MLCalculator(LennardJones(**LJ), device="cpu", dtype=np.int64)
    with pytest.raises(ValueError, match=r"unknown device 'gpu'.*'cuda'"):
        MLCalculator(LennardJones(**LJ), device="gpu")


# -- GemNet-OC tags --------------------------------------------------------------------------------------------------
def test_untagged_structure_warns_once_per_calculator(tmp_path, caplog):
    write(tmp_path / "cu.cif", bulk("Cu", "fcc", a=3.6, cubic=True))
    write(tmp_path / "POSCAR", bulk("Cu", "fcc", a=3.6, cubic=True), format="vasp")
    from_cif, from_poscar = read(tmp_path / "cu.cif"), read(tmp_path / "POSCAR")
    assert not from_cif.get_tags().any() and not from_poscar.get_tags().any()
    c = GemNetOCCalculator(DATA / "gemnet_oc_small_grad.pt", device="cpu")
    with caplog.at_level(logging.WARNING, logger="mlcalc"):
        from_cif.calc = c
        from_cif.get_potential_energy()
        from_cif.rattle(0.01, seed=0)
        from_cif.get_forces()
        c.predict([from_poscar])
    warnings = [r for r in caplog.records if "quadruplet" in r.getMessage()]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "OFF" in msg and "[1, 2]" in msg and "0 = " in msg and "1 = surface" in msg and "2 = adsorbate" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlcalc"):
        GemNetOCCalculator(DATA / "gemnet_oc_small_grad.pt", device="cpu").get_potential_energy(from_poscar)
    assert len([r for r in caplog.records if "quadruplet" in r.getMessage()]) == 1  # per calculator


def test_tagged_structure_does_not_warn(caplog):
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0, periodic=True)
    slab.set_tags([0] * 8 + [1] * 4)
    with caplog.at_level(logging.WARNING, logger="mlcalc"):
        GemNetOCCalculator(DATA / "gemnet_oc_small_grad.pt", device="cpu").get_potential_energy(slab)
    assert not [r for r in caplog.records if "quadruplet" in r.getMessage()]


# -- files that are not checkpoints ----------------------------------------------------------------------------------
def test_text_file_as_checkpoint_says_not_a_torch_checkpoint(tmp_path):
    write(tmp_path / "POSCAR", bulk("Cu"), format="vasp")
    with pytest.raises(ValueError, match="not a torch checkpoint") as err:
        MLCalculator(tmp_path / "POSCAR", device="cpu")
    assert "pickled" not in str(err.value)


# -- predict ---------------------------------------------------------------------------------------------------------
def test_predict_empty_list_returns_empty_list():
    assert lj_calc().predict([]) == []


def test_predict_splits_into_batches_of_batch_size(monkeypatch):
    c = lj_calc()
    structs = [cu((1, 1, k + 1), seed=k) for k in range(5)]
    sizes = []
    orig = c.build_graph

    def counting(atoms_list):
        sizes.append(len(atoms_list))
        return orig(atoms_list)

    monkeypatch.setattr(c, "build_graph", counting)
    out = c.predict(structs, batch_size=2)
    assert sizes == [2, 2, 1]
    for a, r in zip(structs, out, strict=True):
        ref = reference(a)
        assert r["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(r["stress"], ref.get_stress(), atol=1e-8)
    with pytest.raises(ValueError, match="batch_size"):
        c.predict(structs, batch_size=0)
    with pytest.raises(TypeError, match="list of structures"):
        c.predict(structs[0])


def test_predict_mixing_molecule_and_bulk_gives_stress_for_every_3d_cell():
    structs = [cu(), molecule("CH4"), fcc111("Cu", (2, 2, 3), vacuum=5.0, periodic=True), cu((1, 1, 2), seed=2)]
    structs[2].rattle(0.05, seed=1)
    out = lj_calc().predict(structs)
    assert "stress" not in out[1]
    for k in (0, 2, 3):
        ref = reference(structs[k])
        np.testing.assert_allclose(out[k]["stress"], ref.get_stress(), atol=1e-8)
        np.testing.assert_allclose(out[k]["forces"], ref.get_forces(), atol=1e-8)
    np.testing.assert_allclose(out[1]["forces"], reference(structs[1]).get_forces(), atol=1e-8)


def test_out_of_memory_becomes_a_memory_error_naming_the_size():
    """An allocator failure deep in torch reaches the user as MemoryError with atoms, edges and the way out."""
    from ase.build import bulk

    from mlcalc import load_calculator

    calc = load_calculator(Path(__file__).resolve().parents[1] / "checkpoints" / "lj_argon.pt", device="cpu")

    def exhausted(graph):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 5800000000 bytes.")

    calc.model.forward = exhausted
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True)
    atoms.calc = calc
    with pytest.raises(MemoryError, match=r"4 atoms in 1 structure\(s\) with \d+ edges .*batch_size"):
        atoms.get_potential_energy()

    def other(graph):
        raise RuntimeError("shape mismatch")

    calc.model.forward = other
    with pytest.raises(RuntimeError, match="shape mismatch"):
        calc.predict([atoms])
