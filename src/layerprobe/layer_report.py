"""Which layers matter, per (backbone, dataset): the single-layer probes' test curves (`per_layer`), ALF's attention
per layer, its knock-out drops and the truncated backbone (`alf_truncated`), read from the evaluate stage's markers;
the rank agreement of attention with single-layer accuracy; the report's section, the curves for `dvc plots` and the
parent MLflow run's metrics.

The blocks a marker carries decide what is shown, whichever suite probe wrote them: `per_layer` (the per-layer
family), `knockout` (HEADLINE's marker) and `truncation`. A task with none of them is left out, so a suite without
those probes reports as before. Accuracies are fractions in the markers, percent here (drops: pp).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerprobe.report import HEADLINE, LEVEL

KINDS = {"cls": "CLS", "ap": "AP", "cls_ap": "CLS‖AP"}  # the per-layer family's token kinds, as figures name them
CURVE_KIND = "cls_ap"  # the single-layer curve ALF's attention is ranked against (the paper's single-layer probe)


def rank_agreement(first, second) -> float | None:
    """Spearman's rho of two equal-length sequences: the Pearson correlation of their ranks, tied values sharing
    their mean rank. None where it is undefined (fewer than two values, or one sequence constant)."""
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"rank agreement needs two sequences of one length, got shapes {first.shape}, {second.shape}")
    if len(first) < 2:
        return None
    a, b = (ranks - ranks.mean() for ranks in (_average_ranks(first), _average_ranks(second)))
    scale = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return None if scale == 0.0 else float((a * b).sum() / scale)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values), dtype=float)
    for value in np.unique(values):  # ties share the mean of the ranks they span
        ranks[values == value] = ranks[values == value].mean()
    return ranks


def task_findings(markers: dict[str, dict], heatmap: dict | None) -> dict | None:
    """One task's layer findings from its suite probes' evaluation markers ({probe: metrics.json}) and HEADLINE's
    layer heatmap (`metrics.layer_attention_heatmap`, None where absent); None when no marker carries a layer block.

    Returns {"layers": the figure's layer axis, "curves": {kind: {"test", "low", "high", "val"}: [L] in %} | None,
    "best": the (layer, kind) with the best validation score and its test score | None, "attention": {layer: %} |
    None, "knockout": {layer: {"drop", "low", "high"} in pp} | None, "truncation": the marker's block with the
    truncated probe's test score (`test`, `low`, `high` in %) | None, "alf_test": HEADLINE's test score (%) | None,
    "rank_agreement": rho | None, "rank_layers": the layers it was computed over}.
    """
    per_layer = next((m["per_layer"] for m in markers.values() if m.get("per_layer")), None)
    knockout = (markers.get(HEADLINE) or {}).get("knockout")
    truncated = next((m for m in markers.values() if m.get("truncation")), None)
    if per_layer is None and knockout is None and truncated is None:
        return None
    attention = None
    if heatmap is not None:
        attention = {x: 100 * share for x, share in zip(heatmap["layers"], heatmap["layer_means"], strict=True)}
    axis = [*(attention or {}), *(knockout["layers"] if knockout else [])]  # without per-layer curves
    layers = list(per_layer["layers"]) if per_layer else list(dict.fromkeys(axis))
    curves = best = None
    if per_layer:
        curves = {
            kind: {
                "test": [100 * v for v in per_layer["test_balanced_accuracy"][kind]],
                "low": [100 * low for low, _ in per_layer["interval"][kind]],
                "high": [100 * high for _, high in per_layer["interval"][kind]],
                "val": [100 * v for v in per_layer["val_balanced_accuracy"][kind]],
            }
            for kind in per_layer["kinds"]
        }
        # the family's own selection (validation, never test): the first best in layer order, then kind order
        i, kind = max(((i, k) for i in range(len(layers)) for k in curves), key=lambda ik: curves[ik[1]]["val"][ik[0]])
        best = {"layer": layers[i], "kind": kind, **{key: curves[kind][key][i] for key in ("test", "low", "high")}}
    read = [layer for layer in (attention or {}) if curves and CURVE_KIND in curves and layer in layers]
    rho = rank_agreement([attention[x] for x in read], [curves[CURVE_KIND]["test"][layers.index(x)] for x in read])
    return {
        "layers": layers,
        "curves": curves,
        "best": best,
        "attention": attention,
        "knockout": None if knockout is None else _knockout(knockout),
        "truncation": None if truncated is None else {**truncated["truncation"], **_score(truncated)},
        "alf_test": _score(markers[HEADLINE])["test"] if HEADLINE in markers else None,
        "rank_agreement": rho,
        "rank_layers": read,
    }


def _knockout(block: dict) -> dict[str, dict]:
    return {
        layer: {"drop": 100 * drop, "low": 100 * low, "high": 100 * high}
        for layer, drop, (low, high) in zip(block["layers"], block["drop"], block["interval"], strict=True)
    }


def _score(marker: dict) -> dict[str, float]:
    low, high = marker["test_ci"]["balanced_accuracy"]
    return {"test": 100 * marker["test"]["balanced_accuracy"], "low": 100 * low, "high": 100 * high}


def layer_findings(markers: dict[str, dict[str, dict[str, dict]]], heatmaps: dict[str, dict[str, dict]]) -> dict:
    """{backbone: {dataset: `task_findings`}} for the tasks with layer blocks, from {backbone: {dataset: {probe:
    marker}}} and HEADLINE's heatmaps {backbone: {dataset: heatmap}}."""
    found: dict = {}
    for backbone, by_dataset in markers.items():
        for dataset, by_probe in by_dataset.items():
            findings = task_findings(by_probe, heatmaps.get(backbone, {}).get(dataset))
            if findings is not None:
                found.setdefault(backbone, {})[dataset] = findings
    return found


def truncation_position(findings: dict) -> float | None:
    """Where the truncation point falls on the layer axis: after the last layer depth k computes (block<i> needs
    depth i + 1, `final` all B blocks)."""
    cut = findings["truncation"]
    if cut is None:
        return None
    depths = [cut["blocks"] if x == "final" else int(x.removeprefix("block")) + 1 for x in findings["layers"]]
    kept = [i for i, depth in enumerate(depths) if depth <= cut["depth"]]
    return (max(kept) if kept else -1) + 0.5


def curve_rows(findings: dict) -> list[dict]:
    """One task's curves for `dvc plots`: a row per layer with its index, each kind's test score and interval (%),
    ALF's attention (%) and knock-out drop (pp) where known."""
    rows = []
    for i, layer in enumerate(findings["layers"]):
        row = {"layer_index": i, "layer": layer}
        for kind, curve in (findings["curves"] or {}).items():
            row |= {kind: curve["test"][i], f"{kind}_ci_low": curve["low"][i], f"{kind}_ci_high": curve["high"][i]}
        row["attention"] = (findings["attention"] or {}).get(layer)
        row["knockout_drop"] = (findings["knockout"] or {}).get(layer, {}).get("drop")
        rows.append(row)
    return rows


def draw_findings(findings: dict, path: str | Path, *, title: str) -> Path:
    """The task's picture (`plots.plot_layer_findings`): curves, attention, knock-out drops, truncation point."""
    from layerprobe.plots import plot_layer_findings

    cut, alf = findings["truncation"], findings["alf_test"]
    if cut is not None:
        cut = (truncation_position(findings), f"truncated: depth {cut['depth']} of {cut['blocks']}")
    return plot_layer_findings(
        findings["layers"],
        path,
        title=title,
        curves={KINDS.get(kind, kind): curve for kind, curve in (findings["curves"] or {}).items()},
        attention=findings["attention"],
        knockout=findings["knockout"],
        reference=None if alf is None else (f"{HEADLINE} (all layers)", alf),
        cut=cut,
        probe=HEADLINE,
        level=LEVEL,
    )


def section_markdown(found: dict, *, figures: str = "layers") -> str:
    """The report's "Which layers matter" section: a row per task (`layer_findings`)."""
    lines = [
        "\n## Which layers matter\n",
        "Best single layer: the per-layer probe (one linear head per layer and token kind) with the best validation "
        f"balanced accuracy, its test score and {LEVEL} interval. Attention peak: the layer {HEADLINE} attends to "
        f"most (mean over its tokens, %). Largest knock-out drop: the layer whose tokens, masked out of the trained "
        f"{HEADLINE}, cost it most test balanced accuracy (pp, paired {LEVEL} interval). Truncation: the smallest "
        f"depth k of B blocks whose {HEADLINE} is within the margin of the full one on validation, its test score, "
        "and the measured speed-up of extracting and predicting through k blocks. Rank agreement: Spearman's rho of "
        f"{HEADLINE}'s attention per layer and the {KINDS[CURVE_KIND]} single-layer test accuracy, over the layers "
        f"{HEADLINE} reads. Figures: `{figures}/<backbone>-<dataset>.png`.\n",
        "| backbone | dataset | best single layer | test | attention peak | largest knock-out drop | truncation "
        "(depth k of B) | test | speed-up extract / predict | rank agreement |",
        "|---|---|---|---:|---|---|---|---:|---|---:|",
    ]
    for backbone, by_dataset in found.items():
        lines += [
            f"| {backbone} | {dataset} | " + " | ".join(_section_cells(f)) + " |" for dataset, f in by_dataset.items()
        ]
    return "\n".join(lines) + "\n"


def _section_cells(f: dict) -> list[str]:
    """A task's cells of the section's table, "–" for each part its suite did not measure."""
    best, attention, drops, cut, rho = (
        f[key] for key in ("best", "attention", "knockout", "truncation", "rank_agreement")
    )
    cells = ["–", "–"] if best is None else [f"{best['layer']} {KINDS.get(best['kind'], best['kind'])}", _scored(best)]
    peak = max(attention, key=attention.get) if attention else None
    cells.append("–" if peak is None else f"{peak}: {attention[peak]:.1f}")
    top = max(drops, key=lambda layer: drops[layer]["drop"]) if drops else None
    cells.append(
        "–" if top is None else f"{top}: {drops[top]['drop']:+.2f} [{drops[top]['low']:.1f}, {drops[top]['high']:.1f}]"
    )
    if cut is None:
        cells += ["–", "–", "–"]
    else:
        speed = cut.get("speedup") or {}
        cells += [f"{cut['depth']} of {cut['blocks']}", _scored(cut)]
        cells.append(" / ".join("–" if speed.get(k) is None else f"{speed[k]:.2f}x" for k in ("extract", "predict")))
    cells.append("–" if rho is None else f"{rho:+.2f} ({len(f['rank_layers'])} layers)")
    return cells


def _scored(score: dict) -> str:
    """`58.00 [55.0, 61.0]`: a test score and its interval, in %."""
    return f"{score['test']:.2f} [{score['low']:.1f}, {score['high']:.1f}]"


def layer_metrics(found: dict) -> dict[str, float]:
    """The parent MLflow run's layer metrics (fractions, as every score it logs). A parent spans every task of the
    suite, so each key names its task first, then what it measures:
    `layer/<backbone>/<dataset>/<kind>/<layer>/test/balanced_accuracy` (kind: cls, ap, cls_ap),
    `layer/<backbone>/<dataset>/knockout/<layer>/test/balanced_accuracy_drop`,
    `layer/<backbone>/<dataset>/truncation/depth` and `.../truncation/test/balanced_accuracy`, and
    `layer/<backbone>/<dataset>/attention_rank_agreement` (Spearman's rho, `section_markdown`)."""
    metrics: dict[str, float] = {}
    for backbone, by_dataset in found.items():
        for dataset, f in by_dataset.items():
            task = f"layer/{backbone}/{dataset}"
            for kind, curve in (f["curves"] or {}).items():
                for layer, value in zip(f["layers"], curve["test"], strict=True):
                    metrics[f"{task}/{kind}/{layer}/test/balanced_accuracy"] = value / 100
            for layer, drop in (f["knockout"] or {}).items():
                metrics[f"{task}/knockout/{layer}/test/balanced_accuracy_drop"] = drop["drop"] / 100
            if f["truncation"] is not None:
                metrics[f"{task}/truncation/depth"] = f["truncation"]["depth"]
                metrics[f"{task}/truncation/test/balanced_accuracy"] = f["truncation"]["test"] / 100
            if f["rank_agreement"] is not None:
                metrics[f"{task}/attention_rank_agreement"] = f["rank_agreement"]
    return metrics
