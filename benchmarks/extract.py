"""Extraction overhead: the full cache-writing path against a bare `forward_features` on the same image tensors.

What it does: generates random, already-transformed images batch by batch from a seeded generator (never N images in
memory at once), then times
  (a) `layerprobe.extract.write_token_shards` — the same tensor-batch loop `extract_features` runs: extractor forward
      at the chosen tap, cls/ap pooling, host copy, Arrow shard writes to a temporary directory;
  (b) a bare `model.forward_features` loop on identical tensors (same inference_mode; with --precision bfloat16 the
      same autocast),
and prints images/s for both, the ratio (a)/(b) and the peak host RSS. The ratio is also given in process CPU time,
which other processes on a shared CPU cannot inflate (on GPU read the wall-clock ratio). A warm-up batch runs first;
CUDA is synchronised before every clock read. Image decoding and resizing are excluded (the DataLoader's job).

Run:
    python benchmarks/extract.py                                   # CPU default: tiny ViT at 64 px, ~10 s on 2 cores
    python benchmarks/extract.py --model vit_base_patch16_224 --img-size 224 --batch-size 256 --device cuda \\
        --num-images 10000                                         # GPU; repeat with 50000: RSS must not grow with N
Cost: 2 x --repeats passes over --num-images images plus a warm-up batch; shards (N x L x 2 x D x 2 bytes) are deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

from layerprobe.backbone import create_backbone
from layerprobe.config import DTYPES, EXTRACT_PRECISIONS, TAPS
from layerprobe.device import resolve_device
from layerprobe.extract import LayerTokenExtractor, ShardPlan, write_token_shards
from layerprobe.features import shard_name


def generate_batches(num_images: int, batch_size: int, img_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Seeded normal images made per batch on the target device, so memory does not grow with num_images."""
    generator = torch.Generator(device=device).manual_seed(0)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        yield torch.randn((count, 3, img_size, img_size), generator=generator, device=device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def time_extraction(
    args: argparse.Namespace, extractor: LayerTokenExtractor, device: torch.device
) -> tuple[float, float]:
    """Wall and process-CPU seconds of the full path."""
    shard_size = 1024
    indices = np.arange(args.num_images, dtype=np.int64)
    plans = [
        ShardPlan(
            file=shard_name(number),
            indices=indices[start : start + shard_size],
            labels=np.zeros(len(indices[start : start + shard_size]), dtype=np.int64),
            splits=np.full(len(indices[start : start + shard_size]), "train", dtype=object),
        )
        for number, start in enumerate(range(0, args.num_images, shard_size))
    ]
    with tempfile.TemporaryDirectory(prefix="layerprobe-bench-") as out_dir:
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        write_token_shards(
            generate_batches(args.num_images, args.batch_size, args.img_size, device),
            extractor=extractor,
            shards=plans,
            out_dir=out_dir,
            metadata={"benchmark": True},
            dtype=args.dtype,
            device=device,
            batch_size=args.batch_size,
            progress=False,
        )
        synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu_start


def time_bare_forward(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> tuple[float, float]:
    """Wall and process-CPU seconds of forward_features alone."""
    bfloat16 = args.precision == "bfloat16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bfloat16 else contextlib.nullcontext()
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode(), autocast:
        for images in generate_batches(args.num_images, args.batch_size, args.img_size, device):
            model.forward_features(images)
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float16", choices=DTYPES)
    parser.add_argument("--tap", default="norm2", choices=TAPS)
    parser.add_argument(
        "--precision", default="float32", choices=EXTRACT_PRECISIONS, help="forward dtype (extract.precision)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best of each is reported")
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict for timm.create_model")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_backbone(args.model, model_kwargs={"img_size": args.img_size, **json.loads(args.model_kwargs)})
    model.to(device)
    extractor = LayerTokenExtractor(model, tap=args.tap, precision=args.precision)
    warm_up = next(generate_batches(args.batch_size, args.batch_size, args.img_size, device))
    extractor(warm_up)
    with torch.inference_mode():
        model.forward_features(warm_up)
    del warm_up

    # Alternate the two paths and keep each one's best round: on a shared machine other processes only ever slow a
    # round down, so the minimum is the least disturbed measurement (timeit's rule).
    # NOTE: on CPU a bare forward_features loop under inference_mode was measured to grow RSS by ~100 MB per 1k images
    # (torch 2.14, timm 1.0.31) while the extraction path stays flat, so the extraction's peak is read before (b) runs.
    full = time_extraction(args, extractor, device)
    extraction_rss = peak_rss_mb()
    bare = (float("inf"), float("inf"))
    for _ in range(args.repeats):
        bare = tuple(map(min, bare, time_bare_forward(args, model, device)))
        full = tuple(map(min, full, time_extraction(args, extractor, device)))
    n = args.num_images
    print(
        f"device={device} model={args.model} img_size={args.img_size} batch={args.batch_size} images={n} "
        f"tap={args.tap} dtype={args.dtype} precision={args.precision} threads={torch.get_num_threads()} "
        f"best of {args.repeats}"
    )
    print(f"(a) extraction + shard writes: {n / full[0]:9.1f} images/s ({full[0]:.2f} s wall, {full[1]:.2f} s CPU)")
    print(f"(b) bare forward_features:     {n / bare[0]:9.1f} images/s ({bare[0]:.2f} s wall, {bare[1]:.2f} s CPU)")
    print(f"ratio (a)/(b): {bare[0] / full[0]:.3f} wall, {bare[1] / full[1]:.3f} CPU time")
    print(f"peak host RSS: {extraction_rss:.0f} MB after (a), {peak_rss_mb():.0f} MB after (b)")


if __name__ == "__main__":
    main()
