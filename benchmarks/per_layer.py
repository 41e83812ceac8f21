"""Time training every per-layer probe of one (backbone, dataset) cache against one `linear_last_cls`, same recipe.

What: cache-like float16 features (random: L cached layers x cls/ap, width D, C classes, N images split 4:1 into
train and val), the recipe's defaults with the given lr x weight-decay grid, steps and batch (defaults: the default
run's shape, vit_shapes_d6's 7 layers x 64 on a 6-class task, its grid and steps). Both runs are
what the train step runs per seed: `linear_last_cls` is `train.sweep_selected` on the final layer's cls (its sweep
on train, scoring on val, the refit on train+val); the family is `per_layer.sweep_family` (the same, for its three token
kinds (cls, ap, cls‖ap) on every layer's cls and ap: 3 x L heads per grid point, sharing every batch and step).
The two take turns (`--repeats` times, the fastest of each kept), so drift in the machine's speed reaches both.
Prints both wall times, their ratio (goal: at most 2x) and the heads each trains, and, for scale, the 3 x L probes
trained one after another (one layer's probe of each kind timed alone, times L).
Threads: 1 by default (`--threads`): on a shared, oversubscribed machine torch's multi-threaded fused AdamW spends
most of its time waiting for threads (measured 100x slower per call at load 10 on 2 cores), whichever run it is.
How:  python benchmarks/per_layer.py [--layers 13 --dim 384 --classes 10 --images 2000 --steps 100 --batch 256
      --lrs 1e-1 1e-2 1e-3 --wds 1e-4 1e-2]
Cost: about a minute on 2 CPU cores at the defaults.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

import torch

from layerprobe.config import TrainConfig
from layerprobe.per_layer import KINDS, sweep_family
from layerprobe.probes import gather_raw, get_probe_spec, select_token_positions
from layerprobe.train import make_grid, sweep_selected


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=7, help="cached layers (block0..block{L-2}, final)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300, help="train.min_steps (the sweep's and the refit's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument("--wds", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    layer_names = [f"block{i}" for i in range(args.layers - 1)] + ["final"]
    tokens = torch.randn(args.images, args.layers, 2, args.dim).half()
    labels = torch.randint(0, args.classes, (args.images,))
    num_train = args.images * 4 // 5
    config = replace(TrainConfig(), epochs=1, min_steps=args.steps, batch_size=args.batch, device="cpu")
    config = replace(config, precision="float32", seeds=[0])
    grid = make_grid(args.lrs, args.wds)

    baseline = get_probe_spec("linear_last_cls")
    last = gather_raw(tokens, select_token_positions(layer_names, ["cls", "ap"], layers="last", tokens=("cls",)))
    family = get_probe_spec("per_layer")
    every = gather_raw(tokens, select_token_positions(layer_names, ["cls", "ap"], layers="all", tokens=("cls", "ap")))

    def linear() -> None:
        sweep_selected(baseline, last, labels, num_train=num_train, num_classes=args.classes, grid=grid, config=config)

    def per_layer() -> None:
        sweep_family(
            family,
            every,
            labels,
            num_train=num_train,
            num_layers=args.layers,
            num_classes=args.classes,
            grid=grid,
            config=config,
            seed=0,
        )

    def one_of_each_kind() -> None:  # layer 0's probe of each kind, trained alone
        for tokens_of_kind in KINDS.values():
            spec = replace(baseline, name="alone", layers=(0,), tokens=tokens_of_kind)
            slots = select_token_positions(layer_names, ["cls", "ap"], layers=spec.layers, tokens=spec.tokens)
            features = gather_raw(tokens, slots)
            sweep_selected(
                spec, features, labels, num_train=num_train, num_classes=args.classes, grid=grid, config=config
            )

    runs = {"linear_last_cls": linear, "per_layer": per_layer, "alone": one_of_each_kind}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    print(f"CPU: {cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(
        f"cache: {args.images} images x {args.layers} layers x cls/ap x D={args.dim}, {args.classes} classes; "
        f"grid {len(grid)} (lr x wd); {args.steps} steps at batch {args.batch}, sweep + val + refit"
    )
    print(f"linear_last_cls: {best['linear_last_cls']:.2f} s ({len(grid)} heads in the sweep)")
    print(f"per_layer:       {best['per_layer']:.2f} s ({3 * args.layers * len(grid)} heads: 3 kinds x L x grid)")
    print(f"ratio per_layer / linear_last_cls: {best['per_layer'] / best['linear_last_cls']:.2f}x (goal <= 2x)")
    print(
        f"for scale, the same {3 * args.layers} probes one after another: {args.layers * best['alone']:.2f} s "
        f"(one of each kind timed alone, x {args.layers}): {args.layers * best['alone'] / best['per_layer']:.1f}x "
        "the family"
    )


if __name__ == "__main__":
    main()
