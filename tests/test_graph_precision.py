"""float32 results must not depend on where the atoms sit (issue 8, item 2).

An unwrapped MD trajectory (atoms K lattice vectors away), a slab or molecule 5e3 Å from the origin in a 1e4 Å box:
absolute coordinates cast to float32 before the edge vectors are formed lose ~|x| * 6e-8 Å each. The calculator
recentres its graph in float64 (``AtomGraph.recentered``), so every case must equal the compact, wrapped cell to
float32 noise: exactly, or within 1e-6 of the largest force (float32 vs float64 of the wrapped cell differs by
~2e-6 of it), where the unfixed code is off by 1e-4 .. 1e-1 of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.lj import LennardJones as AseLJ

from mlcalc import GemNetOCCalculator, MLCalculator
from mlcalc.graph import radius_graph
from mlcalc.graph.geometry import complete_cell
from mlcalc.models import LennardJones

DATA = Path(__file__).parent / "data"
GRAD = DATA / "gemnet_oc_small_grad.pt"
LJ = dict(sigma=2.3, epsilon=0.4, rc=5.5, ro=4.0)
#: float32 results of moved structures vs the compact one, relative to the largest |force| (or |energy|, |stress|)
REL_TOL = 1e-6


# ----------------------------------------------------------------------------------------------- structures


def copper() -> Atoms:
    """32-atom fcc Cu cell, rattled, every atom tagged 1 (GemNet-OC's quadruplets on)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    atoms.set_tags(np.ones(len(atoms), dtype=int))
    return atoms


def unwrapped(atoms: Atoms, k: int, seed: int = 0) -> Atoms:
    """Every atom moved by its own random lattice vector with integer components in [-k, k] (|n| ~ k)."""
    out = atoms.copy()
    n = np.random.default_rng(seed).integers(-k, k + 1, (len(atoms), 3))
    n[0] = k  # at least one atom k cells away along every axis
    out.positions += n @ atoms.cell.array
    return out


def slab() -> Atoms:
    atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0, a=3.61)
    atoms.rattle(0.05, seed=2)
    atoms.pbc = (True, True, False)
    return atoms


def far_slab() -> Atoms:
    """The slab in a 1e4 Å cell along its non-periodic axis, 5e3 Å above the origin."""
    atoms = slab()
    atoms.cell[2] = [0.0, 0.0, 1e4]
    atoms.positions[:, 2] += 5e3 - atoms.positions[:, 2].mean()
    return atoms


def cluster() -> Atoms:
    atoms = Atoms("Cu13", positions=bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2).positions[:13])
    atoms.rattle(0.05, seed=3)
    atoms.set_tags(np.ones(len(atoms), dtype=int))
    return atoms


def far_cluster(pbc: bool) -> Atoms:
    """The cluster at 5e3 Å in a 1e4 Å box (periodic or not)."""
    atoms = cluster()
    atoms.positions += 5e3
    atoms.set_cell(np.eye(3) * 1e4)
    atoms.pbc = pbc
    return atoms


# ----------------------------------------------------------------------------------------------- helpers


def results(calc, atoms: Atoms) -> dict[str, np.ndarray]:
    a = atoms.copy()
    a.calc = calc
    out = {"energy": np.array(a.get_potential_energy()), "forces": a.get_forces()}
    if a.pbc.all():
        out["stress"] = a.get_stress()
    return out


def assert_same(got: dict, ref: dict, scale: dict, rel: float = REL_TOL) -> None:
    """max |got - ref| <= rel * scale, per property."""
    for key, value in ref.items():
        err = float(np.abs(got[key] - value).max())
        assert err <= rel * scale[key], f"{key}: max |diff| {err:.3g} > {rel:g} x {scale[key]:.3g}"


def scales(ref: dict) -> dict:
    return {k: max(float(np.abs(v).max()), 1e-12) for k, v in ref.items()}


@pytest.fixture(scope="module")
def gemnet32() -> GemNetOCCalculator:
    return GemNetOCCalculator(GRAD, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def copper_reference(gemnet32) -> dict:
    return results(gemnet32, copper())


# ----------------------------------------------------------------------------------------------- the graph


def random_batch() -> list[Atoms]:
    rng = np.random.default_rng(5)
    out = []
    for pbc in [(True, True, True), (True, False, True), (False, False, False), (True, True, False)]:
        cell = np.diag(rng.uniform(4.0, 7.0, 3)) + rng.uniform(-1.5, 1.5, (3, 3))
        frac = rng.uniform(-3, 4, (9, 3)) + rng.integers(-50, 50, 3)  # far from the origin, outside the cell
        out.append(Atoms("Cu9", positions=frac @ cell, cell=cell, pbc=pbc))
    out.insert(2, Atoms())
    return out


def test_recentered_keeps_every_edge_vector() -> None:
    structures = random_batch()
    graph = radius_graph(structures, 5.0, 20)
    moved = graph.recentered()
    assert torch.equal(moved.edge_index, graph.edge_index) and torch.equal(moved.cell, graph.cell)
    torch.testing.assert_close(moved.edge_vectors(), graph.edge_vectors(), rtol=0, atol=1e-10)
    assert not torch.equal(moved.cell_offsets, graph.cell_offsets)  # offsets follow the lattice moves
    # every structure ends up centred: fractional coordinates (completed cell) within [-1/2, 1/2] along periodic
    # axes, extent centred on 0 along every axis
    for b, atoms in enumerate(structures):
        mine = moved.pos[graph.batch == b].numpy()
        if len(mine) == 0:
            continue
        periodic = np.asarray(atoms.pbc)
        frac = mine @ np.linalg.inv(complete_cell(atoms.cell.array, periodic))
        assert np.abs(frac[:, periodic]).max(initial=0.0) <= 0.5 + 1e-9
        np.testing.assert_allclose(frac.min(0) + frac.max(0), 0.0, atol=1e-9)


def test_recenter_option_and_dtype() -> None:
    structures = random_batch()
    plain = radius_graph(structures, 5.0, 20)
    got = radius_graph(structures, 5.0, 20, dtype=torch.float32, recenter=True)
    want = plain.recentered().to(dtype=torch.float32)
    assert got.pos.dtype == torch.float32 and torch.equal(got.pos, want.pos)
    assert torch.equal(got.edge_index, plain.edge_index) and torch.equal(got.cell_offsets, want.cell_offsets)


def test_molecule_across_the_cell_boundary_becomes_contiguous() -> None:
    """A molecule straddling the corner of a periodic box is cut at the widest gap: no image offsets remain."""
    atoms = cluster()
    atoms.positions -= atoms.positions.mean(0)  # around the corner at the origin: wrapped, it is split in 8
    atoms.set_cell(np.eye(3) * 30.0)
    atoms.pbc = True
    atoms.wrap()
    graph = radius_graph(atoms, 6.0).recentered()
    assert graph.num_edges > 0 and torch.all(graph.cell_offsets == 0)
    assert float(graph.pos.abs().max()) < 6.0


def test_calculator_graph_is_recentred(gemnet32) -> None:
    atoms = unwrapped(copper(), 1000)
    graph = gemnet32.build_graph(atoms)
    assert graph.pos.dtype == torch.float32
    assert float(graph.pos.abs().max()) <= 0.5 * float(atoms.cell.array.sum(0).max()) + 1e-3
    reference = radius_graph(atoms, gemnet32.model.cutoff, gemnet32.model.max_neighbors)
    assert torch.equal(graph.edge_index, reference.edge_index)


# ----------------------------------------------------------------------------------------------- GemNet-OC


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_gemnet_oc_unwrapped_trajectory_float32(gemnet32, copper_reference, k: int) -> None:
    assert_same(results(gemnet32, unwrapped(copper(), k)), copper_reference, scales(copper_reference))


def test_gemnet_oc_unwrapped_float64_unchanged() -> None:
    calc = GemNetOCCalculator(GRAD, device="cpu", dtype="float64")
    ref = results(calc, copper())
    assert_same(results(calc, unwrapped(copper(), 1000)), ref, scales(ref), rel=1e-10)


@pytest.mark.parametrize("name", ["slab", "cluster_open", "cluster_periodic"])
def test_gemnet_oc_huge_box_float32(gemnet32, name: str) -> None:
    compact, far = {
        "slab": (slab(), far_slab()),
        "cluster_open": (cluster(), far_cluster(False)),
        "cluster_periodic": (cluster(), far_cluster(True)),
    }[name]
    ref = results(gemnet32, compact)
    ref.pop("stress", None)
    got = results(gemnet32, far)
    assert_same(got, ref, scales(ref))


# ----------------------------------------------------------------------------------------------- exact oracle


@pytest.mark.parametrize("k", [0, 10, 100, 1000])
def test_lennard_jones_float32_vs_ase_unwrapped(k: int) -> None:
    calc = MLCalculator(LennardJones(**LJ), device="cpu", dtype="float32")
    exact = results(AseLJ(**LJ, smooth=True), copper())  # translation by lattice vectors: same exact answer
    got = results(calc, unwrapped(copper(), k))
    assert_same(got, exact, scales(exact), rel=1e-5)  # float32 LJ on the wrapped cell: ~2e-6


@pytest.mark.parametrize("name", ["slab", "cluster_open", "cluster_periodic"])
def test_lennard_jones_float32_vs_ase_huge_box(name: str) -> None:
    compact, far = {
        "slab": (slab(), far_slab()),
        "cluster_open": (cluster(), far_cluster(False)),
        "cluster_periodic": (cluster(), far_cluster(True)),
    }[name]
    exact = results(AseLJ(**LJ, smooth=True), compact)
    exact.pop("stress", None)
    got = results(MLCalculator(LennardJones(**LJ), device="cpu", dtype="float32"), far)
    got.pop("stress", None)
    assert_same(got, exact, scales(exact), rel=1e-5)
