"""mlcalc.nn.linear: nn.Linear with oneDNN's prepacked product for CPU inference.

Oracle: torch.nn.functional.linear (MKL sgemm) on the same tensors; float32 products of a few hundred terms agree to
~1e-6 relative, so the tolerances below are a few float32 ulps of the output scale.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import mlcalc.nn.linear as lin
from mlcalc.nn.linear import Linear, linear, onednn_linear_available
from mlcalc.precision import Bfloat16Linears, cpu_has_bfloat16

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="torch build without oneDNN linear")
F32 = dict(rtol=1e-5, atol=1e-5)


def _layer(inp: int = 96, out: int = 80, bias: bool = True, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    return Linear(inp, out, bias=bias)


def test_state_dict_and_type_match_nn_linear():
    layer = _layer()
    ref = nn.Linear(96, 80)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(7, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), **F32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (37, 96), (1088, 96), (3, 5, 96)])
def test_inference_matches_functional_linear(bias, shape):
    layer = _layer(bias=bias)
    x = torch.randn(*shape)
    ref = nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        out = layer(x)
        out_silu = layer(x, silu=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **F32)
    torch.testing.assert_close(out_silu, nn.functional.silu(ref), **F32)


def test_non_contiguous_input():
    layer = _layer()
    x = torch.randn(96, 40).T  # (40, 96), transposed strides
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), **F32)


@needs_onednn
def test_inference_uses_a_prepacked_weight_and_autograd_does_not():
    layer = _layer()
    x = torch.randn(20, 96)
    y = layer(x)  # autograd records (parameters require grad): plain path, nothing packed
    assert y.requires_grad
    assert layer.weight not in lin._PACKED
    with torch.no_grad():
        layer(x)
    assert layer.weight in lin._PACKED


@needs_onednn
def test_in_place_weight_change_repacks():
    layer = _layer()
    x = torch.randn(20, 96)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2.0)
        after = layer(x)
        torch.testing.assert_close(after, nn.functional.linear(x, layer.weight, layer.bias), **F32)
        assert not torch.allclose(before, after)
        other = _layer(seed=1)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), nn.functional.linear(x, other.weight, other.bias), **F32)


@needs_onednn
def test_views_of_a_weight_are_packed_per_view_and_follow_it():
    torch.manual_seed(2)
    weight = nn.Parameter(torch.randn(64, 3 * 32))
    x = torch.randn(30, 32)
    with torch.no_grad():
        parts = [linear(x, weight[:, 32 * k : 32 * (k + 1)]) for k in range(3)]
        for k, part in enumerate(parts):
            torch.testing.assert_close(part, x @ weight[:, 32 * k : 32 * (k + 1)].T, **F32)
        assert len(lin._PACKED[weight]) == 3
        weight[:, 32:64] = 0.0
        assert torch.count_nonzero(linear(x, weight[:, 32:64])) == 0


def test_gradients_match_nn_linear():
    layer = _layer()
    ref = nn.Linear(96, 80)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(11, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x, silu=True).square().sum().backward()
    nn.functional.silu(ref(x_ref)).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **F32)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **F32)


def test_float64_and_empty_inputs_take_the_plain_path():
    layer = _layer().double()
    x = torch.randn(5, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-12, atol=1e-12)
        assert layer(torch.zeros(0, 96, dtype=torch.float64)).shape == (0, 80)
    with torch.no_grad():
        assert _layer()(torch.zeros(0, 96)).shape == (0, 80)


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="CPU without bfloat16 arithmetic")
def test_bfloat16_mode_keeps_its_arithmetic():
    """Inside Bfloat16Linears the packed path equals the mode's own F.linear: bfloat16 operands and product."""
    layer = _layer()
    x = torch.randn(50, 96)
    with torch.no_grad(), Bfloat16Linears():
        out = layer(x)
        plain = nn.functional.linear(x, layer.weight, layer.bias)  # the mode's path
    expected = (x.bfloat16() @ layer.weight.bfloat16().T).float() + layer.bias
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)


@needs_onednn
def test_models_with_packed_weights_deepcopy_and_pickle():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(4, 96))
    clone = copy.deepcopy(layer)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"weight", "bias"}
    with torch.no_grad():
        torch.testing.assert_close(clone(torch.ones(2, 96)), layer(torch.ones(2, 96)), **F32)


@needs_onednn
def test_moving_a_layer_replaces_its_packed_weight():
    """``.double().float()`` moves the weight's data: the packed copy follows it and the old one is dropped."""
    layer = _layer()
    x = torch.randn(8, 96)
    with torch.no_grad():
        layer(x)
        layer.double().float()
        layer.weight.mul_(0.5)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), **F32)
    assert len(lin._PACKED[layer.weight]) == 1
