"""``mlcalc.nn.init.skip_init``: ``load_model`` builds models without random initialisation, loads every weight
exactly, and still computes the deterministic construction-time state (buffers, sphere points, Bessel zeros)."""

from __future__ import annotations

from pathlib import Path

import ase.io
import pytest
import torch
from torch import nn

from mlcalc.checkpoint import load_model, read_checkpoint, save_model
from mlcalc.graph import radius_graph
from mlcalc.models.base import MLModel, get_model_class
from mlcalc.models.gemnet_oc.layers import he_orthogonal_init
from mlcalc.models.spherenet import SphereNet
from mlcalc.models.spherenet.blocks import glorot_orthogonal_
from mlcalc.nn.init import init_skipped, skip_init

DATA = Path(__file__).parent / "data"
FIXTURES = ["gemnet_oc_small_grad", "gemnet_oc_small_direct", "escn_small", "escn_multires", "scn_small"]
STRUCTURE = next(a for a in ase.io.read(DATA / "structures.extxyz", index=":") if a.info["name"] == "a_cu111_2x2x3_O")

SPHERENET_SMALL = dict(
    hidden_channels=16, int_emb_size=8, basis_emb_size_dist=4, basis_emb_size_angle=4, basis_emb_size_torsion=4,
    out_emb_channels=16, num_spherical=4, num_radial=4, num_layers=2, num_output_layers=2, cutoff=4.0,
    max_num_neighbors=None,
)  # fmt: skip


def spherenet_checkpoint(tmp_path: Path) -> tuple[Path, SphereNet]:
    torch.manual_seed(0)
    model = SphereNet(**SPHERENET_SMALL).eval()
    path = tmp_path / "spherenet.pt"
    save_model(model, path)
    return path, model


def raw_outputs(model: MLModel) -> dict[str, torch.Tensor]:
    graph = radius_graph(STRUCTURE, model.cutoff, model.max_neighbors, model.strict_max_neighbors)
    graph = graph.to(dtype=torch.float32)
    with torch.no_grad():
        return model(graph)


def built_normally(path: Path) -> MLModel:
    """What ``load_model`` did before ``skip_init``: random initialisation, then the checkpoint's weights."""
    data = read_checkpoint(path)
    model = get_model_class(data.model_name).from_config(data.hparams)
    if data.source_format == "mlcalc":
        model.load_state_dict(data.state_dict, strict=True)
    else:
        model.load_checkpoint_state(data.state_dict, data.scale_dict)
    return model.eval()


def test_skip_init_flag_is_scoped():
    assert not init_skipped()
    with pytest.raises(RuntimeError, match="boom"):
        with skip_init():
            assert init_skipped()
            raise RuntimeError("boom")
    assert not init_skipped()


def test_initialisers_and_torch_layers_draw_no_random_numbers_inside_skip_init():
    weight = torch.full((6, 4), 7.0)
    state = torch.get_rng_state()
    with skip_init():
        he_orthogonal_init(weight)
        glorot_orthogonal_(weight)
        nn.init.kaiming_uniform_(weight)
        nn.init.xavier_uniform_(weight)
        weight.normal_()
        linear, embedding = nn.Linear(64, 32), nn.Embedding(10, 8)
        zeros = nn.init.zeros_(torch.ones(3))  # deterministic fills still run
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(weight, torch.full((6, 4), 7.0))
    assert linear.weight.shape == (32, 64) and embedding.weight.shape == (10, 8)
    assert torch.equal(zeros, torch.zeros(3))
    nn.Linear(4, 4)  # outside: initialised as usual
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fixture", [*FIXTURES, "spherenet"])
def test_load_model_skips_random_initialisation(fixture, tmp_path):
    path = spherenet_checkpoint(tmp_path)[0] if fixture == "spherenet" else DATA / f"{fixture}.pt"
    torch.manual_seed(1)
    state = torch.get_rng_state()
    load_model(path)
    assert torch.equal(torch.get_rng_state(), state), "load_model drew random numbers (initialised the weights)"


@pytest.mark.parametrize("fixture", FIXTURES)
def test_loaded_fixture_equals_checkpoint_and_normal_build(fixture):
    path = DATA / f"{fixture}.pt"
    data = read_checkpoint(path)
    model = load_model(path)
    own = model.state_dict()
    for key, value in data.state_dict.items():
        assert own[key].dtype == value.dtype and torch.equal(own[key], value), key
    for name, value in (data.scale_dict or {}).items():
        assert torch.equal(own[f"{name}.scale_factor"], torch.tensor(float(value), dtype=torch.float32)), name
    # buffers computed at construction (persistent or not) and the outputs equal a normally initialised build
    reference = built_normally(path)
    ref_buffers = dict(reference.named_buffers())
    buffers = dict(model.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    for key, value in buffers.items():
        assert torch.equal(value, ref_buffers[key]), key
    out, ref = raw_outputs(model), raw_outputs(reference)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_spherenet_roundtrip_is_exact(tmp_path):
    path, original = spherenet_checkpoint(tmp_path)
    model = load_model(path)
    assert model.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    for key, value in original.named_buffers():  # Bessel zeros, normalisers, ... (persistent or not)
        assert torch.equal(dict(model.named_buffers())[key], value), key
    out, ref = raw_outputs(model), raw_outputs(original)
    assert torch.equal(out["energy"], ref["energy"])
