"""The truncated backbone's speed-up: extraction and the predict path through k of B blocks against all B.

What it does: for each depth k, builds the backbone twice from one probe.json-like config (the way `layerprobe
predict` and alf_truncated's evaluation build it: `layerprobe.layer_evaluation.build_extractor`), full and run
through blocks 0..k-1 only, and an ALF reading the `paper` preset's layers of depth <= k (block1..block{k-1}; random
weights: its cost does not depend on them). It then times, in turns, (a) the extractor's forward and (b) the predict
path after decoding (extractor, token gathering, ALF: `layer_evaluation.classify_pixels`) on one batch of random
images at the model's input size, and prints the median-time ratios full / depth k, in process CPU time (which
other work on a shared CPU cannot skew) and wall-clock, beside the ideal B / k: the figures alf_truncated's
evaluation records (`layer_evaluation.measured_speedup`, the same function).

Run:
    python benchmarks/truncation.py                       # ViT-Ti/16 at 224 px, depths 3, 6, 9 of 12; ~2 min, 2 cores
    python benchmarks/truncation.py --blocks 6 --width 64 --heads 4 --img-size 32 --patch-size 8 --depths 2 3 4 5
                                                          # the default run's backbone (vit_shapes_d6's shape)
    python benchmarks/truncation.py --model vit_base_patch16_224 --width 768 --heads 12 --device cuda --batch-size 128
Cost: per depth, (repeats + 1) x 2 forwards of each backbone.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from layerprobe.layer_evaluation import measured_speedup
from layerprobe.probes import build_probe, extract_member, get_probe_spec, select_token_positions, token_labels


def probe_config(args: argparse.Namespace, depth: int) -> tuple[torch.nn.Module, dict]:
    """An ALF on the paper layers of depth <= `depth` and the probe.json fields the predict path reads."""
    layer_names = [f"block{i}" for i in range(args.blocks)] + ["final"]
    token_names = ["cls", "ap"]
    layers = list(range(1, depth)) if depth < args.blocks else "paper"
    positions = select_token_positions(layer_names, token_names, layers=layers, tokens=token_names)
    spec = get_probe_spec("alf")
    probe = build_probe(spec, num_tokens=len(positions), dim=args.width, num_classes=10)
    config = {
        "provenance": {
            "model": args.model,
            "pretrained": False,
            "model_kwargs": {
                "img_size": args.img_size,
                "patch_size": args.patch_size,
                "depth": args.blocks,
                "embed_dim": args.width,
                "num_heads": args.heads,
            },
            "tap": args.tap,
            "layer_names": layer_names,
        },
        "positions": [list(p) for p in positions],
        "token_labels": token_labels(layer_names, token_names, positions),
        "width": None,
        "normalize": "token",
    }
    return extract_member(probe, 0), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=192, help="the model's embed_dim")
    parser.add_argument("--heads", type=int, default=3, help="the model's attention heads")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--tap", default="norm2", choices=["norm2", "block"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not all(2 <= depth <= args.blocks for depth in args.depths):
        parser.error(f"--depths must lie in 2..{args.blocks}: depth 1 reads none of the paper preset's layers")
    torch.manual_seed(0)
    print(
        f"{args.model} ({args.blocks} blocks, width {args.width}, patch {args.patch_size}) at {args.img_size} px, "
        f"tap {args.tap}, "
        f"batch {args.batch_size}, median of {args.repeats}, {args.device} ({platform.processor() or 'cpu'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'depth':>7} {'ideal B/k':>10} {'extract (cpu, wall)':>20} {'predict (cpu, wall)':>20}")
    started = time.perf_counter()
    for depth in args.depths:
        probe, config = probe_config(args, depth)
        timed = measured_speedup(
            config, probe, depth=depth, batch=args.batch_size, repeats=args.repeats, device=args.device
        )
        cells = [f"{timed['cpu'][name]:>9.2f}x {timed['wall'][name]:>7.2f}x" for name in ("extract", "predict")]
        print(f"{depth:>3}/{args.blocks:<3} {args.blocks / depth:>10.2f} {cells[0]:>20} {cells[1]:>20}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
