"""Checkpoint files: fairchem layouts (legacy, new, prefixes, scale_dict, normalizers) and mlcalc round trip."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from mlcalc import MLCalculator, load_model, read_checkpoint, save_model
from mlcalc.models import LennardJones

DATA = Path(__file__).parent / "data"


def test_legacy_layout_gemnet_direct():
    ck = read_checkpoint(DATA / "gemnet_oc_small_direct.pt")
    assert ck.model_name == "gemnet_oc"
    assert ck.hparams["direct_forces"] is True
    assert not any(k.startswith("module.") for k in ck.state_dict)
    assert not any(k.endswith("scale_factor") for k in ck.state_dict)
    assert ck.scale_dict and all(isinstance(v, float) for v in ck.scale_dict.values())
    assert ck.normalizers["energy"] == (
        float(np.float32(-0.7554450631141663)),
        float(np.float32(2.887317180633545)),
    )
    assert ck.normalizers["forces"] == (0.0, float(np.float32(2.887317180633545)))


def test_new_layout_gemnet_grad_has_scale_factors_in_state_dict_and_ignores_ema():
    ck = read_checkpoint(DATA / "gemnet_oc_small_grad.pt")
    assert ck.model_name == "gemnet_oc" and ck.hparams["direct_forces"] is False
    assert sum(k.endswith(".scale_factor") for k in ck.state_dict) == 25
    assert ck.scale_dict is None
    assert ck.normalizers == {"energy": (-1.5, 1.75), "forces": (0.0, 1.75)}
    raw = torch.load(DATA / "gemnet_oc_small_grad.pt", weights_only=True)
    key = next(k for k in raw["state_dict"] if k.endswith("weight"))
    assert torch.equal(ck.state_dict[key.removeprefix("module.")], raw["state_dict"][key])


@pytest.mark.parametrize(
    "name, model, e_mean, f_std", [("escn_small", "escn", 0.3, 20000.0), ("scn_small", "scn", -0.25, 10000.0)]
)
def test_new_layout_escn_scn_normalizers_are_the_float32_tensors(name, model, e_mean, f_std):
    ck = read_checkpoint(DATA / f"{name}.pt")
    assert ck.model_name == model
    assert ck.normalizers["energy"][0] == float(np.float32(e_mean))  # the tensor, not the config copy
    assert ck.normalizers["forces"] == (0.0, f_std)


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "config": {"model": "x"}, "payload": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(path)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a torch file")
    with pytest.raises(ValueError):
        read_checkpoint(p)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fairchem or mlcalc"):
        read_checkpoint(tmp_path / "other.pt")


def test_mlcalc_format_round_trips_exactly(tmp_path):
    model = LennardJones(sigma=2.1, epsilon=0.3, rc=5.0, ro=3.9)
    model.normalizers = {"energy": (0.5, 2.0)}
    save_model(model, tmp_path / "lj.pt", training_data="none (analytic)")
    back = load_model(tmp_path / "lj.pt")
    assert type(back) is LennardJones and back.hparams == model.hparams
    assert back.normalizers == model.normalizers
    assert back.metadata["training_data"] == "none (analytic)" and back.metadata["cutoff"] == 5.0
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    atoms.rattle(0.05, seed=0)
    e1 = MLCalculator(model, device="cpu", dtype="float64").get_potential_energy(atoms)
    e2 = MLCalculator(tmp_path / "lj.pt", device="cpu", dtype="float64").get_potential_energy(atoms)
    assert e1 == e2


def test_numpy_metrics_in_a_fairchem_file_are_accepted(tmp_path):
    raw = torch.load(DATA / "scn_small.pt", weights_only=True)
    raw["val_metrics"] = {"energy_mae": np.float64(0.25), "hist": np.arange(3.0)}
    torch.save(raw, tmp_path / "np.pt")
    ck = read_checkpoint(tmp_path / "np.pt")
    assert ck.model_name == "scn" and ck.normalizers["forces"] == (0.0, 10000.0)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"Cu\n 1.0\n 0 1.8 1.8\n 1.8 0 1.8\n 1.8 1.8 0\n Cu\n 1\nCartesian\n 0 0 0\n", "text file, first line 'Cu'"),
        (b'{"model": "gemnet_oc"}', "text file"),
        (b"", "empty"),
        (b"\x00\x01\x02binary", "binary file"),
    ],
)
def test_files_that_are_not_torch_checkpoints_say_so(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a torch checkpoint") as err:
        read_checkpoint(path)
    assert message in str(err.value) and "pickled" not in str(err.value)


def test_truncated_checkpoint_is_reported_as_unreadable(tmp_path):
    data = (DATA / "scn_small.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")


# ------------------------------------------------------------------------------------------------ fairchem >= 1.1
def _grad_fixture_with(tmp_path: Path, **changes) -> Path:
    ckpt = torch.load(DATA / "gemnet_oc_small_grad.pt", weights_only=True)
    ckpt.update(changes)
    path = tmp_path / "variant.pt"
    torch.save(ckpt, path)
    return path


def test_fairchem_elementrefs_are_added_after_denormalisation(tmp_path):
    """fairchem 1.10 (ocp_trainer._denorm_preds): E = raw * rmsd + mean + sum_i refs[Z_i]; forces and stress
    unchanged. Oracle: the same file without references (the fairchem fixture) plus the analytic sum."""
    import ase.io

    from mlcalc import GemNetOCCalculator

    table = torch.zeros(119, dtype=torch.float32)
    table[1:] = torch.linspace(-3.0, 2.0, 118)
    path = _grad_fixture_with(tmp_path, elementrefs={"energy": {"element_references": table}})
    assert read_checkpoint(path).element_references[29] == float(table[29])
    atoms = ase.io.read(DATA / "structures.extxyz", index=0)
    with_refs = GemNetOCCalculator(path, device="cpu", dtype="float64")
    plain = GemNetOCCalculator(DATA / "gemnet_oc_small_grad.pt", device="cpu", dtype="float64")
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = with_refs, plain
    shift = sum(float(table[z]) for z in atoms.numbers)
    assert a.get_potential_energy() - b.get_potential_energy() == pytest.approx(shift, abs=1e-9)
    assert np.abs(a.get_forces() - b.get_forces()).max() <= 1e-12
    assert np.abs(a.get_stress() - b.get_stress()).max() <= 1e-12


def test_fairchem_elementrefs_other_targets_are_refused(tmp_path):
    path = _grad_fixture_with(tmp_path, elementrefs={"forces": {"element_references": torch.zeros(119)}})
    with pytest.raises(ValueError, match="energy only"):
        read_checkpoint(path)


def test_normalizers_come_from_the_checkpoint_only(tmp_path):
    """As fairchem's inference-only trainer: config normalize_labels/target_mean are never used; an empty
    ``normalizers`` entry means none; a missing entry with normalize_labels True is refused (fairchem: KeyError)."""
    ckpt = torch.load(DATA / "gemnet_oc_small_direct.pt", weights_only=True)
    assert ckpt["config"]["dataset"]["normalize_labels"]
    ckpt["normalizers"] = {}
    torch.save(ckpt, tmp_path / "empty.pt")
    assert read_checkpoint(tmp_path / "empty.pt").normalizers == {}
    del ckpt["normalizers"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="no 'normalizers' entry"):
        read_checkpoint(tmp_path / "missing.pt")
