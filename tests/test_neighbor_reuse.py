"""Neighbour reuse (``MLCalculator(skin=...)``, ``mlcalc.graph.reuse.NeighborCache``): graphs and results
bit-identical to fresh builds along MD trajectories, and every change that must rebuild does."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet

from mlcalc import MLCalculator, load_calculator
from mlcalc.graph import AtomGraph, radius_graph
from mlcalc.graph.geometry import pair_distances_sq
from mlcalc.graph.reuse import NeighborCache, distances_sq_from_offsets, image_offsets
from mlcalc.models import LennardJones

CHECKPOINTS = Path(__file__).parents[1] / "checkpoints"
ARGON = CHECKPOINTS / "lj_argon.pt"
GEMNET = CHECKPOINTS / "gemnet_oc-emt.pt"
FIELDS = ("pos", "numbers", "cell", "pbc", "batch", "natoms", "tags", "edge_index", "cell_offsets")


def assert_same_graph(a: AtomGraph, b: AtomGraph) -> None:
    """Every tensor of the two graphs equal bit for bit, same dtype and shape."""
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name
    assert a.cutoff == b.cutoff


def fresh(atoms: Atoms, cutoff: float, max_neighbors: int | None = None, strict: bool = True) -> AtomGraph:
    return radius_graph(atoms, cutoff, max_neighbors, strict, recenter=True)


def thermalize(atoms: Atoms, temperature_k: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_k`` (K) from a seeded generator."""
    sigma = np.sqrt(units.kB * temperature_k * atoms.get_masses())[:, None]  # sqrt(eV amu)
    atoms.set_momenta(np.random.default_rng(seed).normal(size=(len(atoms), 3)) * sigma)


def argon_bulk() -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3)  # 108 atoms, box 15.8 Å < 2 x cutoff 8.5 Å
    atoms.rattle(0.05, seed=1)
    return atoms


def argon_slab() -> Atoms:
    atoms = fcc111("Ar", size=(3, 3, 4), a=5.26, vacuum=6.0)  # periodic along x, y only
    atoms.rattle(0.05, seed=2)
    return atoms


# -- MD trajectories: graphs, energies, forces, stress identical to fresh builds -----------------------------------
@pytest.mark.parametrize("make", [argon_bulk, argon_slab], ids=["bulk", "slab"])
def test_lj_md_trajectory_is_bit_identical_to_fresh_builds(make):
    atoms = make()
    calc = load_calculator(ARGON, device="cpu", dtype="float64", skin=1.0)
    ref = load_calculator(ARGON, device="cpu", dtype="float64")
    atoms.calc = calc
    thermalize(atoms, 300, seed=0)
    dyn = Langevin(atoms, 5 * units.fs, temperature_K=300, friction=0.01, rng=np.random.default_rng(1), fixcm=False)
    cutoff = calc.model.cutoff
    for step in range(120):
        dyn.run(1)
        if step % 40 == 39:  # user code wrapping the atoms back into the cell: a jump by lattice vectors
            atoms.wrap()
        assert_same_graph(calc.build_graph(atoms), ref.build_graph(atoms))
        assert_same_graph(calc.neighbor_cache.graph(atoms, cutoff), fresh(atoms, cutoff))
        other = atoms.copy()
        assert calc.get_potential_energy(atoms) == ref.get_potential_energy(other)
        np.testing.assert_array_equal(calc.get_forces(atoms), ref.get_forces(other))
        if atoms.pbc.all():
            np.testing.assert_array_equal(calc.get_stress(atoms), ref.get_stress(other))
    stats = calc.neighbor_stats
    assert stats is calc.neighbor_cache.stats
    assert stats["builds"] >= 4, stats  # hot enough that atoms move skin/2 repeatedly ...
    assert stats["reuses"] > 3 * stats["builds"], stats  # ... and most steps reuse
    assert ref.neighbor_stats["reuses"] == 0 and ref.neighbor_stats["builds"] > 100


def test_gemnet_oc_float32_md_is_bit_identical():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.6, "fcc")
    slab.set_tags([0] * 4 + [1] * 8 + [2])
    slab.rattle(0.05, seed=3)
    calc = load_calculator(GEMNET, device="cpu", dtype="float32", skin=0.6)
    ref = load_calculator(GEMNET, device="cpu", dtype="float32")
    slab.calc = calc
    thermalize(slab, 600, seed=0)
    dyn = VelocityVerlet(slab, 2 * units.fs)
    for step in range(5):
        dyn.run(1)
        if step == 2:
            slab.positions[-1] += [0.0, 0.0, 0.4]  # a jump beyond skin/2: rebuild mid-trajectory
        g_skin, g_ref = calc.build_graph(slab), ref.build_graph(slab)
        assert g_skin.pos.dtype == torch.float32
        assert_same_graph(g_skin, g_ref)
        other = slab.copy()
        assert calc.get_potential_energy(slab) == ref.get_potential_energy(other)
        np.testing.assert_array_equal(calc.get_forces(slab), ref.get_forces(other))
    assert calc.neighbor_stats["builds"] >= 2 and calc.neighbor_stats["reuses"] >= 5, calc.neighbor_stats


# -- what must rebuild ---------------------------------------------------------------------------------------------
def lj_calc(skin: float = 1.0) -> MLCalculator:
    return MLCalculator(LennardJones(sigma=2.3, epsilon=0.4, rc=5.5), device="cpu", dtype="float64", skin=skin)


def cu(seed: int = 0) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=seed)
    return atoms


def checked(calc: MLCalculator, atoms: Atoms) -> tuple[int, int, str | None]:
    """Evaluate, compare with a fresh skin=0 calculator bit for bit; (builds, reuses, why the last build)."""
    ref = lj_calc(skin=0.0)
    assert calc.get_potential_energy(atoms) == ref.get_potential_energy(atoms.copy())
    reason = calc.neighbor_cache.last_reason
    np.testing.assert_array_equal(calc.get_forces(atoms), ref.get_forces(atoms.copy()))
    assert_same_graph(calc.build_graph(atoms), ref.build_graph(atoms))
    calc.neighbor_stats["reuses"] -= 1  # the comparison's own build_graph call
    return calc.neighbor_stats["builds"], calc.neighbor_stats["reuses"], reason


def test_each_change_that_invalidates_the_candidates_rebuilds():
    calc, atoms = lj_calc(skin=1.0), cu()
    assert checked(calc, atoms) == (1, 0, "first call")
    atoms.positions += np.random.default_rng(0).normal(0, 0.05, atoms.positions.shape).clip(-0.1, 0.1)
    assert checked(calc, atoms) == (1, 1, None)  # every atom moved < 0.18 Å < skin/2 = 0.5 Å
    atoms.positions[3] += [0.7, 0.0, 0.0]  # now >= 0.6 Å from the reference
    builds, reuses, reason = checked(calc, atoms)
    assert (builds, reuses) == (2, 1) and "moved" in reason
    atoms.positions[5] += [0.0, 0.0, 0.49]  # < skin/2 from the new reference
    assert checked(calc, atoms) == (2, 2, None)
    atoms.positions[5] += atoms.cell[1]  # wrapped across the boundary: same physics, new images
    assert checked(calc, atoms)[:2] == (3, 2)
    atoms.set_cell(atoms.cell * 1.001, scale_atoms=True)
    assert checked(calc, atoms) == (4, 2, "cell changed")
    atoms.numbers[0] = 28
    assert checked(calc, atoms) == (5, 2, "atomic numbers changed")
    atoms.pbc = [True, True, False]
    assert checked(calc, atoms) == (6, 2, "pbc changed")
    del atoms[-1]
    assert checked(calc, atoms) == (7, 2, "atom count changed")
    atoms.set_tags(1)  # tags do not change the candidates: reused, and the graph carries the new tags
    assert checked(calc, atoms) == (7, 3, None)


def test_wrapping_every_atom_rebuilds_and_matches():
    calc, atoms = lj_calc(skin=1.5), cu(seed=4)
    atoms.positions += 0.3 * atoms.cell[0] + 1.7 * atoms.cell[2]  # outside the cell
    assert checked(calc, atoms)[:2] == (1, 0)
    atoms.wrap()
    assert checked(calc, atoms)[:2] == (2, 0)
    atoms.positions += 0.2
    assert checked(calc, atoms)[:2] == (2, 1)


def test_cache_rebuilds_on_cutoff_change_and_validates_like_radius_graph():
    cache, atoms = NeighborCache(1.0), cu()
    assert_same_graph(cache.graph(atoms, 5.0), fresh(atoms, 5.0))
    assert_same_graph(cache.graph(atoms, 4.0), fresh(atoms, 4.0))
    assert cache.last_reason == "cutoff changed" and cache.stats == {"builds": 2, "reuses": 0}
    bad = atoms.copy()
    bad.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cache.graph(bad, 4.0)
    with pytest.raises(ValueError, match="cutoff"):
        cache.graph(atoms, 0.0)
    with pytest.raises(ValueError, match="max_neighbors"):
        cache.graph(atoms, 4.0, max_neighbors=0)
    with pytest.raises(ValueError, match="skin"):
        NeighborCache(0.0)
    for skin in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="skin"):
            lj_calc(skin=skin)


# -- exactness of the selection and of the criterion ---------------------------------------------------------------
@pytest.mark.parametrize("strict", [True, False])
def test_max_neighbors_truncation_is_exact_under_reuse(strict):
    """Perfect lattice first (exact distance ties at the truncation), then a random walk with reuse."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(3)
    cache, rng = NeighborCache(0.8), np.random.default_rng(5)
    for _ in range(30):
        for k in (6, 13, 20):
            assert_same_graph(cache.graph(atoms, 5.0, k, strict), fresh(atoms, 5.0, k, strict))
        atoms.positions += rng.normal(0, 0.04, atoms.positions.shape)
    assert cache.stats["reuses"] >= 40 and cache.stats["builds"] >= 3, cache.stats


def test_max_neighbors_truncating_model_gives_identical_results():
    skin_calc, ref = lj_calc(skin=1.0), lj_calc(skin=0.0)
    for calc in (skin_calc, ref):
        calc.model.max_neighbors = 10
    atoms, rng = cu(seed=6), np.random.default_rng(6)
    for _ in range(8):
        atoms.positions += rng.normal(0, 0.06, atoms.positions.shape)
        assert ref.build_graph(atoms).num_edges == 10 * len(atoms)  # truncated
        assert skin_calc.get_potential_energy(atoms) == ref.get_potential_energy(atoms.copy())
        np.testing.assert_array_equal(skin_calc.get_forces(atoms), ref.get_forces(atoms.copy()))
    assert skin_calc.neighbor_stats["reuses"] >= 4


def structures() -> list[Atoms]:
    tri = bulk("Cu", "fcc", a=3.6).repeat((2, 3, 2))  # primitive triclinic cell, thinner than the cutoff
    tiny = bulk("Cu", "fcc", a=3.6)  # one atom: many images of itself
    mol = molecule("CH3CH2OH")
    wire = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 3))
    wire.pbc = [False, False, True]
    spread = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    spread.pbc = [True, False, False]
    spread.positions[:8, 1] += 3000.0  # two clusters kilometres apart along an open axis (split search)
    return [tri, tiny, mol, wire, spread]


@pytest.mark.parametrize("index", range(5), ids=["triclinic", "one-atom", "molecule", "wire", "split"])
def test_random_moves_just_under_half_the_skin(index):
    """Every atom displaced by up to (not quite) skin/2 from the reference in random directions: still exact."""
    atoms = structures()[index]
    skin, cutoff = 0.8, 4.5
    cache, rng = NeighborCache(skin), np.random.default_rng(index)
    start = atoms.positions.copy()
    cache.graph(atoms, cutoff)
    for _ in range(12):
        direction = rng.normal(size=start.shape)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        atoms.positions = start + direction * rng.uniform(0.45, 0.4999, (len(start), 1)) * skin
        assert_same_graph(cache.graph(atoms, cutoff), fresh(atoms, cutoff))
        assert_same_graph(cache.graph(atoms, cutoff, 8), fresh(atoms, cutoff, 8))
    assert cache.stats == {"builds": 1, "reuses": 24}


@pytest.mark.parametrize("periodic", [False, True])
def test_pair_at_the_edge_of_the_skin_is_found(periodic):
    """The bound itself: a pair just inside cutoff + skin whose atoms approach each other by just under skin/2
    each ends inside the cutoff and must be an edge; a move of exactly skin/2 rebuilds."""
    cutoff, skin, eps = 4.0, 1.0, 1e-7
    length = 20.0
    x0 = cutoff + skin - eps
    if periodic:  # the partner is the image of atom 1 one cell to the left
        atoms = Atoms("Cu2", positions=[[0, 0, 0], [length - x0, 0, 0]], cell=[length, 8, 8], pbc=True)
        towards = np.array([[-1.0, 0, 0], [1.0, 0, 0]])
    else:
        atoms = Atoms("Cu2", positions=[[0, 0, 0], [x0, 0, 0]])
        towards = np.array([[1.0, 0, 0], [-1.0, 0, 0]])
    cache = NeighborCache(skin)
    assert cache.graph(atoms, cutoff).num_edges == 0
    start = atoms.positions.copy()
    atoms.positions = start + towards * (0.5 * skin - 0.1 * eps)
    graph = cache.graph(atoms, cutoff)
    assert cache.stats == {"builds": 1, "reuses": 1} and graph.num_edges == 2
    assert_same_graph(graph, fresh(atoms, cutoff))
    atoms.positions = start + towards * 0.5 * skin
    assert_same_graph(cache.graph(atoms, cutoff), fresh(atoms, cutoff))
    assert cache.stats == {"builds": 2, "reuses": 1}


def test_cached_offsets_reproduce_pair_distances_bitwise():
    rng = np.random.default_rng(7)
    cell = torch.from_numpy(rng.normal(0, 5.0, (3, 3)) + np.diag([20.0, 17.0, 23.0]))
    pos = torch.from_numpy(rng.uniform(-500.0, 500.0, (50, 3)))
    i, j = (torch.from_numpy(rng.integers(0, 50, 4000)) for _ in range(2))
    shifts = torch.from_numpy(rng.integers(-40, 41, (4000, 3)))
    expected = pair_distances_sq(pos, cell, i, j, shifts)
    got = distances_sq_from_offsets(pos, i, j, image_offsets(cell, shifts.t().contiguous()))
    assert torch.equal(got, expected)


# -- calculator plumbing ------------------------------------------------------------------------------------------
def test_default_is_off_and_predict_copy_pickle_keep_working():
    off = lj_calc(skin=0.0)
    assert off.skin == 0.0 and off.neighbor_cache is None
    atoms = cu(seed=8)
    e = off.get_potential_energy(atoms)
    assert off.neighbor_stats == {"builds": 1, "reuses": 0}
    on = lj_calc(skin=1.0)
    assert on.get_potential_energy(atoms) == e
    results = on.predict([atoms, cu(seed=9)])  # batched: fresh builds, the cache is not touched
    assert results[0]["energy"] == pytest.approx(e, abs=1e-10)
    assert on.neighbor_stats == {"builds": 1, "reuses": 0}
    moved = atoms.copy()
    moved.positions += 0.05
    for clone in (copy.deepcopy(on), pickle.loads(pickle.dumps(on))):
        assert clone.neighbor_stats is clone.neighbor_cache.stats
        assert clone.get_potential_energy(moved) == off.get_potential_energy(moved.copy())
        assert clone.neighbor_stats == {"builds": 1, "reuses": 1}
    assert on.neighbor_stats == {"builds": 1, "reuses": 0}  # the clones' caches are their own
