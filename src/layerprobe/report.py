"""The paper-style results table: datasets x probes per backbone, with the gain of `alf` over `linear_last_cls`.

Pure functions from the evaluate stage's metrics summary ({backbone: {dataset: {probe: metrics}}}) to rows,
Markdown, CSV and a gains series that `dvc plots` can draw. Accuracies are reported in percent.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from layerprobe.config import REPORT_FILES

BASELINE = "linear_last_cls"
HEADLINE = "alf"
METRIC = "test_balanced_accuracy"  # the paper's headline metric


def metrics_summary(evaluations: list[dict]) -> dict:
    """The evaluate stage's summary {backbone: {dataset: {probe: test/val metrics}}} from per-probe evaluations."""
    summary: dict = {}
    for r in evaluations:
        summary.setdefault(r["backbone"], {}).setdefault(r["dataset"], {})[r["probe"]] = {
            "test_balanced_accuracy": r["test"]["balanced_accuracy"],
            "test_accuracy": r["test"]["accuracy"],
            "val_balanced_accuracy": r["val_balanced_accuracy"],
        }
    return summary


def flat_metrics(summary: dict) -> dict[str, float]:
    """`test/balanced_accuracy/<backbone>/<dataset>/<probe>` for the parent MLflow run."""
    return {
        f"test/balanced_accuracy/{b}/{d}/{p}": v["test_balanced_accuracy"]
        for b, datasets in summary.items()
        for d, probes in datasets.items()
        for p, v in probes.items()
    }


def evaluation_markdown(evaluations: list[dict], champions: dict[str, dict]) -> str:
    """One row per evaluated probe (percent), with its registered version and the champion marked."""
    lines = [
        "| backbone | dataset | probe | test balanced acc | test acc | val balanced acc | version |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in evaluations:
        crown = " (champion)" if champions.get(r["registered_model"], {}).get("probe") == r["probe"] else ""
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r['probe']} | {100 * r['test']['balanced_accuracy']:.2f} | "
            f"{100 * r['test']['accuracy']:.2f} | {100 * r['val_balanced_accuracy']:.2f} | {r['version']}{crown} |"
        )
    return "\n".join(lines)


def results_rows(summary: dict, *, probes: list[str], groups: dict[str, str | None] | None = None) -> list[dict]:
    """One row per (backbone, dataset): each probe's test balanced accuracy (%) and the headline gain (pp)."""
    rows = []
    for backbone, datasets in summary.items():
        for dataset, by_probe in datasets.items():
            row = {"backbone": backbone, "dataset": dataset, "group": (groups or {}).get(dataset) or ""}
            for probe in probes:
                value = by_probe.get(probe, {}).get(METRIC)
                row[probe] = None if value is None else 100.0 * value
            row["gain"] = _gain(row)
            rows.append(row)
    return rows


def _gain(row: dict) -> float | None:
    if row.get(HEADLINE) is None or row.get(BASELINE) is None:
        return None
    return row[HEADLINE] - row[BASELINE]


def mean_row(rows: list[dict], probes: list[str], *, backbone: str) -> dict:
    """The mean over datasets of one backbone (the paper's per-model summary)."""
    mine = [r for r in rows if r["backbone"] == backbone]
    mean = {"backbone": backbone, "dataset": "mean", "group": ""}
    for key in [*probes, "gain"]:
        values = [r[key] for r in mine if r.get(key) is not None]
        mean[key] = sum(values) / len(values) if values else None
    return mean


def layer_reading(heatmap: dict) -> dict:
    """Where a probe reads: the final layer's attention, the most-attended intermediate layer and the top layer.

    Shares are per layer (the mean over its tokens, as the paper's figure), in percent.
    """
    layers, means = list(heatmap["layers"]), [100.0 * m for m in heatmap["layer_means"]]
    inner = max(range(len(layers) - 1), key=lambda i: means[i]) if len(layers) > 1 else None
    top = max(range(len(layers)), key=lambda i: means[i])
    return {
        "final": means[-1],
        "intermediate": None if inner is None else means[inner],
        "intermediate_layer": None if inner is None else layers[inner],
        "top_layer": layers[top],
    }


def format_markdown(rows: list[dict], probes: list[str], heatmaps: dict[str, dict[str, dict]] | None = None) -> str:
    """One table per backbone: rows datasets (+ mean), columns probes and the gain of alf over linear_last_cls; then,
    where `heatmaps` has the backbone, where alf reads on each dataset (its layer attention)."""
    parts = [f"# Results: test balanced accuracy (%), gain = {HEADLINE} - {BASELINE} (pp)\n"]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        table = [r for r in rows if r["backbone"] == backbone] + [mean_row(rows, probes, backbone=backbone)]
        parts.append(f"\n## {backbone}\n")
        parts.append("| dataset | group | " + " | ".join(probes) + " | gain |")
        parts.append("|---|---|" + "---:|" * (len(probes) + 1))
        for r in table:
            best = max((r[p] for p in probes if r[p] is not None), default=None)
            cells = [_cell(r[p], bold=r[p] is not None and r[p] == best) for p in probes]
            gain = "" if r["gain"] is None else f"{r['gain']:+.2f}"
            parts.append(f"| {r['dataset']} | {r['group']} | " + " | ".join(cells) + f" | {gain} |")
        by_dataset = (heatmaps or {}).get(backbone, {})
        if by_dataset:
            parts.append(_reading_table([r for r in rows if r["backbone"] == backbone], by_dataset))
    return "\n".join(parts) + "\n"


def _reading_table(rows: list[dict], heatmaps: dict[str, dict]) -> str:
    """Per dataset: the gain, the final layer's attention share and the most-read layers (`layer_reading`)."""
    lines = [
        f"\nWhere {HEADLINE} reads (% of its attention per layer: the mean over the layer's CLS and AP tokens; "
        "spread evenly it would be 100 / tokens read):\n",
        "| dataset | group | gain | final layer | most-read intermediate layer | most-read layer |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in (r for r in rows if r["dataset"] in heatmaps):
        read = layer_reading(heatmaps[r["dataset"]])
        gain = "" if r["gain"] is None else f"{r['gain']:+.2f}"
        inner = "–" if read["intermediate"] is None else f"{read['intermediate_layer']}: {read['intermediate']:.1f}"
        lines.append(
            f"| {r['dataset']} | {r['group']} | {gain} | {read['final']:.1f} | {inner} | {read['top_layer']} |"
        )
    return "\n".join(lines)


def _cell(value: float | None, *, bold: bool) -> str:
    if value is None:
        return "–"
    return f"**{value:.2f}**" if bold else f"{value:.2f}"


def format_csv(rows: list[dict], probes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["backbone", "dataset", "group", *probes, "gain"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v)) for k, v in row.items()})
    return buffer.getvalue()


def gains_series(rows: list[dict]) -> list[dict]:
    """`[{task, gain}]` for `dvc plots` (a bar per backbone/dataset)."""
    return [{"task": f"{r['backbone']}/{r['dataset']}", "gain": r["gain"]} for r in rows if r["gain"] is not None]


def attention_rows(heatmaps: dict[str, dict[str, dict]]) -> list[dict]:
    """Long-format layer attention, `{backbone, dataset, layer, token, share}` (token "layer" = the per-layer mean)."""
    rows = []
    for backbone, by_dataset in heatmaps.items():
        for dataset, heatmap in by_dataset.items():
            for layer, weights, mean in zip(heatmap["layers"], heatmap["weights"], heatmap["layer_means"], strict=True):
                for token, weight in zip([*heatmap["tokens"], "layer"], [*weights, mean], strict=True):
                    if weight is not None:
                        rows.append({"backbone": backbone, "dataset": dataset, "layer": layer, "token": token,
                                     "share": weight})  # fmt: skip
    return rows


def write_report(
    summary: dict,
    out_dir: Path,
    *,
    probes: list[str],
    groups: dict[str, str | None],
    heatmaps: dict[str, dict[str, dict]],
) -> dict[str, Path]:
    """Write report.md, report.csv, gains.json and gains.png, and the layer attention of `alf`: one matrix figure per
    backbone (`attention/<backbone>.png`, rows datasets, columns layers) and its numbers (attention.json).

    `heatmaps` maps backbone -> dataset -> `metrics.layer_attention_heatmap` output. Returns every file written.
    """
    from layerprobe.plots import plot_attention_matrix, plot_gains

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = results_rows(summary, probes=probes, groups=groups)
    files = {key: out_dir / name for key, name in REPORT_FILES.items() if key != "attention"}
    files["markdown"].write_text(format_markdown(rows, probes, heatmaps))
    files["csv"].write_text(format_csv(rows, probes))
    series = gains_series(rows)
    files["gains"].write_text(json.dumps(series, indent=2) + "\n")
    if series:
        plot_gains({s["task"]: s["gain"] for s in series}, files["gains_png"], probe=HEADLINE, baseline=BASELINE)
    else:
        del files["gains_png"]  # no task has both probes: nothing to compare
    files["attention_json"].write_text(json.dumps(attention_rows(heatmaps), indent=1) + "\n")
    for backbone, by_dataset in heatmaps.items():
        labels = {f"{d} ({groups[d]})" if groups.get(d) else d: heatmap for d, heatmap in by_dataset.items()}
        files[f"attention/{backbone}"] = plot_attention_matrix(
            labels, out_dir / REPORT_FILES["attention"] / f"{backbone}.png",
            title=f"{backbone}: where {HEADLINE} attends, per dataset (test images, mean over heads)",
        )  # fmt: skip
    return files
