"""What evaluate adds about layers, and the backbone run only as deep as a probe reads.

Knock-out: a trained attentive probe reading several layers is scored on test with one layer's tokens left out of
its attention (their scores -inf, the softmax renormalised over the rest; no retraining). The drop in balanced
accuracy, with a paired bootstrap interval over test images (the report's gains' resamples and level), says how
much the probe relies on that layer.

The truncated backbone: a saved probe's backbone rebuilt from its probe.json and run through `depth` blocks only
(`truncation.probe_depth`); `layerprobe predict` classifies through it, and alf_truncated's evaluation times it
against the full backbone.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from layerprobe import per_layer
from layerprobe.truncation import TRUNCATED_PROBE, token_layers

TIMING_BATCH = 32  # images per timed forward
TIMING_REPEATS = 5  # timings per depth (the median is kept)
MIN_TIMED_SECONDS = 0.1  # each timing of the full backbone lasts at least this long


# ---------------------------------------------------------------- the backbone as deep as a probe reads


def build_extractor(config: dict, *, depth: int | None = None):
    """The frozen backbone a saved probe's features came from (its probe.json provenance), as a
    `LayerTokenExtractor` running `depth` blocks (None: all)."""
    from layerprobe.backbone import create_backbone
    from layerprobe.extract import LayerTokenExtractor

    source = config["provenance"]
    network = create_backbone(
        source["model"],
        pretrained=bool(source.get("pretrained", False)),
        checkpoint=source.get("checkpoint"),
        model_kwargs=source.get("model_kwargs") or {},
        pos_embed_resample=source.get("pos_embed_resample", "timm"),
    )
    return LayerTokenExtractor(
        network,
        tap=source["tap"],
        final_projection=bool(source.get("final_projection")),
        precision=source.get("precision", "float32"),
        final_patch_tokens=bool(config.get("patch_tokens")),
        depth=depth,
    )


def classify_pixels(extractor, probe: torch.nn.Module, config: dict, pixels: torch.Tensor):
    """Transformed images `[b, 3, H, W]` → (labels `[b]`, logits `[b, C]`): the predict path after decoding."""
    from layerprobe.checkpoint import reading_arguments
    from layerprobe.train import predict

    tokens, patches = extractor.forward_all(pixels)  # [b, L, T, D], [b, P, D_final] or None
    patches = None if patches is None else patches.cpu()
    labels, logits, _ = predict(
        probe, tokens.cpu(), batch_size=len(pixels), patches=patches, **reading_arguments(config)
    )
    return labels, logits


def measured_speedup(
    config: dict,
    probe: torch.nn.Module,
    *,
    depth: int,
    batch: int = TIMING_BATCH,
    repeats: int = TIMING_REPEATS,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Full backbone over depth `depth`: the median time of `repeats` forwards of the extractor ("extract"), and of
    the predict path after decoding ("predict": `classify_pixels` with `probe`), on one batch of random images at
    the model's input size, as {"wall": ratios, "cpu": ratios}. The CPU-time ratio (this process's, every thread)
    is the one other work on a shared machine cannot skew; on a GPU read the wall-clock one. The two depths take
    turns, so drift in the machine's speed reaches both alike; the first forward of each is a warm-up."""
    full = build_extractor(config).to(device)
    truncated = build_extractor(config, depth=depth).to(device)
    height, width = full.model.patch_embed.img_size
    pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    probe = probe.to(device)
    runs = {
        "extract": lambda extractor: extractor.forward_all(pixels),
        "predict": lambda extractor: classify_pixels(extractor, probe, config, pixels),
    }
    speedup: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
    for name, step in runs.items():
        times = {(key, clock): [] for key in ("full", "truncated") for clock in speedup}
        # Each timing runs the step often enough to last MIN_TIMED_SECONDS on the full backbone: a small model's
        # single forward (milliseconds) is within the clocks' and the scheduler's noise.
        once = max(_timed(step, full, device, 1)[0], 1e-6)
        loops = max(1, math.ceil(MIN_TIMED_SECONDS / once))
        for repeat in range(repeats + 1):
            for key, extractor in (("full", full), ("truncated", truncated)):
                wall, cpu = _timed(step, extractor, device, loops)
                if repeat:
                    times[key, "wall"].append(wall)
                    times[key, "cpu"].append(cpu)
        for clock, ratios in speedup.items():
            ratios[name] = statistics.median(times["full", clock]) / statistics.median(times["truncated", clock])
    return speedup


def _timed(step: Callable[[object], object], extractor, device: str, loops: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of `loops` calls of `step(extractor)`, the device's queued work included."""
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(loops):
        step(extractor)
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


# ---------------------------------------------------------------- knock-out


def layer_knockout(
    probes: Sequence[torch.nn.Module],
    features,
    labels: np.ndarray,
    full_predictions: np.ndarray,
    *,
    token_labels: Sequence[str],
    num_classes: int,
    normalize: str = "token",
    batch_size: int = 1024,
) -> dict | None:
    """Each layer's tokens knocked out of attentive `probes` (one per seed) in turn, on test `features` `[N, K, D]`.

    Returns {"layers", "drop", "interval"}: drop = balanced accuracy of `full_predictions` `[S, N]` minus the
    knocked-out one (mean over seeds), with its paired bootstrap interval; None for a probe reading one layer.
    One test-set predict per layer and seed.
    """
    from layerprobe.metrics import paired_bootstrap_gain
    from layerprobe.train import predict_selected

    per_token = token_layers(token_labels)
    layers = list(dict.fromkeys(per_token))
    if len(layers) < 2:
        return None
    drops, intervals = [], []
    for layer in layers:
        keep = torch.tensor([name != layer for name in per_token])
        knocked = np.stack(
            [
                predict_selected(probe, features, batch_size=batch_size, normalize=normalize, keep=keep)[0][0].numpy()
                for probe in probes
            ]
        )
        drop, low, high = paired_bootstrap_gain(labels, full_predictions, knocked, num_classes)
        drops.append(drop)
        intervals.append([low, high])
    return {"layers": layers, "drop": drops, "interval": intervals}


def evaluation_blocks(
    probe_name: str,
    trained: dict,
    probes: Sequence[tuple[torch.nn.Module, dict]],
    test,
    predictions: np.ndarray,
    *,
    batch_size: int,
    features_dir=None,
) -> dict:
    """What the evaluate marker adds for layers: `knockout` for an attentive probe reading several layers
    (`layer_knockout` on the `test` selection, every seed's probe), `truncation` for alf_truncated (its train
    record and the measured speed-up through its depth, `measured_speedup` with the first seed's probe),
    `per_layer` for the per-layer family (every layer's curves, `per_layer.evaluation_block`, on the test split of
    the cache at `features_dir`)."""
    from layerprobe.device import resolve_device

    blocks = {}
    config = probes[0][1]
    if config["head"]["kind"] == "attentive" and not config.get("patch_tokens"):
        knockout = layer_knockout(
            [probe for probe, _ in probes],
            test.features,
            test.labels.numpy(),
            predictions,
            token_labels=config["token_labels"],
            num_classes=config["num_classes"],
            normalize=config.get("normalize", "token"),
            batch_size=batch_size,
        )
        if knockout is not None:
            blocks["knockout"] = knockout
    if probe_name == TRUNCATED_PROBE:
        device = resolve_device("auto").type
        record = dict(trained["truncation"])
        if record["depth"] < record["blocks"]:
            timed = measured_speedup(config, probes[0][0], depth=record["depth"], device=device)
        else:  # every block: the same network as the full one, so nothing to time (a timing would show noise)
            timed = {clock: {"extract": 1.0, "predict": 1.0} for clock in ("wall", "cpu")}
        # Full time / time through the chosen depth. On a CPU the process's CPU time, which other work on a shared
        # machine cannot skew; on a GPU the wall clock, which holds the device's work.
        record["speedup"] = timed["cpu" if device == "cpu" else "wall"]
        record["speedup_wall"] = timed["wall"]
        record["timed_on"] = {"device": device, "batch": TIMING_BATCH, "repeats": TIMING_REPEATS}
        blocks["truncation"] = record
    if probe_name == per_layer.PER_LAYER:
        blocks["per_layer"] = per_layer_curves(
            trained, features_dir, num_classes=config["num_classes"], batch_size=batch_size
        )
    return blocks


# ---------------------------------------------------------------- the per-layer family's curves


def per_layer_curves(trained: dict, features_dir, *, num_classes: int, batch_size: int) -> dict:
    """The evaluate marker's `per_layer` block: every layer's and kind's test balanced accuracy (mean over seeds),
    the first seed's bootstrap interval, the val balanced accuracy (mean over seeds) and the selected head, from the
    seeds' saved families (`per_layer.load_family`) scored on the cache's test split, read once for all of them."""
    from pathlib import Path

    from sklearn.metrics import balanced_accuracy_score

    from layerprobe.files import read_json
    from layerprobe.metrics import bootstrap_balanced_accuracy
    from layerprobe.probes import gather_raw
    from layerprobe.selection import open_selection
    from layerprobe.train import predict_selected

    family = read_json(Path(trained["seeds"][0]["dir"]) / per_layer.FAMILY_CONFIG)
    positions = [tuple(p) for p in family["positions"]]
    test = open_selection(
        Path(features_dir),
        splits=["test"],
        select=lambda tokens, patches: gather_raw(tokens, positions, width=family["width"]),
        batch_rows=batch_size,
    )
    labels = test.labels.numpy()
    record = trained["per_layer"]
    scores: dict[str, list] = {kind: [] for kind in record["kinds"]}
    interval = {}
    for entry in trained["seeds"]:
        head, _ = per_layer.load_family(Path(entry["dir"]))
        predictions = predict_selected(head, test.features, batch_size=batch_size)[0].numpy()  # [3L, N]
        for kind in record["kinds"]:
            by_layer = [predictions[head.index(kind, layer)] for layer in range(len(record["layers"]))]
            scores[kind].append([float(balanced_accuracy_score(labels, p)) for p in by_layer])
            if kind not in interval:  # the first seed's, as the other blocks' intervals
                interval[kind] = [list(bootstrap_balanced_accuracy(labels, p, num_classes)) for p in by_layer]
    return {
        "layers": record["layers"],
        "kinds": record["kinds"],
        "test_balanced_accuracy": {kind: np.mean(s, axis=0).tolist() for kind, s in scores.items()},
        "interval": interval,
        "val_balanced_accuracy": record["val_balanced_accuracy"],
        "selected": record["selected"],
    }
