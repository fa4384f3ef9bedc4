"""binary_metrics against a small example worked out by hand (positive class = real = 1)."""

import json

import numpy as np
import pytest

from meso_jax import metrics

# Three fakes and three reals. Sorted by score: 0.9 R, 0.8 R, 0.6 F, 0.4 F, 0.35 R, 0.1 F.
LABELS = [0, 0, 0, 1, 1, 1]
SCORES = [0.1, 0.4, 0.6, 0.35, 0.8, 0.9]


def test_binary_metrics_matches_hand_computed_example():
    result = metrics.binary_metrics(LABELS, SCORES, threshold=0.5)

    assert (result["n"], result["n_real"], result["n_fake"]) == (6, 3, 3)
    # At 0.5: fakes 0.1, 0.4 judged fake and 0.6 judged real; reals 0.35 judged fake, 0.8, 0.9 real.
    assert result["confusion_matrix"] == [[2, 1], [1, 2]]
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    # AUC: real-over-fake pairs: 0.35 beats 1 fake, 0.8 and 0.9 beat 3 each -> 7 of 9.
    assert result["auc"] == pytest.approx(7 / 9)
    # AP: precision at each real in rank order is 1/1, 2/2, 3/5; each real adds 1/3 recall.
    assert result["average_precision"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    # At threshold 0.6: TPR 2/3, FPR 1/3, so FNR = FPR = 1/3.
    assert result["eer"] == pytest.approx(1 / 3)
    assert result["eer_threshold"] == pytest.approx(0.6)
    # At threshold 0.8: all fakes rejected, 2 of 3 reals accepted -> (1 + 2/3) / 2.
    assert result["best_balanced_accuracy"] == pytest.approx(5 / 6)
    assert result["best_balanced_accuracy_threshold"] == pytest.approx(0.8)
    json.dumps(result, allow_nan=False)


def test_threshold_changes_only_threshold_dependent_numbers():
    at_half = metrics.binary_metrics(LABELS, SCORES, threshold=0.5)
    at_best = metrics.binary_metrics(LABELS, SCORES, threshold=0.8)
    assert at_best["confusion_matrix"] == [[3, 0], [1, 2]]
    assert at_best["balanced_accuracy"] == pytest.approx(5 / 6)
    for key in ("auc", "average_precision", "eer", "eer_threshold", "best_balanced_accuracy_threshold"):
        assert at_best[key] == at_half[key]


def test_perfect_separation_and_constant_scores():
    perfect = metrics.binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert perfect["auc"] == 1.0 and perfect["eer"] == 0.0 and perfect["accuracy"] == 1.0
    constant = metrics.binary_metrics([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    assert constant["auc"] == 0.5 and constant["eer"] == 0.5
    json.dumps(constant, allow_nan=False)  # sklearn's +inf threshold must not leak into JSON


def test_single_class_leaves_ranking_metrics_undefined():
    result = metrics.binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["confusion_matrix"] == [[0, 0], [1, 2]]
    assert result["auc"] is None and result["eer"] is None and result["average_precision"] is None


@pytest.mark.parametrize("labels, scores", [([], []), ([0, 1], [0.5]), ([0, 2], [0.1, 0.2])])
def test_bad_input_raises_value_error(labels, scores):
    with pytest.raises(ValueError):
        metrics.binary_metrics(labels, scores)


def test_plot_roc_curves_writes_png(tmp_path):
    png = tmp_path / "roc.png"
    metrics.plot_roc_curves({"frames": (np.array(LABELS), np.array(SCORES)),
                             "videos": (np.array([1, 1]), np.array([0.2, 0.3]))}, str(png), "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
