"""GemNet-OC's bucketed padded products (mlcalc.models.gemnet_oc.buckets) against a direct per-row sum.

Oracle: out[e] = sum over the rows r of group e of outer(first[r], second[r]) (x) m[r], accumulated row by row in
float64 with index_add; the bucketed product adds the same terms (plus exact zeros), so float64 agrees to ~1e-12.
"""

from __future__ import annotations

import pytest
import torch

from mlcalc.models.gemnet_oc.buckets import RATIO, BucketedBasis, BucketPlan
from mlcalc.models.gemnet_oc.layers import Aggregation
from mlcalc.nn.chunking import Chunk
from mlcalc.precision import cpu_has_bfloat16


def ragged(seed: int = 0, size: int = 60) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (size,), generator=g)
    counts[::7] = 0  # empty groups
    counts[3] = 55  # one large group
    outer = torch.repeat_interleave(torch.arange(size), counts)
    starts = torch.cumsum(counts, 0) - counts
    inner = torch.arange(outer.shape[0]) - starts[outer]
    return outer, inner, counts


def reference(outer, first, second, values, size):
    prod = (first[:, :, None] * second[:, None, :]).flatten(1)[:, :, None] * values[:, None, :]  # (R, S, C)
    return torch.zeros((size, *prod.shape[1:]), dtype=prod.dtype).index_add_(0, outer, prod)


def test_plan_covers_every_row_once_with_bounded_padding():
    outer, inner, counts = ragged()
    plan = BucketPlan.of(outer, inner, counts.shape[0])
    assert torch.unique(plan.flat_of_row).shape[0] == outer.shape[0]
    assert int(plan.flat_of_row.max()) < plan.volume
    in_buckets = torch.cat(plan.slots)
    assert sorted(in_buckets.tolist()) == torch.nonzero(counts).flatten().tolist()  # empty groups skipped
    for slots, width in zip(plan.slots, plan.widths, strict=True):
        assert int(counts[slots].max()) == width
        assert int(counts[slots].min()) > RATIO * width
    assert plan.volume < counts.shape[0] * int(counts.max())


@pytest.mark.parametrize("with_index", [False, True])
def test_bucketed_product_equals_the_direct_sum(with_index):
    outer, inner, counts = ragged(1)
    size, rows = counts.shape[0], outer.shape[0]
    g = torch.Generator().manual_seed(2)
    first, second = (
        torch.randn(rows, 4, generator=g, dtype=torch.float64),
        torch.randn(rows, 4, generator=g, dtype=torch.float64),
    )
    plan = BucketPlan.of(outer, inner, size)
    basis = BucketedBasis.outer_product(plan, first, second)
    if with_index:
        table = torch.randn(rows // 2, 5, generator=g, dtype=torch.float64)
        index = torch.randint(0, table.shape[0], (rows,), generator=g)
        out = basis.product(table, size, index=index)
        values = table[index]
    else:
        values = torch.randn(rows, 5, generator=g, dtype=torch.float64)
        out = basis.product(values, size)
    torch.testing.assert_close(out, reference(outer, first, second, values, size), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="CPU without bfloat16 arithmetic")
def test_bucketed_product_in_bfloat16():
    outer, inner, counts = ragged(3)
    size, rows = counts.shape[0], outer.shape[0]
    first, second, values = torch.rand(rows, 4), torch.rand(rows, 4), torch.rand(rows, 5)
    basis = BucketedBasis.outer_product(BucketPlan.of(outer, inner, size), first, second)
    out = basis.product(values, size, bfloat16=True)
    assert out.dtype == torch.float32
    ref = reference(outer, first.double(), second.double(), values.double(), size).float()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_aggregation_plans_buckets_only_for_one_chunk():
    outer, inner, counts = ragged()
    size = counts.shape[0]
    agg = Aggregation(outer, inner, size, int(counts.max()))
    plan = agg.bucket_plan()
    assert plan is not None and agg.bucket_plan() is plan  # kept for the call
    rows = int(counts[:30].sum())
    chunked = Aggregation(
        outer, inner, size, int(counts.max()), chunks=[Chunk(0, 30, 0, rows), Chunk(30, size, rows, outer.shape[0])]
    )
    assert chunked.bucket_plan() is None


def test_one_chunk_direct_force_calls_use_buckets_and_match_the_padded_path(monkeypatch):
    """A direct-force GemNet-OC call in one chunk runs its quadruplet products by buckets; with two chunks (the
    fully padded path) the energy and forces are the same to float64 rounding."""
    from test_gemnet_oc_memory import slab, small_model

    from mlcalc import GemNetOCCalculator
    from mlcalc.calculator import evaluate_model

    model = small_model(direct=True)
    graph = GemNetOCCalculator(model, device="cpu", dtype="float64").build_graph(slab())
    calls = []
    product = BucketedBasis.product
    monkeypatch.setattr(BucketedBasis, "product", lambda self, *a, **k: calls.append(1) or product(self, *a, **k))
    model.chunk_size = None
    bucketed = evaluate_model(model, graph)
    assert len(calls) == model.num_blocks
    model.chunk_size = graph.edge_index.shape[1] // 2 + 1
    padded = evaluate_model(model, graph)
    assert len(calls) == model.num_blocks
    for key in ("energy", "forces"):
        torch.testing.assert_close(bucketed[key], padded[key], rtol=0, atol=1e-10)


def test_repeated_products_reuse_buffers_without_stale_values():
    """Each block of a call multiplies new messages with the same basis: the reused buffers hold each call's
    values (empty groups stay zero)."""
    outer, inner, counts = ragged(4)
    size, rows = counts.shape[0], outer.shape[0]
    first, second = torch.rand(rows, 3, dtype=torch.float64), torch.rand(rows, 3, dtype=torch.float64)
    basis = BucketedBasis.outer_product(BucketPlan.of(outer, inner, size), first, second)
    for seed in range(3):
        values = torch.randn(rows, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        out = basis.product(values, size).clone()
        torch.testing.assert_close(out, reference(outer, first, second, values, size), rtol=1e-12, atol=1e-12)
        assert torch.count_nonzero(out[counts == 0]) == 0


def test_product_with_a_projected_radial_basis():
    """product(m, rad=R) = R[e] @ (the basis-weighted sum of e), computed as (R[e] @ basis[e]) @ m; R's products
    are made once and reused while R is the same tensor (every block of a call)."""
    outer, inner, counts = ragged(5)
    size, rows = counts.shape[0], outer.shape[0]
    g = torch.Generator().manual_seed(6)
    first, second = (torch.randn(rows, 3, generator=g, dtype=torch.float64) for _ in range(2))
    rad = torch.randn(size, 4, 9, generator=g, dtype=torch.float64)
    basis = BucketedBasis.outer_product(BucketPlan.of(outer, inner, size), first, second)
    for seed in range(2):
        values = torch.randn(rows, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = rad @ reference(outer, first, second, values, size)
        torch.testing.assert_close(basis.product(values, size, rad=rad), expected, rtol=1e-12, atol=1e-12)
    kept = basis.projected(rad)
    assert basis.projected(rad) is kept  # made once per rad
