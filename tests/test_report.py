"""The paper-style table: rows datasets, columns probes, gain of alf over linear_last_cls, intervals on each."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from layerprobe.files import read_arrays, write_arrays
from layerprobe.metrics import paired_bootstrap_gain
from layerprobe.params import load_params
from layerprobe.report import (
    MEAN,
    baseline_probe,
    csv_columns,
    format_csv,
    format_markdown,
    gain_intervals,
    gain_metrics,
    gains_series,
    mean_row,
    metrics_summary,
    results_rows,
    write_report,
)

PROBES = ["linear_last_cls", "alf"]


def probe_metrics(value: float, low: float, high: float, std: float = 0.0, seeds: int = 1) -> dict:
    return {
        "test_balanced_accuracy": value,
        "test_balanced_accuracy_ci_low": low,
        "test_balanced_accuracy_ci_high": high,
        "test_balanced_accuracy_std": std,
        "num_seeds": seeds,
    }


SUMMARY = {
    "vit": {
        "digits": {"linear_last_cls": probe_metrics(0.50, 0.46, 0.54), "alf": probe_metrics(0.75, 0.71, 0.79)},
        "texture": {"linear_last_cls": probe_metrics(0.40, 0.36, 0.44), "alf": probe_metrics(0.30, 0.26, 0.34)},
    }
}
INTERVALS = {  # gain_intervals output, fractions
    "vit": {
        "digits": {"gain": 0.25, "low": 0.181, "high": 0.32},
        "texture": {"gain": -0.10, "low": -0.15, "high": -0.05},
        MEAN: {"gain": 0.075, "low": 0.04, "high": 0.11},
    }
}


def test_rows_hold_percent_accuracies_gains_and_their_intervals():
    rows = results_rows(SUMMARY, probes=PROBES, groups={"digits": "natural"}, intervals=INTERVALS)
    assert rows[0]["alf"] == pytest.approx(75.0)
    assert rows[0]["gain"] == pytest.approx(25.0)
    assert rows[1]["gain"] == pytest.approx(-10.0)
    assert rows[0]["group"] == "natural"
    assert (rows[0]["alf_ci_low"], rows[0]["alf_ci_high"]) == pytest.approx((71.0, 79.0))
    assert (rows[0]["gain_ci_low"], rows[0]["gain_ci_high"]) == pytest.approx((18.1, 32.0))
    assert rows[0]["alf_std"] is None  # one seed: no spread to show
    mean = mean_row(rows, PROBES, backbone="vit", intervals=INTERVALS)
    assert mean["gain"] == pytest.approx(7.5)
    assert (mean["gain_ci_low"], mean["gain_ci_high"]) == pytest.approx((4.0, 11.0))
    # the mean's interval only where it covers exactly the datasets of the mean
    partial = {"vit": {"digits": INTERVALS["vit"]["digits"], MEAN: INTERVALS["vit"][MEAN]}}
    rows = results_rows(SUMMARY, probes=PROBES, intervals=partial)
    assert mean_row(rows, PROBES, backbone="vit", intervals=partial)["gain_ci_low"] is None


def test_markdown_and_csv_render_every_probe_the_mean_and_the_intervals():
    rows = results_rows(SUMMARY, probes=PROBES, intervals=INTERVALS)
    markdown = format_markdown(rows, PROBES, intervals=INTERVALS)
    assert "## vit" in markdown and "| mean |" in markdown
    assert "| digits |  | 50.00 [46.0, 54.0] | **75.00** [71.0, 79.0] | +25.00 [18.1, 32.0] |" in markdown
    assert "| mean |  | 45.00 | **52.50** | +7.50 [4.0, 11.0] |" in markdown
    assert "95 % bootstrap interval over test images" in markdown and "±" not in markdown.split("## vit")[1]
    csv_text = format_csv(rows, PROBES)
    header = csv_text.splitlines()[0].split(",")
    assert header == csv_columns(PROBES)
    assert header[:7] == ["backbone", "dataset", "group", "linear_last_cls", "alf", "gain", "baseline"]  # the table's
    assert header[7:] == [
        "linear_last_cls_ci_low",
        "linear_last_cls_ci_high",
        "alf_ci_low",
        "alf_ci_high",
        "gain_ci_low",
        "gain_ci_high",
        "linear_last_cls_std",
        "alf_std",
    ]
    assert csv_text.splitlines()[1] == (
        "vit,digits,,50.0000,75.0000,25.0000,linear_last_cls,46.0000,54.0000,71.0000,79.0000,18.1000,32.0000,,"
    )


def test_several_seeds_show_their_std():
    summary = {
        "vit": {
            "d": {
                "linear_last_cls": probe_metrics(0.5, 0.45, 0.55, std=0.012, seeds=3),
                "alf": probe_metrics(0.6, 0.55, 0.65, std=0.034, seeds=3),
            }
        }
    }
    rows = results_rows(summary, probes=PROBES)
    assert rows[0]["alf_std"] == pytest.approx(3.4)
    markdown = format_markdown(rows, PROBES)
    assert "| 50.00 ± 1.20 [45.0, 55.0] | **60.00** ± 3.40 [55.0, 65.0] | +10.00 |" in markdown
    assert format_csv(rows, PROBES).splitlines()[1].endswith(",1.2000,3.4000")


def test_missing_probe_leaves_no_gain():
    rows = results_rows({"vit": {"d": {"alf": {"test_balanced_accuracy": 0.9}}}}, probes=PROBES)
    assert rows[0]["gain"] is None
    assert gains_series(rows) == []
    assert "| d |  | – | **90.00** |  |" in format_markdown(rows, PROBES)  # a summary without intervals renders


def predictions_file(tmp_path, name: str, labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Round trip through the evaluate step's file format."""
    path = write_arrays(
        tmp_path / f"{name}.npz",
        labels=labels.astype(np.uint8),
        predictions=np.atleast_2d(predictions).astype(np.uint8),
        seeds=np.arange(1),
        num_classes=np.int64(3),
    )
    return read_arrays(path)


def test_gain_intervals_pair_the_two_probes_on_each_task_and_average_tasks_for_the_mean(tmp_path):
    rng = np.random.default_rng(0)
    tasks = {}
    for dataset, n in (("digits", 1200), ("texture", 1200)):
        labels = rng.integers(0, 3, n)
        alf = np.where(rng.random(n) < 0.8, labels, (labels + 1) % 3)
        linear = np.where(rng.random(n) < 0.6, labels, (labels + 2) % 3)
        tasks[dataset] = {
            "alf": predictions_file(tmp_path, f"{dataset}-alf", labels, alf),
            "linear_last_cls": predictions_file(tmp_path, f"{dataset}-lin", labels, linear),
        }
    same = {"alf": tasks["digits"]["alf"], "linear_last_cls": tasks["digits"]["alf"]}
    intervals = gain_intervals({"vit": tasks, "dino": {"same": same, "alone": {"alf": same["alf"]}}})

    digits = tasks["digits"]
    gain, low, high = paired_bootstrap_gain(
        digits["alf"]["labels"], digits["alf"]["predictions"], digits["linear_last_cls"]["predictions"], 3
    )
    assert intervals["vit"]["digits"]["gain"] == pytest.approx(gain)
    assert 0 < intervals["vit"]["digits"]["low"] < gain < intervals["vit"]["digits"]["high"]
    assert intervals["vit"]["digits"]["high"] - intervals["vit"]["digits"]["low"] == pytest.approx(high - low, rel=0.15)
    mean = intervals["vit"][MEAN]
    assert mean["gain"] == pytest.approx((gain + intervals["vit"]["texture"]["gain"]) / 2)
    widths = [intervals["vit"][d]["high"] - intervals["vit"][d]["low"] for d in ("digits", "texture")]
    # independent tasks: the mean's width is sqrt(w1^2 + w2^2) / 2, narrower than either task's
    assert mean["high"] - mean["low"] == pytest.approx(np.hypot(*widths) / 2, rel=0.15)
    assert intervals["dino"] == {
        "same": {"gain": 0.0, "low": 0.0, "high": 0.0},
        MEAN: {"gain": 0.0, "low": 0.0, "high": 0.0},
    }
    assert gain_intervals({"vit": tasks}) == {"vit": intervals["vit"]}  # seeded by task: reruns agree
    metrics = gain_metrics(intervals)
    assert metrics["test/balanced_accuracy_gain/vit/digits"] == pytest.approx(gain)
    assert metrics["test/balanced_accuracy_gain_ci_low/vit/mean"] == mean["low"]

    linear = tasks["texture"]["linear_last_cls"]
    shifted = {**linear, "labels": np.roll(linear["labels"], 1)}
    with pytest.raises(ValueError, match="vit/texture: alf and linear_last_cls were not scored on the same test"):
        gain_intervals({"vit": {"texture": {"alf": tasks["texture"]["alf"], "linear_last_cls": shifted}}})


def test_write_report_writes_tables_gains_with_intervals_and_one_attention_matrix_per_backbone(tmp_path):
    heatmap = {
        "layers": ["block1", "final"],
        "tokens": ["cls", "ap"],
        "weights": [[0.1, 0.2], [0.3, 0.4]],
        "layer_means": [0.15, 0.35],
    }
    heatmaps = {"vit": {"digits": heatmap, "texture": heatmap}, "dino": {"digits": heatmap}}
    files = write_report(
        SUMMARY,
        tmp_path / "report",
        probes=PROBES,
        groups={"digits": "natural"},
        heatmaps=heatmaps,
        intervals=INTERVALS,
    )
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0
    assert {"attention/vit", "attention/dino"} <= set(files)
    assert json.loads(files["gains"].read_text())[0] == {
        "task": "vit/digits",
        "gain": pytest.approx(25.0),
        "baseline": "linear_last_cls",
        "gain_ci_low": pytest.approx(18.1),
        "gain_ci_high": pytest.approx(32.0),
    }
    markdown = files["markdown"].read_text()
    assert "| digits | natural | +25.00 [18.1, 32.0] |" in markdown  # the reading table carries the interval too
    assert matplotlib.image.imread(files["gains_png"]).std() > 0.05
    attention = json.loads(files["attention_json"].read_text())
    assert len(attention) == 3 * 2 * 3  # 3 (backbone, dataset) pairs x 2 layers x (cls, ap, layer mean)
    assert {"backbone": "vit", "dataset": "texture", "layer": "final", "token": "layer", "share": 0.35} in attention


def test_metrics_summary_carries_interval_std_and_seed_count():
    evaluation = {
        "backbone": "vit",
        "dataset": "d",
        "probe": "alf",
        "test": {"balanced_accuracy": 0.7, "accuracy": 0.72},
        "test_std": {"balanced_accuracy": 0.01, "accuracy": 0.02},
        "test_ci": {"balanced_accuracy": [0.65, 0.75]},
        "val_balanced_accuracy": 0.69,
        "num_seeds": 2,
    }
    assert metrics_summary([evaluation])["vit"]["d"]["alf"] == {
        **probe_metrics(0.7, 0.65, 0.75, std=0.01, seeds=2),
        "test_accuracy": 0.72,
        "val_balanced_accuracy": 0.69,
    }


def test_mae_gains_are_measured_against_the_final_ap_token_and_the_gain_column_names_it(tmp_path):
    paper = load_params(Path(__file__).resolve().parents[1] / "params.paper.yaml")
    baselines = {name: baseline_probe(paper.backbones[name].family) for name in ("mae_b16", "vit_b16", "clip_b16")}
    assert baselines == {"mae_b16": "linear_last_ap", "vit_b16": "linear_last_cls", "clip_b16": "linear_last_cls"}
    by_probe = {
        "linear_last_cls": probe_metrics(0.20, 0.15, 0.25),
        "linear_last_ap": probe_metrics(0.60, 0.55, 0.65),
        "alf": probe_metrics(0.70, 0.65, 0.75),
    }
    summary = {"mae_b16": {"digits": by_probe}, "vit_b16": {"digits": by_probe}}
    rows = results_rows(summary, probes=PROBES, baselines=baselines)  # linear_last_ap need not be a column
    # The paper's appendix: for MAE, gain = acc(alf) - acc(linear_last_ap); for the others acc(alf) - acc(CLS probe).
    assert (rows[0]["baseline"], rows[0]["gain"]) == ("linear_last_ap", pytest.approx(100 * (0.70 - 0.60)))
    assert (rows[1]["baseline"], rows[1]["gain"]) == ("linear_last_cls", pytest.approx(100 * (0.70 - 0.20)))
    markdown = format_markdown(rows, PROBES)
    mae, vit = markdown.split("## mae_b16")[1].split("## vit_b16")
    assert "| alf | gain vs linear_last_ap |" in mae and "| alf | gain vs linear_last_cls |" in vit
    assert "| mean |  | 20.00 | **70.00** | +10.00 |" in mae
    assert format_csv(rows, PROBES).splitlines()[1].startswith("mae_b16,digits,,20.0000,70.0000,10.0000,linear_last_ap")
    assert gains_series(rows)[0]["baseline"] == "linear_last_ap"

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 600)
    guesses = {
        p: np.where(rng.random(600) < share, labels, (labels + 1) % 3)
        for p, share in (("alf", 0.8), ("linear_last_ap", 0.7), ("linear_last_cls", 0.4))
    }
    task = {p: predictions_file(tmp_path, p, labels, guess) for p, guess in guesses.items()}
    intervals = gain_intervals({"mae_b16": {"digits": task}}, baselines=baselines)
    gain, _, _ = paired_bootstrap_gain(labels, task["alf"]["predictions"], task["linear_last_ap"]["predictions"], 3)
    assert intervals["mae_b16"]["digits"]["gain"] == pytest.approx(gain)
    assert gain_intervals({"mae_b16": {"digits": task}})["mae_b16"]["digits"]["gain"] > gain  # vs the CLS probe
