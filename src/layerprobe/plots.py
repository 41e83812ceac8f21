"""Figures from metric arrays: layer-attention heatmaps, confusion matrices, gain bars (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120


def heatmap_figsize(num_layers: int, num_tokens: int) -> tuple[float, float]:
    """Inches for a heatmap with layers across and tokens down: wide enough that every cell holds its number."""
    return (2.2 + 0.62 * num_layers, 1.6 + 0.55 * num_tokens)


def _save(fig: plt.Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)  # fixed canvas (no bbox "tight"), so the pixel size is predictable
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_layer_heatmap(heatmap: Mapping, path: str | Path, *, title: str = "", dpi: int = DPI) -> Path:
    """Draw `metrics.layer_attention_heatmap` output: layers across, cls/ap down, values in % in each cell."""
    fig, ax = plt.subplots(
        figsize=heatmap_figsize(len(heatmap["layers"]), len(heatmap["tokens"])), layout="constrained"
    )
    image = _draw_heatmap(ax, heatmap, title=title)
    fig.colorbar(image, ax=ax, label="attention (%)", fraction=0.05, pad=0.02)
    return _save(fig, path, dpi)


def plot_heatmap_grid(heatmaps: Mapping[str, Mapping], path: str | Path, *, dpi: int = DPI) -> Path:
    """One layer-attention heatmap per task (e.g. `backbone/dataset`), stacked so tasks can be compared at a glance."""
    if not heatmaps:
        raise ValueError("heatmaps is empty: nothing to plot")
    widest = max(len(h["layers"]) for h in heatmaps.values())
    width, height = heatmap_figsize(widest, 2)
    fig, axes = plt.subplots(
        len(heatmaps), 1, figsize=(width, height * len(heatmaps)), layout="constrained", squeeze=False
    )
    for ax, (name, heatmap) in zip(axes[:, 0], heatmaps.items(), strict=True):
        image = _draw_heatmap(ax, heatmap, title=name)
        fig.colorbar(image, ax=ax, label="%", fraction=0.05, pad=0.02)
    return _save(fig, path, dpi)


def _draw_heatmap(ax: plt.Axes, heatmap: Mapping, *, title: str = ""):
    layers, tokens = list(heatmap["layers"]), list(heatmap["tokens"])
    grid = np.array([[np.nan if w is None else 100.0 * w for w in row] for row in heatmap["weights"]]).T  # [T, L]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(layers)), [name.replace("block", "b") for name in layers], rotation=45, ha="right")
    ax.set_yticks(range(len(tokens)), tokens)
    ax.set_xlabel("layer")
    ax.set_ylabel("token")
    if title:
        ax.set_title(title)
    top = np.nanmax(grid) if np.isfinite(grid).any() else 1.0
    for (t, li), value in np.ndenumerate(grid):
        if np.isfinite(value):
            colour = "black" if value > 0.6 * top else "white"  # readable on both ends of viridis
            ax.text(li, t, f"{value:.1f}", ha="center", va="center", fontsize=7, color=colour)
    return image


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, *, title: str = "", dpi: int = DPI
) -> Path:
    """Row-normalised confusion matrix (true class down, predicted across), counts annotated when it is small."""
    counts = np.asarray(cm, dtype=float)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {len(class_names)} class names")
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 2.5 + 0.35 * len(class_names)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), layout="constrained")
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion (row-normalised)")
    if len(class_names) <= 20:  # beyond that the numbers are unreadable anyway
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    return _save(fig, path, dpi)


def plot_gains(
    gains: Mapping[str, float],
    path: str | Path,
    *,
    probe: str,
    baseline: str,
    errors: Mapping[str, float] | None = None,
    dpi: int = DPI,
) -> Path:
    """Bar per dataset of `probe`'s gain over `baseline` (percentage points), with the mean as a dashed line."""
    if not gains:
        raise ValueError("gains is empty: nothing to plot")
    names = list(gains)
    values = np.array([gains[n] for n in names], dtype=float)
    yerr = None if errors is None else np.array([errors.get(n, 0.0) for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(2.0 + 0.5 * len(names), 3.6), layout="constrained")
    ax.bar(range(len(names)), values, yerr=yerr, color=np.where(values >= 0, "tab:green", "tab:red"), capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axhline(values.mean(), color="tab:blue", linestyle="--", linewidth=1, label=f"mean {values.mean():+.2f} pp")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel(f"{probe} − {baseline} (pp)")
    ax.set_title(f"gain of {probe} over {baseline}")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path, dpi)
