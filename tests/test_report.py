"""The paper-style table: rows datasets, columns probes, gain of alf over linear_last_cls."""

from __future__ import annotations

import json

import pytest

from layerprobe.report import format_csv, format_markdown, gains_series, mean_row, results_rows, write_report

PROBES = ["linear_last_cls", "alf"]
SUMMARY = {
    "vit": {
        "digits": {"linear_last_cls": {"test_balanced_accuracy": 0.50}, "alf": {"test_balanced_accuracy": 0.75}},
        "texture": {"linear_last_cls": {"test_balanced_accuracy": 0.40}, "alf": {"test_balanced_accuracy": 0.30}},
    }
}


def test_rows_hold_percent_accuracies_and_gains():
    rows = results_rows(SUMMARY, probes=PROBES, groups={"digits": "natural"})
    assert rows[0]["alf"] == pytest.approx(75.0)
    assert rows[0]["gain"] == pytest.approx(25.0)
    assert rows[1]["gain"] == pytest.approx(-10.0)
    assert rows[0]["group"] == "natural"
    assert mean_row(rows, PROBES, backbone="vit")["gain"] == pytest.approx(7.5)


def test_markdown_and_csv_render_every_probe_and_the_mean():
    rows = results_rows(SUMMARY, probes=PROBES)
    markdown = format_markdown(rows, PROBES)
    assert "## vit" in markdown and "| mean |" in markdown
    assert "**75.00**" in markdown and "+25.00" in markdown
    csv_text = format_csv(rows, PROBES)
    assert csv_text.splitlines()[0] == "backbone,dataset,group,linear_last_cls,alf,gain"
    assert csv_text.splitlines()[1].startswith("vit,digits,,50.0000,75.0000,25.0000")


def test_missing_probe_leaves_no_gain():
    rows = results_rows({"vit": {"d": {"alf": {"test_balanced_accuracy": 0.9}}}}, probes=PROBES)
    assert rows[0]["gain"] is None
    assert gains_series(rows) == []


def test_write_report_writes_tables_and_one_attention_matrix_per_backbone(tmp_path):
    heatmap = {
        "layers": ["block1", "final"],
        "tokens": ["cls", "ap"],
        "weights": [[0.1, 0.2], [0.3, 0.4]],
        "layer_means": [0.15, 0.35],
    }
    heatmaps = {"vit": {"digits": heatmap, "texture": heatmap}, "dino": {"digits": heatmap}}
    files = write_report(SUMMARY, tmp_path / "report", probes=PROBES, groups={"digits": "natural"}, heatmaps=heatmaps)
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0
    assert {"attention/vit", "attention/dino"} <= set(files)
    assert json.loads(files["gains"].read_text())[0] == {"task": "vit/digits", "gain": pytest.approx(25.0)}
    attention = json.loads(files["attention_json"].read_text())
    assert len(attention) == 3 * 2 * 3  # 3 (backbone, dataset) pairs x 2 layers x (cls, ap, layer mean)
    assert {"backbone": "vit", "dataset": "texture", "layer": "final", "token": "layer", "share": 0.35} in attention
