"""Stratified train / val / test index splits (scikit-learn's `train_test_split`), deterministic in the seed."""

from __future__ import annotations

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def _cut(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (kept, cut) with about `fraction` cut, stratified by label where possible."""
    from sklearn.model_selection import train_test_split  # here: importing scikit-learn costs every process ~1.5 s

    if fraction <= 0.0 or len(indices) < 2:
        return indices, indices[:0]
    classes, counts = np.unique(labels[indices], return_counts=True)
    # A class with a single image cannot be on both sides: it stays in the kept (training) part, where a probe can
    # at least learn it, instead of making sklearn's stratifier raise.
    rare = np.isin(labels[indices], classes[counts < 2])
    pool, kept_rare = indices[~rare], indices[rare]
    if len(pool) < 2:
        return indices, indices[:0]
    try:
        kept, cut = train_test_split(pool, test_size=fraction, random_state=seed, stratify=labels[pool])
    except ValueError:
        # Too few images for every class to appear on both sides (cut smaller than the number of classes, or the
        # reverse): a plain shuffled cut of the same size is the best that exists.
        kept, cut = train_test_split(pool, test_size=fraction, random_state=seed, shuffle=True)
    return np.sort(np.concatenate([kept, kept_rare])), np.sort(cut)


def make_splits(
    labels: np.ndarray,
    *,
    official_splits: np.ndarray | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Sorted int64 index arrays for "train", "val" and "test"; disjoint and covering every image.

    Args:
        labels: [N] class index per image.
        official_splits: [N] of "train"/"test" when the source defines a test set; then `test_fraction` is unused.
        val_fraction: share of the training part cut (stratified) into validation.
        test_fraction: share of all images cut (stratified) into test when there is no official test set.
        seed: random state of both cuts.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {value}")
    everything = np.arange(len(labels), dtype=np.int64)
    if official_splits is not None:
        official = np.asarray(official_splits).astype(str)
        if official.shape != labels.shape:
            raise ValueError(f"official_splits has shape {official.shape}, labels {labels.shape}")
        unknown = sorted(set(official.tolist()) - {"train", "test"})
        if unknown:
            raise ValueError(f"official_splits holds {unknown}; valid values: 'train', 'test'")
        train_part, test = everything[official == "train"], everything[official == "test"]
    else:
        train_part, test = _cut(everything, labels, test_fraction, seed)
    train, val = _cut(train_part, labels, val_fraction, seed)
    return {"train": train.astype(np.int64), "val": val.astype(np.int64), "test": np.sort(test).astype(np.int64)}
