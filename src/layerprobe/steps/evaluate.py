"""Evaluate step: score one trained probe (every seed) once on the test split: metrics, predictions (the confusion
matrix's compact form) and the attention heatmap's numbers. Figures of them are drawn by whoever runs the step
(`layerprobe.plots.draw_evaluation`): drawing decides no number, so it stays outside this step's code key."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerprobe.config import (
    FORMATS,
    HEATMAP_JSON,
    METRICS_FILE,
    PREDICTIONS_FILE,
    PROBE_CONFIG,
    PROBE_WEIGHTS,
    EvaluateConfig,
    PathsConfig,
)
from layerprobe.files import begin_output, read_json, sha256_file, swap_in, write_arrays, write_json
from layerprobe.fingerprint import Fingerprint, listed_files, make_fingerprint, provenance_record, staleness, vouch


def evaluate_fingerprint(trained: dict, *, features_hash: str) -> Fingerprint:
    """The saved probes' bytes (the per-layer family's stacked heads too) and the feature cache's content (evaluation
    has no result-deciding params)."""
    from layerprobe.per_layer import FAMILY_CONFIG, FAMILY_WEIGHTS

    names = (PROBE_WEIGHTS, PROBE_CONFIG, *((FAMILY_WEIGHTS, FAMILY_CONFIG) if "per_layer" in trained else ()))
    probes = [
        {"seed": entry["seed"], **{name: sha256_file(Path(entry["dir"]) / name) for name in names}}
        for entry in trained["seeds"]
    ]
    return make_fingerprint(
        __name__, format=FORMATS["evaluation"], params={}, inputs={"probes": probes, "features": features_hash}
    )


def evaluate_step(
    backbone_name: str, dataset_name: str, probe_name: str, *, evaluate: EvaluateConfig, paths: PathsConfig
) -> dict:
    """Evaluate (or reuse) one probe on test: writes metrics.json (per seed; mean ± std over seeds; a bootstrap
    interval over test images), every seed's test predictions (predictions.npz, which the report pairs across probes
    and the confusion figure counts) and the first seed's attention heatmap (attentive probes: over layers, or over
    patch positions for a probe reading the final layer's patch tokens); metrics.json last, as the completion marker.
    """
    from layerprobe.features import cache_content_hash

    train_marker = paths.train_marker(backbone_name, dataset_name, probe_name)
    if not train_marker.is_file():
        raise FileNotFoundError(f"probe {probe_name!r} is not trained: {train_marker} is missing (run train)")
    trained = read_json(train_marker)
    if (bad := vouch(train_marker, trained).first_problem()) is not None:  # the probes are read only vouched for
        raise ValueError(f"probe {probe_name!r} of {train_marker.parent}: {bad}; re-run train")
    features_dir = paths.features_dir(backbone_name, dataset_name)
    fingerprint = evaluate_fingerprint(trained, features_hash=cache_content_hash(features_dir))
    out_dir = paths.evaluation_dir(backbone_name, dataset_name, probe_name)
    marker = paths.evaluation_marker(backbone_name, dataset_name, probe_name)
    reason = staleness(marker, fingerprint)
    if reason is None:
        return {**read_json(marker), "status": "reused", "reason": None}

    from layerprobe.checkpoint import load_probe, reading_arguments
    from layerprobe.layer_evaluation import evaluation_blocks
    from layerprobe.metrics import (
        BOOTSTRAP_RESAMPLES,
        CI_LEVEL,
        bootstrap_balanced_accuracy,
        classification_metrics,
        layer_attention_heatmap,
        patch_attention_heatmap,
        summarize_over_seeds,
    )
    from layerprobe.probes import gather_raw
    from layerprobe.selection import open_selection
    from layerprobe.train import predict_selected

    staging = begin_output(out_dir, fingerprint.value, marker=METRICS_FILE)  # swapped in whole, marker last
    probes = [load_probe(Path(entry["dir"])) for entry in trained["seeds"]]
    reading = reading_arguments(probes[0][1])
    if any(reading_arguments(config) != reading for _, config in probes[1:]):
        raise ValueError(f"the seeds of {train_marker.parent} read different tokens of the cache: re-run train")
    # What the probe reads of the test split, read once for every seed: held in memory when it fits, else read batch
    # by batch from the cache (the all-tokens probe's patch tokens of a large test split).
    test = open_selection(
        features_dir,
        splits=["test"],
        select=lambda tokens, patches: gather_raw(
            tokens, reading["positions"], patches=patches, width=reading["width"]
        ),
        patches=any(c.get("patch_tokens") for _, c in probes),
        batch_rows=evaluate.batch_size,
    )
    per_seed, seed_predictions, first = [], [], None
    for entry, (probe, config) in zip(trained["seeds"], probes, strict=True):
        predictions, _, attention = predict_selected(
            probe, test.features, batch_size=evaluate.batch_size, normalize=reading["normalize"]
        )
        predictions, attention = predictions[0], None if attention is None else attention[0]  # [G = 1, ...]
        metrics = classification_metrics(test.labels.numpy(), predictions.numpy(), config["num_classes"])
        per_seed.append({"seed": entry["seed"], "val_balanced_accuracy": entry["val_balanced_accuracy"], **metrics})
        seed_predictions.append(predictions.numpy())
        if first is None:
            first = (config, metrics, attention)
    config, metrics, attention = first
    summary = summarize_over_seeds(
        [{k: s[k] for k in ("accuracy", "balanced_accuracy", "val_balanced_accuracy")} for s in per_seed]
    )
    labels, predictions = test.labels.numpy(), np.stack(seed_predictions)  # [N], [S, N]
    # The interval of the seed mean (the number reported): resampled test images, each seed scored on the same ones.
    ci_low, ci_high = bootstrap_balanced_accuracy(labels, predictions, config["num_classes"])
    outputs = {"metrics": str(marker), "predictions": str(out_dir / PREDICTIONS_FILE)}
    label_type = np.min_scalar_type(config["num_classes"] - 1)  # uint8 up to 256 classes: the file stays small
    write_arrays(
        staging / PREDICTIONS_FILE,
        labels=labels.astype(label_type),
        predictions=predictions.astype(label_type),
        seeds=np.array([s["seed"] for s in per_seed]),
        num_classes=np.int64(config["num_classes"]),
    )
    heatmap_kind = None
    if attention is not None:
        if config.get("patch_tokens"):  # one layer, hundreds of tokens: where on the image the probe looks
            heatmap_kind = "patches"
            heatmap = patch_attention_heatmap(
                attention, config["token_labels"], grid=config["provenance"].get("patch_grid")
            )
        else:
            heatmap_kind = "layers"
            heatmap = layer_attention_heatmap(attention, config["token_labels"])
        write_json(staging / HEATMAP_JSON, heatmap)
        outputs["heatmap_json"] = str(out_dir / HEATMAP_JSON)
    result = {
        "probe": probe_name,
        "backbone": backbone_name,
        "dataset": dataset_name,
        "test": {k: v["mean"] for k, v in summary.items() if k != "val_balanced_accuracy"},
        "test_std": {k: v["std"] for k, v in summary.items() if k != "val_balanced_accuracy"},
        "test_ci": {"balanced_accuracy": [ci_low, ci_high], "level": CI_LEVEL, "resamples": BOOTSTRAP_RESAMPLES},
        "val_balanced_accuracy": summary["val_balanced_accuracy"]["mean"],
        "seeds": per_seed,
        "best": trained["seeds"][0]["best"],
        "num_seeds": len(per_seed),
        "class_names": config["class_names"],
        "heatmap": heatmap_kind,  # None (a linear probe), "layers" or "patches"
        **evaluation_blocks(
            probe_name, trained, probes, test, predictions, batch_size=evaluate.batch_size, features_dir=features_dir
        ),
        "outputs": outputs,
        "format": FORMATS["evaluation"],
        "files": listed_files(staging, [PREDICTIONS_FILE, *([HEATMAP_JSON] if heatmap_kind else [])]),
        "fingerprint": fingerprint.as_dict(),
        "recorded": provenance_record(),
    }
    write_json(staging / METRICS_FILE, result)
    swap_in(staging, out_dir)
    return {**result, "status": "computed", "reason": reason}


def signature_example(
    *, probe_dir: Path, features_dir: Path, num_rows: int = 2
) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray]:
    """A few cached test rows and the probe's predictions on them, for the MLflow signature.

    The rows are the cache's tokens `[n, L, T, D]` float32, or for a probe reading the final layer's patch tokens
    {"tokens": [n, L, T, D], "patches": [n, P, D_final]} (the pyfunc's two named inputs).
    """
    from layerprobe.checkpoint import load_probe, reading_arguments
    from layerprobe.features import read_features
    from layerprobe.train import predict
    from layerprobe.truncation import layers_read

    probe, config = load_probe(Path(probe_dir))
    test = read_features(Path(features_dir), split="test", patches=bool(config.get("patch_tokens")), max_rows=num_rows)
    tokens = test.tokens[:, : layers_read(config)].float()  # the layers its backbone yields, run as deep as it reads
    patches = None if test.patches is None else test.patches.float()
    predictions, _, _ = predict(probe, tokens, batch_size=num_rows, patches=patches, **reading_arguments(config))
    example = tokens.numpy() if patches is None else {"tokens": tokens.numpy(), "patches": patches.numpy()}
    return example, np.asarray(predictions, dtype=np.int64)
