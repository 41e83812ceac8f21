"""Member-by-member attention-pool + value projection equals the plain einsum, forward and backward."""

from __future__ import annotations

import pytest
import torch

from layerprobe import attention_pool
from layerprobe.attention_pool import pool_and_project


def plain(weights: torch.Tensor, tokens: torch.Tensor, value_weight: torch.Tensor, members: int) -> torch.Tensor:
    """The same function with the whole grid's pooled tensor written out, in the `[G, B, H*E]` output layout."""
    pooled = torch.einsum("jbk,bkd->bjd", weights, tokens)
    values = torch.einsum("bjd,jed->bje", pooled, value_weight)  # [B, J, E]
    batch, pools, width = values.shape
    return values.reshape(batch, members, pools // members * width).transpose(0, 1)


def inputs(dtype: torch.dtype, *, rows: int = 7, tokens: int = 5, pools: int = 6, dim: int = 4, width: int = 3):
    generator = torch.Generator().manual_seed(0)
    shapes = [(pools, rows, tokens), (rows, tokens, dim), (pools, width, dim)]
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("members", [1, 2, 3])
def test_gradients_pass_gradcheck(members):
    weights, tokens, value_weight = inputs(torch.float64)
    assert torch.autograd.gradcheck(
        lambda w, t, v: pool_and_project(w, t, v, num_members=members), (weights, tokens, value_weight)
    )


@pytest.mark.parametrize("members", [1, 2, 6])
def test_equals_plain_forward_and_backward(members):
    ours, theirs = inputs(torch.float32), inputs(torch.float32)
    grad = torch.randn(members, 7, 6 // members * 3, generator=torch.Generator().manual_seed(1))
    out = pool_and_project(*ours, num_members=members)
    expected = plain(*theirs, members)
    assert out.shape == (members, 7, 6 // members * 3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    out.backward(grad)
    expected.backward(grad)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=1e-5)


def test_bfloat16_tokens_compute_in_bfloat16():
    weights, tokens, value_weight = inputs(torch.float32, rows=16, tokens=8, pools=4, dim=64, width=8)
    out = pool_and_project(weights, tokens.bfloat16(), value_weight, num_members=2)
    exact = plain(weights, tokens, value_weight, 2)
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9): close to the float32 result, but not equal to it.
    relative_error = (out.float() - exact).norm() / exact.norm()
    assert 1e-5 < relative_error < 1e-2
    out.sum().backward()
    assert weights.grad.dtype == value_weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputing_pooled_blocks_gives_the_same_gradients_as_keeping_them(monkeypatch, dtype):
    kept, recomputed = inputs(torch.float32), inputs(torch.float32)
    grad = torch.randn(2, 7, 9, generator=torch.Generator().manual_seed(2)).to(dtype)
    pool_and_project(kept[0], kept[1].detach().to(dtype), kept[2], num_members=2).backward(grad)
    monkeypatch.setattr(attention_pool, "KEEP_POOLED_BYTES", 0)  # too small for any block: recompute
    pool_and_project(recomputed[0], recomputed[1].detach().to(dtype), recomputed[2], num_members=2).backward(grad)
    assert torch.equal(kept[0].grad, recomputed[0].grad) and torch.equal(kept[2].grad, recomputed[2].grad)


def test_only_the_needed_gradients_are_computed():
    weights, tokens, value_weight = inputs(torch.float32)
    tokens = tokens.detach()  # data: never needs a gradient
    pool_and_project(weights, tokens, value_weight, num_members=2).sum().backward()
    assert tokens.grad is None and weights.grad is not None and value_weight.grad is not None


def test_mismatched_shapes_are_named():
    weights, tokens, value_weight = inputs(torch.float32)
    with pytest.raises(ValueError, match=r"value_weight \(5, 3, 4\) do not fit \[J, B, K\]"):
        pool_and_project(weights, tokens, value_weight[:5])
    with pytest.raises(ValueError, match="width 2 != token width 4"):
        pool_and_project(weights, tokens, value_weight[..., :2])
    with pytest.raises(ValueError, match="6 pools do not split into 4 members"):
        pool_and_project(weights, tokens, value_weight, num_members=4)
