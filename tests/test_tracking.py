"""What MLflow is told, without MLflow: one-line descriptions, registry tags, the UI's URL, the report's headline."""

from __future__ import annotations

from pathlib import Path

from layerprobe import mlflow_ui, model_registry, tracking
from layerprobe.report import headline, results_rows


def evaluated(probe: str = "alf", *, seeds: int = 1) -> tracking.EvaluatedProbe:
    evaluation = {
        "test": {"accuracy": 0.70, "balanced_accuracy": 0.677},
        "test_std": {"accuracy": 0.0, "balanced_accuracy": 0.008 if seeds > 1 else 0.0},
        "test_ci": {"balanced_accuracy": [0.631, 0.725], "level": 0.95, "resamples": 1000},
        "val_balanced_accuracy": 0.71,
        "num_seeds": seeds,
        "seeds": [{"seed": seed} for seed in range(seeds)],
        "fingerprint": {"value": "abc123"},
    }
    return tracking.EvaluatedProbe(
        backbone="vit_shapes_d6",
        dataset="digits",
        probe=probe,
        evaluation=evaluation,
        trained={"features_hash": "f" * 64},
        probe_config={},
        evaluation_dir=Path("e"),
        seed_dir=Path("s"),
        features_dir=Path("f"),
        probe_hash="0123456789abcdef",
        registered_model="layerprobe-digits-vit-shapes-d6",
    )


def test_a_probe_is_described_in_one_line_with_its_scores_and_interval():
    assert tracking.describe_probe(evaluated()) == "alf on vit_shapes_d6 / digits: val 71.0, test 67.7 [63.1, 72.5]"
    several = tracking.describe_probe(evaluated(seeds=3))
    assert several == "alf on vit_shapes_d6 / digits: val 71.0, test 67.7 ± 0.8 (3 seeds) [63.1, 72.5]"


def test_a_registered_version_is_tagged_with_what_it_is():
    tags = model_registry.version_tags(evaluated(seeds=3))
    assert tags == {
        "probe": "alf",
        "backbone": "vit_shapes_d6",
        "dataset": "digits",
        "seeds": "0,1,2",
        "val_balanced_accuracy": "0.7100",
        "test_balanced_accuracy": "0.6770",
        "test_balanced_accuracy_ci": "[0.6310, 0.7250]",
        "features.content_hash": "f" * 64,
        "probe_hash": "0123456789abcdef",
    }


def test_a_probe_is_keyed_on_its_evaluation_and_its_weights():
    probe = evaluated()
    assert probe.key == "abc123-0123456789abcdef" and probe.run_name == "vit_shapes_d6/digits/alf"


def test_the_ui_url_opens_the_runs_in_the_training_sidebar_with_the_projects_view():
    url = mlflow_ui.runs_url("http://127.0.0.1:5000/", "7")
    assert url == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=layerprobe&workflowType=machine_learning"
    )
    assert mlflow_ui.runs_url("http://h:1", None) == "http://h:1/#/experiments?workflowType=machine_learning"
    assert mlflow_ui.VIEW_TAG == "mlflow.sharedViewState.layerprobe"
    assert "metrics.`test/balanced_accuracy`" in mlflow_ui.RUNS_VIEW["selectedColumns"]


def test_the_headline_is_the_mean_gain_per_backbone_with_its_interval():
    summary = {
        "vit": {
            d: {"linear_last_cls": {"test_balanced_accuracy": base}, "alf": {"test_balanced_accuracy": base + gain}}
            for d, base, gain in (("a", 0.5, 0.1), ("b", 0.6, 0.3))
        }
    }
    rows = results_rows(summary, probes=["linear_last_cls", "alf"])
    intervals = {
        "vit": {
            "a": {"gain": 0.1, "low": 0.05, "high": 0.15},
            "b": {"gain": 0.3, "low": 0.2, "high": 0.4},
            "mean": {"gain": 0.2, "low": 0.15, "high": 0.25},
        }
    }
    text = headline(rows, ["linear_last_cls", "alf"], intervals=intervals)
    assert text.splitlines()[1] == "- vit: +20.00 [15.0, 25.0] over 2 datasets (vs linear_last_cls)"
