"""Bootstrap intervals over test images: known answers, paired gains, widths that shrink as 1/sqrt(n), coverage."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from layerprobe.metrics import (
    bootstrap_balanced_accuracy,
    classification_metrics,
    paired_bootstrap_draws,
    paired_bootstrap_gain,
    percentile_interval,
)

Z95 = 1.959964


def right_with_rate(truth: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Predictions right on a random `rate` of the images, a wrong class elsewhere."""
    wrong = (truth + rng.integers(1, num_classes, truth.size)) % num_classes
    return np.where(rng.random(truth.size) < rate, truth, wrong)


def test_identical_predictions_give_a_gain_of_exactly_zero():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 300)
    guess = right_with_rate(truth, 0.7, 5, rng)
    assert paired_bootstrap_gain(truth, guess, guess, 5) == (0.0, 0.0, 0.0)


def test_a_perfect_classifier_has_the_interval_one_one():
    truth = np.random.default_rng(1).integers(0, 7, 500)
    assert bootstrap_balanced_accuracy(truth, truth, 7) == (1.0, 1.0)


def test_a_large_paired_gain_excludes_zero_with_about_the_normal_width():
    rng = np.random.default_rng(2)
    truth = np.repeat([0, 1], 1000)  # 2000 images, balanced: balanced accuracy is close to plain accuracy
    a, b = right_with_rate(truth, 0.95, 2, rng), right_with_rate(truth, 0.50, 2, rng)
    gain, low, high = paired_bootstrap_gain(truth, a, b, 2, resamples=2000)
    expected = balanced_accuracy_score(truth, a) - balanced_accuracy_score(truth, b)
    assert gain == pytest.approx(expected, abs=1e-12)
    assert 0.0 < low < gain < high
    per_image = (a == truth).astype(float) - (b == truth)  # the paired differences the normal interval uses
    normal_width = 2 * Z95 * per_image.std(ddof=1) / np.sqrt(truth.size)
    assert high - low == pytest.approx(normal_width, rel=0.1)


def test_interval_holds_the_point_estimate_and_matches_classification_metrics():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 10, 3000)
    guess = right_with_rate(truth, 0.6, 10, rng)
    point = classification_metrics(truth, guess, 10)["balanced_accuracy"]
    low, high = bootstrap_balanced_accuracy(truth, guess, 10)
    assert low < point < high
    assert 0.02 < high - low < 0.05  # ~ 2 * 1.96 * sqrt(0.6 * 0.4 / 3000) = 0.035


def test_width_shrinks_as_one_over_sqrt_n():
    rng = np.random.default_rng(4)
    widths = []
    for n in (500, 2000):
        truth = rng.integers(0, 2, n)
        low, high = bootstrap_balanced_accuracy(truth, right_with_rate(truth, 0.7, 2, rng), 2, resamples=2000)
        widths.append(high - low)
    assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.15)


def test_intervals_cover_the_true_balanced_accuracy_about_95_percent_of_the_time():
    """Draw 200 test sets from a population whose balanced accuracy is known (0.8 per class) and count hits."""
    rng = np.random.default_rng(5)
    hits = 0
    for draw in range(200):
        truth = rng.integers(0, 3, 300)
        low, high = bootstrap_balanced_accuracy(truth, right_with_rate(truth, 0.8, 3, rng), 3, resamples=400, seed=draw)
        hits += low <= 0.8 <= high
    assert 0.89 <= hits / 200 <= 0.99


def test_fixed_seed_is_deterministic_and_another_seed_differs():
    rng = np.random.default_rng(6)
    truth = rng.integers(0, 4, 400)
    a, b = right_with_rate(truth, 0.8, 4, rng), right_with_rate(truth, 0.7, 4, rng)
    assert paired_bootstrap_gain(truth, a, b, 4, seed=3) == paired_bootstrap_gain(truth, a, b, 4, seed=3)
    assert bootstrap_balanced_accuracy(truth, a, 4, seed=3) == bootstrap_balanced_accuracy(truth, a, 4, seed=3)
    assert bootstrap_balanced_accuracy(truth, a, 4, seed=3) != bootstrap_balanced_accuracy(truth, a, 4, seed=4)


def test_pairing_uses_the_same_images_for_both_probes():
    """B is A with a fixed 5% of images broken: paired, the gain barely varies; unpaired it would vary as much as A."""
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 2, 2000)
    a = right_with_rate(truth, 0.7, 2, rng)
    b = np.where(np.arange(truth.size) % 20 == 0, 1 - truth, a)
    _, low, high = paired_bootstrap_gain(truth, a, b, 2)
    single_low, single_high = bootstrap_balanced_accuracy(truth, a, 2)
    assert high - low < 0.5 * (single_high - single_low)


def test_absent_classes_are_skipped_in_a_resample_as_classification_metrics_does():
    """100 images of class 0, all right, and one of class 1, wrong: a resample scores 0.5 with the lone image and
    1.0 without it (class 1 absent, not a recall of 0), which happens with probability (1 - 1/101)^101 ~ 0.37."""
    truth = np.array([0] * 100 + [1])
    guess = np.zeros_like(truth)
    never_right = np.full_like(truth, 2)  # class 2 is in no label: balanced accuracy 0 on every resample
    _, draws = paired_bootstrap_draws(truth, guess, never_right, 3, resamples=4000)
    assert set(np.unique(draws)) == {0.5, 1.0}
    assert (draws == 1.0).mean() == pytest.approx((1 - 1 / 101) ** 101, abs=0.03)


def test_several_seeds_score_the_mean_over_seeds():
    rng = np.random.default_rng(8)
    truth = rng.integers(0, 3, 600)
    seeds = np.stack([right_with_rate(truth, rate, 3, rng) for rate in (0.6, 0.9)])  # [S, N]
    gain, low, high = paired_bootstrap_gain(truth, seeds, seeds[0], 3)
    mean = np.mean([balanced_accuracy_score(truth, s) for s in seeds])
    assert gain == pytest.approx(mean - balanced_accuracy_score(truth, seeds[0]))
    low_mean, high_mean = bootstrap_balanced_accuracy(truth, seeds, 3)
    assert low_mean < mean < high_mean


def test_bad_input_is_named():
    truth = np.array([0, 1, 1])
    with pytest.raises(ValueError, match=r"pred_b must be \[3\] or \[seeds, 3\]"):
        paired_bootstrap_gain(truth, truth, truth[:2], 2)
    with pytest.raises(ValueError, match="y_pred has labels outside"):
        bootstrap_balanced_accuracy(truth, [0, 1, 5], 2)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_balanced_accuracy(truth, truth, 2, resamples=0)
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.zeros(3), level=95)
