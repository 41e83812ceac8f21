"""Attention pooling followed by a per-head value projection, computed in cache-sized blocks of images.

In the reassociated ALF head (DESIGN.md "Cost"), every member g and head h pools the tokens with its attention
weights and then projects the pooled vector:

    values[b, j, :] = W[j] @ (sum_t weights[b, t, j] * tokens[b, t, :])        j = (g, h)

The pooled tensor is `[B, G*H, D]`: 226 MB for a 12-member grid at batch 512, D=384. Written out whole, the
forward and backward pass stream it five times through main memory and the CPU spends most of a step waiting on
it (measured: ~250 of ~310 ms of a 12-member step). This module never materialises it: it works through the
batch a block of images at a time, small enough to stay in cache, and recomputes the block in the backward pass
(one cheap batched matmul) instead of saving it. On CUDA, memory bandwidth is not the limit and one block is the
whole batch.
"""

from __future__ import annotations

import torch

# Pooled block size that measured fastest on the project's 2-core CPU (4 MiB L2 in all): 8 MiB, i.e. 16-32
# images for a 12-member grid. A block several times larger already streams through main memory.
CPU_BLOCK_BYTES = 8 * 2**20


def rows_per_block(num_rows: int, pooled_row_bytes: int, device: torch.device) -> int:
    """Images per block: the whole batch on accelerators, else as many as keep a pooled block near CPU_BLOCK_BYTES."""
    if device.type != "cpu":
        return max(num_rows, 1)
    return max(1, min(num_rows, CPU_BLOCK_BYTES // max(pooled_row_bytes, 1)))


class _BlockBuffers:
    """Block-sized scratch tensors, reused from block to block.

    A fresh multi-megabyte tensor per block would come from new, zero-filled pages of memory each time (the
    allocator hands large blocks back to the system); faulting them in cost as much as the matmul writing them.
    """

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}  # (name, *shape) -> tensor

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of `shape` like `like`, the same one each time this name and shape are asked for."""
        key = (name, *shape)
        if key not in self.tensors:
            self.tensors[key] = like.new_empty(shape)
        return self.tensors[key]


class _PoolAndProject(torch.autograd.Function):
    """values `[B, J, E]` from weights `[B, K, J]`, tokens `[B, K, D]` and value maps `[J, E, D]`, block by block."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, tokens: torch.Tensor, value_weight: torch.Tensor) -> torch.Tensor:
        num_rows, _, num_pools = weights.shape
        step = rows_per_block(num_rows, num_pools * tokens.shape[-1] * tokens.element_size(), tokens.device)
        values = weights.new_empty(num_rows, num_pools, value_weight.shape[1])
        projection = value_weight.transpose(1, 2)  # [J, D, E]
        buffers = _BlockBuffers()
        for start in range(0, num_rows, step):
            rows = slice(start, start + step)
            block_weights = weights[rows].transpose(1, 2)  # [n, J, K]
            pooled_shape = (block_weights.shape[0], num_pools, tokens.shape[2])
            pooled = torch.bmm(block_weights, tokens[rows], out=buffers.get("pooled", pooled_shape, tokens))
            values[rows] = torch.bmm(pooled.transpose(0, 1), projection).transpose(0, 1)  # [n, J, E]
        ctx.save_for_backward(weights, tokens, value_weight)
        ctx.step = step
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, tokens, value_weight = ctx.saved_tensors
        need_weights, need_tokens, need_value_weight = ctx.needs_input_grad
        grad_weights = torch.empty_like(weights) if need_weights else None
        grad_tokens = torch.empty_like(tokens) if need_tokens else None
        grad_value_weight = torch.zeros_like(value_weight) if need_value_weight else None
        buffers = _BlockBuffers()
        for start in range(0, weights.shape[0], ctx.step):
            rows = slice(start, start + ctx.step)
            block_weights = weights[rows].transpose(1, 2)  # [n, J, K]
            grad_block = grad_values[rows].transpose(0, 1)  # [J, n, E]
            count, num_pools = block_weights.shape[:2]
            if need_value_weight:  # the pooled block is recomputed: cheaper than keeping it
                pooled_shape = (count, num_pools, tokens.shape[2])
                pooled = torch.bmm(block_weights, tokens[rows], out=buffers.get("pooled", pooled_shape, tokens))
                grad_value_weight.baddbmm_(grad_block.transpose(1, 2), pooled.transpose(0, 1))  # [J, E, D]
            grad_shape = (num_pools, count, tokens.shape[2])
            grad_pooled = torch.bmm(grad_block, value_weight, out=buffers.get("grad_pooled", grad_shape, tokens))
            grad_pooled = grad_pooled.transpose(0, 1)  # [n, J, D]
            if need_weights:
                grad_weights[rows] = torch.bmm(tokens[rows], grad_pooled.transpose(1, 2))  # [n, K, J]
            if need_tokens:
                grad_tokens[rows] = torch.bmm(block_weights.transpose(1, 2), grad_pooled)  # [n, K, D]
        return grad_weights, grad_tokens, grad_value_weight


def pool_and_project(weights: torch.Tensor, tokens: torch.Tensor, value_weight: torch.Tensor) -> torch.Tensor:
    """`W[j] @ sum_t weights[b, t, j] tokens[b, t]` for every image b and pool j, without the pooled tensor.

    Args:
        weights: attention weights `[B, K, J]` (J pools, e.g. grid members x heads, over K tokens).
        tokens: `[B, K, D]`.
        value_weight: one `[E, D]` map per pool, `[J, E, D]`.

    Returns:
        `[B, J, E]`. Differentiable in all three inputs.
    """
    batch, num_tokens, num_pools = weights.shape
    if tokens.shape[:2] != (batch, num_tokens) or value_weight.dim() != 3 or value_weight.shape[0] != num_pools:
        raise ValueError(
            f"pool_and_project: weights {tuple(weights.shape)}, tokens {tuple(tokens.shape)} and "
            f"value_weight {tuple(value_weight.shape)} do not fit [B, K, J], [B, K, D], [J, E, D]"
        )
    if value_weight.shape[2] != tokens.shape[2]:
        raise ValueError(f"pool_and_project: value_weight width {value_weight.shape[2]} != token width "
                         f"{tokens.shape[2]}")  # fmt: skip
    return _PoolAndProject.apply(weights, tokens, value_weight)
