"""Periodic SphereNet: bases vs scipy, geometry vs a brute-force DIG-style oracle, DIG state_dict keys,
finite-difference forces/stress, supercell consistency, invariances, collinear triplets, ASE relaxation and MD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, fcc111, molecule
from ase.md.langevin import Langevin
from ase.optimize import BFGS
from scipy.special import lpmv, spherical_jn

from mlcalc.calculator import SphereNetCalculator
from mlcalc.graph import radius_graph
from mlcalc.models.base import get_model_class
from mlcalc.models.spherenet import SphereNet
from mlcalc.models.spherenet.bases import (
    real_sph_harm_dig,
    sph_harm_prefactor,
    spherical_bessel_normalizer,
    spherical_bessel_zeros,
    spherical_jn_table,
)
from mlcalc.models.spherenet.geometry import build_triplets
from mlcalc.testing import fd_forces, fd_stress, permuted, random_rotation, rotated, translated

SMALL = dict(
    hidden_channels=16, int_emb_size=8, basis_emb_size_dist=4, basis_emb_size_angle=4, basis_emb_size_torsion=4,
    out_emb_channels=16, num_spherical=4, num_radial=4, num_layers=2, num_output_layers=2, cutoff=4.0,
)  # fmt: skip


def small_model(seed: int = 0, **kw) -> SphereNet:
    torch.manual_seed(seed)
    return SphereNet(**(SMALL | {"max_num_neighbors": None} | kw)).double().eval()


def calc(model: SphereNet, dtype: str = "float64") -> SphereNetCalculator:
    return SphereNetCalculator(model, device="cpu", dtype=dtype)


def energy(model: SphereNet, atoms: Atoms) -> float:
    with torch.no_grad():
        g = radius_graph(atoms, model.cutoff, model.max_neighbors)
        return float(model(g)["energy"].sum())


def triclinic(seed: int, n: int = 3) -> Atoms:
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(3.2, 4.2, 3)) + rng.uniform(-0.6, 0.6, (3, 3)) * (1 - np.eye(3))
    for _ in range(100):
        atoms = Atoms(numbers=rng.integers(1, 30, n), scaled_positions=rng.uniform(size=(n, 3)), cell=cell, pbc=True)
        d = atoms.get_all_distances(mic=True) + 10 * np.eye(n)
        if d.min() > 1.6:
            return atoms
    raise RuntimeError("no structure found")


def structures() -> dict[str, Atoms]:
    slab = fcc111("Cu", (2, 2, 2), vacuum=4.0, a=3.6)
    slab.rattle(0.08, seed=2)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=3)
    return {"triclinic": triclinic(1), "slab": slab, "molecule": mol}


# ---------------------------------------------------------------------------------------------- bases
def test_spherical_bessel_against_scipy():
    zeros = spherical_bessel_zeros(7, 6)
    for l in range(7):
        assert np.abs(spherical_jn(l, zeros[l])).max() < 1e-14
        assert np.all(np.diff(zeros[l]) > 0) and (l == 0 or zeros[l, 0] > zeros[l - 1, 0])
    norm = spherical_bessel_normalizer(zeros)
    np.testing.assert_allclose(norm, np.sqrt(2) / np.abs(spherical_jn(np.arange(7)[:, None] + 1, zeros)))
    x = torch.linspace(1e-3, 28.0, 4001, dtype=torch.float64)
    table = spherical_jn_table(x[:, None, None].expand(-1, 7, 1), 7)[..., 0]
    ref = np.stack([spherical_jn(l, x.numpy()) for l in range(7)], axis=1)
    assert np.abs(table.numpy() - ref).max() < 2e-15


def test_real_spherical_harmonics_dig_order():
    rng = np.random.default_rng(0)
    theta, phi = rng.uniform(0, np.pi, 64), rng.uniform(0, 2 * np.pi, 64)
    xyz = [torch.tensor(v) for v in (np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta))]
    got = real_sph_harm_dig(*xyz, 7).numpy()
    ref = []
    for l in range(7):
        ref.append(sph_harm_prefactor(l, 0) * lpmv(0, l, np.cos(theta)))
        for m in [*range(1, l + 1), *range(-l, 0)]:  # DIG order m = 0, 1..l, -l..-1
            trig = np.cos(m * phi) if m > 0 else np.sin(-m * phi)
            ref.append(np.sqrt(2) * sph_harm_prefactor(l, m) * lpmv(abs(m), l, np.cos(theta)) * trig)
    np.testing.assert_allclose(got, np.stack(ref, axis=1), atol=1e-13)


def test_torsion_average_is_the_phi_mean():
    """use_torsion=False: the torsion basis averaged over the torsion angle (quadrature over phi)."""
    model = small_model(num_spherical=5)
    basis = model.emb.spherical
    radial = basis.radial(torch.tensor([1.1, 2.3, 3.7], dtype=torch.float64))
    z = torch.tensor([0.3, -0.8, 0.95], dtype=torch.float64)
    s = torch.sqrt(1 - z * z)
    phis = torch.arange(64, dtype=torch.float64) * (2 * math.pi / 64)
    mean = sum(basis.torsion(radial, s * torch.cos(p), s * torch.sin(p), z) for p in phis) / len(phis)
    torch.testing.assert_close(basis.torsion_averaged(radial, z), mean, atol=1e-14, rtol=0)


# ------------------------------------------------------------------------------------- DIG compatibility
def dig_state_dict_shapes(h: dict) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of DIG's / Geom3D's SphereNet state_dict, written down from their source."""
    H, R, S, I_ = h["hidden_channels"], h["num_radial"], h["num_spherical"], h["int_emb_size"]
    OE = h["out_emb_channels"]
    bd, ba, bt = h["basis_emb_size_dist"], h["basis_emb_size_angle"], h["basis_emb_size_torsion"]
    shapes = {
        "init_e.emb.weight": (95, H),
        "init_e.lin_rbf_0.weight": (H, R), "init_e.lin_rbf_0.bias": (H,),
        "init_e.lin.weight": (H, 3 * H), "init_e.lin.bias": (H,),
        "init_e.lin_rbf_1.weight": (H, R),
        "emb.dist_emb.freq": (R,),
    }  # fmt: skip
    for prefix in ["init_v", *[f"update_vs.{n}" for n in range(h["num_layers"])]]:
        shapes |= {f"{prefix}.lin_up.weight": (OE, H), f"{prefix}.lin_up.bias": (OE,), f"{prefix}.lin.weight": (1, OE)}
        for k in range(h["num_output_layers"]):
            shapes |= {f"{prefix}.lins.{k}.weight": (OE, OE), f"{prefix}.lins.{k}.bias": (OE,)}
    for n in range(h["num_layers"]):
        p = f"update_es.{n}."
        shapes |= {
            p + "lin_rbf1.weight": (bd, R), p + "lin_rbf2.weight": (H, bd),
            p + "lin_sbf1.weight": (ba, S * R), p + "lin_sbf2.weight": (I_, ba),
            p + "lin_t1.weight": (bt, S * S * R), p + "lin_t2.weight": (I_, bt),
            p + "lin_rbf.weight": (H, R),
            p + "lin_kj.weight": (H, H), p + "lin_kj.bias": (H,),
            p + "lin_ji.weight": (H, H), p + "lin_ji.bias": (H,),
            p + "lin_down.weight": (I_, H), p + "lin_up.weight": (H, I_),
            p + "lin.weight": (H, H), p + "lin.bias": (H,),
        }  # fmt: skip
        for stack, count in (("layers_before_skip", 1), ("layers_after_skip", 2)):
            for k in range(count):
                for lin in ("lin1", "lin2"):
                    shapes |= {f"{p}{stack}.{k}.{lin}.weight": (H, H), f"{p}{stack}.{k}.{lin}.bias": (H,)}
    return shapes


def test_dig_state_dict_loads():
    hp = SMALL | {"num_output_layers": 3}
    shapes = dig_state_dict_shapes(hp)
    gen = torch.Generator().manual_seed(7)
    sd = {k: 0.3 * torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    model = SphereNet(**hp).double()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.update_es[1].lin_t1.weight, sd["update_es.1.lin_t1.weight"])
    assert math.isfinite(energy(model, molecule("H2O")))


def test_registry_and_config():
    for name in ("spherenet", "SphereNet", "SphereNetPeriodic"):
        assert get_model_class(name) is SphereNet
    m = SphereNet.from_config({"cutoff": 4.5, "hidden_channels": 8, "out_emb_channels": 8, "num_layers": 1,
                               "act": "swish", "energy_and_force": True, "regress_forces": True})  # fmt: skip
    assert m.cutoff == 4.5 and m.max_neighbors == 32 and not m.direct_forces and m.max_elements == 94
    assert SphereNet(max_num_neighbors=None, num_layers=1).max_neighbors is None
    assert m.hparams["cutoff"] == 4.5 and m.hparams["use_torsion"] is True


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"out_channels": 2}, "out_channels"), ({"act": "relu6"}, "activation"), ({"output_init": "x"}, "output_init"),
     ({"cutoff": 0.0}, "cutoff"), ({"use_extra_node_feature": True}, "extra_node"),
     ({"max_num_neighbors": 0}, "max_num")],
)  # fmt: skip
def test_bad_hparams(kw, match):
    with pytest.raises(ValueError, match=match):
        SphereNet(**({"num_layers": 1} | kw))


def test_bad_element():
    model = small_model()
    with pytest.raises(ValueError, match="atomic numbers"):
        model(radius_graph(Atoms(numbers=[1, 100], positions=[[0, 0, 0], [0, 0, 1]]), 4.0))


# ------------------------------------------------------------------------------- geometry vs brute force
def brute_force_bases(model: SphereNet, graph) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DIG's triplet / angle / torsion definitions evaluated literally, one triplet at a time, with scipy bases.

    Triplets: every edge k->j into the source of j->i except the reverse edge (same atoms, opposite image).
    Angle: atan2(|ji x jk|, ji . jk). Torsion: DIG's signed dihedral to every other edge n->j (not the reverse
    edge, not k->j), mapped to (0, 2 pi], minimum taken (2 pi if no candidate). Returns sorted by (ji, kj):
    idx_kj, idx_ji, sbf (T, L*K), tbf (T, L*L*K).
    """
    vec = graph.edge_vectors().detach().numpy()
    src, tgt = graph.edge_index.numpy()
    off = graph.cell_offsets.numpy()
    L, K, cut = model.emb.spherical.num_spherical, model.emb.spherical.num_radial, model.cutoff
    zeros = spherical_bessel_zeros(L, K)
    norm = spherical_bessel_normalizer(zeros)
    rows = []
    for e1 in range(len(src)):
        j, i = src[e1], tgt[e1]
        into_j = np.where(tgt == j)[0]
        rev = (src[into_j] == i) & (off[into_j] == -off[e1]).all(axis=1)
        cands = into_j[~rev]
        r_ji = -vec[e1]
        for e2 in cands:
            r_jk = vec[e2]
            theta = math.atan2(np.linalg.norm(np.cross(r_ji, r_jk)), r_ji @ r_jk)
            others = cands[cands != e2]
            plane1 = np.cross(r_ji, r_jk)
            plane2 = np.cross(r_ji, vec[others])
            a = plane2 @ plane1
            b = np.cross(plane1, plane2) @ r_ji / np.linalg.norm(r_ji)
            phi = np.arctan2(b, a)
            phi[phi <= 0] += 2 * np.pi
            # exact-arithmetic DIG: a candidate coplanar with k on its side, or collinear with j->i, gives
            # atan2(0, x >= 0) = 0 -> 2 pi (small cells make such coincidences exact: lattice vectors)
            scale = np.linalg.norm(vec[others], axis=1) * np.linalg.norm(r_ji)
            degenerate = np.linalg.norm(plane2, axis=1) < 1e-9 * scale
            phi[degenerate | (phi < 1e-9) | (phi > 2 * np.pi - 1e-9)] = 2 * np.pi
            rows.append((e1, e2, theta, phi.min() if len(others) else 2 * np.pi))
    rows.sort()
    idx_ji, idx_kj, theta, phi = (np.array(c) for c in zip(*rows, strict=True))
    d = np.linalg.norm(vec[idx_kj], axis=1)
    radial = norm * spherical_jn(np.arange(L)[:, None], zeros * (d / cut)[:, None, None])  # (T, L, K)
    ylm = []
    for l in range(L):
        ylm.append(sph_harm_prefactor(l, 0) * lpmv(0, l, np.cos(theta)))
        for m in [*range(1, l + 1), *range(-l, 0)]:
            trig = np.cos(m * phi) if m > 0 else np.sin(-m * phi)
            ylm.append(np.sqrt(2) * sph_harm_prefactor(l, m) * lpmv(abs(m), l, np.cos(theta)) * trig)
    ylm = np.stack(ylm, axis=1)
    sbf = (radial * ylm[:, [l * l for l in range(L)], None]).reshape(len(d), -1)
    tbf = (radial[:, None] * ylm.reshape(-1, L, L, 1)).reshape(len(d), -1)
    return idx_kj, idx_ji, sbf, tbf


@pytest.mark.parametrize("name", ["molecule", "triclinic", "tiny_cell"])
def test_geometry_matches_brute_force(name):
    if name == "tiny_cell":  # cell smaller than the cutoff: k and i are often the same atom in other images
        atoms = bulk("Si", "diamond", a=3.0)
        atoms.rattle(0.05, seed=5)
    else:
        atoms = structures()[name] if name == "molecule" else triclinic(4, n=2)
    model = small_model(num_spherical=5, num_radial=3, cutoff=3.3)
    graph = radius_graph(atoms, model.cutoff)
    idx_kj, idx_ji, sbf, tbf = brute_force_bases(model, graph)
    geo = model.geometry(graph)
    order = np.lexsort((geo["idx_kj"].numpy(), geo["idx_ji"].numpy()))
    np.testing.assert_array_equal(geo["idx_kj"].numpy()[order], idx_kj)
    np.testing.assert_array_equal(geo["idx_ji"].numpy()[order], idx_ji)
    np.testing.assert_allclose(geo["sbf"].detach().numpy()[order], sbf, atol=1e-12)
    np.testing.assert_allclose(geo["tbf"].detach().numpy()[order], tbf, atol=1e-9)
    # the triplet's own k is never its torsion reference when another candidate exists (DIG's rounding bug)
    ref = geo["reference"].numpy()
    has_other = np.bincount(geo["idx_ji"].numpy())[geo["idx_ji"].numpy()] > 1
    assert (ref[has_other] != np.arange(len(ref))[has_other]).mean() > 0.95


def test_triplet_count_small_cell():
    """1-atom simple cubic cell, 6 neighbours (all images of itself): 6 * 5 triplets, reverse edges excluded."""
    atoms = Atoms("Cu", cell=np.eye(3) * 2.5, pbc=True)
    g = radius_graph(atoms, 3.0)
    assert g.num_edges == 6
    idx_kj, idx_ji = build_triplets(g.edge_index, g.cell_offsets, g.num_atoms)
    assert idx_kj.numel() == 30
    off = g.cell_offsets
    assert not bool(((off[idx_kj] + off[idx_ji]) == 0).all(dim=1).any())


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("use_torsion", [False, True])
@pytest.mark.parametrize("name", ["triclinic", "slab", "molecule"])
def test_forces_and_stress_match_finite_differences(name, use_torsion):
    atoms = structures()[name]
    c = calc(small_model(use_torsion=use_torsion))
    a = atoms.copy()
    a.calc = c
    idx = [0, 1, 2] if len(atoms) > 3 else None
    ref = fd_forces(atoms, c, h=1e-5, indices=idx)
    rows = slice(None) if idx is None else idx
    assert np.abs(a.get_forces()[rows] - ref[rows]).max() < 1e-6
    if atoms.cell.rank == 3:
        assert np.abs(a.get_stress() - fd_stress(atoms, c, h=1e-5)).max() < 1e-6


def test_supercell_consistency():
    """Energy is extensive: a 2x2x2 supercell has 8x the energy. Exact (1e-9) without torsion; with torsion the
    reference choice is made with a tolerance, which keeps lattice coincidences consistent (measured ~1e-13)."""
    cells = {
        "rattled": triclinic(2, n=3),
        "perfect_fcc": bulk("Cu", "fcc", a=3.6),
        "rocksalt": bulk("NaCl", "rocksalt", a=4.4),
    }
    for use_torsion in (False, True):
        model = small_model(use_torsion=use_torsion)
        for name, atoms in cells.items():
            e1, e8 = energy(model, atoms), energy(model, atoms * (2, 2, 2))
            assert abs(e8 - 8 * e1) < 1e-9 * max(1.0, abs(e8)), (name, use_torsion, e8 - 8 * e1)


def test_invariances():
    atoms = structures()["triclinic"]
    model = small_model()
    c = calc(model)
    a = atoms.copy()
    a.calc = c
    e0, f0, s0 = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
    b = translated(atoms, [0.7, -1.3, 2.1])
    b.calc = c
    assert abs(b.get_potential_energy() - e0) < 1e-10
    np.testing.assert_allclose(b.get_forces(), f0, atol=1e-10)
    rot = random_rotation(3)
    b = rotated(atoms, rot)
    b.calc = c
    assert abs(b.get_potential_energy() - e0) < 1e-10
    np.testing.assert_allclose(b.get_forces(), f0 @ rot.T, atol=1e-9)
    np.testing.assert_allclose(b.get_stress(voigt=False), rot @ s0 @ rot.T, atol=1e-9)
    b, perm = permuted(atoms * (1, 2, 1), seed=4)
    b.calc = c
    ref = atoms * (1, 2, 1)
    ref.calc = c
    assert abs(b.get_potential_energy() - ref.get_potential_energy()) < 1e-10
    np.testing.assert_allclose(b.get_forces(), ref.get_forces()[perm], atol=1e-10)
    wrapped = atoms.copy()
    wrapped.positions += 5.0 * atoms.cell[0]
    wrapped.calc = c
    assert abs(wrapped.get_potential_energy() - e0) < 1e-10


@pytest.mark.parametrize("use_torsion", [False, True])
def test_collinear_triplets_no_nan(use_torsion):
    """Linear CO2 (angle exactly pi) and a 1-atom cubic cell (every triplet collinear or at right angles)."""
    model = small_model(use_torsion=use_torsion)
    c = calc(model)
    co2 = molecule("CO2")
    cube = Atoms("Cu", cell=np.eye(3) * 2.6, pbc=True)
    chain = Atoms("C3", positions=[[0, 0, 0], [1.3, 0, 0], [2.6, 0, 0]])
    for atoms in (co2, cube, chain):
        a = atoms.copy()
        a.calc = c
        assert np.isfinite(a.get_potential_energy())
        assert np.isfinite(a.get_forces()).all()
        if a.cell.rank == 3:
            assert np.isfinite(a.get_stress()).all()
    # symmetric structures: forces vanish by symmetry, the stress of the cube is isotropic
    co2.calc = c
    np.testing.assert_allclose(co2.get_forces()[:, :2], 0.0, atol=1e-12)  # CO2 lies along z
    cube.calc = c
    s = cube.get_stress()
    np.testing.assert_allclose(s[:3], s[0], atol=1e-10)
    np.testing.assert_allclose(s[3:], 0.0, atol=1e-10)
    if not use_torsion:  # the smooth model: FD on the straight line (collinear angle derivatives)
        ref = fd_forces(co2, c, h=1e-5)
        np.testing.assert_allclose(co2.get_forces(), ref, atol=1e-6)


def test_batch_equals_single_and_float32():
    model = small_model()
    items = [structures()["triclinic"], structures()["molecule"], triclinic(7, n=2)]
    c64 = calc(model)
    batch = c64.predict(items)
    for atoms, res in zip(items, batch, strict=True):
        a = atoms.copy()
        a.calc = c64
        assert abs(a.get_potential_energy() - res["energy"]) < 1e-10
        np.testing.assert_allclose(a.get_forces(), res["forces"], atol=1e-10)
        a.calc = calc(model, "float32")
        assert abs(a.get_potential_energy() - res["energy"]) < 1e-4 * max(1, abs(res["energy"]))
        np.testing.assert_allclose(a.get_forces(), res["forces"], atol=1e-3)


def test_isolated_atom_and_no_triplets():
    model = small_model()
    e_single = energy(model, Atoms("Cu", positions=[[0, 0, 0]]))
    assert math.isfinite(e_single)
    far = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 10.0]])
    assert abs(energy(model, far) - 2 * e_single) < 1e-12
    dimer = Atoms("CuO", positions=[[0, 0, 0], [0, 0, 1.8]])  # edges but no triplets
    assert math.isfinite(energy(model, dimer))


def test_default_hyperparameters():
    """The default-size model (DIG defaults, max_num_neighbors 32) on a small cell: finite, FD-consistent."""
    torch.manual_seed(0)
    model = SphereNet().double()
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.numbers = [29, 8, 29, 1]
    c = calc(model)
    a = atoms.copy()
    a.calc = c
    ref = fd_forces(atoms, c, h=1e-5, indices=[1])
    np.testing.assert_allclose(a.get_forces()[1], ref[1], atol=1e-6)


# ------------------------------------------------------------------------------------------ ASE drivers
@pytest.mark.parametrize("use_torsion", [False, True])
def test_bfgs_relaxation(use_torsion):
    """Random weights: a periodic cell relaxes (molecules tend to collapse under random potentials)."""
    atoms = structures()["triclinic"]
    atoms.calc = calc(small_model(use_torsion=use_torsion))
    e0 = atoms.get_potential_energy()
    opt = BFGS(atoms, logfile=None, maxstep=0.05)
    converged = opt.run(fmax=0.02, steps=200)
    assert atoms.get_potential_energy() < e0
    if not use_torsion:  # the discontinuous torsion model need not converge; the smooth one must
        assert converged and np.abs(atoms.get_forces()).max() < 0.02


def test_langevin_md():
    model = small_model()
    atoms = structures()["triclinic"] * (2, 1, 1)
    atoms.calc = calc(model)
    dyn = Langevin(
        atoms, timestep=0.5 * units.fs, temperature_K=300, friction=0.02, fixcm=False, rng=np.random.default_rng(0)
    )
    dyn.run(20)
    assert np.isfinite(atoms.positions).all() and np.isfinite(atoms.get_potential_energy())


def test_torsion_reference_switch_is_a_jump():
    """A neighbour crossing k's half-plane switches the torsion reference: a jump with torsion, none without."""

    def atoms(alpha: float) -> Atoms:
        pos = [[0, 0, 0], [0, 0, 1.5], [1.5, 0, 0.3], [1.4 * np.cos(alpha), 1.4 * np.sin(alpha), -0.4], [-1, 1.2, 0.2]]
        return Atoms("CHONH", positions=pos)

    delta = 1e-6  # beyond the coplanarity tolerance (1.5e-8 rad)
    for use_torsion in (True, False):
        model = small_model(use_torsion=use_torsion)
        jump = abs(energy(model, atoms(delta)) - energy(model, atoms(-delta)))
        assert (jump > 1e-4) if use_torsion else (jump < 1e-6), (use_torsion, jump)
