"""mlcalc.optimize.relax: ASE's FIRE/BFGS/LBFGS step for step, batched == one by one, in-flight refill, errors."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.cluster import Icosahedron
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS

import mlcalc
from mlcalc.optimize import relax

ROOT = Path(__file__).resolve().parents[1]
ASE_OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}


@pytest.fixture(scope="module")
def lj():
    return mlcalc.load_calculator(ROOT / "checkpoints" / "lj_argon.pt", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def gemnet():
    return mlcalc.load_calculator(ROOT / "checkpoints" / "gemnet_oc-emt.pt", device="cpu", dtype="float64")


def ar_cluster(seed: int, fix: bool = False, rattle: float = 0.25) -> Atoms:
    atoms = Icosahedron("Ar", 2, latticeconstant=5.3)
    atoms.rattle(rattle, seed=seed)
    if fix:
        atoms.set_constraint(FixAtoms(indices=[0, 3, 7]))
    return atoms


def ar_cell(seed: int, strain: float = 1.03) -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.4, cubic=True)
    atoms.rattle(0.1, seed=seed)
    atoms.set_cell(atoms.cell * [strain, 1.0, 1.0 / strain], scale_atoms=True)
    return atoms


def ase_run(atoms: Atoms, calc, name: str, fmax: float, steps: int, cell: bool = False, **kwargs):
    atoms = atoms.copy()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if cell else atoms
    opt = ASE_OPTIMIZERS[name](target, logfile=None, **kwargs)
    converged = opt.run(fmax=fmax, steps=steps)
    return atoms, opt.nsteps, converged


# -- single structure: ASE's algorithm step for step ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["FIRE", "BFGS", "LBFGS"])
@pytest.mark.parametrize("fix", [False, True])
def test_single_structure_follows_ase(lj, name, fix):
    start = ar_cluster(1, fix)
    # 20 steps of a relaxation that is far from converged: positions within 1e-6 Å of ASE's
    ref, nsteps, conv = ase_run(start, lj, name, fmax=1e-6, steps=20)
    (out,) = relax([start], lj, optimizer=name, fmax=1e-6, steps=20, progress=False)
    assert (nsteps, conv) == (20, False)
    assert out.info["relax_steps"] == 20 and out.info["relax_converged"] is False
    assert np.abs(out.positions - ref.positions).max() < 1e-6
    # to convergence: the same number of steps as ASE's opt.nsteps
    ref, nsteps, conv = ase_run(start, lj, name, fmax=0.005, steps=500)
    (out,) = relax([start], lj, optimizer=name, fmax=0.005, steps=500, progress=False)
    assert conv and out.info["relax_converged"] is True
    assert out.info["relax_steps"] == nsteps
    assert np.abs(out.positions - ref.positions).max() < 1e-6
    assert out.info["relax_fmax"] < 0.005


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # large, fast-growing time steps: the downhill check resets uphill steps (8 times here)
        ("FIRE", {"dt": 1.0, "dtmax": 5.0, "maxstep": 0.5, "Nmin": 0, "finc": 2.0, "downhill_check": True}),
        ("BFGS", {"alpha": 30.0, "maxstep": 0.05}),
        ("LBFGS", {"memory": 3, "damping": 0.8, "alpha": 40.0, "maxstep": 0.1}),
    ],
)
def test_optimizer_parameters_follow_ase(lj, name, kwargs):
    start = ar_cluster(5, rattle=0.4)
    ref, nsteps, _ = ase_run(start, lj, name, fmax=0.005, steps=60, **kwargs)
    (out,) = relax([start], lj, optimizer=name, fmax=0.005, steps=60, progress=False, optimizer_kwargs=kwargs)
    assert out.info["relax_steps"] == nsteps
    assert np.abs(out.positions - ref.positions).max() < 1e-6


@pytest.mark.parametrize("name", ["FIRE", "BFGS", "LBFGS"])
def test_cell_filter_follows_ase_frechet(lj, name):
    start = ar_cell(2)
    ref, nsteps, conv = ase_run(start, lj, name, fmax=0.002, steps=200, cell=True)
    (out,) = relax([start], lj, optimizer=name, fmax=0.002, steps=200, cell_filter=True, progress=False)
    assert conv and out.info["relax_converged"] and out.info["relax_steps"] == nsteps
    assert np.abs(out.positions - ref.positions).max() < 1e-6
    assert np.abs(out.cell.array - ref.cell.array).max() < 1e-6
    assert np.abs(out.cell.array - start.cell.array).max() > 1e-3  # the cell did relax
    assert np.abs(out.get_stress()).max() < 0.002 * 4 / out.get_volume() + 1e-9  # Frechet's scaled criterion


# -- batching -------------------------------------------------------------------------------------------------------
def mixed_structures() -> list[Atoms]:
    return [ar_cluster(10), ar_cluster(11, fix=True), ar_cell(12), ar_cluster(13, rattle=0.1), ar_cell(14, 1.0)]


def simulate_inflight(evaluations: list[int], batch_size: int) -> list[int]:
    """Batch sizes of every model call when structure k needs evaluations[k] calls and the batch is refilled."""
    waiting, active, sizes = deque(evaluations), [], []
    while waiting or active:
        while waiting and len(active) < batch_size:
            active.append(waiting.popleft())
        sizes.append(len(active))
        active = [n - 1 for n in active if n > 1]
    return sizes


@pytest.mark.parametrize("name", ["FIRE", "BFGS", "LBFGS"])
def test_batched_equals_one_by_one_with_inflight_refill(lj, name, monkeypatch):
    structures = mixed_structures()
    singles = [relax([s], lj, optimizer=name, fmax=0.01, steps=300, progress=False)[0] for s in structures]
    steps = [a.info["relax_steps"] for a in singles]
    assert all(a.info["relax_converged"] for a in singles)
    assert len(set(steps)) > 1  # different lengths, so structures leave at different times
    original = lj._predict_batch
    for batch_size in (1, 3, len(structures)):
        sizes: list[int] = []

        def counting(atoms_list, _orig=original, _sizes=sizes):
            _sizes.append(len(atoms_list))
            return _orig(atoms_list)

        monkeypatch.setattr(lj, "_predict_batch", counting)
        out = relax(structures, lj, optimizer=name, fmax=0.01, steps=300, batch_size=batch_size, progress=False)
        monkeypatch.undo()
        assert [len(a) for a in out] == [len(s) for s in structures]  # input order
        for a, ref in zip(out, singles, strict=True):
            assert a.info["relax_steps"] == ref.info["relax_steps"]
            assert a.info["relax_converged"]
            assert np.abs(a.positions - ref.positions).max() < 1e-8
            assert abs(a.get_potential_energy() - ref.get_potential_energy()) < 1e-8
        # one model call per step of the batch, refilled as soon as a structure leaves
        assert sizes == simulate_inflight([n + 1 for n in steps], batch_size)
        assert max(sizes) <= batch_size
    # with batch_size 3 the batch stays full while structures wait (refill happened)
    refill = simulate_inflight([n + 1 for n in steps], 3)
    assert refill[: min(steps) + 2] == [3] * (min(steps) + 2)


def test_fixed_atoms_never_move_and_step_limit(lj):
    start = ar_cluster(20, fix=True)
    (out,) = relax([start], lj, optimizer="FIRE", fmax=1e-6, steps=7, progress=False)
    assert out.info["relax_converged"] is False and out.info["relax_steps"] == 7
    assert out.info["relax_fmax"] >= 1e-6
    fixed = [0, 3, 7]
    assert np.array_equal(out.positions[fixed], start.positions[fixed])
    assert np.abs(out.positions - start.positions).max() > 1e-3
    assert np.all(out.get_forces()[fixed] == 0.0)  # constraints still attached to the result
    assert np.any(out.get_forces(apply_constraint=False)[fixed] != 0.0)
    # steps=0: evaluated, not moved
    (zero,) = relax([start], lj, fmax=0.05, steps=0, progress=False)
    assert zero.info["relax_steps"] == 0 and zero.info["relax_converged"] is False
    assert np.array_equal(zero.positions, start.positions)


def test_results_are_copies_with_single_point_results(lj):
    start = ar_cluster(30)
    start.info["name"] = "cluster"
    before = start.positions.copy()
    (out,) = relax([start], lj, optimizer="BFGS", fmax=0.01, progress=True)
    assert out is not start and np.array_equal(start.positions, before) and start.calc is None
    assert isinstance(out.calc, SinglePointCalculator) and out.info["name"] == "cluster"
    fresh = out.copy()
    fresh.calc = lj
    assert abs(out.get_potential_energy() - fresh.get_potential_energy()) < 1e-10
    assert np.abs(out.get_forces() - fresh.get_forces()).max() < 1e-10


# -- the shipped GemNet-OC ------------------------------------------------------------------------------------------
def slab_with_adsorbate(metal: str, ads: str, seed: int) -> Atoms:
    slab = fcc111(metal, (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, molecule(ads) if len(ads) > 1 else ads, 1.8, "fcc")
    mlcalc.tag_adsorbate_slab(slab)
    slab.set_constraint(FixAtoms(mask=slab.positions[:, 2] < slab.positions[:, 2].min() + 0.5))
    slab.rattle(0.05, seed=seed)
    return slab


def test_gemnet_oc_batched_relaxations(gemnet):
    structures = [slab_with_adsorbate("Pt", "O", 0), slab_with_adsorbate("Cu", "CO", 1),
                  slab_with_adsorbate("Ni", "H", 2)]
    out = relax(structures, gemnet, optimizer="BFGS", fmax=0.05, steps=200, batch_size=3, progress=False)
    for start, a in zip(structures, out, strict=True):
        assert a.info["relax_converged"]
        assert (a.get_tags() == start.get_tags()).all()
        fixed = start.constraints[0].index
        assert np.array_equal(a.positions[fixed], start.positions[fixed])
        fresh = a.copy()
        fresh.calc = gemnet
        assert abs(a.get_potential_energy() - fresh.get_potential_energy()) < 1e-8
        assert np.linalg.norm(fresh.get_forces(), axis=1).max() < 0.05
    # the first one, as ASE's BFGS runs it
    ref, nsteps, _ = ase_run(structures[0], gemnet, "BFGS", fmax=0.05, steps=200)
    assert out[0].info["relax_steps"] == nsteps
    assert np.abs(out[0].positions - ref.positions).max() < 1e-6


# -- errors ---------------------------------------------------------------------------------------------------------
def test_bad_inputs(lj):
    good = [ar_cluster(0)]
    with pytest.raises(ValueError, match="FIRE, BFGS, LBFGS"):
        relax(good, lj, optimizer="MDMin")
    with pytest.raises(TypeError, match="optimizer"):
        relax(good, lj, optimizer=BFGS)
    for fmax in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fmax"):
            relax(good, lj, fmax=fmax)
    with pytest.raises(ValueError, match="steps"):
        relax(good, lj, steps=-1)
    with pytest.raises(TypeError, match="steps"):
        relax(good, lj, steps=2.5)
    with pytest.raises(ValueError, match="batch_size"):
        relax(good, lj, batch_size=0)
    assert relax([], lj) == []
    with pytest.raises(TypeError, match=r"relax\(\[atoms\]"):
        relax(good[0], lj)
    with pytest.raises(TypeError, match="structure 1"):
        relax([good[0], "Ar.xyz"], lj)
    with pytest.raises(TypeError, match="MLCalculator"):
        relax(good, object())
    with pytest.raises(TypeError, match="unknown optimizer parameter"):
        relax(good, lj, optimizer="FIRE", optimizer_kwargs={"alpha": 1.0})
    with pytest.raises(ValueError, match="maxstep"):
        relax(good, lj, optimizer="LBFGS", optimizer_kwargs={"maxstep": 2.0})
    with pytest.raises(ValueError, match="structure 1: .*closer than"):
        relax([good[0], Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 0.01]])], lj)
    with pytest.raises(ValueError, match="structure 0: cell_filter needs a 3-D"):
        relax(good, lj, cell_filter=True)


def test_cell_filter_refused_for_direct_forces():
    direct = mlcalc.load_calculator(ROOT / "tests" / "data" / "gemnet_oc_small_direct.pt", device="cpu")
    assert direct.model.direct_forces
    with pytest.raises(ValueError, match="cell_filter needs stress.*direct"):
        relax([bulk("Cu", "fcc", a=3.6, cubic=True)], direct, cell_filter=True)
