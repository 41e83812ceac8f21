"""Time an ALF hyperparameter sweep trained as one stacked grid vs the same configs trained one after another.

What: a 4 x 3 (lr x weight decay) `alf` grid on cache-like float16 features (random, 13 cached layers x cls/ap;
alf reads the paper's set, blocks 1-11 + final: 24 tokens, 24 heads, D=384), the paper's recipe (jitter,
clipping, cosine) at batch 512. Both runs use the same seed, so they compute the same 12 probes; the grid shares
batches, normalisation, LN statistics, jitter and the score matmul. Prints both wall times and their ratio
(target <= 0.35), with the probe matmuls in the dtype `--precision` resolves to (auto: bfloat16 where native).
How:  python benchmarks/sweep.py [--steps 200 --num-images 5000 --batch 512 --precision auto|float32|bfloat16]
Cost: about 1.5 minutes (bfloat16) or 2.5 minutes (float32) on 2 CPU cores at the defaults; ~1.5 GB RAM.
"""

from __future__ import annotations

import argparse
import time

import torch

from layerprobe.probes import get_probe_spec, select_token_positions
from layerprobe.train import (
    PRECISION_CHOICES,
    TrainSettings,
    flush_denormals,
    make_grid,
    resolve_matmul_dtype,
    train_grid,
)


def main() -> None:
    flush_denormals()  # as the flows do; both paths measured alike
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--blocks", type=int, default=12, help="cached layers = blocks + final; alf skips block0")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help="probe matmul dtype")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    layer_names = [f"block{i}" for i in range(args.blocks)] + ["final"]
    tokens = torch.randn(args.num_images, len(layer_names), 2, args.dim, generator=generator).half()  # [N, L, T, D]
    labels = torch.randint(0, args.classes, (args.num_images,), generator=generator)
    spec = get_probe_spec("alf")
    positions = select_token_positions(layer_names, ["cls", "ap"], layers=spec.layers, tokens=spec.tokens)
    grid = make_grid([1e-1, 1e-2, 1e-3, 1e-4], [1e-4, 1e-2, 1e-1])
    # epochs=1 and min_steps=steps: exactly `steps` steps whatever the batch plan gives per epoch.
    settings = TrainSettings(epochs=1, min_steps=args.steps, batch_size=args.batch, min_batches=1, device="cpu",
                             precision=args.precision, log_every=max(args.steps, 1))  # fmt: skip
    matmul_dtype = resolve_matmul_dtype(args.precision, torch.device("cpu"))

    def run(configs: list) -> tuple[float, int]:
        start = time.perf_counter()
        trained = train_grid(spec, tokens, labels, positions=positions, num_classes=args.classes, grid=configs,
                             settings=settings)  # fmt: skip
        return time.perf_counter() - start, trained.steps

    print(f"config: {len(grid)} configs, {args.num_images} images, {len(positions)} tokens, D={args.dim}, "
          f"batch {args.batch}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"probe matmuls in {matmul_dtype} (--precision {args.precision})")
    together, steps = run(grid)
    print(f"grid at once:          {together:.1f} s ({steps} steps)")
    alone = sum(run([config])[0] for config in grid)
    print(f"one after another:     {alone:.1f} s ({len(grid)} x {steps} steps)")
    print(f"ratio at once / one after another: {together / alone:.3f}  (target <= 0.35)")


if __name__ == "__main__":
    main()
