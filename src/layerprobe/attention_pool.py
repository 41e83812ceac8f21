"""Attention pooling followed by a per-head value projection, one grid member at a time.

In the reassociated ALF head (docs/design.md "Cost"), every member g and head h pools the tokens with its attention
weights and then projects the pooled vector:

    values[g, b, h, :] = W[g, h] @ (sum_t weights[(g, h), b, t] * tokens[b, t, :])

The two steps batch over different axes: pooling is one small matmul per image (`[H, K] x [K, D]`), the
projection one matmul per head (`[B, D] x [D, E]`), and BLAS batches only over a tensor's outermost axis. So each
member's pooled block `[B, H, D]` is copied once into head-major order between them. Working one member at a time
keeps that block small (9 MB in bfloat16 at batch 512, D=384, 24 heads) where the whole grid's would be 113 MB,
gives the projection its best shape, and writes the output straight into the `[G, B, H*E]` layout the output
projection reads.

The backward pass needs each member's pooled block again. It keeps the forward's copies when they fit in
`KEEP_POOLED_BYTES` (reading one back costs about 0.2 ms per member) and recomputes them otherwise (about 1.4 ms
per member on the project's CPU), so memory stays bounded for large grids and batches.

In float32 the head-major order is a strided view that BLAS batches over directly; oneDNN's bfloat16 matmul
would copy such a batch itself, more slowly, so for bfloat16 the copy is made here, into reused scratch.

Matmuls run in the tokens' dtype (bfloat16 for mixed precision: float32 accumulation, results rounded to
bfloat16); values come out in the tokens' dtype, gradients in their inputs' dtypes.
"""

from __future__ import annotations

import torch

# Pooled blocks kept from the forward pass for the backward pass, at most this many bytes in all.
KEEP_POOLED_BYTES = 1 << 30


class _Scratch:
    """Named scratch tensors, each allocated once per pass and reused by every member."""

    def __init__(self, like: torch.Tensor) -> None:
        self.like, self.tensors = like, {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        if name not in self.tensors:
            self.tensors[name] = self.like.new_empty(shape)
        return self.tensors[name]


def _member_weights(weights: torch.Tensor, heads: slice, dtype: torch.dtype) -> torch.Tensor:
    """One member's attention as per-image matrices `[B, H, K]` in `dtype`."""
    return weights[heads].transpose(0, 1).to(dtype, memory_format=torch.contiguous_format)


def _batches_strided(dtype: torch.dtype) -> bool:
    """Whether matmuls in `dtype` batch over strided matrices as they are (float32 BLAS does; oneDNN's bfloat16
    matmul would copy such a batch itself, more slowly than the one copy made here)."""
    return dtype == torch.float32


def _swap_leading(tensor: torch.Tensor, storage: torch.Tensor) -> torch.Tensor:
    """`tensor` with its two leading axes swapped: a view where batches may be strided, else a copy into `storage`."""
    if _batches_strided(tensor.dtype):
        return tensor.transpose(0, 1)
    return storage.view(tensor.shape[1], tensor.shape[0], tensor.shape[2]).copy_(tensor.transpose(0, 1))


def _pool_by_head(member_weights: torch.Tensor, tokens: torch.Tensor, scratch: _Scratch, storage: torch.Tensor):
    """One member's pooled tokens, head-major `[H, B, D]`, held in `storage` (B*H*D elements)."""
    shape = (*member_weights.shape[:2], tokens.shape[2])  # [B, H, D]
    pooled = storage.view(shape) if _batches_strided(tokens.dtype) else scratch.get("pooled", *shape)
    return _swap_leading(torch.bmm(member_weights, tokens, out=pooled), storage)


class _PoolAndProject(torch.autograd.Function):
    """values `[G, B, H*E]` from weights `[G*H, B, K]`, tokens `[B, K, D]` and value maps `[G*H, E, D]`."""

    @staticmethod
    def forward(
        ctx, weights: torch.Tensor, tokens: torch.Tensor, value_weight: torch.Tensor, num_members: int, keep: bool
    ) -> torch.Tensor:
        num_pools, batch, _ = weights.shape
        num_heads, width, dim, dtype = num_pools // num_members, value_weight.shape[1], tokens.shape[2], tokens.dtype
        keep = keep and num_pools * batch * dim * tokens.element_size() <= KEEP_POOLED_BYTES
        kept = []  # one pooled block per member, freed with the autograd graph
        values = tokens.new_empty(num_members, batch, num_heads * width)
        projection = value_weight.to(dtype).transpose(1, 2)  # [J, D, E]
        scratch = _Scratch(tokens)
        for member in range(num_members):
            heads = slice(member * num_heads, (member + 1) * num_heads)
            size = num_heads * batch * dim
            storage = tokens.new_empty(size) if keep else scratch.get("by_head", size)
            pooled = _pool_by_head(_member_weights(weights, heads, dtype), tokens, scratch, storage)
            if keep:
                kept.append(pooled)
            member_values = torch.bmm(pooled, projection[heads], out=scratch.get("values", num_heads, batch, width))
            values[member].view(batch, num_heads, width).copy_(member_values.transpose(0, 1))
        ctx.save_for_backward(weights, tokens, value_weight, *kept)
        ctx.num_members = num_members
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, tokens, value_weight, *kept = ctx.saved_tensors
        need_weights, need_tokens, need_value_weight, _, _ = ctx.needs_input_grad
        num_pools, batch, _ = weights.shape
        num_members, width, dim, dtype = ctx.num_members, value_weight.shape[1], tokens.shape[2], tokens.dtype
        num_heads = num_pools // num_members
        grad_weights = torch.empty_like(weights) if need_weights else None
        accumulate = torch.promote_types(dtype, torch.float32)  # summed over members: never in bfloat16
        grad_tokens = torch.zeros(tokens.shape, dtype=accumulate, device=tokens.device) if need_tokens else None
        grad_value_weight = torch.empty_like(value_weight) if need_value_weight else None
        value_maps = value_weight.to(dtype)  # [J, E, D]
        tokens_t = tokens.transpose(1, 2)  # [B, D, K]
        scratch = _Scratch(tokens)
        for member in range(num_members):
            heads = slice(member * num_heads, (member + 1) * num_heads)
            recompute = need_value_weight and not kept
            member_weights = _member_weights(weights, heads, dtype) if recompute or need_tokens else None  # [B, H, K]
            grad_member = scratch.get("grad_values", num_heads, batch, width)
            grad_member.copy_(grad_values[member].view(batch, num_heads, width).transpose(0, 1))  # [H, B, E]
            if need_value_weight:
                if recompute:
                    storage = scratch.get("by_head", num_heads * batch * dim)
                    pooled = _pool_by_head(member_weights, tokens, scratch, storage)
                else:
                    pooled = kept[member]
                grad_value_weight[heads] = torch.bmm(grad_member.transpose(1, 2), pooled)  # [H, E, D]
            grad_by_head = scratch.get("grad_by_head", num_heads, batch, dim)
            torch.bmm(grad_member, value_maps[heads], out=grad_by_head)  # [H, B, D]
            grad_pooled = _swap_leading(grad_by_head, scratch.get("grad_pooled", batch * num_heads * dim))
            if need_weights:  # per image [H, D] x [D, K], written back head-major
                grad_weights[heads] = torch.bmm(grad_pooled, tokens_t).transpose(0, 1)
            if need_tokens:
                grad_tokens += torch.bmm(member_weights.transpose(1, 2), grad_pooled)  # [B, K, D]
        grad_tokens = None if grad_tokens is None else grad_tokens.to(dtype)
        return grad_weights, grad_tokens, grad_value_weight, None, None


def pool_and_project(
    weights: torch.Tensor, tokens: torch.Tensor, value_weight: torch.Tensor, *, num_members: int = 1
) -> torch.Tensor:
    """`W[j] @ sum_t weights[j, b, t] tokens[b, t]` for every pool j and image b, member by member.

    Args:
        weights: attention weights `[J, B, K]`, J = num_members x H pools over K tokens, member-major.
        tokens: `[B, K, D]`; its dtype is the matmuls' dtype (e.g. bfloat16 for mixed precision).
        value_weight: one `[E, D]` map per pool, `[J, E, D]`.
        num_members: G, grid members; each member's H pools are projected together.

    Returns:
        `[G, B, H*E]` in the tokens' dtype, heads concatenated as the output projection reads them.
        Differentiable in all three tensors.
    """
    num_pools, batch, num_tokens = weights.shape
    if tokens.shape[:2] != (batch, num_tokens) or value_weight.dim() != 3 or value_weight.shape[0] != num_pools:
        raise ValueError(
            f"pool_and_project: weights {tuple(weights.shape)}, tokens {tuple(tokens.shape)} and "
            f"value_weight {tuple(value_weight.shape)} do not fit [J, B, K], [B, K, D], [J, E, D]"
        )
    if value_weight.shape[2] != tokens.shape[2]:
        raise ValueError(
            f"pool_and_project: value_weight width {value_weight.shape[2]} != token width {tokens.shape[2]}"
        )
    if num_members < 1 or num_pools % num_members:
        raise ValueError(f"pool_and_project: {num_pools} pools do not split into {num_members} members")
    # Pooled blocks serve only the value maps' gradient: keep them when that can be asked for (never when predicting).
    keep = torch.is_grad_enabled() and value_weight.requires_grad
    return _PoolAndProject.apply(weights, tokens, value_weight, num_members, keep)
