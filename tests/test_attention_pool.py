"""The blocked attention-pool + value projection equals the plain einsum, forward and backward, in any block size."""

from __future__ import annotations

import pytest
import torch

from layerprobe import attention_pool
from layerprobe.attention_pool import pool_and_project, rows_per_block


def plain(weights: torch.Tensor, tokens: torch.Tensor, value_weight: torch.Tensor) -> torch.Tensor:
    """The same function with the pooled tensor written out whole."""
    pooled = torch.einsum("bkj,bkd->bjd", weights, tokens)
    return torch.einsum("bjd,jed->bje", pooled, value_weight)


def inputs(dtype: torch.dtype, *, rows: int = 7, tokens: int = 5, pools: int = 6, dim: int = 4, width: int = 3):
    generator = torch.Generator().manual_seed(0)
    shapes = [(rows, tokens, pools), (rows, tokens, dim), (pools, width, dim)]
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


@pytest.fixture
def two_rows_per_block(monkeypatch):
    # 7 rows of 6 pools x 4 dims x 8 bytes: blocks of 2 rows, the last one ragged (1 row).
    monkeypatch.setattr(attention_pool, "CPU_BLOCK_BYTES", 2 * 6 * 4 * 8)


def test_blocked_gradients_pass_gradcheck(two_rows_per_block):
    weights, tokens, value_weight = inputs(torch.float64)
    assert rows_per_block(7, 6 * 4 * 8, torch.device("cpu")) == 2
    assert torch.autograd.gradcheck(pool_and_project, (weights, tokens, value_weight))


@pytest.mark.parametrize("block_bytes", [1, 2 * 6 * 4 * 4, 2**30])  # one row, two rows, the whole batch
def test_blocked_equals_plain_forward_and_backward(monkeypatch, block_bytes):
    monkeypatch.setattr(attention_pool, "CPU_BLOCK_BYTES", block_bytes)
    ours, theirs = inputs(torch.float32), inputs(torch.float32)
    grad = torch.randn(7, 6, 3, generator=torch.Generator().manual_seed(1))
    out = pool_and_project(*ours)
    expected = plain(*theirs)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    out.backward(grad)
    expected.backward(grad)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=1e-5)


def test_only_the_needed_gradients_are_computed():
    weights, tokens, value_weight = inputs(torch.float32)
    tokens = tokens.detach()  # data: never needs a gradient
    pool_and_project(weights, tokens, value_weight).sum().backward()
    assert tokens.grad is None and weights.grad is not None and value_weight.grad is not None


def test_block_size_is_the_whole_batch_on_accelerators_and_bounded_on_cpu():
    assert rows_per_block(512, 288 * 384 * 4, torch.device("cuda")) == 512
    on_cpu = rows_per_block(512, 288 * 384 * 4, torch.device("cpu"))
    assert 1 <= on_cpu < 512 and on_cpu * 288 * 384 * 4 <= attention_pool.CPU_BLOCK_BYTES
    assert rows_per_block(3, 10**12, torch.device("cpu")) == 1  # a single huge row still makes progress


def test_mismatched_shapes_are_named():
    weights, tokens, value_weight = inputs(torch.float32)
    with pytest.raises(ValueError, match=r"value_weight \(5, 3, 4\)"):
        pool_and_project(weights, tokens, value_weight[:5])
    with pytest.raises(ValueError, match="width 2 != token width 4"):
        pool_and_project(weights, tokens, value_weight[..., :2])
