"""Classification metrics, spread over seeds, and the layer-attention heatmap numbers (all JSON-able)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def classification_metrics(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> dict:
    """Top-1 accuracy, balanced accuracy (mean recall over classes present in `y_true`), per-class recall, confusion.

    Returns:
        {"accuracy", "balanced_accuracy", "per_class_accuracy": [C] (None for absent classes),
        "confusion_matrix": [C][C] ints, rows = true class, columns = predicted}.
    """
    truth, guess = _as_numpy(y_true).astype(np.int64).ravel(), _as_numpy(y_pred).astype(np.int64).ravel()
    if truth.shape != guess.shape:
        raise ValueError(f"y_true has {truth.size} labels but y_pred has {guess.size}")
    if truth.size == 0:
        raise ValueError("y_true is empty: no images to score")
    for name, values in (("y_true", truth), ("y_pred", guess)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} has labels outside [0, {num_classes}): range [{values.min()}, {values.max()}]")
    confusion = np.bincount(truth * num_classes + guess, minlength=num_classes**2).reshape(num_classes, num_classes)
    support = confusion.sum(axis=1)
    present = support > 0
    recall = np.divide(np.diag(confusion), support, out=np.zeros(num_classes), where=present)
    return {
        "accuracy": float((truth == guess).mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "per_class_accuracy": [float(r) if p else None for r, p in zip(recall, present, strict=True)],
        "confusion_matrix": confusion.astype(int).tolist(),
    }


def summarize_over_seeds(runs: Sequence[dict[str, float]]) -> dict[str, dict]:
    """Mean, sample std (0 for one run) and the values of every metric the runs share."""
    if not runs:
        raise ValueError("no runs to summarise")
    keys = [k for k in runs[0] if all(k in run for run in runs)]
    summary = {}
    for key in keys:
        values = [float(run[key]) for run in runs]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        summary[key] = {"mean": float(np.mean(values)), "std": std, "values": values}
    return summary


def layer_attention_heatmap(attention: np.ndarray | torch.Tensor, token_labels: Sequence[str]) -> dict:
    """Mean attention per (layer, token), averaged over images then heads, as the reference's heatmaps.

    Args:
        attention: post-softmax weights `[N, H, K]` from `predict`.
        token_labels: K labels like "block3/ap" (`probes.token_labels`).

    Returns:
        {"layers": [L], "tokens": [T], "weights": [L][T] (None where a slot was not read),
        "layer_means": [L] (the mean over a layer's tokens, as the paper's per-layer figure),
        "token_weights": {label: weight}}.
    """
    values = _as_numpy(attention).astype(np.float64)
    if values.ndim != 3 or values.shape[2] != len(token_labels):
        raise ValueError(f"attention must be [N, H, K={len(token_labels)}], got shape {values.shape}")
    per_token = values.mean(axis=0).mean(axis=0)  # over images, then heads
    layers, tokens = [], []
    for label in token_labels:
        layer, _, token = label.rpartition("/")
        if not layer:
            raise ValueError(f"token label {label!r} is not 'layer/token', e.g. 'block3/ap'")
        layers += [layer] if layer not in layers else []
        tokens += [token] if token not in tokens else []
    weights: list[list[float | None]] = [[None] * len(tokens) for _ in layers]
    for label, weight in zip(token_labels, per_token, strict=True):
        layer, _, token = label.rpartition("/")
        weights[layers.index(layer)][tokens.index(token)] = float(weight)
    return {
        "layers": layers,
        "tokens": tokens,
        "weights": weights,
        "layer_means": [float(np.mean([w for w in row if w is not None])) for row in weights],
        "token_weights": {label: float(w) for label, w in zip(token_labels, per_token, strict=True)},
    }
