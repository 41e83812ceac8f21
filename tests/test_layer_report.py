"""Which layers matter: the picture, the report's section and the parent run's metrics, from hand-made evaluation
markers in the formats the per_layer, alf (knock-out) and alf_truncated probes write."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
from test_recording import TASKS, evaluated, project  # noqa: F401 - the recorded tiny suite, reused

from layerprobe.layer_report import layer_findings, layer_metrics, rank_agreement, section_markdown, task_findings
from layerprobe.report import MEAN, format_markdown, results_rows, suite_metrics, write_report

LAYERS = ["block0", "block1", "block2", "block3", "final"]  # a 4-block backbone
KINDS = ["cls", "ap", "cls_ap"]


def marker(test: float, low: float, high: float, **blocks) -> dict:
    """An evaluation marker's scores (fractions) and the layer blocks a probe adds."""
    return {"test": {"balanced_accuracy": test}, "test_ci": {"balanced_accuracy": [low, high]}, **blocks}


def per_layer_block(peak: int) -> dict:
    """Curves peaking at layer `peak` (CLS‖AP highest), on test and on validation."""
    curve = {
        kind: [0.5 + 0.04 * shift - 0.05 * abs(i - peak) for i in range(len(LAYERS))]
        for shift, kind in enumerate(KINDS)
    }
    return {
        "layers": LAYERS,
        "kinds": KINDS,
        "test_balanced_accuracy": curve,
        "interval": {kind: [[v - 0.03, v + 0.03] for v in values] for kind, values in curve.items()},
        "val_balanced_accuracy": {kind: [v + 0.01 for v in values] for kind, values in curve.items()},
        "selected": {"layer": LAYERS[peak], "kind": "cls_ap"},
    }


READ = LAYERS[1:]  # the paper preset: blocks 1..B-1 and final
HEATMAP = {  # alf's attention: most on block2, then final; its ranking is not the single-layer curves' own
    "layers": READ,
    "tokens": ["cls", "ap"],
    "weights": [[0.05, 0.05], [0.2, 0.2], [0.1, 0.1], [0.15, 0.15]],
    "layer_means": [0.05, 0.2, 0.1, 0.15],
}
KNOCKOUT = {
    "layers": READ,
    "drop": [0.0, 0.08, 0.01, 0.03],
    "interval": [[-0.01, 0.01], [0.05, 0.11], [0, 0.02], [0, 0.06]],
}
TRUNCATION = {
    "depth": 3,
    "blocks": 4,
    "layers": ["block1", "block2"],
    "margin": 0.01,
    "val_by_depth": [[1, 0.4], [2, 0.6], [3, 0.69]],
    "full_val_balanced_accuracy": 0.7,
    "speedup": {"extract": 1.31, "predict": 1.27},
}


def task_markers(peak: int = 2) -> dict:
    return {
        "linear_last_cls": marker(0.5, 0.46, 0.54),
        "per_layer": marker(0.62, 0.58, 0.66, per_layer=per_layer_block(peak)),
        "alf": marker(0.7, 0.66, 0.74, knockout=KNOCKOUT),
        "alf_truncated": marker(0.68, 0.64, 0.72, truncation=TRUNCATION),
    }


def test_rank_agreement_is_spearmans_rho_with_ties_averaged():
    assert rank_agreement([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_agreement([1, 2, 3, 4], [0.9, 0.5, 0.2, 0.1]) == pytest.approx(-1.0)
    assert rank_agreement([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties on both sides: still identical
    # ties averaged: ranks [0, 1.5, 1.5, 3] against [0, 1, 2, 3] (scipy.stats.spearmanr gives 0.9486833)
    assert rank_agreement([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert rank_agreement([1, 1, 1], [1, 2, 3]) is None and rank_agreement([1], [2]) is None  # undefined
    with pytest.raises(ValueError, match="one length"):
        rank_agreement([1, 2], [1, 2, 3])


@pytest.mark.parametrize("peak", [1, 3])
def test_a_planted_peak_is_the_best_single_layer_and_the_section_says_so(peak):
    found = task_findings(task_markers(peak), HEATMAP)
    assert (found["best"]["layer"], found["best"]["kind"]) == (LAYERS[peak], "cls_ap")
    assert found["best"]["test"] == pytest.approx(58.0)  # 0.5 + 0.04 * 2 (CLS‖AP) at the peak, in %
    markdown = section_markdown({"vit": {"digits": found}})
    row = next(line for line in markdown.splitlines() if line.startswith("| vit | digits |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2:4] == [f"{LAYERS[peak]} CLS‖AP", "58.00 [55.0, 61.0]"]
    assert cells[4] == "block2: 20.0"  # alf's attention peak
    assert cells[5] == "block2: +8.00 [5.0, 11.0]"  # the largest knock-out drop
    assert cells[6:9] == ["3 of 4", "68.00 [64.0, 72.0]", "1.31x / 1.27x"]
    # over the layers alf reads, attention [5, 20, 10, 15] against the curve peaking at `peak`
    curve = [0.58 - 0.05 * abs(i - peak) for i in range(1, 5)]
    assert found["rank_layers"] == READ
    assert found["rank_agreement"] == pytest.approx(rank_agreement(HEATMAP["layer_means"], curve))
    assert cells[9] == f"{found['rank_agreement']:+.2f} (4 layers)"


def test_attention_ranked_as_the_curve_agrees_fully():
    layer_means = [0.58 - 0.05 * abs(i - 2) for i in range(1, 5)]  # the CLS‖AP curve's own shape
    found = task_findings(task_markers(2), {**HEATMAP, "layer_means": layer_means})
    assert found["rank_agreement"] == pytest.approx(1.0)
    reversed_means = [-v for v in layer_means]
    reversed_found = task_findings(task_markers(2), {**HEATMAP, "layer_means": reversed_means})
    assert reversed_found["rank_agreement"] == pytest.approx(-1.0)


def test_write_report_draws_one_picture_per_task_and_the_curves_for_dvc(tmp_path):
    markers = {"vit": {"digits": task_markers(1), "texture": {"alf": marker(0.6, 0.5, 0.7, knockout=KNOCKOUT)}}}
    found = layer_findings(markers, {"vit": {"digits": HEATMAP}})
    assert set(found["vit"]) == {"digits", "texture"}
    assert found["vit"]["texture"]["curves"] is None and found["vit"]["texture"]["layers"] == READ  # knock-out only
    summary = {"vit": {d: {"alf": {"test_balanced_accuracy": 0.7}} for d in ("digits", "texture")}}
    files = write_report(
        summary, tmp_path / "report", probes=["alf"], groups={}, heatmaps={"vit": {"digits": HEATMAP}}, layers=found
    )
    picture = files["layers/vit-digits"]
    assert picture == tmp_path / "report" / "layers" / "vit-digits.png"
    full, knockout_only = (matplotlib.image.imread(files[f"layers/vit-{d}"]) for d in ("digits", "texture"))
    assert full.std() > 0.05 and full.shape[0] > 2 * knockout_only.shape[0]  # three panels against one
    rows = json.loads(files["layers/vit-digits.json"].read_text())
    assert [r["layer"] for r in rows] == LAYERS and rows[0]["attention"] is None  # alf does not read block0
    assert rows[1]["cls_ap"] == pytest.approx(58.0) and rows[1]["cls_ap_ci_low"] == pytest.approx(55.0)
    assert rows[2]["attention"] == pytest.approx(20.0) and rows[2]["knockout_drop"] == pytest.approx(8.0)
    markdown = files["markdown"].read_text()
    assert "## Which layers matter" in markdown and "| vit | digits | block1 CLS‖AP |" in markdown
    assert "| vit | texture | – | – | – | block2: +8.00 [5.0, 11.0] | – | – | – | – |" in markdown


def test_a_suite_without_layer_probes_reports_as_before(tmp_path):
    markers = {"vit": {"digits": {"alf": marker(0.7, 0.6, 0.8), "linear_last_cls": marker(0.5, 0.4, 0.6)}}}
    found = layer_findings(markers, {"vit": {"digits": HEATMAP}})
    assert found == {} and layer_metrics(found) == {}
    summary = {"vit": {"digits": {"alf": {"test_balanced_accuracy": 0.7}}}}
    args = {"probes": ["alf"], "groups": {}, "heatmaps": {"vit": {"digits": HEATMAP}}}
    files = write_report(summary, tmp_path / "report", **args, layers=found)
    assert set(files) == {"markdown", "csv", "gains", "attention_json", "attention/vit"}  # as before: no layers/
    assert not (tmp_path / "report" / "layers").exists()
    assert files["markdown"].read_text() == format_markdown(
        results_rows(summary, probes=["alf"]), ["alf"], args["heatmaps"]
    )


def test_layer_and_suite_metrics_name_the_task_kind_and_layer():
    found = layer_findings({"vit": {"digits": task_markers(3)}}, {"vit": {"digits": HEATMAP}})
    metrics = layer_metrics(found)
    assert metrics["layer/vit/digits/cls_ap/block3/test/balanced_accuracy"] == pytest.approx(0.58)
    assert metrics["layer/vit/digits/cls/block0/test/balanced_accuracy"] == pytest.approx(0.35)
    assert metrics["layer/vit/digits/knockout/block2/test/balanced_accuracy_drop"] == pytest.approx(0.08)
    assert metrics["layer/vit/digits/truncation/depth"] == 3
    assert metrics["layer/vit/digits/attention_rank_agreement"] == found["vit"]["digits"]["rank_agreement"]
    assert len(metrics) == 3 * 5 + 4 + 2 + 1
    summary = {
        "vit": {
            "digits": {
                "alf": {"test_balanced_accuracy": 0.8, "val_balanced_accuracy": 0.7},
                "lin": {"test_balanced_accuracy": 0.5},
            },
            "texture": {
                "alf": {"test_balanced_accuracy": 0.6, "val_balanced_accuracy": 0.5},
                "lin": {"test_balanced_accuracy": 0.3},
            },
        }
    }
    intervals = {"vit": {MEAN: {"gain": 0.3, "low": 0.2, "high": 0.4}}}
    assert suite_metrics(summary, intervals) == {
        "test/balanced_accuracy": pytest.approx(0.7),
        "val/balanced_accuracy": pytest.approx(0.6),
        "test/balanced_accuracy/alf": pytest.approx(0.7),
        "test/balanced_accuracy/lin": pytest.approx(0.4),
        "test/balanced_accuracy_gain": 0.3,
        "test/balanced_accuracy_gain_ci_low": 0.2,
        "test/balanced_accuracy_gain_ci_high": 0.4,
    }


@pytest.mark.usefixtures("project")
def test_the_parent_run_carries_the_suites_scores_the_layer_curves_and_the_picture_after_a_recorded_report():
    from mlflow.tracking import MlflowClient

    from flows.evaluate import write_summaries
    from flows.report import read_results, record_report
    from layerprobe import tracking
    from layerprobe.params import load_params

    params = load_params("params.yaml")
    recorded = tracking.record_evaluations(params, TASKS)
    summary = write_summaries(params, recorded)
    # The layer blocks as the per_layer and alf probes write them into their markers (the block, not the probe's
    # name, decides what is read: per_layer is not a probe of this suite).
    for probe, block in (("linear_last_cls", {"per_layer": per_layer_block(2)}), ("alf", {"knockout": KNOCKOUT})):
        path = params.paths.evaluation_marker("tiny_vit", "count", probe)
        path.write_text(json.dumps({**json.loads(path.read_text()), **block}))
    results = read_results(params)
    groups = {name: dataset.group for name, dataset in params.datasets.items()}
    keys = ("heatmaps", "intervals", "baselines", "layers")
    args = {key: results[key] for key in keys}
    write_report(results["summary"], params.paths.report_dir, probes=params.suite.probes, groups=groups, **args)
    record_report(params, results)

    client = MlflowClient()
    parent = recorded["parent_run_id"]
    metrics = client.get_run(parent).data.metrics
    by_dataset = summary["tiny_vit"]
    for probe in ("alf", "linear_last_cls"):
        mean = np.mean([by_dataset[d][probe]["test_balanced_accuracy"] for d in by_dataset])
        assert metrics[f"test/balanced_accuracy/{probe}"] == pytest.approx(mean)
    # the runs table's columns, filled in the parent row: alf's mean over the suite
    assert metrics["test/balanced_accuracy"] == pytest.approx(metrics["test/balanced_accuracy/alf"])
    gain = results["intervals"]["tiny_vit"][MEAN]
    assert metrics["test/balanced_accuracy_gain"] == pytest.approx(gain["gain"])
    assert metrics["test/balanced_accuracy_gain_ci_low"] == pytest.approx(gain["low"])
    assert metrics["layer/tiny_vit/count/cls_ap/block2/test/balanced_accuracy"] == pytest.approx(0.58)
    assert metrics["layer/tiny_vit/count/knockout/block2/test/balanced_accuracy_drop"] == pytest.approx(0.08)
    assert "layer/tiny_vit/count/attention_rank_agreement" in metrics  # alf's own heatmap, read from disk
    # shapes has no per-layer curves; its alf's knock-out is the one evaluate wrote
    assert not any(key.startswith("layer/tiny_vit/shapes/cls") for key in metrics)
    drops = json.loads(params.paths.evaluation_marker("tiny_vit", "shapes", "alf").read_text())["knockout"]["drop"]
    assert metrics["layer/tiny_vit/shapes/knockout/final/test/balanced_accuracy_drop"] == pytest.approx(drops[-1])
    pictures = [a.path for a in client.list_artifacts(parent, "report/layers")]
    assert "report/layers/tiny_vit-count.png" in pictures and "report/layers/tiny_vit-count.json" in pictures
