"""One function per pipeline step, composing the library for one unit of work.

Flows (`flows/`) and the CLI (`layerprobe ...`) both call these, so a Prefect task and a command line run do the
same thing. Each takes plain arguments, reads and writes files under explicit paths, and returns a small JSON-able
summary (paths and content hashes, never tensors: Prefect caches and logs these).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from layerprobe.checkpoint import load_probe, save_probe
from layerprobe.data import open_prepared, prepare_dataset
from layerprobe.features import cache_content_hash, read_features, sha256_file
from layerprobe.metrics import classification_metrics, layer_attention_heatmap, summarize_over_seeds
from layerprobe.probes import get_probe_spec, select_token_positions, token_labels
from layerprobe.train import (
    HParams,
    TrainSettings,
    make_grid,
    predict,
    resolve_device,
    resolve_matmul_dtype,
    sweep_probe,
)


def stable_hash(payload: Any) -> str:
    """Short content hash of a JSON-able value (sorted keys), for cache keys and provenance."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically: a temporary name, then rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


# --- prepare ---------------------------------------------------------------------------------------------------


def prepare_step(
    name: str, *, source: str, options: dict, out_dir: Path, val_fraction: float, test_fraction: float, seed: int
) -> dict:
    """Materialise one dataset's splits (and, for small sources, its images) under `out_dir`."""
    prepared = prepare_dataset(
        name,
        source=source,
        options=options,
        out_dir=Path(out_dir),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    return {
        "dataset": name,
        "path": str(prepared.path),
        "version": prepared.version,
        "num_classes": len(prepared.class_names),
        "split_sizes": {split: int(len(ix)) for split, ix in prepared.splits.items()},
    }


# --- extract ---------------------------------------------------------------------------------------------------


def extract_step(
    backbone_name: str,
    dataset_name: str,
    *,
    prepared_dir: Path,
    out_dir: Path,
    model: str,
    pretrained: bool,
    checkpoint: str | None,
    model_kwargs: dict,
    crop_pct: float | None,
    final_projection: bool,
    tap: str,
    dtype: str,
    batch_size: int,
    num_workers: int,
    shard_size: int,
    device: str,
    progress: bool = True,
) -> dict:
    """Run the frozen backbone once over a prepared dataset and write its per-layer cls/ap feature cache."""
    from layerprobe.backbone import create_backbone, create_eval_transform, describe_transform
    from layerprobe.extract import LayerTokenExtractor, extract_features

    prepared = open_prepared(Path(prepared_dir))  # fails on a missing dataset before any model is built
    network = create_backbone(model, pretrained=pretrained, checkpoint=checkpoint, model_kwargs=model_kwargs)
    extractor = LayerTokenExtractor(network, tap=tap, final_projection=final_projection)
    provenance = {
        "backbone": backbone_name,
        "model": model,
        "weights": _weights_tag(model, pretrained=pretrained, checkpoint=checkpoint),
        "pretrained": pretrained,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "model_kwargs": model_kwargs,
        "tap": tap,
        "final_projection": final_projection,
        "crop_pct": crop_pct,
        "transform": describe_transform(network, crop_pct=crop_pct),
        "dataset": dataset_name,
        "dataset_version": prepared.version,
        "class_names": prepared.class_names,
    }
    extract_features(
        images=prepared.dataset,
        splits=prepared.splits,
        extractor=extractor,
        transform=create_eval_transform(network, crop_pct=crop_pct),
        out_dir=Path(out_dir),
        provenance=provenance,
        shard_size=shard_size,
        batch_size=batch_size,
        num_workers=num_workers,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    return {
        "backbone": backbone_name,
        "dataset": dataset_name,
        "path": str(out_dir),
        "content_hash": cache_content_hash(out_dir),
    }


def _weights_tag(model: str, *, pretrained: bool, checkpoint: str | None) -> str:
    if checkpoint:
        return f"file:{Path(checkpoint).name}:{sha256_file(Path(checkpoint))[:12]}"
    return f"pretrained:{model}" if pretrained else "random-init"


# --- train -----------------------------------------------------------------------------------------------------


def train_step(
    probe_name: str,
    *,
    features_dir: Path,
    out_dir: Path,
    probe_overrides: dict,
    lrs: list[float],
    weight_decays: list[float],
    attn_dropouts: list[float],
    seeds: list[int],
    settings: dict,
) -> dict:
    """Sweep a probe's grid on train (scored on val), refit the best on train+val per seed, save each probe.

    Writes `out_dir/seed-<s>/` (probe.safetensors + probe.json), `sweep.json` (every config's validation scores)
    and `history.json` (training curves) per seed, then `out_dir/train.json` last as the completion marker.
    """
    out_dir = Path(out_dir)
    spec = get_probe_spec(probe_name, **probe_overrides)
    train = read_features(Path(features_dir), split="train")
    val = read_features(Path(features_dir), split="val")
    positions = select_token_positions(train.layer_names, train.token_names, layers=spec.layers, tokens=spec.tokens)
    num_classes = len(train.metadata["class_names"])
    # Attention dropout only exists in attentive heads; a linear probe sweeps lr x wd alone.
    dropouts = attn_dropouts if spec.head == "attentive" else [0.0]
    grid = make_grid(lrs, weight_decays, dropouts)
    # About 100 points per training curve in MLflow, whatever the step count.
    settings = {"log_every": max(1, int(settings["min_steps"]) // 100), **settings}
    # What "auto" resolved to on this machine, saved with every probe and logged to MLflow.
    device = resolve_device(settings.get("device", "auto"))
    matmul_dtype = resolve_matmul_dtype(settings.get("precision", "auto"), device)
    training = {"device": device.type, "precision": str(matmul_dtype).removeprefix("torch.")}
    per_seed = []
    for seed in seeds:
        result = sweep_probe(
            spec,
            train.tokens,
            train.labels,
            val_tokens=val.tokens,
            val_labels=val.labels,
            positions=positions,
            num_classes=num_classes,
            grid=grid,
            settings=TrainSettings(**settings, seed=seed),
        )
        seed_dir = out_dir / f"seed-{seed}"
        config = {
            "probe": probe_name,
            "spec": _spec_dict(spec),
            "best": _hparams_dict(result.best),
            "seed": seed,
            "num_classes": num_classes,
            "class_names": train.metadata["class_names"],
            "token_labels": token_labels(train.layer_names, train.token_names, positions),
            "positions": [list(p) for p in positions],
            "features": {"path": str(features_dir), "content_hash": cache_content_hash(Path(features_dir))},
            "provenance": train.metadata,
            "training": training,
        }
        save_probe(seed_dir, result.probe, config)
        write_json(seed_dir / "sweep.json", {"best": _hparams_dict(result.best), "configs": result.val_scores})
        write_json(seed_dir / "history.json", result.history)
        best_val = max(score["balanced_accuracy"] for score in result.val_scores)
        per_seed.append(
            {"seed": seed, "dir": str(seed_dir), "best": _hparams_dict(result.best), "val_balanced_accuracy": best_val}
        )
    summary = {"probe": probe_name, "seeds": per_seed, "features_hash": cache_content_hash(Path(features_dir))}
    write_json(out_dir / "train.json", summary)
    return summary


def _spec_dict(spec: Any) -> dict:
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}


def _hparams_dict(hparams: HParams) -> dict:
    return {"lr": hparams.lr, "weight_decay": hparams.weight_decay, "attn_dropout": hparams.attn_dropout}


# --- evaluate --------------------------------------------------------------------------------------------------


def evaluate_step(*, probe_dir: Path, features_dir: Path, out_dir: Path, batch_size: int = 1024) -> dict:
    """Score every seed's probe once on the test split; write metrics, layer-attention heatmap and confusion matrix.

    Writes `out_dir/metrics.json` (per seed and mean ± std over seeds), `heatmap.json`/`heatmap.png` (attentive
    probes) and `confusion.png`, all from the first seed's probe except the seed summary.
    """
    from layerprobe.plots import plot_confusion_matrix, plot_layer_heatmap

    probe_dir, out_dir = Path(probe_dir), Path(out_dir)
    trained = json.loads((probe_dir / "train.json").read_text())
    test = read_features(Path(features_dir), split="test")
    per_seed, first = [], None
    for entry in trained["seeds"]:
        probe, config = load_probe(Path(entry["dir"]))
        positions = [tuple(p) for p in config["positions"]]
        predictions, _, attention = predict(probe, test.tokens, positions=positions, batch_size=batch_size)
        metrics = classification_metrics(test.labels.numpy(), predictions.numpy(), config["num_classes"])
        per_seed.append({"seed": entry["seed"], "val_balanced_accuracy": entry["val_balanced_accuracy"], **metrics})
        if first is None:
            first = (config, metrics, attention)
    config, metrics, attention = first
    summary = summarize_over_seeds(
        [{k: s[k] for k in ("accuracy", "balanced_accuracy", "val_balanced_accuracy")} for s in per_seed]
    )
    outputs = {"metrics": str(out_dir / "metrics.json"), "confusion_png": str(out_dir / "confusion.png")}
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), config["class_names"], out_dir / "confusion.png")
    if attention is not None:
        heatmap = layer_attention_heatmap(attention, config["token_labels"])
        write_json(out_dir / "heatmap.json", heatmap)
        source = config["provenance"]
        title = f"{source.get('backbone', '')} / {source.get('dataset', '')} / {config['probe']}"
        plot_layer_heatmap(heatmap, out_dir / "heatmap.png", title=title)
        outputs.update(heatmap_json=str(out_dir / "heatmap.json"), heatmap_png=str(out_dir / "heatmap.png"))
    result = {
        "probe": config["probe"],
        "backbone": config["provenance"].get("backbone"),
        "dataset": config["provenance"].get("dataset"),
        "test": {k: v["mean"] for k, v in summary.items() if k != "val_balanced_accuracy"},
        "test_std": {k: v["std"] for k, v in summary.items() if k != "val_balanced_accuracy"},
        "val_balanced_accuracy": summary["val_balanced_accuracy"]["mean"],
        "seeds": per_seed,
        "best": trained["seeds"][0]["best"],
        "num_seeds": len(per_seed),
        "outputs": outputs,
    }
    write_json(out_dir / "metrics.json", result)
    return result


def signature_example(*, probe_dir: Path, features_dir: Path, num_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A few cached test rows `[n, L, T, D]` float32 and the probe's predictions on them, for the MLflow signature."""
    probe, config = load_probe(Path(probe_dir))
    tokens = read_features(Path(features_dir), split="test").tokens[:num_rows].float()
    predictions, _, _ = predict(probe, tokens, positions=[tuple(p) for p in config["positions"]], batch_size=num_rows)
    return tokens.numpy(), np.asarray(predictions, dtype=np.int64)
