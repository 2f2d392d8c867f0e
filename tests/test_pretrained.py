"""Released checkpoints by name: registry facts, the download cache (served from 127.0.0.1) and loading each name.

Every registry entry is served as a small fairchem-format fixture of its family and configuration, so the name
path (download, cache, verify, load, calculator) runs for all 19 names without the real files: the fairchem-made
fixtures of the released configurations (tests/data/released_variants*: Large block layout, ODAC graph, IS2RE
energy-only, OC22 with elementrefs, eSCN mmax 3, ODAC eSCN; the non-strict variant for the nsn name), else the
public fixtures (legacy direct GemNet-OC, eSCN, SCN t1-b1 / t4-b2) with OC22 / energy-only markers. Every name must
reproduce fairchem 1.10's float64 numbers for its fixture to 1e-6 eV and eV/Å.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

import mlcalc
from mlcalc import pretrained
from mlcalc.calculator import ESCNCalculator, GemNetOCCalculator, load_calculator
from mlcalc.testing import LocalFileServer

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "expected.json").read_text())["fixtures"]
STRUCTURE = ase.io.read(DATA / "structures.extxyz", index=0)
STRUCTURE_NAME = STRUCTURE.info["name"]

FAIRCHEM_REGISTRY_NAMES = [  # fairchem-core 1.10 pretrained_models.json, GemNet-OC / eSCN / SCN entries
    "GemNet-OC-S2EF-OC20-2M", "GemNet-OC-S2EF-OC20-All", "GemNet-OC-S2EF-OC20-All+MD",
    "GemNet-OC-Large-S2EF-OC20-All+MD", "SCN-S2EF-OC20-2M", "SCN-t4-b2-S2EF-OC20-2M", "SCN-S2EF-OC20-All+MD",
    "eSCN-L4-M2-Lay12-S2EF-OC20-2M", "eSCN-L6-M2-Lay12-S2EF-OC20-2M", "eSCN-L6-M2-Lay12-S2EF-OC20-All+MD",
    "eSCN-L6-M3-Lay20-S2EF-OC20-All+MD", "GemNet-OC-S2EFS-OC22", "GemNet-OC-S2EFS-OC20+OC22",
    "GemNet-OC-S2EFS-nsn-OC20+OC22", "GemNet-OC-S2EFS-OC20->OC22", "GemNet-OC-S2EF-ODAC", "eSCN-S2EF-ODAC",
    "Gemnet-OC-IS2RE-ODAC", "eSCN-IS2RE-ODAC",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ fixtures
VARIANTS = json.loads((DATA / "gemnet_oc_variants.json").read_text())
VARIANT_STRUCTURES = {a.info["name"]: a for a in ase.io.read(DATA / "gemnet_oc_variant_structures.extxyz", index=":")}


RELEASED = torch.load(DATA / "released_variants.pt", weights_only=True)
RELEASED_EXPECTED = json.loads((DATA / "released_variants.json").read_text())["variants"]
RELEASED_STRUCTURES = {a.info["name"]: a for a in ase.io.read(DATA / "released_variants_structures.extxyz", ":")}
#: registry names served with the fairchem-made fixture of their own configuration (tests/data/released_variants*)
RELEASED_FOR = {
    "GemNet-OC-Large-S2EF-OC20-All+MD": "gemnet_oc_released_layout",
    "GemNet-OC-S2EF-ODAC": "gemnet_oc_odac",
    "Gemnet-OC-IS2RE-ODAC": "gemnet_oc_is2re",
    "GemNet-OC-S2EFS-OC22": "gemnet_oc_oc22_elementrefs",
    "eSCN-L6-M3-Lay20-S2EF-OC20-All+MD": "escn_l6_m3",
    "eSCN-S2EF-ODAC": "escn_odac",
    "eSCN-IS2RE-ODAC": "escn_is2re",
}


def _fixture_for(entry: pretrained.PretrainedCheckpoint) -> tuple[dict, Atoms, float, np.ndarray | None]:
    """A small fairchem-format checkpoint of the entry's family and variant, a structure, and fairchem 1.10's
    float64 energy (eV) and forces (eV/Å; None for energy-only models) for that checkpoint and structure."""
    if entry.name in RELEASED_FOR:
        key = RELEASED_FOR[entry.name]
        structure_name, ref = next(iter(RELEASED_EXPECTED[key]["structures"].items()))
        atoms = RELEASED_STRUCTURES.get(structure_name)
        if atoms is None:
            atoms = next(a for a in ase.io.read(DATA / "structures.extxyz", ":") if a.info["name"] == structure_name)
        forces = np.array(ref["forces"]) if "forces" in ref else None
        return copy.deepcopy(RELEASED[key]), atoms, ref["energy"], forces
    if "nsn" in entry.name:  # non-strict max_neighbors: the fairchem-made "nonstrict" GemNet-OC variant
        stored = torch.load(DATA / "gemnet_oc_variants.pt", weights_only=True)["nonstrict"]
        std = torch.tensor(VARIANTS["std"])
        ckpt = {
            "state_dict": {f"module.{k}": v for k, v in stored["state_dict"].items()},
            "normalizers": {"energy": {"mean": torch.tensor(0.0), "rmsd": std},
                            "forces": {"mean": torch.tensor(0.0), "rmsd": std}},
            "config": {"model": {"name": "gemnet_oc", **stored["hparams"]}, "task": {"dataset": "oc22_lmdb"}},
        }
        ref = VARIANTS["variants"]["nonstrict"]["structures"]["g_pt_bulk_degenerate"]
        return ckpt, VARIANT_STRUCTURES["g_pt_bulk_degenerate"], ref["energy"], np.array(ref["forces"])
    if entry.family == "gemnet_oc":
        base = "gemnet_oc_small_direct" if entry.forces == "direct" else "gemnet_oc_small_grad"
    elif entry.family == "escn":
        base = "escn_small"
    else:
        base = "scn_small_t1" if "t4-b2" not in entry.name else "scn_small"
    ckpt = copy.deepcopy(torch.load(DATA / f"{base}.pt", weights_only=True))
    cfg = ckpt["config"]
    model_cfg = cfg["model"] if isinstance(cfg["model"], dict) else cfg.setdefault("model_attributes", {})
    if entry.forces == "none":  # energy-only: the same weights without a force head give the same energy
        model_cfg["regress_forces"] = False
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "force_block" not in k}
        ckpt["normalizers"] = {k: v for k, v in ckpt["normalizers"].items() if k in ("energy", "target")}
    if entry.energy == "total":
        cfg.setdefault("task", {})["dataset"] = "oc22_lmdb"
    ref = EXPECTED[base]["structures"][STRUCTURE_NAME]
    return ckpt, STRUCTURE, ref["energy_f64"], np.array(ref["forces_f64"])


def _serialise(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served() -> Iterator[LocalFileServer]:
    server = LocalFileServer()
    for name in pretrained.available():
        entry = pretrained.info(name)
        server.files[entry.path] = _serialise(_fixture_for(entry)[0])
    yield server
    server.close()


@pytest.fixture()
def env(served, tmp_path, monkeypatch) -> LocalFileServer:
    """An empty cache in tmp_path, downloads from the local server, a fresh request log."""
    monkeypatch.setenv("MLCALC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLCALC_PRETRAINED_URL", served.url)
    monkeypatch.delenv("MLCALC_OFFLINE", raising=False)
    served.requests.clear()
    served.truncate.clear()
    return served


# ------------------------------------------------------------------------------------------------ registry facts
def test_available_lists_fairchems_19_names_with_their_spelling() -> None:
    assert sorted(pretrained.available()) == sorted(FAIRCHEM_REGISTRY_NAMES)
    assert "Gemnet-OC-IS2RE-ODAC" in pretrained.available()  # lower-case "Gemnet", as fairchem spells it


@pytest.mark.parametrize("name", FAIRCHEM_REGISTRY_NAMES)
def test_each_entry_has_its_facts(name: str) -> None:
    e = pretrained.info(name)
    assert e.family in {"gemnet_oc", "escn", "scn"}
    assert e.family == {"GemNet-OC": "gemnet_oc", "Gemnet-OC": "gemnet_oc", "eSCN": "escn", "SCN": "scn"}[
        name.split("-S2EF")[0].split("-IS2RE")[0].split("-Large")[0].split("-t4")[0].split("-L")[0]
    ]
    assert e.task == ("IS2RE" if "IS2RE" in name else "S2EF")
    assert e.energy == ("total" if "OC22" in name else "adsorption")
    assert e.forces in {"direct", "gradient", "none"}
    assert (e.forces == "none") == (e.task == "IS2RE")
    assert e.url.startswith("https://dl.fbaipublicfiles.com/") and e.url.endswith(".pt")
    assert e.data in {"OC20 2M", "OC20 All", "OC20 All+MD", "OC22", "OC20+OC22", "OC20->OC22", "ODAC23"}
    assert e.sources, "every fact needs a source"
    facts = e.as_dict()
    assert facts["stress"] == (e.forces == "gradient")


def test_entries_sharing_a_file_name_are_cached_apart(tmp_path) -> None:
    a = pretrained.info("GemNet-OC-S2EFS-OC20+OC22")
    b = pretrained.info("GemNet-OC-S2EFS-nsn-OC20+OC22")
    assert a.filename == b.filename == "gnoc_oc22_oc20_all_s2ef.pt"
    assert pretrained.cached_path(a.name, tmp_path) != pretrained.cached_path(b.name, tmp_path)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(KeyError, match="GemNet-OC-S2EF-OC20-All\\+MD"):
        pretrained.info("GemNet-OC-S2EF-OC20-AllMD")
    with pytest.raises(FileNotFoundError, match="did you mean 'eSCN-L6-M2-Lay12-S2EF-OC20-2M'"):
        mlcalc.load_model("eSCN-L6-M2-Lay12-S2EF-OC20-M2")
    assert pretrained.info("gemnet-oc-s2ef-oc20-all+md").name == "GemNet-OC-S2EF-OC20-All+MD"


# ------------------------------------------------------------------------------------------------ download cache
def test_download_once_then_cache_hits(env, tmp_path) -> None:
    name = "eSCN-L4-M2-Lay12-S2EF-OC20-2M"
    path = pretrained.get_checkpoint(name, progress=False)
    entry = pretrained.info(name)
    assert path == tmp_path / "cache" / "pretrained" / Path(*entry.path.split("/"))
    assert path.read_bytes() == env.files[entry.path]
    record = path.with_name(path.name + ".sha256").read_text().split()[0]
    assert record == hashlib.sha256(env.files[entry.path]).hexdigest()
    assert pretrained.get_checkpoint(name) == path
    mlcalc.load_model(name)
    assert env.requests == [entry.path]
    assert not [p for p in path.parent.iterdir() if p.suffix in (".partial", ".tmp")]


def test_cache_dir_argument_and_mirror_argument(env, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLCALC_PRETRAINED_URL", "http://127.0.0.1:9/")  # nothing listens on the discard port
    path = pretrained.get_checkpoint("SCN-S2EF-OC20-2M", cache_dir=tmp_path / "elsewhere", base_url=env.url)
    assert path.is_relative_to(tmp_path / "elsewhere")


def test_interrupted_download_leaves_nothing(env) -> None:
    entry = pretrained.info("SCN-S2EF-OC20-All+MD")
    env.truncate.add(entry.path)
    with pytest.raises(pretrained.DownloadError, match="broke off|incomplete"):
        pretrained.get_checkpoint(entry.name, progress=False)
    path = pretrained.cached_path(entry.name)
    assert not path.exists()
    assert not list(path.parent.glob("*")), "no partial file may stay behind"
    env.truncate.clear()
    assert pretrained.get_checkpoint(entry.name, progress=False).read_bytes() == env.files[entry.path]


def test_corrupt_cache_is_never_used(env) -> None:
    name = "GemNet-OC-S2EF-OC20-2M"
    path = pretrained.get_checkpoint(name, progress=False)
    good = path.read_bytes()
    path.write_bytes(good[:-10] + b"0123456789")  # same size, different content
    again = pretrained.get_checkpoint(name, progress=False)
    assert again.read_bytes() == good
    assert len(env.requests) == 2


def test_error_page_and_pinned_sha_mismatch_are_refused(env, monkeypatch) -> None:
    entry = pretrained.info("GemNet-OC-S2EF-ODAC")
    saved = env.files[entry.path]
    env.files[entry.path] = b"<html><body>Access denied</body></html>"
    try:
        with pytest.raises(pretrained.DownloadError, match="did not return a torch checkpoint"):
            pretrained.get_checkpoint(entry.name, progress=False)
    finally:
        env.files[entry.path] = saved
    assert not pretrained.cached_path(entry.name).exists()
    pinned = pretrained.PretrainedCheckpoint(**{**entry.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(pretrained.REGISTRY, entry.name, pinned)
    with pytest.raises(pretrained.DownloadError, match="sha256"):
        pretrained.get_checkpoint(entry.name, progress=False)
    assert not pretrained.cached_path(entry.name).exists()


def test_http_error_and_no_network_name_the_url_and_the_manual_path(env, monkeypatch) -> None:
    entry = pretrained.info("eSCN-S2EF-ODAC")
    saved = env.files.pop(entry.path)
    try:
        with pytest.raises(pretrained.DownloadError, match="HTTP 404") as err:
            pretrained.get_checkpoint(entry.name, progress=False)
        assert entry.path in str(err.value) and str(pretrained.cached_path(entry.name)) in str(err.value)
    finally:
        env.files[entry.path] = saved
    monkeypatch.setenv("MLCALC_PRETRAINED_URL", "http://127.0.0.1:9/")
    with pytest.raises(pretrained.DownloadError, match="cannot reach http://127.0.0.1:9/") as err:
        pretrained.get_checkpoint(entry.name, progress=False)
    assert "place it at" in str(err.value)


def test_offline_uses_the_cache_and_never_the_network(env, monkeypatch) -> None:
    name = "SCN-t4-b2-S2EF-OC20-2M"
    monkeypatch.setenv("MLCALC_OFFLINE", "1")
    with pytest.raises(pretrained.DownloadError, match="not cached .* downloads are off"):
        pretrained.get_checkpoint(name)
    assert env.requests == []
    path = pretrained.get_checkpoint(name, offline=False, progress=False)
    assert pretrained.get_checkpoint(name) == path and len(env.requests) == 1


def test_hand_placed_file_is_accepted_and_recorded(env) -> None:
    entry = pretrained.info("eSCN-L6-M2-Lay12-S2EF-OC20-2M")
    path = pretrained.cached_path(entry.name)
    path.parent.mkdir(parents=True)
    path.write_bytes(env.files[entry.path])
    assert pretrained.get_checkpoint(entry.name, offline=True) == path
    assert path.with_name(path.name + ".sha256").exists() and env.requests == []


# ------------------------------------------------------------------------------------------------ loading by name
@pytest.mark.parametrize("name", FAIRCHEM_REGISTRY_NAMES)
def test_every_name_loads_and_reproduces_its_fixture(env, name: str) -> None:
    entry = pretrained.info(name)
    _, structure, ref_energy, ref_forces = _fixture_for(entry)
    calc = load_calculator(name, device="cpu", dtype="float64")
    assert calc.model.registry_name == entry.family
    assert calc.info["pretrained"] == entry.name and calc.info["energy"] == entry.energy
    atoms = structure.copy()
    atoms.calc = calc
    assert abs(atoms.get_potential_energy() - ref_energy) <= 1e-6
    if entry.forces == "none":
        assert ref_forces is None
        assert calc.implemented_properties == ["energy", "free_energy"]
        with pytest.raises(PropertyNotImplementedError, match="energy-only"):
            atoms.get_forces()
        assert any("IS2RE" in n for n in calc.info["notes"])
    else:
        assert np.abs(atoms.get_forces() - ref_forces).max() <= 1e-6
    if entry.energy == "total":
        assert any("total energies" in n for n in calc.info["notes"])
        assert not any("adsorption-referenced" in n for n in calc.info["notes"])
    if "nsn" in name:
        assert calc.model.strict_max_neighbors is False


def test_family_calculators_accept_names(env) -> None:
    calc = GemNetOCCalculator("GemNet-OC-S2EF-OC20-All+MD", device="cpu")
    assert calc.info["checkpoint"].endswith("gemnet_oc_base_s2ef_all_md.pt")
    with pytest.raises(ValueError, match="expects a escn model"):
        ESCNCalculator("GemNet-OC-S2EF-OC20-All+MD", device="cpu")
    assert mlcalc.read_checkpoint("eSCN-IS2RE-ODAC").metadata["pretrained"]["task"] == "IS2RE"


def test_energy_only_models_predict_energy_only(env) -> None:
    calc = load_calculator("Gemnet-OC-IS2RE-ODAC", device="cpu", dtype="float64")
    out = calc.predict([STRUCTURE.copy(), STRUCTURE.copy()])
    assert [sorted(r) for r in out] == [["energy", "free_energy"]] * 2
    _, structure, ref, _ = _fixture_for(pretrained.info("Gemnet-OC-IS2RE-ODAC"))
    out = calc.predict([structure.copy(), structure.copy()])
    assert abs(out[1]["energy"] - ref) <= 1e-6
    assert "stress" not in calc.implemented_properties


def test_cli_accepts_names_and_lists_the_registry(env, capsys) -> None:
    from mlcalc.cli import main

    assert main(["info", "eSCN-IS2RE-ODAC", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pretrained"] == "eSCN-IS2RE-ODAC" and info["implemented_properties"] == ["energy", "free_energy"]
    assert main(["pretrained"]) == 0
    listing = capsys.readouterr().out
    assert all(n in listing for n in FAIRCHEM_REGISTRY_NAMES)
    assert main(["pretrained", "GemNet-OC-S2EFS-OC22", "--download", "--no-progress"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["energy"] == "total" and facts["cached"] and Path(facts["cached"]).exists()
    assert main(["info", "GemNet-OC-S2EF-OC2O-All"]) == 2
    assert "did you mean" in capsys.readouterr().err
