"""Figures from metric arrays: layer-attention heatmaps, confusion matrices, gain bars, layer findings (matplotlib,
Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from layerprobe.config import HEATMAP_JSON, PREDICTIONS_FILE  # noqa: E402
from layerprobe.files import read_arrays, read_json, tmp_path  # noqa: E402

DPI = 120
HEATMAP_PNG = "heatmap.png"  # per evaluated probe, beside its heatmap.json
CONFUSION_PNG = "confusion.png"


def heatmap_figsize(num_layers: int, num_tokens: int) -> tuple[float, float]:
    """Inches for a heatmap with layers across and tokens down: wide enough that every cell holds its number."""
    return (2.2 + 0.62 * num_layers, 1.6 + 0.55 * num_tokens)


def _save(fig: plt.Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)  # unique to this writer; the format is named, as the temporary name has no image suffix
    fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")  # fixed canvas: predictable pixel size
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


def plot_patch_heatmap(heatmap: Mapping, path: str | Path, *, title: str = "", dpi: int = DPI) -> Path:
    """Draw `metrics.patch_attention_heatmap` output: attention (%) on each patch position of the image's grid, with
    the share on the other tokens (CLS) in the subtitle; values are written in the cells when the grid is small."""
    weights = 100.0 * np.asarray(heatmap["weights"], dtype=float)  # [rows, cols]
    rows, cols = weights.shape
    side = min(9.0, max(3.0, 0.4 * max(rows, cols)))
    fig, ax = plt.subplots(figsize=(side + 1.4, side * rows / max(cols, rows) + 1.0), layout="constrained")
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, interpolation="nearest")
    others = ", ".join(f"{label.rpartition('/')[2]} {100 * w:.1f}%" for label, w in heatmap["tokens"].items())
    uniform = 100.0 / (rows * cols + len(heatmap["tokens"]))
    ax.set_title(f"{title}\n{others or 'no other tokens'}; uniform {uniform:.2f}% per token", fontsize=9)
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    if rows * cols <= 64:  # beyond that the numbers are unreadable
        _label_cells(ax, weights, "{:.1f}", top=weights.max())
    fig.colorbar(image, ax=ax, label="attention (%)", fraction=0.05, pad=0.02)
    return _save(fig, path, dpi)


def plot_attention_matrix(heatmaps: Mapping[str, Mapping], path: str | Path, *, title: str, dpi: int = DPI) -> Path:
    """One backbone's layer attention on every dataset at a glance: rows datasets, columns layers, three panels.

    `heatmaps` maps a row label (dataset) to `metrics.layer_attention_heatmap` output. The CLS and AP panels give
    the share of the probe's attention (over test images and heads) on that token, so a row sums to 100% over both;
    the third gives each layer's mean over its two tokens, as the paper's per-layer figure.
    """
    if not heatmaps:
        raise ValueError("heatmaps is empty: nothing to plot")
    rows = list(heatmaps)
    layers = list(next(iter(heatmaps.values()))["layers"])
    for name, heatmap in heatmaps.items():
        if list(heatmap["layers"]) != layers:
            raise ValueError(
                f"heatmap {name!r} has layers {heatmap['layers']}, others {layers}: one backbone per figure"
            )
    panels = {}
    for token in ("cls", "ap"):
        panels[f"{token.upper()} token: % of attention"] = np.array(
            [[_token_share(heatmaps[r], layer, token) for layer in layers] for r in rows]
        )
    panels["per layer: mean of CLS and AP (%)"] = np.array(
        [[100 * m for m in heatmaps[r]["layer_means"]] for r in rows]
    )
    width = 1.6 + 0.42 * len(layers)
    fig, axes = plt.subplots(1, 3, figsize=(1.8 + 3 * width, 1.3 + 0.34 * len(rows)), layout="constrained")
    top = max(np.nanmax(values) for values in panels.values())
    for index, (ax, (label, values)) in enumerate(zip(axes, panels.items(), strict=True)):
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", vmin=0.0, vmax=top)
        ax.set_xticks(range(len(layers)), [name.replace("block", "b") for name in layers], rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows if index == 0 else [])
        ax.set_xlabel("layer")
        ax.set_title(label, fontsize=9)
        _label_cells(ax, values, "{:.0f}", top=top)
    fig.colorbar(image, ax=axes, label="%", fraction=0.03, pad=0.01)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def _label_cells(ax: plt.Axes, values: np.ndarray, form: str, *, top: float) -> None:
    """Each finite cell's value written on it, dark on bright cells: readable on both ends of viridis."""
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            colour = "black" if value > 0.6 * top else "white"
            ax.text(col, row, form.format(value), ha="center", va="center", fontsize=7, color=colour)


def _token_share(heatmap: Mapping, layer: str, token: str) -> float:
    """% of attention on (layer, token), NaN where the probe did not read that slot."""
    if token not in heatmap["tokens"]:
        return np.nan
    weight = heatmap["weights"][list(heatmap["layers"]).index(layer)][list(heatmap["tokens"]).index(token)]
    return np.nan if weight is None else 100.0 * weight


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
    _label_cells(ax, grid, "{:.1f}", top=np.nanmax(grid) if np.isfinite(grid).any() else 1.0)
    return image


# A confusion figure's canvas grows with the class count up to this many classes, each named on both axes; past it
# the canvas stays this size (ImageNet's 1000 classes drawn one cell per class would be a 42,000-pixel, 7 GB canvas)
# and the axes give class indices. Counts are written in the cells up to CONFUSION_COUNTED classes.
CONFUSION_NAMED = 40
CONFUSION_COUNTED = 20


def confusion_figsize(num_classes: int) -> tuple[float, float]:
    """Inches of the confusion figure: 0.35 inch per class, capped at CONFUSION_NAMED classes' worth."""
    side = 2.5 + 0.35 * min(num_classes, CONFUSION_NAMED)
    return side + 1.0, side


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, *, title: str = "", dpi: int = DPI
) -> Path:
    """Row-normalised confusion matrix (true class down, predicted across), counts annotated when it is small."""
    counts = np.asarray(cm, dtype=float)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {len(class_names)} class names")
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=confusion_figsize(len(class_names)), layout="constrained")
    # Coloured here, as bytes: matplotlib would resample the float matrix through several float64 RGBA copies
    # (1000 classes: ~150 MB more than the canvas).
    colours = matplotlib.colormaps["Blues"]
    ax.imshow(colours(rates, bytes=True))
    if len(class_names) <= CONFUSION_NAMED:
        ax.set_xticks(range(len(class_names)), class_names, rotation=90)
        ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted" if len(class_names) <= CONFUSION_NAMED else "predicted (class index)")
    ax.set_ylabel("true" if len(class_names) <= CONFUSION_NAMED else "true (class index)")
    ax.set_title(title or "confusion (row-normalised)")
    if len(class_names) <= CONFUSION_COUNTED:  # beyond that the numbers are unreadable anyway
        for (i, j), value in np.ndenumerate(counts):
            ax.text(
                j,
                i,
                f"{int(value)}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    scale = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=colours)
    fig.colorbar(scale, ax=ax, fraction=0.05, pad=0.02)
    return _save(fig, path, dpi)


def draw_evaluation(evaluation: Mapping, out_dir: str | Path, *, title: str, redraw: bool = True) -> dict[str, str]:
    """The figures of one evaluated probe (its metrics.json as `evaluation`): the first seed's confusion matrix,
    counted from the test labels and predictions it saved, and, for an attentive probe, its attention heatmap. With
    `redraw=False` only missing figures are drawn (a reused evaluation keeps its figures). Returns {name: path} of
    the figures."""
    from layerprobe.metrics import confusion_matrix

    out_dir = Path(out_dir)
    figures = {"confusion_png": out_dir / CONFUSION_PNG}
    if redraw or not figures["confusion_png"].is_file():
        saved = read_arrays(out_dir / PREDICTIONS_FILE)
        confusion = confusion_matrix(saved["labels"], saved["predictions"][0], len(evaluation["class_names"]))
        plot_confusion_matrix(confusion, evaluation["class_names"], figures["confusion_png"])
    if evaluation.get("heatmap"):
        figures["heatmap_png"] = out_dir / HEATMAP_PNG
        if redraw or not figures["heatmap_png"].is_file():
            draw = plot_patch_heatmap if evaluation["heatmap"] == "patches" else plot_layer_heatmap
            draw(read_json(out_dir / HEATMAP_JSON), figures["heatmap_png"], title=title)
    return {name: str(path) for name, path in figures.items()}


def plot_gains(
    gains: Mapping[str, float],
    path: str | Path,
    *,
    probe: str,
    baseline: str,
    intervals: Mapping[str, tuple[float, float]] | None = None,
    level: str = "95 %",
    dpi: int = DPI,
) -> Path:
    """Bar per dataset of `probe`'s gain over `baseline` (percentage points), with the mean as a dashed line.

    `intervals` maps a bar to its (low, high) interval, drawn as an error bar (bars without one get none).
    """
    if not gains:
        raise ValueError("gains is empty: nothing to plot")
    names = list(gains)
    values = np.array([gains[n] for n in names], dtype=float)
    yerr = None
    if intervals:
        bounds = np.array([intervals.get(n, (v, v)) for n, v in zip(names, values, strict=True)], dtype=float)
        # Percentile intervals need not be centred on the point; clip so a skewed one never gives a negative length.
        yerr = np.clip(np.stack([values - bounds[:, 0], bounds[:, 1] - values]), 0.0, None)  # [2, bars]
    fig, ax = plt.subplots(figsize=(2.0 + 0.5 * len(names), 3.6), layout="constrained")
    ax.bar(range(len(names)), values, yerr=yerr, color=np.where(values >= 0, "tab:green", "tab:red"), capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axhline(values.mean(), color="tab:blue", linestyle="--", linewidth=1, label=f"mean {values.mean():+.2f} pp")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel(f"{probe} − {baseline} (pp)")
    title = f"gain of {probe} over {baseline}"
    ax.set_title(title + (f"\n(bars: paired-bootstrap {level} interval)" if intervals else ""), fontsize=9)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path, dpi)


def plot_layer_findings(
    layers: Sequence[str],
    path: str | Path,
    *,
    title: str,
    curves: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    attention: Mapping[str, float] | None = None,
    knockout: Mapping[str, Mapping[str, float]] | None = None,
    reference: tuple[str, float] | None = None,
    cut: tuple[float, str] | None = None,
    probe: str = "alf",
    level: str = "95 %",
    dpi: int = DPI,
) -> Path:
    """Which layers matter for one (backbone, dataset): panels over one layer axis, each drawn when given.

    `curves`: {name: {"test", "low", "high": [L] in %}}, test balanced accuracy by layer with interval bars (and
    `reference` (label, %) as a dotted line, e.g. the probe reading every layer); `attention`: {layer: %},
    `probe`'s attention per layer; `knockout`: {layer: {"drop", "low", "high"} in pp}, `probe`'s test balanced
    accuracy lost with the layer masked out; `cut`: (position on the axis, label), the truncation point, a dashed
    line through every panel. Layers a panel lacks are left empty.
    """
    panels = [name for name, given in (("curves", curves), ("attention", attention), ("knockout", knockout)) if given]
    if not panels:
        raise ValueError("no curves, attention or knock-out drops: nothing to plot")
    x = np.arange(len(layers))
    fig, axes = plt.subplots(
        len(panels),
        1,
        sharex=True,
        figsize=(max(6.5, 3.0 + 0.5 * len(layers)), 0.6 + 2.3 * len(panels)),
        layout="constrained",
    )
    axes = np.atleast_1d(axes)
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "curves":
            for offset, (name, curve) in zip(np.linspace(-0.15, 0.15, len(curves)), curves.items(), strict=True):
                values = np.asarray(curve["test"], dtype=float)
                bars = np.clip(np.stack([values - curve["low"], np.asarray(curve["high"]) - values]), 0.0, None)
                ax.errorbar(x + offset, values, yerr=bars, marker="o", markersize=3, capsize=2, label=name)
            if reference is not None:
                ax.axhline(
                    reference[1], color="grey", linestyle=":", linewidth=1, label=f"{reference[0]} {reference[1]:.1f}"
                )
            ax.set_ylabel("test balanced\naccuracy (%)")
            ax.set_title(f"single-layer probes (bars: {level} bootstrap interval)", fontsize=9)
            ax.legend(fontsize=7, loc="best")
        elif panel == "attention":
            shares = np.array([attention.get(layer, np.nan) for layer in layers], dtype=float)
            ax.bar(x, shares, color="tab:purple")
            ax.set_ylabel("attention (%)")
            ax.set_title(f"{probe}'s attention per layer (mean over the layer's tokens)", fontsize=9)
        else:
            drops = np.array([knockout.get(layer, {}).get("drop", np.nan) for layer in layers], dtype=float)
            bounds = np.array([[knockout.get(layer, {}).get(k, np.nan) for layer in layers] for k in ("low", "high")])
            bars = np.nan_to_num(np.clip(np.stack([drops - bounds[0], bounds[1] - drops]), 0.0, None))
            ax.bar(x, drops, yerr=bars, capsize=2, color=np.where(drops >= 0, "tab:red", "tab:green"))
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_ylabel("drop (pp)")
            ax.set_title(
                f"{probe} without the layer: drop in test balanced accuracy (paired {level} interval)", fontsize=9
            )
        if cut is not None:
            ax.axvline(cut[0], color="black", linestyle="--", linewidth=1, label=cut[1] if ax is axes[0] else None)
    if cut is not None:
        axes[0].legend(fontsize=7, loc="best")
    axes[-1].set_xticks(x, [name.replace("block", "b") for name in layers], rotation=45, ha="right")
    axes[-1].set_xlabel("layer")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)
