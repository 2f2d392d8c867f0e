"""Training: loss decreases, resume == uninterrupted, export reproduces the logged validation MAE through the
calculator, fine-tuning with frozen layers, config checks, the training evaluate == the calculator's evaluate."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from mlcalc import MLCalculator, load_model, read_checkpoint
from mlcalc.graph import radius_graph
from mlcalc.models import get_model_class
from mlcalc.train import TrainConfig, fit
from mlcalc.train.batching import collate, collate_graphs, evaluate_for_training, make_samples
from mlcalc.train.cli import add_train_parser
from mlcalc.train.data import System, generate_emt_dataset, labels, load_split, read_db
from mlcalc.train.ema import EMA

SPHERENET = dict(
    hidden_channels=8, int_emb_size=4, basis_emb_size_dist=4, basis_emb_size_angle=4, basis_emb_size_torsion=4,
    out_emb_channels=8, num_spherical=3, num_radial=4, num_layers=1, num_output_layers=1, cutoff=4.0,
    use_torsion=False,
)  # fmt: skip
GEMNET_OC = dict(
    num_spherical=3, num_radial=4, num_blocks=1, emb_size_atom=8, emb_size_edge=8, emb_size_trip_in=4,
    emb_size_trip_out=4, emb_size_quad_in=4, emb_size_quad_out=4, emb_size_aint_in=4, emb_size_aint_out=4,
    emb_size_rbf=4, emb_size_cbf=4, emb_size_sbf=4, num_before_skip=1, num_after_skip=1, num_concat=1, num_atom=1,
    num_output_afteratom=1, cutoff=4.0, cutoff_qint=3.0, cutoff_aeaint=3.5, cutoff_aint=4.5, max_neighbors=20,
    max_neighbors_qint=8, max_neighbors_aeaint=20, max_neighbors_aint=20, quad_interaction=True,
    atom_edge_interaction=True, edge_atom_interaction=True, atom_interaction=True, qint_tags=[1, 2],
    sbf={"name": "legendre_outer"}, direct_forces=False,
)  # fmt: skip
ESCN = dict(
    num_layers=1, lmax_list=[2], mmax_list=[1], sphere_channels=8, hidden_channels=8, edge_channels=8,
    num_sphere_samples=16, cutoff=4.0, max_neighbors=20,
)  # fmt: skip
SCN = dict(
    num_interactions=1, lmax=2, mmax=1, num_resolutions=1, sphere_channels=8, sphere_channels_reduce=8,
    hidden_channels=8, num_sphere_samples=16, num_basis_functions=8, cutoff=4.0, max_num_neighbors=12,
)  # fmt: skip

#: every element of the held-out systems also occurs in training (the exported model refuses unseen elements)
SYSTEMS = [
    System("Cu", "fcc111", "O"),
    System("Pt", "fcc100", "O"),
    System("Cu", "fcc100", "O"),
    System("Pt", "fcc111", "O"),
    System("Cu", "bulk", "none"),
    System("Pt", "bulk", "none"),
]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """18 frames: 4 train systems (12 frames), 1 val, 1 test (3 frames each), <= 16 atoms."""
    path = tmp_path_factory.mktemp("emt") / "emt.db"
    generate_emt_dataset(path, seed=0, size="tiny", systems=SYSTEMS, max_atoms=16)
    return path


def config(db, out, **kw) -> TrainConfig:
    base = dict(
        train_data=str(db), output_dir=str(out), model="spherenet", model_hparams=SPHERENET, dtype="float64",
        epochs=4, batch_size=4, eval_batch_size=2, lr=3e-3, warmup_steps=2, ema_decay=0.9, seed=1,
    )  # fmt: skip
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(db, tmp_path_factory):
    """One 4-epoch SphereNet run (float64) shared by the export and fine-tuning tests."""
    cfg = config(db, tmp_path_factory.mktemp("run") / "run")
    return cfg, fit(cfg, progress=False)


def test_training_loss_decreases(trained) -> None:
    _, result = trained
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(np.isfinite(row["val_forces_mae"]) for row in result.history)


def test_resume_equals_uninterrupted(db, tmp_path, trained) -> None:
    cfg_full, full = trained
    cfg = cfg_full.replace(output_dir=str(tmp_path / "resumed"))
    first = fit(cfg, progress=False, max_epochs=2)
    assert first.last_epoch == 2
    resumed = fit(cfg, resume=True, progress=False)
    assert resumed.last_epoch == 4
    a = torch.load(full.latest_path, weights_only=True)
    b = torch.load(resumed.latest_path, weights_only=True)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-12, atol=1e-14)
    assert a["schedule"] == b["schedule"] and a["best_epoch"] == b["best_epoch"]
    for row_a, row_b in zip(full.history, resumed.history, strict=True):
        assert row_a["epoch"] == row_b["epoch"]
        assert row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-10)
        assert row_a["val_loss"] == pytest.approx(row_b["val_loss"], rel=1e-10)


def _val_maes(db, calc) -> tuple[float, float, float]:
    """(energy MAE eV, energy MAE eV/atom, force MAE eV/Å) of the val split, one structure at a time via ASE."""
    e_err, e_atom_err, f_err = [], [], []
    for atoms in load_split(db, "val"):
        energy, forces = labels(atoms)
        atoms.calc = calc
        e_err.append(abs(atoms.get_potential_energy() - energy))
        e_atom_err.append(e_err[-1] / len(atoms))
        f_err.append(np.abs(atoms.get_forces(apply_constraint=False) - forces).ravel())
    return float(np.mean(e_err)), float(np.mean(e_atom_err)), float(np.concatenate(f_err).mean())


def test_exported_checkpoint_reproduces_logged_validation(db, trained) -> None:
    cfg, result = trained
    best = next(row for row in result.history if row["epoch"] == result.best_epoch)
    logged = (best["val_energy_mae"], best["val_energy_per_atom_mae"], best["val_forces_mae"])
    # the file's float64 weights in a float64 model: the calculator gives the logged numbers to rounding
    data = read_checkpoint(result.best_model_path)
    exact = get_model_class(data.model_name).from_config(data.hparams).double()
    exact.load_state_dict(data.state_dict)
    exact.normalizers = data.normalizers
    exact.element_references = data.element_references
    assert _val_maes(db, MLCalculator(exact, device="cpu", dtype="float64")) == pytest.approx(logged, rel=1e-9)
    # mlcalc.load_model keeps float32 weights (as for every checkpoint): equal to float32 rounding
    model = load_model(result.best_model_path)
    calc = MLCalculator(model, device="cpu", dtype="float64")
    assert _val_maes(db, calc) == pytest.approx(logged, rel=1e-5)
    meta = read_checkpoint(result.best_model_path).metadata
    assert meta["elements"] == sorted({s for a in load_split(db, "train") for s in a.get_chemical_symbols()})
    assert meta["metrics"]["epoch"] == result.best_epoch
    assert meta["training_config"] == cfg.to_dict() and meta["training_data"]["n_train"] == 12
    assert set(model.normalizers) == {"energy", "forces"}
    assert "stress" in calc.implemented_properties  # gradient forces: stress from the strain derivative


def test_finetune_with_frozen_layers(db, tmp_path, trained) -> None:
    _, result = trained
    start = load_model(result.best_model_path)
    cfg = TrainConfig(
        train_data=str(db), output_dir=str(tmp_path / "ft"), init_checkpoint=str(result.best_model_path),
        freeze=["init_e.*", "init_v.*"], normalizers="keep", epochs=2, batch_size=4, lr=1e-2, dtype="float64",
        train_select="facet=fcc111", val_select="split=val",
    )  # fmt: skip
    tuned = fit(cfg, progress=False)
    after = load_model(tuned.best_model_path)
    before_sd, after_sd = start.state_dict(), after.state_dict()
    frozen = [k for k in before_sd if k.startswith(("init_e.", "init_v."))]
    assert frozen
    for key in before_sd:
        if key in frozen:
            assert torch.equal(before_sd[key], after_sd[key]), key
    assert any(not torch.equal(before_sd[k], after_sd[k]) for k in before_sd if k not in frozen)
    assert after.normalizers == start.normalizers
    meta = read_checkpoint(tuned.best_model_path).metadata
    assert meta["fine_tuned_from"] == str(result.best_model_path) and set(meta["frozen_parameters"]) == set(frozen)


def test_resume_refuses_changed_config(db, tmp_path) -> None:
    cfg = config(db, tmp_path / "run", epochs=1, max_train=4, max_val=2)
    fit(cfg, progress=False)
    with pytest.raises(ValueError, match=r"config changed \(lr: 0.003 -> 0.001\)"):
        fit(cfg.replace(lr=1e-3), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        fit(cfg, progress=False)
    with pytest.raises(FileNotFoundError, match="latest.pt"):
        fit(cfg.replace(output_dir=str(tmp_path / "none")), resume=True, progress=False)
    done = fit(cfg.replace(device="cpu"), resume=True, progress=False)  # device may change; nothing left to do
    assert done.last_epoch == 1


def test_config_errors(db, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown training config key"):
        TrainConfig.from_dict({"train_data": str(db), "model": "spherenet", "learning_rate": 1.0})
    with pytest.raises(ValueError, match="force_loss"):
        config(db, tmp_path, force_loss="huber")
    with pytest.raises(ValueError, match="keep"):
        config(db, tmp_path, normalizers="keep")
    with pytest.raises(ValueError, match="matches no parameter"):
        fit(config(db, tmp_path / "f", freeze=["no_such_layer.*"]), progress=False)


@pytest.mark.parametrize(
    ("name", "hparams"), [("spherenet", SPHERENET), ("gemnet_oc", GEMNET_OC), ("escn", ESCN), ("scn", SCN)]
)
def test_training_evaluate_matches_calculator(db, name, hparams) -> None:
    torch.manual_seed(0)
    model = get_model_class(name).from_config(hparams).double()
    model.normalizers = {"energy": (1.5, 0.7), "forces": (0.0, 0.7 if not model.direct_forces else 0.3)}
    calc = MLCalculator(model, device="cpu", dtype="float64")
    structures = read_db(db)[:5]
    batch = collate(make_samples(structures, calc))
    direct = calc.build_graph(structures)
    for field in ("pos", "numbers", "cell", "batch", "natoms", "tags", "edge_index", "cell_offsets"):
        assert torch.equal(getattr(batch.graph, field), getattr(direct, field)), field
    ref = calc.evaluate(batch.graph)
    out = evaluate_for_training(model, batch.graph)
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["forces"], ref["forces"], rtol=1e-12, atol=1e-12)
    assert out["forces"].requires_grad  # the force loss reaches the parameters
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["forces"].pow(2).sum(), params, allow_unused=True)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(params) // 2


def test_collate_graphs_equals_radius_graph(db) -> None:
    structures = read_db(db)[:4]
    single = [radius_graph(a, 4.0, 12) for a in structures]
    batched = radius_graph(structures, 4.0, 12)
    merged = collate_graphs(single)
    for field in ("pos", "numbers", "cell", "pbc", "batch", "natoms", "tags", "edge_index", "cell_offsets"):
        assert torch.equal(getattr(merged, field), getattr(batched, field)), field


def test_ema_swap_and_state() -> None:
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, 0.5)
    raw = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)  # d = min(0.5, 2/11): shadow moves 9/11 of the way
    with ema.swapped_in(lin):
        torch.testing.assert_close(lin.weight, raw + 9 / 11)
        with pytest.raises(RuntimeError):
            ema.update(lin)
    torch.testing.assert_close(lin.weight, raw + 1.0)
    other = EMA(lin, 0.5)
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 1


def test_cli_yaml_and_toml(db, tmp_path) -> None:
    pytest.importorskip("yaml")
    hp = json.dumps(SPHERENET)
    (tmp_path / "c.yaml").write_text(
        f"train_data: {db}\nmodel: spherenet\nmodel_hparams: {hp}\nepochs: 3\nlr: 1e-3\nmax_train: 4\nmax_val: 2\n"
    )
    (tmp_path / "c.toml").write_text(
        f'train_data = "{db}"\nmodel = "spherenet"\nepochs = 1\nmax_train = 4\nmax_val = 2\nlog_format = "jsonl"\n'
        "[model_hparams]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in SPHERENET.items())
    )
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="cmd"))
    for name, fmt in (("c.yaml", "csv"), ("c.toml", "jsonl")):
        out = tmp_path / f"out_{fmt}"
        args = parser.parse_args(
            ["train", str(tmp_path / name), "--output-dir", str(out), "--epochs", "1", "--no-progress"]
        )
        assert args.func(args) == 0
        assert (out / "best_model.pt").is_file() and (out / f"log.{fmt}").is_file()
        assert json.loads((out / "config.json").read_text())["epochs"] == 1


def test_finetune_fairchem_checkpoint(db, tmp_path) -> None:
    """A fairchem v1 file (GemNet-OC, direct forces, scale factors) fine-tuned on the EMT data, output blocks only."""
    src = "tests/data/gemnet_oc_small_direct.pt"
    start = load_model(src)
    cfg = TrainConfig(
        train_data=str(db), output_dir=str(tmp_path / "ft"), init_checkpoint=src, model="gemnetoc", epochs=1,
        batch_size=4, max_train=4, max_val=2, normalizers="fit", freeze=["atom_emb.*", "int_blocks.*"],
    )  # fmt: skip
    result = fit(cfg, progress=False)
    tuned = load_model(result.best_model_path)
    assert tuned.direct_forces and tuned.normalizers != start.normalizers
    before, after = start.state_dict(), tuned.state_dict()
    for key in before:
        if key.startswith(("atom_emb.", "int_blocks.")) or key.endswith(".scale_factor"):
            assert torch.equal(before[key], after[key]), key
    meta = read_checkpoint(result.best_model_path).metadata
    assert meta["source"] == "fairchem" and meta["elements"] is None  # the base listed none: not restricted
