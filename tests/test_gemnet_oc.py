"""GemNet-OC: parity with fairchem-core 1.10 (fixtures in tests/data), graphs, checkpoints, conformance."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from scipy import special

import mlcalc.models.gemnet_oc  # noqa: F401  (registers the model)
from mlcalc import GemNetOCCalculator, load_model
from mlcalc.models.gemnet_oc import GemNetOC
from mlcalc.models.gemnet_oc.bases import real_spherical_harmonics, zonal_harmonics
from mlcalc.models.gemnet_oc.interaction import QuadrupletInteraction
from mlcalc.testing import fd_forces, fd_stress, permuted, random_rotation, rotated, translated

DATA = Path(__file__).parent / "data"
FIXTURES = ["gemnet_oc_small_direct", "gemnet_oc_small_grad"]
EXPECTED = json.loads((DATA / "expected.json").read_text())
STRUCTURES = {a.info["name"]: a for a in ase.io.read(DATA / "structures.extxyz", index=":")}
NAMES = list(STRUCTURES)
UNTAGGED = ["b_pt_fcc_bulk_2x2x2", "f_cu_fcc_1atom"]  # no atom tagged 1/2: fairchem raises, reference_error
TAGGED = [n for n in NAMES if n not in UNTAGGED]
GRAPH_KEYS = ["main", "a2a", "a2ee2a", "qint", "triplets_e2e", "triplets_a2e", "triplets_e2a", "quadruplets"]

_MODELS: dict[str, GemNetOC] = {}


def model(fixture: str) -> GemNetOC:
    if fixture not in _MODELS:
        _MODELS[fixture] = load_model(DATA / f"{fixture}.pt")
    return _MODELS[fixture]


def calculator(fixture: str, dtype=torch.float64) -> GemNetOCCalculator:
    return GemNetOCCalculator(model(fixture), device="cpu", dtype=dtype)


def ref(fixture: str, name: str) -> dict:
    return EXPECTED["fixtures"][fixture]["structures"][name]


def evaluate(calc, atoms):
    a = atoms.copy()
    a.calc = calc
    return a.get_potential_energy(), a.get_forces()


def graph_sizes(m: GemNetOC, atoms) -> dict[str, int]:
    graph = GemNetOCCalculator(m, device="cpu", dtype=torch.float64).build_graph(atoms)
    idx = m.build_indices(graph)
    return {
        "main": idx.main.num,
        "a2a": idx.a2a.num,
        "a2ee2a": idx.a2ee2a.num,
        "qint": idx.qint.num,
        "triplets_e2e": idx.trip_e2e.out.numel(),
        "triplets_a2e": idx.trip_a2e.out.numel(),
        "triplets_e2a": idx.trip_e2a.out.numel(),
        "quadruplets": idx.quad.out.numel(),
    }


# ------------------------------------------------------------------------------------------------ graphs first
@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("name", TAGGED)
def test_graph_sizes_match_fairchem(fixture, name):
    expected = ref(fixture, name)["graph"]
    assert graph_sizes(model(fixture), STRUCTURES[name]) == {k: expected[k] for k in GRAPH_KEYS}


@pytest.mark.parametrize("name", UNTAGGED)
def test_untagged_structures_have_no_quadruplets(name):
    sizes = graph_sizes(model("gemnet_oc_small_direct"), STRUCTURES[name])
    assert sizes["qint"] == 0 and sizes["quadruplets"] == 0 and sizes["triplets_e2e"] > 0


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("name", TAGGED)
def test_parity_float64(fixture, name):
    r = ref(fixture, name)
    energy, forces = evaluate(calculator(fixture), STRUCTURES[name])
    assert abs(energy - r["energy_f64"]) <= 1e-6
    assert np.abs(forces - np.array(r["forces_f64"])).max() <= 1e-6


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("name", TAGGED)
def test_parity_float32(fixture, name):
    """Against the float64 reference within 3x fairchem's own float32 error, with a floor of 1e-5 relative
    (1e-5 eV per atom for the energy: c has |E| = 0.003 eV, a cancellation of ~10 eV per-atom terms)."""
    r = ref(fixture, name)
    energy, forces = evaluate(calculator(fixture, torch.float32), STRUCTURES[name])
    f_ref = np.array(r["forces_f64"])
    tol_e = max(3 * r["f32_vs_f64"]["abs_dE"], 1e-5 * max(abs(r["energy_f64"]), len(f_ref)))
    tol_f = max(3 * r["f32_vs_f64"]["max_abs_dF"], 1e-5 * np.abs(f_ref).max())
    assert abs(energy - r["energy_f64"]) <= tol_e
    assert np.abs(forces - f_ref).max() <= tol_f


def _without_quadruplets(monkeypatch):
    monkeypatch.setattr(QuadrupletInteraction, "forward", lambda self, m, *args: torch.zeros_like(m))


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("name", UNTAGGED)
def test_untagged_structure_equals_model_without_quadruplet_messages(fixture, name, monkeypatch):
    """fairchem crashes here (empty quadruplet graph); the right answer is a zero quadruplet message."""
    energy, forces = evaluate(calculator(fixture), STRUCTURES[name])
    assert np.isfinite(energy) and np.isfinite(forces).all()
    _without_quadruplets(monkeypatch)
    energy0, forces0 = evaluate(calculator(fixture), STRUCTURES[name])
    # two code paths (zero quadruplet messages vs none): equal to float64 rounding, not bit for bit
    assert energy == pytest.approx(energy0, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(forces, forces0, rtol=0, atol=1e-12 * max(1.0, np.abs(forces0).max()))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_batch_with_untagged_structure_equals_single_evaluations(fixture):
    """In a batch, b's edges see no quadruplets through the non-empty code path: same numbers as b alone."""
    calc = calculator(fixture)
    structures = [STRUCTURES[n] for n in ("a_cu111_2x2x3_O", "b_pt_fcc_bulk_2x2x2", "e_pt100_CO_pbcTTF")]
    batched = calc.predict(structures)
    for atoms, res in zip(structures, batched, strict=True):
        energy, forces = evaluate(calculator(fixture), atoms)
        assert abs(res["energy"] - energy) <= 1e-9 * max(1.0, abs(energy))
        assert np.abs(res["forces"] - forces).max() <= 1e-9


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("fixture", FIXTURES)
def test_checkpoint_loads_every_tensor_and_scale_factor(fixture):
    info = EXPECTED["fixtures"][fixture]
    m = model(fixture)
    ckpt = torch.load(DATA / f"{fixture}.pt", weights_only=True)
    keys = {k.removeprefix("module.").removeprefix("module.") for k in ckpt["state_dict"]}
    own = set(m.state_dict())
    assert keys == (own if fixture.endswith("grad") else {k for k in own if not k.endswith(".scale_factor")})
    assert len(keys) == info["n_state_dict_keys"]
    trainable = {id(p): p.numel() for p in m.parameters() if p.requires_grad}
    assert sum(trainable.values()) == info["n_trainable_params"]
    scales = {n: float(mod.scale_factor) for n, mod in m.named_modules() if n.rsplit(".", 1)[-1].startswith("scale_")}
    assert scales == pytest.approx(info["scale_factors"], rel=0, abs=0)


def test_scale_factor_zero_means_unfitted():
    m = GemNetOC.from_config(dict(EXPECTED["fixtures"]["gemnet_oc_small_grad"]["hparams"]))
    m.load_state_dict(model("gemnet_oc_small_grad").state_dict())
    calc = GemNetOCCalculator(m, device="cpu", dtype=torch.float64)
    scale = m.int_blocks[0].trip_interaction.scale_rbf.scale_factor
    with torch.no_grad():
        scale.fill_(1.0)
    e1 = evaluate(calc, STRUCTURES["c_triclinic_NiAlO"])[0]
    with torch.no_grad():
        scale.fill_(0.0)
    calc.reset()
    assert evaluate(calc, STRUCTURES["c_triclinic_NiAlO"])[0] == e1


def test_bad_checkpoint_and_config_give_clear_errors():
    hp = dict(EXPECTED["fixtures"]["gemnet_oc_small_direct"]["hparams"])
    m = GemNetOC.from_config(hp)
    sd = dict(model("gemnet_oc_small_direct").state_dict())
    sd.pop("atom_emb.embeddings.weight")
    with pytest.raises(ValueError, match="missing keys.*atom_emb"):
        m.load_checkpoint_state(sd)
    with pytest.raises(ValueError, match="cutoff_aint"):
        GemNetOC.from_config({**hp, "cutoff_qint": 7.0})
    legacy = {k: v for k, v in sd.items() if not k.endswith(".scale_factor")}
    legacy["atom_emb.embeddings.weight"] = m.atom_emb.embeddings.weight.detach()
    with pytest.raises(ValueError, match="scale"):
        GemNetOC.from_config({**hp, "scale_file": "does/not/exist.pt"}).load_checkpoint_state(legacy)


def test_unknown_element_is_rejected():
    atoms = STRUCTURES["d_ch3oh_molecule"].copy()
    atoms.numbers[0] = 90  # Th: outside num_elements = 83
    atoms.calc = calculator("gemnet_oc_small_direct")
    with pytest.raises(ValueError, match="1..83"):
        atoms.get_potential_energy()


# ------------------------------------------------------------------------------------------------ bases
def test_angular_bases_match_scipy():
    rng = np.random.default_rng(0)
    theta, phi = rng.uniform(0, np.pi, 50), rng.uniform(-np.pi, np.pi, 50)
    z = torch.tensor(np.cos(theta))
    zonal = zonal_harmonics(z, 6).numpy()
    real = real_spherical_harmonics(z, torch.tensor(phi), 5).numpy()
    col = 0
    for l_deg in range(5):
        np.testing.assert_allclose(zonal[:, l_deg], special.sph_harm_y(l_deg, 0, theta, phi).real, atol=1e-12)
        for m in [0, *range(1, l_deg + 1), *range(-l_deg, 0)]:
            y = special.sph_harm_y(l_deg, abs(m), theta, phi)
            expected = y.real if m == 0 else np.sqrt(2) * (-1) ** m * (y.real if m > 0 else y.imag)
            np.testing.assert_allclose(real[:, col], expected, atol=1e-12, err_msg=f"l={l_deg} m={m}")
            col += 1


# ------------------------------------------------------------------------------------------------ conformance
def _rattled(name: str, seed: int = 3):
    atoms = STRUCTURES[name].copy()
    atoms.rattle(0.05, seed=seed)
    return atoms


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("name", ["a_cu111_2x2x3_O", "e_pt100_CO_pbcTTF"])
def test_translation_and_rotation_invariance(fixture, name):
    atoms = _rattled(name)
    calc = calculator(fixture)
    e0, f0 = evaluate(calc, atoms)
    scale = max(1.0, abs(e0))
    e, f = evaluate(calc, translated(atoms, [0.31, -1.7, 2.9]))
    assert abs(e - e0) <= 1e-10 * scale and np.abs(f - f0).max() <= 1e-9
    rot = random_rotation(7)
    e, f = evaluate(calc, rotated(atoms, rot))
    assert abs(e - e0) <= 1e-10 * scale and np.abs(f - f0 @ rot.T).max() <= 1e-9


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("name", ["a_cu111_2x2x3_O", "d_ch3oh_molecule"])
def test_permutation_invariance(fixture, name):
    """Permutation invariance holds when the main graph's max_neighbors truncation is symmetric. fairchem (and
    so mlcalc) symmetrises the main graph by keeping the edges with source index < target index, so an edge
    kept for only one of its atoms survives or not depending on atom order; a gets an untruncated main graph."""
    hp = dict(EXPECTED["fixtures"][fixture]["hparams"], max_neighbors=100, max_neighbors_aint=100)
    m = GemNetOC.from_config(hp)
    m.load_state_dict(model(fixture).state_dict())
    calc = GemNetOCCalculator(m if name.startswith("a_") else model(fixture), device="cpu", dtype=torch.float64)
    atoms = _rattled(name)
    e0, f0 = evaluate(calc, atoms)
    perm_atoms, perm = permuted(atoms, 11)
    e, f = evaluate(calc, perm_atoms)
    assert abs(e - e0) <= 1e-10 * max(1.0, abs(e0)) and np.abs(f - f0[perm]).max() <= 1e-9


def test_gradient_forces_and_stress_match_finite_differences():
    atoms = _rattled("c_triclinic_NiAlO")
    calc = calculator("gemnet_oc_small_grad")
    a = atoms.copy()
    a.calc = calc
    forces, stress = a.get_forces(), a.get_stress()
    idx = [0, 2, 5]
    fd = fd_forces(atoms, calc, h=1e-4, indices=idx)
    np.testing.assert_allclose(forces[idx], fd[idx], atol=1e-6 * np.abs(forces).max())
    np.testing.assert_allclose(stress, fd_stress(atoms, calc, h=1e-5), atol=1e-6 * np.abs(stress).max())


def test_forces_coupled_conserve_momentum_and_intensive_energy_is_mean():
    hp = dict(EXPECTED["fixtures"]["gemnet_oc_small_direct"]["hparams"])
    state = model("gemnet_oc_small_direct").state_dict()
    atoms = _rattled("a_cu111_2x2x3_O")
    graph = calculator("gemnet_oc_small_direct").build_graph(atoms)
    outs = {}
    for key, extra in {"plain": {}, "coupled": {"forces_coupled": True}, "intensive": {"extensive": False}}.items():
        m = GemNetOC.from_config({**hp, **extra}).double()
        m.load_state_dict(state)
        with torch.no_grad():
            outs[key] = m(graph)
    # F_st = F_ts: the two directions of an edge cancel in the sum over atoms
    assert outs["coupled"]["forces"].sum(0).abs().max() <= 1e-10
    assert outs["plain"]["forces"].sum(0).abs().max() > 1e-3
    torch.testing.assert_close(outs["intensive"]["energy"] * len(atoms), outs["plain"]["energy"])
    torch.testing.assert_close(outs["intensive"]["forces"], outs["plain"]["forces"])


# ------------------------------------------------------------------------------------------------ workflows
#: a tiny random GemNet-OC with gradient forces; max_neighbors never binds, so its energy is smooth
TINY = dict(
    num_spherical=3, num_radial=6, num_blocks=1, emb_size_atom=8, emb_size_edge=8, emb_size_trip_in=4,
    emb_size_trip_out=4, emb_size_quad_in=4, emb_size_quad_out=4, emb_size_aint_in=4, emb_size_aint_out=4,
    emb_size_rbf=4, emb_size_cbf=4, emb_size_sbf=4, num_before_skip=1, num_after_skip=1, num_concat=1, num_atom=1,
    num_output_afteratom=1, cutoff=4.0, cutoff_qint=3.0, cutoff_aeaint=3.5, cutoff_aint=4.5, max_neighbors=64,
    max_neighbors_qint=64, max_neighbors_aeaint=64, max_neighbors_aint=64, quad_interaction=True,
    atom_edge_interaction=True, edge_atom_interaction=True, atom_interaction=True, qint_tags=[1, 2],
    sbf={"name": "legendre_outer"}, direct_forces=False,
)  # fmt: skip


def tiny_model() -> GemNetOC:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = GemNetOC(**TINY)
    m.normalizers = {"energy": (0.0, 0.5), "forces": (0.0, 0.5)}
    return m


def o_on_cu111():
    """Rattled 2x2x3 Cu(111) with O in the fcc site; OC20 tags (0 bottom layer, 1 top layers, 2 adsorbate).
    Rattled: in an ideal lattice quadruplets have collinear edges whose dihedral angle (as in fairchem) has an
    ill-defined gradient."""
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0, a=3.61)
    add_adsorbate(slab, "O", 1.2, "fcc")
    z = slab.positions[:, 2]
    tags = np.where(z > z[:12].min() + 0.5, 1, 0)
    tags[-1] = 2
    slab.set_tags(tags)
    slab.rattle(0.05, seed=2)
    return slab


@pytest.mark.slow
def test_bfgs_relaxation_and_molecular_dynamics_through_the_calculator():
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import BFGS

    m = tiny_model()
    slab = o_on_cu111()
    tags = slab.get_tags()
    # relax the O atom on the frozen slab
    slab.set_constraint(FixAtoms(mask=tags < 2))
    slab.calc = GemNetOCCalculator(m, device="cpu", dtype=torch.float64)
    e0 = slab.get_potential_energy()
    opt = BFGS(slab, logfile=None)
    assert opt.run(fmax=0.01, steps=100)
    assert 0 < opt.get_number_of_steps() < 100 and slab.get_potential_energy() < e0
    assert np.linalg.norm(slab.get_forces()[-1]) < 0.01
    # NVE with forces = -dE/dx conserves the total energy
    slab.set_constraint(FixAtoms(mask=tags == 0))
    thermalize_momenta(slab, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(slab, 0.5 * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(slab.get_total_energy()), interval=5)
    dyn.run(40)
    assert np.ptp(energies) < 1e-5
    # 200 Langevin steps in float32
    slab.calc = GemNetOCCalculator(m, device="cpu", dtype=torch.float32)
    dyn = Langevin(slab, 1.0 * units.fs, temperature_K=300, friction=0.05, fixcm=False, rng=np.random.default_rng(1))
    temps = []
    dyn.attach(lambda: temps.append(slab.get_temperature()), interval=10)
    dyn.run(200)
    assert np.isfinite(slab.positions).all() and np.isfinite(slab.get_forces()).all()
    assert 50 < np.mean(temps[5:]) < 1000


# ------------------------------------------------------------------------------------------------ option variants
#: small fairchem models covering the options the public fixtures lack (see gemnet_oc_make_variants.py)
VARIANTS = json.loads((DATA / "gemnet_oc_variants.json").read_text())
VARIANT_STRUCTURES = {a.info["name"]: a for a in ase.io.read(DATA / "gemnet_oc_variant_structures.extxyz", index=":")}
VARIANT_CASES = [(v, s) for v, entry in VARIANTS["variants"].items() for s in entry["structures"]]


@pytest.mark.parametrize("variant, name", VARIANT_CASES)
def test_variant_parity_float64(variant, name):
    stored = torch.load(DATA / "gemnet_oc_variants.pt", weights_only=True)[variant]
    m = GemNetOC.from_config(stored["hparams"])
    m.load_checkpoint_state(stored["state_dict"])
    std = VARIANTS["std"]
    m.normalizers = {"energy": (0.0, std), "forces": (0.0, std)}
    atoms = STRUCTURES[name] if name in STRUCTURES else VARIANT_STRUCTURES[name]
    r = VARIANTS["variants"][variant]["structures"][name]
    energy, forces = evaluate(GemNetOCCalculator(m, device="cpu", dtype=torch.float64), atoms)
    assert abs(energy - r["energy"]) <= 1e-6
    assert np.abs(forces - np.array(r["forces"])).max() <= 1e-6


@pytest.mark.parametrize("fixture", FIXTURES)
def test_isolated_atoms_are_additive(fixture):
    """Atoms beyond every cutoff do not interact: E(C + O far apart) = E(C) + E(O) - mean, zero forces."""
    from ase import Atoms

    mean = model(fixture).normalizers["energy"][0]
    calc = calculator(fixture)
    e_c, _ = evaluate(calc, Atoms("C", positions=[[0, 0, 0]]))
    e_o, _ = evaluate(calc, Atoms("O", positions=[[0, 0, 0]]))
    e_co, f_co = evaluate(calc, Atoms("CO", positions=[[0, 0, 0], [15, 0, 0]], tags=[2, 2]))
    assert e_co == pytest.approx(e_c + e_o - mean, abs=1e-10) and not f_co.any()


def test_nonstrict_subselection_keeps_degenerate_shells():
    """With enforce_max_neighbors_strictly=False every neighbour within d_(k+1) + 0.01 Å is kept: on rattled
    fcc Pt the whole second shell (18 neighbours) for max_neighbors=14, the first shell (12) for qint's 8."""
    stored = torch.load(DATA / "gemnet_oc_variants.pt", weights_only=True)["nonstrict"]
    m = GemNetOC.from_config(stored["hparams"])
    atoms = VARIANT_STRUCTURES["g_pt_bulk_degenerate"]
    idx = m.build_indices(GemNetOCCalculator(m, device="cpu", dtype=torch.float64).build_graph(atoms))
    n = len(atoms)
    assert idx.main.num == 18 * n and idx.qint.num == 12 * n and idx.a2ee2a.num == 18 * n and idx.a2a.num == 42 * n


def test_unknown_config_keys_are_ignored_with_a_log_line(caplog):
    hp = dict(EXPECTED["fixtures"]["gemnet_oc_small_direct"]["hparams"], some_future_option=3, num_targets=1)
    with caplog.at_level("INFO"):
        m = GemNetOC.from_config(hp)
    assert "some_future_option" in caplog.text and m.cutoff == 6.0 and m.max_neighbors == 50 and m.strict_max_neighbors


def test_inference_fast_path_equals_autograd_path():
    """Without autograd the model overwrites temporaries in place; the numbers must be the same to rounding.

    In-place and out-of-place kernels may take different SIMD paths (tails, alignment), so the comparison allows a
    few float32 ulps instead of demanding identical bits."""
    m = model("gemnet_oc_small_direct")
    calc = calculator("gemnet_oc_small_direct")
    graph = calc.build_graph(STRUCTURES["a_cu111_2x2x3_O"])
    with torch.no_grad():
        fast = calc.model(graph)
    graph.pos.requires_grad_(True)
    with torch.enable_grad():
        slow = calc.model(graph)
    assert m.direct_forces and slow["forces"].requires_grad
    for key in ("energy", "forces"):
        ref = slow[key].detach()
        tol = 16 * torch.finfo(ref.dtype).eps * max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(fast[key], ref, rtol=0, atol=tol)
