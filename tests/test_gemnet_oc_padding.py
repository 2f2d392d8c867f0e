"""GemNet-OC's padded layouts without autograd: one gather (``Aggregation.pad_gather``) gives exactly the zero-fill +
scatter layout of the autograd path, a reused buffer holds each call's values, and one-chunk triplet and neighbour
bases are built once per forward (as fairchem does), not once per interaction block."""

from __future__ import annotations

import pytest
import torch
from test_gemnet_oc_memory import slab, small_model

from mlcalc import GemNetOCCalculator
from mlcalc.models.gemnet_oc import bases as gemnet_bases
from mlcalc.models.gemnet_oc.layers import Aggregation


def layout(seed: int = 0) -> tuple[Aggregation, int]:
    """A ragged grouping of R rows into 9 slots (slot 4 empty), rows sorted by slot, with its kmax."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (9,), generator=g)
    counts[4] = 0
    outer = torch.repeat_interleave(torch.arange(9), counts)
    inner = torch.cat([torch.arange(int(c)) for c in counts])
    kmax = int(counts.max())
    return Aggregation(outer, inner, 9, kmax), outer.shape[0]


def scatter_layout(agg: Aggregation, x: torch.Tensor, s0: int, s1: int, rows) -> torch.Tensor:
    """The autograd path's layout (zero fill, then scatter), computed independently."""
    out = torch.zeros((s1 - s0, agg.kmax, *x.shape[1:]), dtype=x.dtype)
    out[agg.outer[rows] - s0, agg.inner[rows]] = x
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_equals_scatter(dtype: torch.dtype) -> None:
    agg, n_rows = layout()
    x = torch.randn(n_rows, 5, dtype=dtype)
    whole = slice(0, n_rows)
    assert torch.equal(agg.pad_rows(x, 0, 9, whole), scatter_layout(agg, x, 0, 9, whole))
    assert torch.equal(agg.pad_columns(x), scatter_layout(agg, x, 0, 9, whole).transpose(1, 2))
    # a block of slots [3, 7) and its rows
    r0, r1 = int((agg.outer < 3).sum()), int((agg.outer < 7).sum())
    part = slice(r0, r1)
    assert torch.equal(agg.pad_rows(x[part], 3, 7, part), scatter_layout(agg, x[part], 3, 7, part))
    # with an index: rows are src[index[row]]
    src = torch.randn(11, 5, dtype=dtype)
    index = torch.randint(0, 11, (n_rows,))
    expected = scatter_layout(agg, src[index[part]], 3, 7, part)
    assert torch.equal(agg.pad_gather(src, 3, 7, part, index=index), expected)
    # the autograd path is unchanged and agrees
    xg = x.clone().requires_grad_(True)
    assert torch.equal(agg.pad_rows(xg, 0, 9, whole).detach(), scatter_layout(agg, x, 0, 9, whole))


def test_reused_buffer_holds_each_calls_values() -> None:
    agg, n_rows = layout(1)
    whole = slice(0, n_rows)
    a, b = torch.randn(n_rows, 3), torch.randn(n_rows, 3)
    first = agg.pad_gather(a, 0, 9, whole, reuse=True).clone()
    second = agg.pad_gather(b, 0, 9, whole, reuse=True)
    assert torch.equal(first, scatter_layout(agg, a, 0, 9, whole))
    assert torch.equal(second, scatter_layout(agg, b, 0, 9, whole))
    assert len(agg._workspace) == 1  # one buffer served both


def test_padding_without_zeros_gives_the_same_products_with_a_zero_padded_basis() -> None:
    """``zero_pad=False`` fills the padding with src's first row instead of zeros (no zero row appended): the real
    positions are the same, and a product with a zero-padded basis (how sph_m uses it) is unchanged."""
    agg, n_rows = layout(2)
    whole = slice(0, n_rows)
    src = torch.randn(7, 4, dtype=torch.float64)
    index = torch.randint(0, 7, (n_rows,))
    zeros = agg.pad_gather(src, 0, 9, whole, index=index)
    filled = agg.pad_gather(src, 0, 9, whole, index=index, zero_pad=False)
    real = torch.zeros(9, agg.kmax, dtype=torch.bool)
    real[agg.outer, agg.inner] = True
    assert torch.equal(filled[real], zeros[real])
    assert torch.equal(filled[~real], src[0].expand(int((~real).sum()), 4))
    basis = agg.pad_columns(torch.randn(n_rows, 3, dtype=torch.float64))  # (9, 3, kmax), zero in the padding
    torch.testing.assert_close(basis @ filled, basis @ zeros, rtol=0, atol=1e-14)
    empty = torch.zeros(0, 4)  # nothing to copy: zeros after all
    assert (
        torch.count_nonzero(
            Aggregation(agg.outer[:0], agg.inner[:0], 2, 1).pad_gather(empty, 0, 2, slice(0, 0), zero_pad=False)
        )
        == 0
    )


def test_one_chunk_triplet_bases_are_built_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two interaction blocks, three triplet interactions (e2e, a2e, e2a): without chunks, each circular basis's
    angular part is evaluated once per call; with many chunks, per block (so no whole layout exists)."""
    calls = {"n": 0}
    original = gemnet_bases.CircularBasisLayer.angular

    def counting(self, cos_angle):
        calls["n"] += 1
        return original(self, cos_angle)

    monkeypatch.setattr(gemnet_bases.CircularBasisLayer, "angular", counting)
    model = small_model(direct=True)
    atoms = slab()
    results = {}
    for chunk in (None, 37):
        model.chunk_size = chunk
        calls["n"] = 0
        calc = GemNetOCCalculator(model, device="cpu", dtype="float64")
        results[chunk] = (calc.get_potential_energy(atoms.copy()), calc.get_forces(atoms.copy()))
        if chunk is None:
            assert calls["n"] == 3 + 1  # e2e, a2e, e2a, and the quadruplets' input triplets
        else:
            assert calls["n"] > 3 * model.num_blocks
    assert abs(results[None][0] - results[37][0]) < 1e-10
    assert torch.allclose(torch.as_tensor(results[None][1]), torch.as_tensor(results[37][1]), atol=1e-10, rtol=0)
