"""The paper-style results table: datasets x probes per backbone, with the gain of `alf` over the backbone's
baseline (`linear_last_cls`; `linear_last_ap` for MAE, as the paper's appendix).

Pure functions from the evaluate stage's metrics summary ({backbone: {dataset: {probe: metrics}}}) to rows,
Markdown, CSV and a gains series that `dvc plots` can draw. Accuracies are reported in percent, each with a bootstrap
interval over test images (and the std over seeds when there are several); each gain with a paired-bootstrap
interval from both probes' predictions on the same test images (`gain_intervals`).
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from pathlib import Path

import numpy as np

from layerprobe.files import begin_output, swap_in, write_bytes_atomic
from layerprobe.metrics import CI_LEVEL, paired_bootstrap_draws, percentile_interval

REPORT_FILES = {  # the report stage's outputs (dvc.yaml's plots name two of them)
    "markdown": "report.md",
    "csv": "report.csv",
    "gains": "gains.json",
    "gains_png": "gains.png",
    "attention_json": "attention.json",  # alf's layer attention, long format
    "attention": "attention",  # a folder: one layer-attention matrix figure per backbone
    "layers": "layers",  # a folder: per (backbone, dataset) with layer findings, its picture and curves (JSON)
}

BASELINE = "linear_last_cls"  # the standard linear probe: every gain's baseline unless the family has its own
# A backbone family's own baseline: MAE's CLS token is not trained by its objective, so the paper's appendix measures
# MAE's gains against the linear probe on the final layer's average-pooled token.
BASELINES = {"mae": "linear_last_ap"}
HEADLINE = "alf"
METRIC = "test_balanced_accuracy"  # the paper's headline metric
MEAN = "mean"  # the row (and gain interval) of the mean over a backbone's datasets
LEVEL = f"{100 * CI_LEVEL:g} %"


def baseline_probe(family: str | None) -> str:
    """The probe a backbone's gain is measured against, by its family (`backbones.<name>.family`)."""
    return BASELINES.get(family or "", BASELINE)


def metrics_summary(evaluations: list[dict]) -> dict:
    """The evaluate stage's summary {backbone: {dataset: {probe: test/val metrics}}} from per-probe evaluations:
    means over seeds, their std, and the bootstrap interval over test images of test balanced accuracy."""
    summary: dict = {}
    for r in evaluations:
        low, high = r["test_ci"]["balanced_accuracy"]
        summary.setdefault(r["backbone"], {}).setdefault(r["dataset"], {})[r["probe"]] = {
            "test_balanced_accuracy": r["test"]["balanced_accuracy"],
            "test_balanced_accuracy_ci_low": low,
            "test_balanced_accuracy_ci_high": high,
            "test_balanced_accuracy_std": r["test_std"]["balanced_accuracy"],
            "test_accuracy": r["test"]["accuracy"],
            "val_balanced_accuracy": r["val_balanced_accuracy"],
            "num_seeds": r["num_seeds"],
        }
    return summary


def merge_summaries(earlier: dict, summary: dict, backbones: list[str], datasets: list[str], probes: list[str]) -> dict:
    """`summary`'s rows over `earlier`'s, for the suite's tasks (backbone, dataset, probe) only, in its order."""
    merged: dict = {}
    for b, d, p in ((b, d, p) for b in backbones for d in datasets for p in probes):
        row = summary.get(b, {}).get(d, {}).get(p) or earlier.get(b, {}).get(d, {}).get(p)
        if row is not None:
            merged.setdefault(b, {}).setdefault(d, {})[p] = row
    return merged


def gain_metrics(intervals: dict) -> dict[str, float]:
    """`test/balanced_accuracy_gain[_ci_low|_ci_high]/<backbone>/<dataset>` (fractions) for the parent MLflow run."""
    return {
        f"test/balanced_accuracy_gain{suffix}/{b}/{d}": interval[key]
        for b, datasets in intervals.items()
        for d, interval in datasets.items()
        for suffix, key in (("", "gain"), ("_ci_low", "low"), ("_ci_high", "high"))
    }


def suite_metrics(summary: dict, intervals: dict) -> dict[str, float]:
    """The parent MLflow run's own scores, so the runs table's parent row reads without its children (fractions):
    `test/balanced_accuracy` and `val/balanced_accuracy` are HEADLINE's mean over the suite's tasks (the columns the
    children fill), `test/balanced_accuracy/<probe>` each probe's mean, and `test/balanced_accuracy_gain` (+
    `_ci_low`, `_ci_high`) the mean gain over the backbones' means, with its interval where the suite has one
    backbone (each backbone's own: `gain_metrics`)."""
    scores: dict[str, dict[str, list[float]]] = {}
    for by_probe in (by_probe for datasets in summary.values() for by_probe in datasets.values()):
        for probe, metrics in by_probe.items():
            for split in ("test", "val"):
                scores.setdefault(split, {}).setdefault(probe, []).append(metrics.get(f"{split}_balanced_accuracy"))
    means = {s: {p: float(np.mean(v)) for p, v in by.items() if None not in v} for s, by in scores.items()}
    metrics = {f"test/balanced_accuracy/{probe}": mean for probe, mean in means.get("test", {}).items()}
    metrics |= {f"{s}/balanced_accuracy": means[s][HEADLINE] for s in means if HEADLINE in means[s]}
    gains = [by[MEAN] for by in intervals.values() if MEAN in by]
    if gains:
        metrics["test/balanced_accuracy_gain"] = float(np.mean([g["gain"] for g in gains]))
    if len(gains) == 1 == len(summary):
        metrics |= {f"test/balanced_accuracy_gain_ci_{k}": gains[0][k] for k in ("low", "high")}
    return metrics


def evaluation_markdown(evaluations: list[dict], champions: dict[str, dict]) -> str:
    """One row per evaluated probe (percent), with its registered version and the champion marked."""
    lines = [
        f"| backbone | dataset | probe | test balanced acc | {LEVEL} interval | test acc | val balanced acc | "
        "version |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in evaluations:
        crown = " (champion)" if champions.get(r["registered_model"], {}).get("probe") == r["probe"] else ""
        low, high = r["test_ci"]["balanced_accuracy"]
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r['probe']} | {100 * r['test']['balanced_accuracy']:.2f} | "
            f"[{100 * low:.1f}, {100 * high:.1f}] | {100 * r['test']['accuracy']:.2f} | "
            f"{100 * r['val_balanced_accuracy']:.2f} | {r['version']}{crown} |"
        )
    return "\n".join(lines)


def gain_intervals(
    predictions: dict[str, dict[str, dict[str, dict]]], *, baselines: dict[str, str] | None = None
) -> dict[str, dict[str, dict]]:
    """Paired-bootstrap intervals of the gain of HEADLINE over each backbone's baseline, per task and for each
    backbone's mean.

    Args:
        predictions: backbone -> dataset -> probe -> the evaluate step's predictions file (`files.read_arrays`:
            labels [N], predictions [S, N], num_classes); tasks lacking either probe are skipped.
        baselines: backbone -> its baseline probe (`baseline_probe`); BASELINE where a backbone has none.

    Returns:
        backbone -> dataset (and MEAN, over the datasets with both probes) -> {"gain", "low", "high"} as fractions.
        Each task resamples its own test images (seeded by its name, so reruns agree); the mean's interval averages
        the tasks' draws, as the datasets' test sets are independent.
    """
    intervals: dict[str, dict[str, dict]] = {}
    for backbone, datasets in predictions.items():
        baseline = (baselines or {}).get(backbone, BASELINE)
        draws = []
        for dataset, by_probe in datasets.items():
            if HEADLINE not in by_probe or baseline not in by_probe:
                continue
            ours, theirs = by_probe[HEADLINE], by_probe[baseline]
            if not np.array_equal(ours["labels"], theirs["labels"]):
                raise ValueError(
                    f"{backbone}/{dataset}: {HEADLINE} and {baseline} were not scored on the same test images "
                    "(their labels differ); re-run evaluate"
                )
            gain, task_draws = paired_bootstrap_draws(
                ours["labels"],
                ours["predictions"],
                theirs["predictions"],
                int(ours["num_classes"]),
                seed=zlib.crc32(f"{backbone}/{dataset}".encode()),
            )
            low, high = percentile_interval(task_draws)
            intervals.setdefault(backbone, {})[dataset] = {"gain": gain, "low": low, "high": high}
            draws.append(task_draws)
        if draws:
            mean = [intervals[backbone][d]["gain"] for d in intervals[backbone]]
            low, high = percentile_interval(np.mean(draws, axis=0))
            intervals[backbone][MEAN] = {"gain": float(np.mean(mean)), "low": low, "high": high}
    return intervals


def results_rows(
    summary: dict,
    *,
    probes: list[str],
    groups: dict[str, str | None] | None = None,
    intervals: dict[str, dict[str, dict]] | None = None,
    baselines: dict[str, str] | None = None,
) -> list[dict]:
    """One row per (backbone, dataset): each probe's test balanced accuracy (%), its bootstrap interval
    (`<probe>_ci_low`, `<probe>_ci_high`) and std over seeds (`<probe>_std`, None for one seed), and the headline gain
    (pp) over the backbone's `baseline` (`baselines`, as in `gain_intervals`) with its paired interval
    (`gain_ci_low`, `gain_ci_high`) from `intervals` (`gain_intervals`)."""
    rows = []
    for backbone, datasets in summary.items():
        baseline = (baselines or {}).get(backbone, BASELINE)
        for dataset, by_probe in datasets.items():
            row = {"backbone": backbone, "dataset": dataset, "group": (groups or {}).get(dataset) or ""}
            for probe in probes:
                value = by_probe.get(probe, {}).get(METRIC)
                row[probe] = None if value is None else 100.0 * value
            row["gain"], row["baseline"] = _gain(by_probe, baseline), baseline
            for probe in probes:
                metrics = by_probe.get(probe, {})
                for key in ("ci_low", "ci_high"):
                    row[f"{probe}_{key}"] = _percent(metrics.get(f"{METRIC}_{key}"))
                several = metrics.get("num_seeds", 1) > 1
                row[f"{probe}_std"] = _percent(metrics.get(f"{METRIC}_std")) if several else None
            row.update(_gain_interval(row, (intervals or {}).get(backbone, {}).get(dataset)))
            rows.append(row)
    return rows


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _gain_interval(row: dict, interval: dict | None) -> dict[str, float | None]:
    """The gain's interval in pp, where the row has a gain and the probes' predictions gave one."""
    if row["gain"] is None or interval is None:
        return {"gain_ci_low": None, "gain_ci_high": None}
    return {"gain_ci_low": 100.0 * interval["low"], "gain_ci_high": 100.0 * interval["high"]}


def _gain(by_probe: dict, baseline: str) -> float | None:
    """HEADLINE's accuracy minus `baseline`'s (pp), read from the summary: the baseline need not be a column."""
    ours, theirs = (by_probe.get(p, {}).get(METRIC) for p in (HEADLINE, baseline))
    if ours is None or theirs is None:
        return None
    return 100.0 * ours - 100.0 * theirs


def mean_row(rows: list[dict], probes: list[str], *, backbone: str, intervals: dict | None = None) -> dict:
    """The mean over datasets of one backbone (the paper's per-model summary), with the mean gain's interval where
    `intervals` (`gain_intervals`) covers every dataset that has a gain."""
    mine = [r for r in rows if r["backbone"] == backbone]
    mean = {"backbone": backbone, "dataset": MEAN, "group": "", "baseline": _baseline_of(mine)}
    for key in [*probes, "gain"]:
        values = [r[key] for r in mine if r.get(key) is not None]
        mean[key] = sum(values) / len(values) if values else None
    computed = (intervals or {}).get(backbone, {})
    covered = {r["dataset"] for r in mine if r["gain"] is not None} == set(computed) - {MEAN}
    mean.update(_gain_interval(mean, computed.get(MEAN) if covered else None))
    return mean


def _baseline_of(rows: list[dict]) -> str:
    """The baseline of one backbone's rows."""
    return rows[0]["baseline"] if rows else BASELINE


def headline(rows: list[dict], probes: list[str], *, intervals: dict | None = None) -> str:
    """The results table's headline, one line per backbone: the mean gain of HEADLINE over its baseline (pp, with the
    interval of the mean) over the datasets that have both (`results_rows` rows; the parent MLflow run's description).
    """
    lines = [f"Mean gain of {HEADLINE} over each backbone's baseline (test balanced accuracy, pp, {LEVEL} interval):"]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mean = mean_row(rows, probes, backbone=backbone, intervals=intervals)
        datasets = sum(r["gain"] is not None for r in rows if r["backbone"] == backbone)
        gain = "no dataset with both probes" if mean["gain"] is None else f"{_gain_cell(mean)} over {datasets} datasets"
        lines.append(f"- {backbone}: {gain} (vs {mean['baseline']})")
    return "\n".join(lines)


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


def format_markdown(
    rows: list[dict],
    probes: list[str],
    heatmaps: dict[str, dict[str, dict]] | None = None,
    *,
    intervals: dict[str, dict[str, dict]] | None = None,
) -> str:
    """One table per backbone: rows datasets (+ mean), columns probes and the gain of alf over the backbone's
    baseline (named in the column), each with its interval in brackets (and ± the std over seeds where there are
    several); then, where `heatmaps` has the backbone, where alf reads on each dataset (its layer attention)."""
    parts = [
        f"# Results: test balanced accuracy (%), gain = {HEADLINE} - baseline (pp)\n",
        f"The baseline is {BASELINE}, the standard linear probe; for MAE it is {BASELINES['mae']}, as in the paper's "
        "appendix (MAE's CLS token is not trained by its objective). Each table's gain column names it.",
        f"[low, high]: {LEVEL} bootstrap interval over test images (for the gain: paired, both probes scored on the "
        "same resampled images; for the mean: each dataset resampled on its own). ± std over seeds where there are "
        "several.",
    ]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        table = [r for r in rows if r["backbone"] == backbone]
        table.append(mean_row(rows, probes, backbone=backbone, intervals=intervals))
        parts.append(f"\n## {backbone}\n")
        parts.append("| dataset | group | " + " | ".join(probes) + f" | gain vs {_baseline_of(table)} |")
        parts.append("|---|---|" + "---:|" * (len(probes) + 1))
        for r in table:
            best = max((r[p] for p in probes if r[p] is not None), default=None)
            cells = [
                _cell(
                    r[p],
                    bold=r[p] is not None and r[p] == best,
                    std=r.get(f"{p}_std"),
                    interval=(r.get(f"{p}_ci_low"), r.get(f"{p}_ci_high")),
                )
                for p in probes
            ]
            parts.append(f"| {r['dataset']} | {r['group']} | " + " | ".join(cells) + f" | {_gain_cell(r)} |")
        by_dataset = (heatmaps or {}).get(backbone, {})
        if by_dataset:
            parts.append(_reading_table([r for r in rows if r["backbone"] == backbone], by_dataset))
    return "\n".join(parts) + "\n"


def _reading_table(rows: list[dict], heatmaps: dict[str, dict]) -> str:
    """Per dataset: the gain, the final layer's attention share and the most-read layers (`layer_reading`)."""
    lines = [
        f"\nWhere {HEADLINE} reads (% of its attention per layer: the mean over the layer's CLS and AP tokens; "
        "spread evenly it would be 100 / tokens read):\n",
        f"| dataset | group | gain vs {_baseline_of(rows)} | final layer | most-read intermediate layer | "
        "most-read layer |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in (r for r in rows if r["dataset"] in heatmaps):
        read = layer_reading(heatmaps[r["dataset"]])
        gain = _gain_cell(r)
        inner = "–" if read["intermediate"] is None else f"{read['intermediate_layer']}: {read['intermediate']:.1f}"
        lines.append(
            f"| {r['dataset']} | {r['group']} | {gain} | {read['final']:.1f} | {inner} | {read['top_layer']} |"
        )
    return "\n".join(lines)


def _cell(
    value: float | None,
    *,
    bold: bool,
    std: float | None = None,
    interval: tuple[float | None, float | None] = (None, None),
) -> str:
    """`75.00`, bold for the row's best, then ` ± 0.81` (std over seeds) and ` [70.1, 79.8]` where known."""
    if value is None:
        return "–"
    text = f"**{value:.2f}**" if bold else f"{value:.2f}"
    text += "" if std is None else f" ± {std:.2f}"
    return text + _interval(*interval)


def _gain_cell(row: dict) -> str:
    """`+12.30 [8.1, 16.0]`: the gain (pp) and its paired interval where known."""
    if row["gain"] is None:
        return ""
    return f"{row['gain']:+.2f}" + _interval(row.get("gain_ci_low"), row.get("gain_ci_high"))


def _interval(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f" [{low:.1f}, {high:.1f}]"


def csv_columns(probes: list[str]) -> list[str]:
    """The table's columns and the gain's baseline, then each probe's interval, the gain's interval and each probe's
    std over seeds."""
    intervals = [f"{p}_{bound}" for p in [*probes, "gain"] for bound in ("ci_low", "ci_high")]
    return ["backbone", "dataset", "group", *probes, "gain", "baseline", *intervals, *(f"{p}_std" for p in probes)]


def format_csv(rows: list[dict], probes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(probes), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v)) for k, v in row.items()})
    return buffer.getvalue()


def gains_series(rows: list[dict]) -> list[dict]:
    """`[{task, gain, baseline, gain_ci_low, gain_ci_high}]` (pp; None where no interval) for `dvc plots`: a bar
    per backbone/dataset."""
    return [
        {
            "task": f"{r['backbone']}/{r['dataset']}",
            "gain": r["gain"],
            "baseline": r["baseline"],
            "gain_ci_low": r.get("gain_ci_low"),
            "gain_ci_high": r.get("gain_ci_high"),
        }
        for r in rows
        if r["gain"] is not None
    ]


def attention_rows(heatmaps: dict[str, dict[str, dict]]) -> list[dict]:
    """Long-format layer attention, `{backbone, dataset, layer, token, share}` (token "layer" = the per-layer mean)."""
    rows = []
    for backbone, by_dataset in heatmaps.items():
        for dataset, heatmap in by_dataset.items():
            for layer, weights, mean in zip(heatmap["layers"], heatmap["weights"], heatmap["layer_means"], strict=True):
                for token, weight in zip([*heatmap["tokens"], "layer"], [*weights, mean], strict=True):
                    if weight is not None:
                        rows.append(
                            {"backbone": backbone, "dataset": dataset, "layer": layer, "token": token, "share": weight}
                        )
    return rows


def write_report(
    summary: dict,
    out_dir: Path,
    *,
    probes: list[str],
    groups: dict[str, str | None],
    heatmaps: dict[str, dict[str, dict]],
    intervals: dict[str, dict[str, dict]] | None = None,
    baselines: dict[str, str] | None = None,
    layers: dict[str, dict[str, dict]] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.csv, gains.json and gains.png, and the layer attention of `alf`: one matrix figure per
    backbone (`attention/<backbone>.png`, rows datasets, columns layers) and its numbers (attention.json); and where
    `layers` (`layer_report.layer_findings`) has tasks, the "Which layers matter" section and per task its picture
    and curves (`layers/<backbone>-<dataset>.png` and `.json`).

    `heatmaps` maps backbone -> dataset -> `metrics.layer_attention_heatmap` output; `intervals` is `gain_intervals`
    output (without it, gains carry no interval); `baselines` maps a backbone to its baseline probe (`baseline_probe`;
    BASELINE where absent). Returns every file written.
    """
    from layerprobe.layer_report import curve_rows, draw_findings, section_markdown
    from layerprobe.plots import plot_attention_matrix, plot_gains

    out_dir = Path(out_dir)
    staging = begin_output(out_dir, "report", marker=None)  # the last report stays whole until this one replaces it
    rows = results_rows(summary, probes=probes, groups=groups, intervals=intervals, baselines=baselines)
    files = {key: staging / name for key, name in REPORT_FILES.items() if key not in ("attention", "layers")}
    section = section_markdown(layers, figures=REPORT_FILES["layers"]) if layers else ""
    files["markdown"].write_text(format_markdown(rows, probes, heatmaps, intervals=intervals) + section)
    files["csv"].write_text(format_csv(rows, probes))
    series = gains_series(rows)
    write_bytes_atomic(files["gains"], (json.dumps(series, indent=2) + "\n").encode())
    if series:
        bounds = {s["task"]: (s["gain_ci_low"], s["gain_ci_high"]) for s in series if s["gain_ci_low"] is not None}
        baseline = " / ".join(dict.fromkeys(s["baseline"] for s in series))  # each baseline in use, once
        plot_gains(
            {s["task"]: s["gain"] for s in series},
            files["gains_png"],
            probe=HEADLINE,
            baseline=baseline,
            intervals=bounds,
            level=LEVEL,
        )
    else:
        del files["gains_png"]  # no task has both probes: nothing to compare
    write_bytes_atomic(files["attention_json"], (json.dumps(attention_rows(heatmaps), indent=1) + "\n").encode())
    for backbone, by_dataset in heatmaps.items():
        labels = {f"{d} ({groups[d]})" if groups.get(d) else d: heatmap for d, heatmap in by_dataset.items()}
        files[f"attention/{backbone}"] = plot_attention_matrix(
            labels,
            staging / REPORT_FILES["attention"] / f"{backbone}.png",
            title=f"{backbone}: where {HEADLINE} attends, per dataset (test images, mean over heads)",
        )
    for backbone, dataset, findings in ((b, d, f) for b, by in (layers or {}).items() for d, f in by.items()):
        stem = staging / REPORT_FILES["layers"] / f"{backbone}-{dataset}"
        title = f"{backbone} / {dataset}: which layers matter (test images)"
        files[f"layers/{backbone}-{dataset}"] = draw_findings(findings, stem.with_suffix(".png"), title=title)
        rows_json = (json.dumps(curve_rows(findings), indent=1) + "\n").encode()
        files[f"layers/{backbone}-{dataset}.json"] = write_bytes_atomic(stem.with_suffix(".json"), rows_json)
    swap_in(staging, out_dir)
    return {key: out_dir / Path(path).relative_to(staging) for key, path in files.items()}
