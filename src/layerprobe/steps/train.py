"""Train step: sweep one probe's grid on one feature cache (scored on val), refit the best on train+val per seed."""

from __future__ import annotations

import dataclasses
import math

from layerprobe import per_layer, truncation
from layerprobe.config import (
    FORMATS,
    HISTORY_FILE,
    PROBE_CONFIG,
    PROBE_WEIGHTS,
    SWEEP_FILE,
    TRAIN_MARKER,
    PathsConfig,
    ProbeConfig,
    TrainConfig,
)
from layerprobe.device import dtype_name, resolve_device, resolve_matmul_dtype
from layerprobe.files import begin_output, pause_point, read_json, swap_in, write_json
from layerprobe.fingerprint import Fingerprint, listed_files, make_fingerprint, provenance_record, staleness


def train_fingerprint(probe_name: str, probe: ProbeConfig, train: TrainConfig, *, features_hash: str) -> Fingerprint:
    """The probe and its overrides, the recipe with its resolved precision, and the feature cache's content."""
    precision = dtype_name(resolve_matmul_dtype(train.precision, resolve_device(train.device)))
    params = {
        "probe": probe_name,
        "overrides": probe.overrides(),
        "train": train.fingerprint_params(matmul_precision=precision),
    }
    return make_fingerprint(__name__, format=FORMATS["probes"], params=params, inputs={"features": features_hash})


def train_step(
    backbone_name: str,
    dataset_name: str,
    probe_name: str,
    *,
    probe: ProbeConfig,
    train: TrainConfig,
    paths: PathsConfig,
) -> dict:
    """Train (or reuse) probe `probe_name` on the (backbone, dataset) feature cache.

    Writes `seed-<s>/` (probe.safetensors + probe.json, sweep.json with every config's validation scores,
    history.json with the refit's curves) per seed, then `train.json` last as the completion marker, into a staging
    folder that replaces the probe's folder whole once complete (`layerprobe.files.begin_output`).
    """
    from layerprobe.features import cache_content_hash

    if probe_name == truncation.TRUNCATED_PROBE:  # trained from alf's selection, with its own scan
        return truncation.truncated_train_step(backbone_name, dataset_name, probe=probe, train=train, paths=paths)
    features_dir = paths.features_dir(backbone_name, dataset_name)
    features_hash = cache_content_hash(features_dir)  # fails naming the folder when extraction has not run
    fingerprint = train_fingerprint(probe_name, probe, train, features_hash=features_hash)
    out_dir = paths.probe_dir(backbone_name, dataset_name, probe_name)
    marker = paths.train_marker(backbone_name, dataset_name, probe_name)
    reason = staleness(marker, fingerprint)
    if reason is None:
        return {**read_json(marker), "status": "reused", "reason": None}
    if probe_name == per_layer.PER_LAYER:  # every layer's probes at once, its best one saved as the standard probe
        task = {"backbone_name": backbone_name, "dataset_name": dataset_name, "features_hash": features_hash}
        return per_layer.train_family(
            **task, probe=probe, train=train, paths=paths, fingerprint=fingerprint, reason=reason
        )

    from layerprobe.checkpoint import save_probe
    from layerprobe.features import num_patch_tokens, read_manifest
    from layerprobe.probes import gather_raw, get_probe_spec, reading_widths, select_token_positions, token_labels
    from layerprobe.selection import PREDICT_ROWS, open_selection
    from layerprobe.train import make_grid, sweep_selected

    staging = begin_output(out_dir, fingerprint.value, marker=TRAIN_MARKER)  # the old probe stays whole until swapped
    spec = get_probe_spec(probe_name, **probe.overrides())
    metadata = read_manifest(features_dir)["provenance"]
    layer_names, token_names = metadata["layer_names"], metadata["token_names"]
    # Patch tokens are read only for a probe that needs them (a cache without them fails here, in one line).
    num_patches = num_patch_tokens(features_dir) if spec.reads_patches else 0
    positions = select_token_positions(
        layer_names, token_names, layers=spec.layers, tokens=spec.tokens, num_patches=num_patches
    )
    width, token_widths = reading_widths(spec, metadata.get("layer_widths"), positions)
    # Train and val rows in one tensor, read shard by shard: the cache itself is never held in memory whole, and the
    # sweep, its validation and the refit all use views of this one selection, for every seed. A selection that does
    # not fit in memory stays in the cache and is read batch by batch (the reference plan's batches can exceed
    # train.batch_size by up to a fifth; the validation pass reads up to PREDICT_ROWS at a time).
    selection = open_selection(
        features_dir,
        splits=["train", "val"],
        select=lambda tokens, patches: gather_raw(tokens, positions, patches=patches, width=width),
        patches=spec.reads_patches,
        batch_rows=lambda counts: max(math.ceil(1.25 * train.batch_size), min(PREDICT_ROWS, counts["val"])),
    )
    num_classes = len(metadata["class_names"])
    # Attention dropout only exists in attentive heads; a linear probe sweeps lr x wd alone.
    grid = make_grid(train.lrs, train.weight_decays, train.attn_dropouts if spec.head == "attentive" else [0.0])
    device = resolve_device(train.device)
    training = {"device": device.type, "precision": dtype_name(resolve_matmul_dtype(train.precision, device))}
    per_seed = []
    for seed in train.seeds:
        result = sweep_selected(
            spec,
            selection.features,
            selection.labels,
            num_train=selection.counts["train"],
            num_classes=num_classes,
            grid=grid,
            config=train,
            seed=seed,
            token_widths=token_widths,
        )
        seed_dir, staged = paths.seed_dir(backbone_name, dataset_name, probe_name, seed), staging / f"seed-{seed}"
        best = dataclasses.asdict(result.best)
        config = {
            "probe": probe_name,
            "spec": _spec_dict(spec),
            "best": best,
            "seed": seed,
            "num_classes": num_classes,
            "class_names": metadata["class_names"],
            "token_labels": token_labels(layer_names, token_names, positions),
            "positions": [list(p) for p in positions],
            "width": width,  # tokens are read at this width (a narrower final layer unpadded), None: all of D
            "normalize": spec.normalize,  # how the read tokens are normalised (checkpoint.reading_arguments)
            "patch_tokens": spec.reads_patches,  # the probe needs the cache's final-layer patch tokens
            "features": {"path": str(features_dir), "content_hash": features_hash},
            "provenance": metadata,
            "training": training,
        }
        save_probe(staged, result.probe, config)
        write_json(staged / SWEEP_FILE, {"best": best, "configs": result.val_scores})
        write_json(staged / HISTORY_FILE, result.history)
        best_val = max(score["balanced_accuracy"] for score in result.val_scores)
        per_seed.append({"seed": seed, "dir": str(seed_dir), "best": best, "val_balanced_accuracy": best_val})
    summary = {
        "probe": probe_name,
        "seeds": per_seed,
        "features_hash": features_hash,
        "training": training,
        "format": FORMATS["probes"],
        "files": listed_files(
            staging,
            [
                f"seed-{seed}/{name}"
                for seed in train.seeds
                for name in (PROBE_WEIGHTS, PROBE_CONFIG, SWEEP_FILE, HISTORY_FILE)
            ],
        ),
        "fingerprint": fingerprint.as_dict(),
        "recorded": provenance_record(),
    }
    write_json(staging / TRAIN_MARKER, summary)
    pause_point(f"train-swap-{probe_name}")
    swap_in(staging, out_dir)
    return {**summary, "status": "computed", "reason": reason}


def _spec_dict(spec) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}
