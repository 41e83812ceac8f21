"""Metrics agree with scikit-learn; heatmap numbers and figures come out right."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from layerprobe.metrics import classification_metrics, layer_attention_heatmap, summarize_over_seeds
from layerprobe.metrics import confusion_matrix as count_confusions
from layerprobe.plots import DPI, heatmap_figsize, plot_confusion_matrix, plot_gains, plot_layer_heatmap


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 200)  # class 4 of 5 never appears: balanced accuracy skips it, as sklearn
    guess = np.where(rng.random(200) < 0.6, truth, rng.integers(0, 5, 200))
    result = classification_metrics(truth, guess, num_classes=5)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, guess))
    assert result["accuracy"] == pytest.approx((truth == guess).mean())
    assert count_confusions(truth, guess, 5).tolist() == confusion_matrix(truth, guess, labels=range(5)).tolist()
    assert result["per_class_accuracy"][4] is None
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 7], [0, 1], num_classes=3)


def test_summary_over_seeds_gives_mean_and_sample_std():
    summary = summarize_over_seeds([{"acc": 0.5, "bal": 0.4}, {"acc": 0.7, "bal": 0.6}, {"acc": 0.6}])
    assert summary["acc"]["mean"] == pytest.approx(0.6)
    assert summary["acc"]["std"] == pytest.approx(0.1)
    assert "bal" not in summary  # not shared by every run


def test_heatmap_averages_images_then_heads_and_sums_layers():
    labels = ["block1/cls", "block1/ap", "final/cls", "final/ap"]
    attention = np.zeros((3, 2, 4))
    attention[:, 0, 1] = 1.0  # head 0 reads block1/ap
    attention[:, 1, 3] = 1.0  # head 1 reads final/ap
    heatmap = layer_attention_heatmap(attention, labels)
    assert heatmap["layers"] == ["block1", "final"] and heatmap["tokens"] == ["cls", "ap"]
    assert heatmap["weights"] == [[0.0, 0.5], [0.0, 0.5]]
    assert heatmap["layer_means"] == [0.25, 0.25]  # the mean of a layer's cls and ap shares
    with pytest.raises(ValueError, match="K=4"):
        layer_attention_heatmap(attention[:, :, :3], labels)


def test_plots_write_pngs_of_the_expected_size(tmp_path):
    labels = [f"block{i}/{t}" for i in range(1, 6) for t in ("cls", "ap")]
    heatmap = layer_attention_heatmap(np.random.default_rng(0).dirichlet(np.ones(10), size=(4, 3)), labels)
    path = plot_layer_heatmap(heatmap, tmp_path / "heat" / "map.png", title="test")
    image = matplotlib.image.imread(path)
    width, height = heatmap_figsize(5, 2)
    assert image.shape[:2] == (round(height * DPI), round(width * DPI))
    assert image.std() > 0.05  # not blank
    cm_path = plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], tmp_path / "cm.png")
    gains_path = plot_gains(
        {"svhn": 27.3, "stl10": 0.04, "x": -1.0}, tmp_path / "gains.png", probe="alf", baseline="linear_last_cls"
    )
    assert cm_path.stat().st_size > 1000 and gains_path.stat().st_size > 1000


def test_gains_figure_draws_interval_bars(tmp_path):
    gains = {"svhn": 27.3, "stl10": 0.04, "x": -1.0}

    def draw(name: str, intervals: dict) -> np.ndarray:
        path = plot_gains(gains, tmp_path / name, probe="alf", baseline="linear_last_cls", intervals=intervals)
        return matplotlib.image.imread(path)

    # a skewed interval (the point outside it, as a percentile interval can be) must still draw
    wide = draw("wide.png", {"svhn": (15.0, 33.0), "x": (-0.5, 2.0)})
    narrow = draw("narrow.png", {"svhn": (27.0, 27.6)})
    assert wide.shape == narrow.shape
    assert np.abs(wide - narrow).sum() > 100  # same bars and title: only the error bars differ
