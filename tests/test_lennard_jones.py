"""The calculator core against an exact oracle: torch Lennard-Jones vs ase's LennardJones (smooth=True)."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, fcc111, molecule
from ase.calculators.lj import LennardJones as AseLJ
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from mlcalc import MLCalculator
from mlcalc.models import LennardJones
from mlcalc.testing import fd_forces, fd_stress

SIG, EPS, RC, RO = 2.3, 0.4, 5.5, 4.0


def ml_calc(dtype="float64", **kw):
    p = dict(sigma=SIG, epsilon=EPS, rc=RC, ro=RO) | kw
    return MLCalculator(LennardJones(**p), device="cpu", dtype=dtype)


def ase_calc(**kw):
    p = dict(sigma=SIG, epsilon=EPS, rc=RC, ro=RO, smooth=True) | kw
    return AseLJ(**p)


def random_triclinic(seed: int, n: int = 6) -> Atoms:
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(4.5, 6.5, 3)) + rng.uniform(-1.5, 1.5, (3, 3)) * (1 - np.eye(3))
    frac = rng.uniform(size=(n, 3))
    atoms = Atoms("X" * n, scaled_positions=frac, cell=cell, pbc=True)
    atoms.numbers = rng.integers(1, 30, n)
    # push apart any pair closer than 1.9 Å so LJ stays moderate
    for _ in range(200):
        d = atoms.get_all_distances(mic=True)
        np.fill_diagonal(d, 10)
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] > 1.9:
            break
        atoms.positions[j] += rng.normal(size=3) * 0.5
    return atoms


def structures():
    out = {}
    for s in range(3):
        out[f"triclinic{s}"] = random_triclinic(s)
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0, a=3.6)
    slab.rattle(0.05, seed=1)
    slab.pbc = (True, True, False)
    out["slab_TTF"] = slab
    wire = slab.copy()
    wire.pbc = (True, False, False)
    out["wire_TFF"] = wire
    tiny = bulk("Ar", "fcc", a=3.3)  # primitive cell much smaller than the cut-off: many self-images
    tiny.set_cell(tiny.cell.array @ (np.eye(3) + 0.01 * np.array([[1, 2, 0], [2, -1, 1], [0, 1, 3]])), scale_atoms=True)
    out["tiny_1atom"] = tiny
    two = bulk("Ar", "hcp", a=3.3, c=5.4)
    two.rattle(0.05, seed=3)
    out["tiny_hcp"] = two
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=2)
    out["molecule"] = mol
    outside = random_triclinic(7)
    outside.positions += outside.cell[0] * 1.7 - outside.cell[2] * 2.3  # atoms far outside the cell
    out["outside_cell"] = outside
    return out


STRUCTS = structures()


@pytest.mark.parametrize("name", list(STRUCTS))
def test_matches_ase_lennard_jones_float64(name):
    atoms = STRUCTS[name]
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = ml_calc(), ase_calc()
    e_ref = b.get_potential_energy()
    assert abs(a.get_potential_energy() - e_ref) <= 1e-8 * max(1.0, abs(e_ref))
    np.testing.assert_allclose(a.get_forces(), b.get_forces(), rtol=0, atol=1e-8)
    if atoms.cell.rank == 3:
        np.testing.assert_allclose(a.get_stress(), b.get_stress(), rtol=0, atol=1e-8)


def test_matches_ase_shifted_mode():
    atoms = STRUCTS["triclinic1"]
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = ml_calc(smooth=False), ase_calc(smooth=False)
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-8)


def test_defaults_follow_ase():
    m = LennardJones(sigma=2.0)
    assert m.rc == 6.0 and m.ro == pytest.approx(0.66 * 6.0)
    atoms = STRUCTS["triclinic0"]
    a, b = atoms.copy(), atoms.copy()
    a.calc = MLCalculator(LennardJones(sigma=2.0, epsilon=0.3), device="cpu", dtype=torch.float64)
    b.calc = AseLJ(sigma=2.0, epsilon=0.3, smooth=True)
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-8)


@pytest.mark.parametrize("name", ["triclinic0", "slab_TTF", "tiny_hcp", "molecule"])
def test_forces_and_stress_match_finite_differences(name):
    atoms = STRUCTS[name]
    calc = ml_calc()
    a = atoms.copy()
    a.calc = calc
    np.testing.assert_allclose(a.get_forces(), fd_forces(atoms, ml_calc(), h=1e-4), rtol=1e-6, atol=2e-6)
    if atoms.cell.rank == 3:
        np.testing.assert_allclose(a.get_stress(), fd_stress(atoms, ml_calc(), h=1e-5), atol=1e-7)


def test_float32_close_to_float64():
    atoms = STRUCTS["triclinic2"]
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = ml_calc("float32"), ml_calc("float64")
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), rel=1e-5, abs=1e-5)
    assert a.get_forces().dtype == np.float64
    np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-4 * max(1, np.abs(b.get_forces()).max()))


def test_bfgs_relaxation_reaches_ase_minimum():
    atoms = bulk("Ar", "fcc", a=3.9, cubic=True) * (2, 2, 2)
    atoms.rattle(0.15, seed=4)
    a, b = atoms.copy(), atoms.copy()
    a.calc = MLCalculator(LennardJones(sigma=3.4, epsilon=0.0104, rc=8.0), device="cpu", dtype="float64")
    b.calc = AseLJ(sigma=3.4, epsilon=0.0104, rc=8.0, smooth=True)
    assert BFGS(a, logfile=None).run(fmax=1e-4, steps=300)
    BFGS(b, logfile=None).run(fmax=1e-4, steps=300)
    assert np.abs(a.get_forces()).max() < 1e-4
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-7)


def test_cell_relaxation_uses_stress():
    atoms = bulk("Ar", "fcc", a=5.6, cubic=True)
    atoms.calc = MLCalculator(LennardJones(sigma=3.4, epsilon=0.0104, rc=10.0), device="cpu", dtype="float64")
    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    assert opt.run(fmax=1e-5, steps=200)
    assert np.abs(atoms.get_stress()).max() < 1e-5
    ref = atoms.copy()
    ref.calc = AseLJ(sigma=3.4, epsilon=0.0104, rc=10.0, smooth=True)
    assert np.abs(ref.get_stress()).max() < 1e-5  # the oracle agrees this cell is at zero stress
    assert atoms.cell.cellpar()[0] < 5.6  # it contracted toward the LJ fcc lattice constant


def test_langevin_md_runs_and_matches_oracle_along_the_trajectory():
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    atoms.calc = MLCalculator(LennardJones(sigma=3.4, epsilon=0.0104, rc=8.0), device="cpu", dtype="float64")
    rng = np.random.default_rng(0)
    dyn = Langevin(atoms, timestep=5.0 * units.fs, temperature_K=80, friction=0.02, rng=rng, fixcm=False)
    dyn.run(100)
    check = atoms.copy()
    check.calc = AseLJ(sigma=3.4, epsilon=0.0104, rc=8.0, smooth=True)
    assert np.isfinite(atoms.get_potential_energy())
    np.testing.assert_allclose(atoms.get_forces(), check.get_forces(), atol=1e-8)
    assert 10 < atoms.get_temperature() < 300
