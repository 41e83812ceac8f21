"""Classification metrics, bootstrap intervals over test images, spread over seeds, and the layer-attention heatmap
numbers (all JSON-able)."""

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
    """Top-1 accuracy, balanced accuracy (mean recall over classes present in `y_true`) and per-class recall.

    Returns:
        {"accuracy", "balanced_accuracy", "per_class_accuracy": [C] (None for absent classes)}. The confusion matrix
        is `confusion_matrix`: C² numbers do not belong in a JSON document (ImageNet: a million), and the labels and
        predictions it counts (O(images), in the evaluation's predictions.npz) are its compact form.
    """
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    support = confusion.sum(axis=1)
    present = support > 0
    recall = np.divide(np.diag(confusion), support, out=np.zeros(num_classes), where=present)
    return {
        "accuracy": float(np.trace(confusion) / support.sum()),
        "balanced_accuracy": float(recall[present].mean()),
        "per_class_accuracy": [float(r) if p else None for r, p in zip(recall, present, strict=True)],
    }


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """`[C, C]` int64 counts, rows = true class, columns = predicted."""
    truth, guess = _as_numpy(y_true).astype(np.int64).ravel(), _as_numpy(y_pred).astype(np.int64).ravel()
    if truth.shape != guess.shape:
        raise ValueError(f"y_true has {truth.size} labels but y_pred has {guess.size}")
    if truth.size == 0:
        raise ValueError("y_true is empty: no images to score")
    for name, values in (("y_true", truth), ("y_pred", guess)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} has labels outside [0, {num_classes}): range [{values.min()}, {values.max()}]")
    return np.bincount(truth * num_classes + guess, minlength=num_classes**2).reshape(num_classes, num_classes)


# Bootstrap intervals. The paper reports one seed and no intervals; on a test set of a few thousand images a 1-2 pp
# gain can be noise. Resampling test images (with replacement) gives the spread of a score over test sets drawn like
# this one; percentile intervals, vectorised over resamples.
BOOTSTRAP_RESAMPLES = 1000
CI_LEVEL = 0.95
_MAX_DRAWS = 1 << 22  # image indices drawn per chunk of resamples: ~32 MiB of int64, whatever the test set's size


def bootstrap_balanced_accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    num_classes: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of balanced accuracy over test images.

    `y_pred` is `[N]`, or `[S, N]` for S seeds' probes scored on the same images: each resample's score is then the
    mean over seeds (what the report shows), so the interval is that of the seed mean. A class absent from a
    resample is skipped, as `classification_metrics` does. Same seed, same interval.
    """
    truth, predictions = _checked_labels(y_true, {"y_pred": y_pred}, num_classes)
    (scores,) = _resampled_balanced_accuracies(truth, predictions, num_classes, resamples=resamples, seed=seed)
    return percentile_interval(scores, level=level)


def paired_bootstrap_gain(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    num_classes: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float, float]:
    """Gain in balanced accuracy of predictions A over B on the same test images, and its paired-bootstrap interval.

    Both are scored on the same resampled image indices, so what the two share (hard and easy images) cancels out
    of the interval. Predictions are `[N]` or `[S, N]` (mean over seeds, per probe). Returns
    (gain on all images, low, high), as fractions (not percentage points).
    """
    gain, draws = paired_bootstrap_draws(y_true, pred_a, pred_b, num_classes, resamples=resamples, seed=seed)
    return (gain, *percentile_interval(draws, level=level))


def paired_bootstrap_draws(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    num_classes: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """The gain of A over B on all images and its `[resamples]` bootstrap draws (see `paired_bootstrap_gain`).

    Draws of independent test sets (other datasets, other seeds) average into the draws of the mean gain.
    """
    truth, (a, b) = _checked_labels(y_true, {"pred_a": pred_a, "pred_b": pred_b}, num_classes)
    every_image = np.arange(truth.size)[None]  # the test set itself, as one "resample"
    score_a, score_b = _balanced_accuracies(truth, every_image, [a, b], num_classes)
    scores_a, scores_b = _resampled_balanced_accuracies(truth, [a, b], num_classes, resamples=resamples, seed=seed)
    return float((score_a - score_b)[0]), scores_a - scores_b


def percentile_interval(draws: np.ndarray, *, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central `level` interval of bootstrap draws (percentile method)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(draws, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no bootstrap draws to take an interval of")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _checked_labels(
    y_true: ArrayLike, predictions: dict[str, ArrayLike], num_classes: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels `[N]` and each prediction set as `[S, N]` int64, checked against each other and `num_classes`."""
    truth = _as_numpy(y_true).astype(np.int64).ravel()
    if truth.size == 0:
        raise ValueError("y_true is empty: no images to score")
    checked = []
    for name, values in predictions.items():
        array = _as_numpy(values).astype(np.int64)
        array = array[None] if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[1] != truth.size or array.shape[0] == 0:
            raise ValueError(f"{name} must be [{truth.size}] or [seeds, {truth.size}], got shape {array.shape}")
        checked.append(array)
    for name, values in (("y_true", truth), *zip(predictions, checked, strict=True)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} has labels outside [0, {num_classes}): range [{values.min()}, {values.max()}]")
    return truth, checked


def _resampled_balanced_accuracies(
    truth: np.ndarray, prediction_sets: list[np.ndarray], num_classes: int, *, resamples: int, seed: int
) -> list[np.ndarray]:
    """Balanced accuracy of each `[S, N]` prediction set (mean over its seeds) on the same `resamples` resamples."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAWS // truth.size)
    scores: list[list[np.ndarray]] = [[] for _ in prediction_sets]
    for start in range(0, resamples, chunk):
        indices = rng.integers(0, truth.size, size=(min(chunk, resamples - start), truth.size))  # [R, N]
        chunk_scores = _balanced_accuracies(truth, indices, prediction_sets, num_classes)
        for found, score in zip(scores, chunk_scores, strict=True):
            found.append(score)
    return [np.concatenate(found) for found in scores]


def _balanced_accuracies(
    truth: np.ndarray, indices: np.ndarray, prediction_sets: list[np.ndarray], num_classes: int
) -> list[np.ndarray]:
    """Per prediction set `[S, N]`: `[R]` balanced accuracy (mean over its seeds) on each row of image `indices`
    `[R, N]`.

    One bincount over (resample, class) pairs counts each resample's images (or hits) per class at once; the images
    drawn and their classes are shared by every set.
    """
    num_resamples = indices.shape[0]
    bins = (np.arange(num_resamples)[:, None] * num_classes + truth[indices]).ravel()  # [R * N]
    support = np.bincount(bins, minlength=num_resamples * num_classes).reshape(num_resamples, num_classes)
    present = support > 0
    scores = []
    for predictions in prediction_sets:
        total = np.zeros(num_resamples)
        for row in predictions:  # one seed at a time: memory stays [R, N]
            correct = (row == truth)[indices].ravel()
            hits = np.bincount(bins, weights=correct, minlength=num_resamples * num_classes)
            recall = np.divide(
                hits.reshape(num_resamples, num_classes), support, out=np.zeros(support.shape), where=present
            )
            total += recall.sum(axis=1) / present.sum(axis=1)
        scores.append(total / len(predictions))
    return scores


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
