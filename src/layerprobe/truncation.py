"""How deep a probe reads, and the truncated ALF: the smallest backbone depth within a margin of alf on val.

Truncation (`alf_truncated`): "depth k" runs blocks 0..k-1 of the B blocks; a cached `block<i>` needs depth i+1 and
`final` (all blocks and the final norm) depth B. For k = 2, 3, ... (the depths of alf's layers; depth 1 reads none
of them), an ALF on alf's layers of depth <= k is trained with alf's selected hyperparameters (no sweep) and scored
on val; the first k within `probes.alf_truncated.truncation_margin` of alf's val balanced accuracy is chosen and
refit on train+val. At depth B it reads alf's layers with alf's recipe, so the scan always ends. The saved probe
is a standard one: evaluate, the registry and `layerprobe predict` read it like any ALF, and predict (like every
probe's) runs the backbone only as deep as the probe reads (`probe_depth`, `layer_evaluation.build_extractor`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from layerprobe.probes import TRAINED_FROM

TRUNCATED_PROBE = "alf_truncated"
FULL_PROBE = TRAINED_FROM[TRUNCATED_PROBE]  # the probe whose selection it starts from


# ---------------------------------------------------------------- depth


def num_blocks(layer_names: Sequence[str]) -> int:
    """B, the backbone's blocks, from a cache's layer axis (block0..block{B-1}, final)."""
    return sum(1 for name in layer_names if re.fullmatch(r"block\d+", name))


def layer_depth(name: str, blocks: int) -> int:
    """Blocks a cached layer needs: `block<i>` i + 1, `final` all `blocks` (and the final norm)."""
    match = re.fullmatch(r"block(\d+)", name)
    if match:
        return int(match.group(1)) + 1
    if name == "final":
        return blocks
    raise ValueError(f"layer {name!r} is neither block<i> nor final")


def probe_depth(config: dict) -> int:
    """The depth a saved probe (its probe.json) needs: that of the deepest layer its slots read."""
    names = config["provenance"]["layer_names"]
    return max(layer_depth(names[layer], num_blocks(names)) for layer, _ in config["positions"])


def layers_read(config: dict) -> int:
    """How many leading layers of the cache layout a probe's backbone yields: its depth, or every layer (the
    final one too) when it needs all blocks. What the logged pyfunc model takes as its layer axis."""
    names = config["provenance"]["layer_names"]
    depth = probe_depth(config)
    return len(names) if depth == num_blocks(names) else depth


# ---------------------------------------------------------------- the depth scan


def token_layers(token_labels: Sequence[str]) -> list[str]:
    """The layer of each selected token: "block3/cls" → "block3", "final/patch7" → "final"."""
    return [label.split("/")[0] for label in token_labels]


def depth_slots(token_labels: Sequence[str], blocks: int) -> dict[int, list[int]]:
    """For each depth k that adds one of the selected tokens' layers: the token indices of depth <= k."""
    depths = [layer_depth(layer, blocks) for layer in token_layers(token_labels)]
    return {k: [t for t, d in enumerate(depths) if d <= k] for k in sorted(set(depths))}


def val_score(spec, features, labels: torch.Tensor, *, num_train: int, num_classes: int, hparams, config, seed: int):
    """Balanced accuracy on val (rows `num_train:`) of a probe with `hparams` trained on train (rows `:num_train`),
    scored as `train.sweep_selected` scores a grid member (its batch plan, its validation jitter)."""
    from sklearn.metrics import balanced_accuracy_score

    from layerprobe.train import predict_selected, train_selected

    trained = train_selected(
        spec,
        features[:num_train],
        labels[:num_train],
        num_classes=num_classes,
        grid=[hparams],
        config=config,
        seed=seed,
        plan_size=len(features),
    )
    predictions, _, _ = predict_selected(
        trained.probe,
        features[num_train:],
        normalize=spec.normalize,
        jitter_std=config.jitter_std if config.jitter_val else 0.0,
        jitter_prob=config.jitter_prob,
        jitter_seed=seed + 3,
    )
    return float(balanced_accuracy_score(labels[num_train:].cpu().numpy(), predictions[0].numpy()))


def scan_depths(
    slots_by_depth: dict[int, list[int]],
    score: Callable[[list[int]], float],
    *,
    target: float,
    margin: float,
) -> tuple[int, list[list]]:
    """The smallest depth whose `score(slots)` >= `target - margin`, scanning upward and stopping there, and the
    [depth, score] pairs scanned. The deepest depth is taken if none is within the margin."""
    scanned: list[list] = []
    for depth, slots in slots_by_depth.items():
        scanned.append([depth, score(slots)])
        if scanned[-1][1] >= target - margin:
            break
    return scanned[-1][0], scanned


def truncated_train_step(backbone_name: str, dataset_name: str, *, probe, train, paths) -> dict:
    """Train (or reuse) alf_truncated on the (backbone, dataset) cache from the trained alf's selection.

    Writes what every train step writes (seed-<s>/ probe.safetensors + probe.json + sweep.json + history.json, then
    train.json last, swapped in whole), train.json with a `truncation` record beside. Its fingerprint holds alf's,
    so retraining alf retrains it.
    """
    from layerprobe.config import FORMATS, HISTORY_FILE, PROBE_CONFIG, PROBE_WEIGHTS, SWEEP_FILE, TRAIN_MARKER
    from layerprobe.device import dtype_name, resolve_device, resolve_matmul_dtype
    from layerprobe.features import cache_content_hash
    from layerprobe.files import begin_output, read_json, swap_in, write_json
    from layerprobe.fingerprint import listed_files, make_fingerprint, provenance_record, staleness, vouch

    features_dir = paths.features_dir(backbone_name, dataset_name)
    features_hash = cache_content_hash(features_dir)
    alf_marker = paths.train_marker(backbone_name, dataset_name, FULL_PROBE)
    if not alf_marker.is_file():
        raise FileNotFoundError(f"{TRUNCATED_PROBE} needs {FULL_PROBE} trained first: {alf_marker} is missing")
    alf = read_json(alf_marker)
    if (bad := vouch(alf_marker, alf).first_problem()) is not None:
        raise ValueError(f"probe {FULL_PROBE!r} of {alf_marker.parent}: {bad}; re-run train for it")
    if alf.get("features_hash") != features_hash:
        raise ValueError(f"{alf_marker} was trained on another feature cache; re-run train for {FULL_PROBE}")
    precision = dtype_name(resolve_matmul_dtype(train.precision, resolve_device(train.device)))
    params = {
        "probe": TRUNCATED_PROBE,
        "margin": probe.margin,
        "train": train.fingerprint_params(matmul_precision=precision),
    }
    fingerprint = make_fingerprint(
        "layerprobe.steps.train",
        format=FORMATS["probes"],
        params=params,
        inputs={"features": features_hash, FULL_PROBE: alf["fingerprint"]["value"]},
    )
    out_dir = paths.probe_dir(backbone_name, dataset_name, TRUNCATED_PROBE)
    marker = out_dir / TRAIN_MARKER
    reason = staleness(marker, fingerprint)
    if reason is None:
        return {**read_json(marker), "status": "reused", "reason": None}

    from layerprobe.checkpoint import save_probe
    from layerprobe.probes import ProbeSpec, gather_raw, reading_widths
    from layerprobe.selection import PREDICT_ROWS, open_selection
    from layerprobe.train import HParams, sweep_selected

    seeds = {entry["seed"]: entry for entry in alf["seeds"]}
    if sorted(seeds) != sorted(train.seeds):
        raise ValueError(f"{alf_marker} holds seeds {sorted(seeds)}, train.seeds is {train.seeds}; re-run train")
    alf_config = read_json(Path(alf["seeds"][0]["dir"]) / PROBE_CONFIG)
    spec_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in alf_config["spec"].items()}
    alf_spec = ProbeSpec(**{**spec_fields, "name": TRUNCATED_PROBE})
    metadata = alf_config["provenance"]
    layer_names, blocks = metadata["layer_names"], num_blocks(metadata["layer_names"])
    positions = [tuple(p) for p in alf_config["positions"]]
    slots_by_depth = depth_slots(alf_config["token_labels"], blocks)

    def selection(slots: list[int]):
        chosen = [positions[t] for t in slots]
        spec = dataclasses.replace(alf_spec, layers=tuple(dict.fromkeys(li for li, _ in chosen)))
        width, _ = reading_widths(spec, metadata.get("layer_widths"), chosen)
        rows = open_selection(
            features_dir,
            splits=["train", "val"],
            select=lambda tokens, patches: gather_raw(tokens, chosen, width=width),
            batch_rows=lambda counts: max(math.ceil(1.25 * train.batch_size), min(PREDICT_ROWS, counts["val"])),
        )
        return spec, chosen, width, rows

    first = alf["seeds"][0]
    hparams = {seed: HParams(**entry["best"]) for seed, entry in seeds.items()}

    def first_seed_score(slots: list[int]) -> float:
        spec, _, _, rows = selection(slots)
        return val_score(
            spec,
            rows.features,
            rows.labels,
            num_train=rows.counts["train"],
            num_classes=len(metadata["class_names"]),
            hparams=hparams[first["seed"]],
            config=train,
            seed=first["seed"],
        )

    target = first["val_balanced_accuracy"]
    depth, scanned = scan_depths(slots_by_depth, first_seed_score, target=target, margin=probe.margin)
    spec, chosen, width, rows = selection(slots_by_depth[depth])
    record = {
        "depth": depth,
        "blocks": blocks,
        "layers": list(dict.fromkeys(layer_names[li] for li, _ in chosen)),
        "margin": probe.margin,
        "val_by_depth": scanned,
        "full_val_balanced_accuracy": target,
    }
    staging = begin_output(out_dir, fingerprint.value, marker=TRAIN_MARKER)
    device = resolve_device(train.device)
    training = {"device": device.type, "precision": precision}
    per_seed = []
    for seed in train.seeds:
        result = sweep_selected(
            spec,
            rows.features,
            rows.labels,
            num_train=rows.counts["train"],
            num_classes=len(metadata["class_names"]),
            grid=[hparams[seed]],
            config=train,
            seed=seed,
        )
        staged = staging / f"seed-{seed}"
        best = dataclasses.asdict(result.best)
        seed_config = {
            **{k: alf_config[k] for k in ("num_classes", "class_names", "normalize", "patch_tokens", "provenance")},
            "probe": TRUNCATED_PROBE,
            "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()},
            "best": best,
            "seed": seed,
            "token_labels": [alf_config["token_labels"][t] for t in slots_by_depth[depth]],
            "positions": [list(p) for p in chosen],
            "width": width,
            "features": {"path": str(features_dir), "content_hash": features_hash},
            "training": training,
        }
        save_probe(staged, result.probe, seed_config)
        write_json(staged / SWEEP_FILE, {"best": best, "configs": result.val_scores})
        write_json(staged / HISTORY_FILE, result.history)
        seed_dir = paths.seed_dir(backbone_name, dataset_name, TRUNCATED_PROBE, seed)
        val = result.val_scores[0]["balanced_accuracy"]
        per_seed.append({"seed": seed, "dir": str(seed_dir), "best": best, "val_balanced_accuracy": val})
    names = [f"seed-{s}/{n}" for s in train.seeds for n in (PROBE_WEIGHTS, PROBE_CONFIG, SWEEP_FILE, HISTORY_FILE)]
    summary = {
        "probe": TRUNCATED_PROBE,
        "seeds": per_seed,
        "features_hash": features_hash,
        "training": training,
        "truncation": record,
        "format": FORMATS["probes"],
        "files": listed_files(staging, names),
        "fingerprint": fingerprint.as_dict(),
        "recorded": provenance_record(),
    }
    write_json(staging / TRAIN_MARKER, summary)
    swap_in(staging, out_dir)
    return {**summary, "status": "computed", "reason": reason}
