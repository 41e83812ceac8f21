"""Time an ALF hyperparameter sweep trained as one stacked grid vs the same configs trained one after another.

What: a 4 x 3 (lr x weight decay) `alf` grid on cache-like float16 features (random, 13 cached layers x cls/ap;
alf reads the paper's set, blocks 1-11 + final: 24 tokens, 24 heads, D=384), the paper's recipe (jitter,
clipping, cosine) at batch 512. Both runs use the same seed, so they compute the same 12 probes; the grid shares
batches, normalisation, LN statistics, jitter and the score matmul. Prints both wall times and their ratio
(target <= 0.35), with the probe matmuls in the dtype `--precision` resolves to (auto: bfloat16 where native).

Then it says how low the ratio can go on this machine. With s the shared part of a step and m one member's part,
the ratio is (s + 12 m) / (12 (s + m)); both are read off the two runs' step times. A member's step cannot take
less than its own matmuls (each timed here at its shape, operands contiguous and warm, alone or batched over the
members as the grid computes it, whichever is faster per member) plus its clipping and AdamW update: the "member
floor". The ratio with every member at that floor and the shared part as measured is the lowest any
implementation using this machine's matmul kernels can print (a faster shared part raises it).
How:  python benchmarks/sweep.py [--steps 200 --num-images 5000 --batch 512 --precision auto|float32|bfloat16]
Cost: about 2-3 minutes (bfloat16) or 3-4 minutes (float32) on 2 CPU cores at the defaults; ~1.5 GB RAM.
"""

from __future__ import annotations

import argparse
import time

import torch

from layerprobe.config import PRECISIONS, TrainConfig
from layerprobe.device import flush_denormals, resolve_matmul_dtype
from layerprobe.probes import StackedAttentiveHead, build_probe, get_probe_spec, select_token_positions
from layerprobe.train import StackedAdamW, clip_grad_norm_per_member, make_grid, train_grid


def median_seconds(fn, *, repeats: int = 20) -> float:
    """Median wall time of `fn()` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# One matmul of a member's step: operand shapes, and the axis of each operand that grows with the members when the
# grid computes all of them in one call (None: the operand is the shared tokens, the same for every member).
Matmul = tuple[tuple[int, ...], tuple[int, ...], int, int | None]


def member_matmuls(head: StackedAttentiveHead, batch: int, num_tokens: int) -> list[Matmul]:
    """Every matmul in one member's training step (forward and backward) as the head computes it in the
    reassociated form (docs/design.md "Cost"), with how the grid stacks it over members."""
    b, k, d, h, e, c = batch, num_tokens, head.dim, head.num_heads, head.head_dim, head.num_classes
    return [
        ((h, d), (d, b * k), 0, None),  # scores: folded queries x tokens
        ((h, b * k), (b * k, d), 0, None),  # their gradient: the folded queries'
        ((b, h, k), (b, k, d), 1, None),  # pooling, per image
        ((b, h, d), (b, d, k), 1, None),  # its gradient: the attention weights'
        ((h, b, d), (h, d, e), 0, 0),  # value maps, per head
        ((h, b, e), (h, e, d), 0, 0),  # their input gradient
        ((h, e, b), (h, b, d), 0, 0),  # their weight gradient
        ((1, b, h * e), (1, h * e, d), 0, 0),  # output projection
        ((1, b, d), (1, d, h * e), 0, 0),  # its input gradient
        ((1, d, b), (1, b, h * e), 0, 0),  # its weight gradient
        ((1, b, d), (1, d, c), 0, 0),  # classifier
        ((1, b, c), (1, c, d), 0, 0),  # its input gradient
        ((1, c, b), (1, b, d), 0, 0),  # its weight gradient
    ]


def member_floor_seconds(
    head: StackedAttentiveHead, *, batch: int, num_tokens: int, grid_size: int, dtype: torch.dtype
) -> float:
    """Seconds one grid member's step cannot go below here: each of its matmuls in `dtype`, timed alone and as the
    grid's `grid_size`-member call (per member), whichever is faster, plus its per-member gradient clipping and
    fused AdamW update (`head` must have one member)."""
    generator = torch.Generator().manual_seed(0)

    def seconds(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> float:
        a = torch.randn(a_shape, generator=generator).to(dtype)
        b = torch.randn(b_shape, generator=generator).to(dtype)
        return median_seconds(lambda: torch.matmul(a, b))

    def stacked(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
        return shape if axis is None else shape[:axis] + (shape[axis] * grid_size,) + shape[axis + 1 :]

    matmuls = sum(
        min(seconds(a_shape, b_shape), seconds(stacked(a_shape, a_axis), stacked(b_shape, b_axis)) / grid_size)
        for a_shape, b_shape, a_axis, b_axis in member_matmuls(head, batch, num_tokens)
    )
    params = list(head.parameters())
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer = StackedAdamW(params, weight_decay=torch.tensor([1e-4]))

    def update() -> None:
        clip_grad_norm_per_member(params, 5.0)
        optimizer.step([1e-3])

    return matmuls + median_seconds(update)


def main() -> None:
    flush_denormals()  # as the flows do; both paths measured alike
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--blocks", type=int, default=12, help="cached layers = blocks + final; alf skips block0")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="probe matmul dtype")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    layer_names = [f"block{i}" for i in range(args.blocks)] + ["final"]
    tokens = torch.randn(args.num_images, len(layer_names), 2, args.dim, generator=generator).half()  # [N, L, T, D]
    labels = torch.randint(0, args.classes, (args.num_images,), generator=generator)
    spec = get_probe_spec("alf")
    positions = select_token_positions(layer_names, ["cls", "ap"], layers=spec.layers, tokens=spec.tokens)
    grid = make_grid([1e-1, 1e-2, 1e-3, 1e-4], [1e-4, 1e-2, 1e-1])
    # epochs=1 and min_steps=steps: exactly `steps` steps whatever the batch plan gives per epoch.
    config = TrainConfig(
        epochs=1, min_steps=args.steps, batch_size=args.batch, min_batches=1, device="cpu", precision=args.precision
    )
    matmul_dtype = resolve_matmul_dtype(args.precision, torch.device("cpu"))

    def run(configs: list) -> tuple[float, int]:
        start = time.perf_counter()
        trained = train_grid(
            spec, tokens, labels, positions=positions, num_classes=args.classes, grid=configs, config=config
        )
        return time.perf_counter() - start, trained.steps

    print(
        f"config: {len(grid)} configs, {args.num_images} images, {len(positions)} tokens, D={args.dim}, "
        f"batch {args.batch}, threads {torch.get_num_threads()}"
    )
    print(f"probe matmuls in {matmul_dtype} (--precision {args.precision})")
    together, steps = run(grid)
    print(f"grid at once:          {together:.1f} s ({steps} steps)")
    alone = sum(run([config])[0] for config in grid)
    print(f"one after another:     {alone:.1f} s ({len(grid)} x {steps} steps)")
    print(f"ratio at once / one after another: {together / alone:.3f}  (target <= 0.35)")

    g = len(grid)
    grid_step, lone_step = together / steps, alone / (g * steps)
    member = (grid_step - lone_step) / (g - 1)
    shared = lone_step - member
    if shared <= 0 or member <= 0:  # start-up costs swamp a few steps
        print(f"too few steps ({steps}) to split a step into shared and per-member parts: run more --steps")
        return
    head = build_probe(spec, num_tokens=len(positions), dim=args.dim, num_classes=args.classes)
    floor = member_floor_seconds(head, batch=args.batch, num_tokens=len(positions), grid_size=g, dtype=matmul_dtype)
    best = (shared + g * floor) / (g * (shared + floor))
    print(
        f"per step: grid {grid_step * 1e3:.1f} ms, lone config {lone_step * 1e3:.1f} ms -> shared part "
        f"{shared * 1e3:.1f} ms, per member {member * 1e3:.1f} ms"
    )
    print(
        f"member floor here (its matmuls, alone or batched as the grid does, + clipping + AdamW): {floor * 1e3:.1f} ms"
    )
    print(
        f"ratio with every member at the floor and this shared part: {best:.3f}  "
        f"(member at {floor / member:.0%} of its measured time)"
    )


if __name__ == "__main__":
    main()
