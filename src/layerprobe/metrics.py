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


def patch_attention_heatmap(
    attention: np.ndarray | torch.Tensor, token_labels: Sequence[str], *, grid: Sequence[int] | None = None
) -> dict:
    """Mean attention per patch position of a probe reading the final layer's patch tokens (averaged over images,
    then heads), laid out on the image's patch grid, plus the share on the other tokens (the CLS token).

    Args:
        attention: post-softmax weights `[N, H, K]` from `predict`.
        token_labels: K labels, the patch tokens "<layer>/patch<p>" and the others (e.g. "final/cls").
        grid: [rows, cols] of the backbone's patch grid (rows * cols = P); None: a square grid, or one row.

    Returns:
        {"kind": "patches", "grid": [rows, cols], "weights": [rows][cols] (patch p at row p // cols),
        "tokens": {label: weight} for the tokens that are not patches, "patch_share": the sum over patches,
        "peak": {"patch", "row", "col", "weight"}: the most attended patch}.
    """
    values = _as_numpy(attention).astype(np.float64)
    if values.ndim != 3 or values.shape[2] != len(token_labels):
        raise ValueError(f"attention must be [N, H, K={len(token_labels)}], got shape {values.shape}")
    per_token = values.mean(axis=0).mean(axis=0)  # over images, then heads
    patch_weights: dict[int, float] = {}
    others: dict[str, float] = {}
    for label, weight in zip(token_labels, per_token, strict=True):
        token = label.rpartition("/")[2]
        if token.startswith("patch") and token[len("patch") :].isdigit():
            patch_weights[int(token[len("patch") :])] = float(weight)
        else:
            others[label] = float(weight)
    count = len(patch_weights)
    if count == 0 or sorted(patch_weights) != list(range(count)):
        raise ValueError(f"token labels must hold patch0..patch<P-1> once each; found patches {sorted(patch_weights)}")
    if grid is not None and int(grid[0]) * int(grid[1]) == count:
        rows, cols = int(grid[0]), int(grid[1])
    else:
        side = int(round(count**0.5))
        rows, cols = (side, side) if side * side == count else (1, count)
    weights = np.array([patch_weights[p] for p in range(count)]).reshape(rows, cols)
    peak = int(np.argmax(weights))
    return {
        "kind": "patches",
        "grid": [rows, cols],
        "weights": weights.tolist(),
        "tokens": others,
        "patch_share": float(weights.sum()),
        "peak": {"patch": peak, "row": peak // cols, "col": peak % cols, "weight": float(weights.flat[peak])},
    }
