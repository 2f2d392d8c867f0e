"""Radius graph tests: brute-force float64 enumeration, ASE's neighbor_list, fairchem fixture graph sizes."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc100, molecule
from ase.cell import Cell
from ase.neighborlist import neighbor_list
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mlcalc.graph import radius_graph, select_neighbors

DATA = Path(__file__).parent / "data"
BACKENDS = ["vesin", "torch"]


# ----------------------------------------------------------------------------------------------- oracles


def brute_force(atoms: Atoms, cutoff: float) -> dict[tuple[int, int, int, int, int], float]:
    """{(i, j, Sx, Sy, Sz): d²} for 1e-4 < d² <= cutoff², enumerating every image that can be within range."""
    pos = atoms.positions.astype(np.float64)
    cell = atoms.cell.array.astype(np.float64)
    pbc = np.asarray(atoms.pbc)
    periodic_rows = np.where(pbc[:, None], cell, 0.0)  # other rows never matter: complete them independently
    full = np.array(Cell(periodic_rows).complete()) if pbc.any() else np.eye(3)
    recip = np.linalg.inv(full)  # frac = v @ recip; |frac_e| <= |v| * |recip[:, e]|
    delta = pos[None, :, :] - pos[:, None, :]  # [i, j] = r_j - r_i
    frac = delta.reshape(-1, 3) @ recip
    ranges = []
    for ax in range(3):
        if not pbc[ax]:
            ranges.append(np.zeros(1, dtype=int))
            continue
        reach = cutoff * np.linalg.norm(recip[:, ax])
        lo, hi = np.floor(-frac[:, ax].max() - reach), np.ceil(-frac[:, ax].min() + reach)
        ranges.append(np.arange(int(lo), int(hi) + 1))
    shifts = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    vec = delta[:, :, None, :] + (shifts @ cell)[None, None]
    d2 = (vec**2).sum(-1)
    ii, jj, ss = np.nonzero((d2 > 1e-4) & (d2 <= cutoff**2))
    return {(int(i), int(j), *map(int, shifts[s])): float(d2[i, j, s]) for i, j, s in zip(ii, jj, ss, strict=True)}


def graph_pairs(graph) -> dict[tuple[int, int, int, int, int], float]:
    """{(i, j, S): d²} of a graph, from its differentiable edge vectors."""
    d2 = (graph.edge_vectors().detach() ** 2).sum(-1).tolist()
    j, i = graph.edge_index.tolist()
    return {(a, b, *s): d for a, b, s, d in zip(i, j, graph.cell_offsets.tolist(), d2, strict=True)}


def reference_selection(pairs: dict, k: int, strict: bool) -> set:
    """fairchem's max-neighbour rule on a brute-force pair dict (strict: k nearest; else d² <= d²_(k+1) + 0.01)."""
    kept = set()
    for i in {key[0] for key in pairs}:
        mine = sorted((d, key) for key, d in pairs.items() if key[0] == i)
        if len(mine) <= k:
            kept.update(key for _, key in mine)
        elif strict:
            kept.update(key for _, key in mine[:k])
        else:
            bound = mine[k][0] + 0.01
            kept.update(key for d, key in mine if d <= bound)
    return kept


def assert_sorted(graph) -> None:
    target = graph.edge_index[1]
    d2 = (graph.edge_vectors().detach() ** 2).sum(-1)
    assert torch.all(target[1:] >= target[:-1])
    same = target[1:] == target[:-1]
    assert torch.all(d2[1:][same] >= d2[:-1][same])


def assert_matches_brute_force(atoms: Atoms, cutoff: float, backend: str) -> None:
    graph = radius_graph(atoms, cutoff, backend=backend)
    expected = brute_force(atoms, cutoff)
    got = graph_pairs(graph)
    assert graph.num_edges == len(got) == len(expected)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-12, atol=1e-12)
    assert_sorted(graph)


# ----------------------------------------------------------------------------------------------- structures


def random_triclinic(seed: int, n: int = 12, pbc=(True, True, True)) -> Atoms:
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(4.0, 7.0, 3)) + rng.uniform(-1.5, 1.5, (3, 3))
    frac = rng.uniform(0, 1, (n, 3))
    return Atoms(numbers=rng.integers(1, 80, n), scaled_positions=frac, cell=cell, pbc=pbc)


def slab() -> Atoms:
    atoms = fcc100("Pt", size=(2, 2, 3), vacuum=6.0)
    atoms.rattle(0.05, seed=3)
    atoms.positions[-1, 2] += 9.0  # an atom above the top of the cell (non-periodic axis)
    return atoms


def wire() -> Atoms:
    rng = np.random.default_rng(7)
    return Atoms(
        "Cu6",
        positions=rng.uniform(-3, 3, (6, 3)),
        cell=[[2.6, 0.3, 0.1], [0, 0, 0], [0, 0, 0]],
        pbc=[True, False, False],
    )


def slab_dependent_c() -> Atoms:
    """Slab whose (non-periodic) third cell vector is parallel to the first: only periodic vectors matter."""
    atoms = slab()
    cell = atoms.cell.array.copy()
    cell[2] = 2.0 * cell[0]
    atoms.set_cell(cell, scale_atoms=False)
    return atoms


def methanol() -> Atoms:
    return molecule("CH3OH")


def tiny_cell() -> Atoms:
    """Two atoms in a skewed cell much smaller than the cutoff."""
    return Atoms(
        "CuO",
        scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.5, 0.9]],
        cell=[[1.9, 0.0, 0.0], [0.7, 1.7, 0.0], [0.4, -0.3, 2.1]],
        pbc=True,
    )


def one_atom_fcc() -> Atoms:
    return bulk("Cu", "fcc", a=3.61)


def outside_cell() -> Atoms:
    atoms = random_triclinic(11, n=8)
    atoms.positions[::2] += np.array([3.0, -2.0, 1.0]) @ atoms.cell.array + np.array([0.3, 0.1, -0.2])
    return atoms


STRUCTURES = {
    "triclinic": lambda: random_triclinic(1),
    "triclinic_TFT": lambda: random_triclinic(2, pbc=(True, False, True)),
    "slab": slab,
    "slab_dependent_c": slab_dependent_c,
    "wire": wire,
    "molecule": methanol,
    "tiny_cell": tiny_cell,
    "one_atom_fcc": one_atom_fcc,
    "outside_cell": outside_cell,
}


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(STRUCTURES))
@pytest.mark.parametrize("cutoff", [3.0, 6.0])
def test_matches_brute_force(name: str, cutoff: float, backend: str) -> None:
    assert_matches_brute_force(STRUCTURES[name](), cutoff, backend)


@pytest.mark.parametrize("name", ["triclinic", "slab", "tiny_cell", "one_atom_fcc", "outside_cell"])
def test_matches_ase_neighbor_list(name: str) -> None:
    atoms = STRUCTURES[name]()
    i, j, shifts = neighbor_list("ijS", atoms, 5.0)
    expected = {(a, b, *s) for a, b, s in zip(i.tolist(), j.tolist(), shifts.tolist(), strict=True)}
    assert set(graph_pairs(radius_graph(atoms, 5.0))) == expected


def test_one_atom_cell_has_only_self_images() -> None:
    atoms = Atoms("Cu", positions=[[0.3, 0.2, 0.1]], cell=np.eye(3) * 2.0, pbc=True)
    graph = radius_graph(atoms, 2.5)
    offsets = graph.cell_offsets
    # simple cubic, a = 2: 6 + 12 (|S|² = 2, d = 2.83 > 2.5 excluded) -> only the 6 nearest images
    assert graph.num_edges == 6
    assert torch.all(graph.edge_index == 0)
    assert torch.all(offsets.abs().sum(1) == 1)


def test_isolated_atoms_have_no_edges() -> None:
    for atoms in (Atoms("Ar", positions=[[1.0, 2.0, 3.0]]), Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 9.0]])):
        for backend in BACKENDS:
            graph = radius_graph(atoms, 6.0, backend=backend)
            assert graph.num_edges == 0
            assert graph.edge_index.shape == (2, 0) and graph.cell_offsets.shape == (0, 3)
            assert graph.edge_vectors().shape == (0, 3)


def test_overlapping_atoms_are_not_neighbours() -> None:
    """fairchem drops every pair closer than 0.01 Å (d² <= 1e-4), not only an atom with itself."""
    atoms = Atoms("H3", positions=[[0, 0, 0], [0.005, 0, 0], [1.0, 0, 0]])
    pairs = set(graph_pairs(radius_graph(atoms, 2.0)))
    assert pairs == {(0, 2, 0, 0, 0), (2, 0, 0, 0, 0), (1, 2, 0, 0, 0), (2, 1, 0, 0, 0)}


def test_outside_cell_same_geometry_as_wrapped() -> None:
    atoms = outside_cell()
    wrapped = atoms.copy()
    wrapped.wrap()
    graph, graph_w = radius_graph(atoms, 6.0, 20), radius_graph(wrapped, 6.0, 20)
    assert graph.num_edges == graph_w.num_edges
    assert torch.equal(graph.edge_index, graph_w.edge_index)
    assert not torch.equal(graph.cell_offsets, graph_w.cell_offsets)  # offsets refer to the unwrapped positions
    torch.testing.assert_close(graph.edge_vectors(), graph_w.edge_vectors(), rtol=0, atol=1e-10)


def test_batch_equals_concatenated_singles() -> None:
    structures = [random_triclinic(5, n=7), methanol(), Atoms(), slab(), one_atom_fcc()]
    for backend in BACKENDS:
        graph = radius_graph(structures, 6.0, 20, backend=backend)
        assert graph.natoms.tolist() == [len(a) for a in structures]
        assert graph.batch.tolist() == sum(([k] * len(a) for k, a in enumerate(structures)), [])
        assert graph.cell.shape == (5, 3, 3) and graph.pbc.shape == (5, 3)
        offset, edges, offsets = 0, [], []
        for atoms in structures:
            single = radius_graph(atoms, 6.0, 20, backend=backend)
            edges.append(single.edge_index + offset)
            offsets.append(single.cell_offsets)
            offset += len(atoms)
        assert torch.equal(graph.edge_index, torch.cat(edges, 1))
        assert torch.equal(graph.cell_offsets, torch.cat(offsets))
        assert torch.all(graph.batch[graph.edge_index[0]] == graph.batch[graph.edge_index[1]])


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", ["triclinic", "slab", "tiny_cell", "one_atom_fcc"])
def test_max_neighbors_matches_reference_rule(name: str, strict: bool) -> None:
    atoms = STRUCTURES[name]()
    if name == "one_atom_fcc":  # split the degenerate shells (as the fixture does) so strict has no ties
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + np.diag([0.004, -0.007, 0.011]) + 0.003), scale_atoms=False)
    expected = reference_selection(brute_force(atoms, 6.0), 12, strict)
    for backend in BACKENDS:
        graph = radius_graph(atoms, 6.0, 12, strict=strict, backend=backend)
        assert set(graph_pairs(graph)) == expected
        assert_sorted(graph)


def test_degenerate_shell_fcc() -> None:
    """Perfect fcc: 12 nearest at a/√2, 6 next at a. Non-strict keeps whole shells, strict cuts through them."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    for backend in BACKENDS:
        counts = {}
        for k, strict in [(11, True), (11, False), (12, True), (14, True), (14, False), (18, False)]:
            graph = radius_graph(atoms, 6.0, k, strict=strict, backend=backend)
            counts[k, strict] = torch.bincount(graph.edge_index[1], minlength=len(atoms)).unique().tolist()
        assert counts == {
            (11, True): [11],
            (11, False): [12],
            (12, True): [12],
            (14, True): [14],
            (14, False): [18],
            (18, False): [42],
        }  # 18 + third shell (24 at a·√1.5) kept whole


def test_select_neighbors_unsorted_input() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (200,), generator=gen)
    values = torch.randint(0, 30, (200,), generator=gen).double() / 10  # many exact ties
    for strict in (True, False):
        mask = select_neighbors(target, values, 5, 7, strict=strict)
        for t in range(5):
            v = values[target == t]
            kept = v[mask[target == t]]
            if strict:
                assert kept.numel() == min(7, v.numel())
                assert kept.max() <= v.sort().values[6]
            else:
                bound = v.sort().values[7] + 0.01 if v.numel() > 7 else float("inf")
                assert torch.equal(mask[target == t], v <= bound)
    assert select_neighbors(target, values, 5, None).all()


def fixture_structures() -> list[Atoms]:
    return ase.io.read(DATA / "structures.extxyz", index=":")


def test_fixture_graph_sizes() -> None:
    """eSCN/SCN graphs (6 Å, 20 strict) and GemNet-OC's a2a graph (6 Å, 50 strict) of the fairchem references."""
    expected = json.loads((DATA / "expected.json").read_text())["fixtures"]
    for atoms in fixture_structures():
        name = atoms.info["name"]
        for backend in BACKENDS:
            for fixture in ("escn_small", "scn_small", "scn_small_t1"):
                graph = radius_graph(atoms, 6.0, 20, backend=backend)
                assert graph.num_edges == expected[fixture]["structures"][name]["graph"]["edges"], (fixture, name)
            for fixture in ("gemnet_oc_small_direct", "gemnet_oc_small_grad"):
                sizes = expected[fixture]["structures"][name].get("graph")
                if sizes is not None:
                    assert radius_graph(atoms, 6.0, 50, backend=backend).num_edges == sizes["a2a"], (fixture, name)


def test_backends_identical_on_fixtures() -> None:
    structures = fixture_structures()
    for k, strict in [(None, True), (20, True), (8, False)]:
        ref = radius_graph(structures, 6.0, k, strict, backend="vesin")
        other = radius_graph(structures, 6.0, k, strict, backend="torch")
        assert torch.equal(ref.edge_index, other.edge_index)
        assert torch.equal(ref.cell_offsets, other.cell_offsets)


def test_edge_vectors_gradient_reaches_pos_and_cell() -> None:
    graph = radius_graph(tiny_cell(), 4.0, 12)
    pos0, cell0 = graph.pos.clone(), graph.cell.clone()

    def energy(pos: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        graph.pos, graph.cell = pos, cell
        d = graph.edge_vectors().norm(dim=1)
        return torch.exp(-d).sum()

    assert torch.autograd.gradcheck(energy, (pos0.requires_grad_(), cell0.requires_grad_()))
    pos, cell = pos0.detach().requires_grad_(), cell0.detach().requires_grad_()
    gp, gc = torch.autograd.grad(energy(pos, cell), (pos, cell))
    assert gp.abs().sum() > 0 and gc.abs().sum() > 0


def test_dtype_and_device_follow_arguments() -> None:
    graph = radius_graph(one_atom_fcc(), 4.0, dtype=torch.float32, device="cpu")
    assert graph.pos.dtype == torch.float32 and graph.cell.dtype == torch.float32
    assert graph.edge_index.dtype == torch.long and graph.cell_offsets.dtype == torch.long
    assert graph.edge_vectors().dtype == torch.float32


def test_bad_input() -> None:
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.2, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    with pytest.raises(ValueError, match="axis 2"):
        radius_graph(atoms, 5.0)
    with pytest.raises(ValueError, match="NaN"):
        radius_graph(Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]]), 5.0)
    with pytest.raises(ValueError, match="NaN"):
        radius_graph(Atoms("H", cell=[[np.nan, 0, 0], [0, 1, 0], [0, 0, 1]], pbc=True), 5.0)
    with pytest.raises(ValueError, match="linearly dependent"):
        radius_graph(Atoms("H", cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]], pbc=True), 5.0)
    with pytest.raises(ValueError, match="cutoff"):
        radius_graph(methanol(), -1.0)
    with pytest.raises(ValueError, match="max_neighbors"):
        radius_graph(methanol(), 5.0, 0)
    with pytest.raises(ValueError, match="backend"):
        radius_graph(methanol(), 5.0, backend="cuda-magic")
    with pytest.raises(ValueError, match="empty"):
        radius_graph([], 5.0)
    with pytest.raises(TypeError):
        radius_graph([methanol(), "H2O"], 5.0)


@st.composite
def random_structures(draw) -> tuple[Atoms, float]:
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 9))
    pbc = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    size = draw(st.floats(1.2, 8.0))
    cell = size * (np.eye(3) + rng.uniform(-0.45, 0.45, (3, 3)))
    assume(np.linalg.cond(cell) < 10)
    frac = rng.uniform(-1.5, 2.5, (n, 3))  # well outside the cell too
    atoms = Atoms(numbers=np.ones(n, dtype=int), positions=frac @ cell, cell=cell, pbc=pbc)
    return atoms, draw(st.floats(0.5, 5.0))


@settings(max_examples=40, deadline=None)
@given(random_structures())
def test_random_structures_property(case: tuple[Atoms, float]) -> None:
    atoms, cutoff = case
    for backend in BACKENDS:
        assert_matches_brute_force(atoms, cutoff, backend)


def test_torch_backend_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunk budgets split the candidate expansion mid-structure; the graph must not change."""
    import mlcalc.graph.celllist as celllist

    structures = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 3, 3)), slab(), tiny_cell()]
    structures[0].rattle(0.1, seed=2)
    ref = radius_graph(structures, 5.0, 16, backend="vesin")
    monkeypatch.setattr(celllist, "_CHUNK_PAIRS", 5000)
    got = radius_graph(structures, 5.0, 16, backend="torch")
    assert torch.equal(ref.edge_index, got.edge_index)
    assert torch.equal(ref.cell_offsets, got.cell_offsets)


@settings(max_examples=25, deadline=None)
@given(st.lists(random_structures(), min_size=1, max_size=3), st.integers(1, 30), st.booleans())
def test_random_batches_backends_identical(cases: list[tuple[Atoms, float]], k: int, strict: bool) -> None:
    structures = [atoms for atoms, _ in cases]
    cutoff = cases[0][1]
    ref = radius_graph(structures, cutoff, k, strict, backend="vesin")
    got = radius_graph(structures, cutoff, k, strict, backend="torch")
    assert torch.equal(ref.edge_index, got.edge_index)
    assert torch.equal(ref.cell_offsets, got.cell_offsets)
    pairs = {}
    for n, atoms in enumerate(structures):  # brute force per structure, shifted into the batch numbering
        start = sum(len(a) for a in structures[:n])
        pairs.update({(a + start, b + start, *s): d for (a, b, *s), d in brute_force(atoms, cutoff).items()})
    if strict:  # exact ties (self-image ±S pairs) make the strict choice order-dependent; compare sizes
        counts = torch.bincount(ref.edge_index[1], minlength=sum(len(a) for a in structures))
        full = torch.bincount(torch.tensor([key[0] for key in pairs], dtype=torch.long), minlength=counts.numel())
        assert torch.equal(counts, full.clamp(max=k))
    else:
        assert set(graph_pairs(ref)) == reference_selection(pairs, k, strict)
