"""Binary detection metrics for MesoNet scores (positive class = REAL = label 1).

Scores are probabilities that the content is REAL; a score >= threshold is judged real.
Used per epoch by the trainer and by eval_main; every number is computed with scikit-learn
except the equal error rate, which is read off sklearn's ROC curve.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from sklearn import metrics as skm

REAL_LABEL = 1
FAKE_LABEL = 0
CONFUSION_MATRIX_ORDER = ("fake", "real")  # rows: true class, columns: predicted class


def _finite_threshold(threshold: float) -> float:
    """sklearn's ROC starts at threshold +inf ("judge everything fake"); 1.0 stands for it in JSON."""
    return float(threshold) if math.isfinite(threshold) else 1.0


def binary_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                   threshold: float = 0.5) -> dict:
    """Detection metrics of ``scores`` (probability real) against ``labels`` (1 real, 0 fake).

    Returns a JSON-ready dict: n, n_real, n_fake, threshold, accuracy, balanced_accuracy,
    confusion_matrix ([[fake->fake, fake->real], [real->fake, real->real]]), and the ranking
    metrics auc, average_precision, eer, eer_threshold, best_balanced_accuracy and
    best_balanced_accuracy_threshold, which are None when only one class is present.
    EER: the ROC point where |false positive rate - false negative rate| is smallest; eer is the
    mean of the two rates there and eer_threshold that point's threshold.
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    scores_array = np.asarray(scores, dtype=np.float64)
    if labels_array.shape != scores_array.shape or labels_array.ndim != 1:
        raise ValueError(f"labels {labels_array.shape} and scores {scores_array.shape} must be equal-length vectors")
    if labels_array.size == 0:
        raise ValueError("binary_metrics needs at least one labelled score")
    if not np.isin(labels_array, (FAKE_LABEL, REAL_LABEL)).all():
        raise ValueError("labels must be 0 (fake) or 1 (real)")

    predictions = (scores_array >= threshold).astype(np.int64)
    n_real = int(labels_array.sum())
    result: dict = {
        "n": int(labels_array.size),
        "n_real": n_real,
        "n_fake": int(labels_array.size - n_real),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels_array, predictions)),
        "confusion_matrix": skm.confusion_matrix(labels_array, predictions,
                                                 labels=[FAKE_LABEL, REAL_LABEL]).tolist(),
        "auc": None,
        "average_precision": None,
        "eer": None,
        "eer_threshold": None,
        "best_balanced_accuracy": None,
        "best_balanced_accuracy_threshold": None,
    }
    both_classes = 0 < n_real < labels_array.size
    if not both_classes:
        # With one class, balanced accuracy is that class's recall (sklearn would warn and say the same).
        result["balanced_accuracy"] = result["accuracy"]
        return result

    result["balanced_accuracy"] = float(skm.balanced_accuracy_score(labels_array, predictions))
    false_positive_rate, true_positive_rate, thresholds = skm.roc_curve(
        labels_array, scores_array, drop_intermediate=False)
    false_negative_rate = 1.0 - true_positive_rate
    eer_index = int(np.argmin(np.abs(false_negative_rate - false_positive_rate)))
    balanced_accuracies = (true_positive_rate + 1.0 - false_positive_rate) / 2.0
    best_index = int(np.argmax(balanced_accuracies))
    result.update(
        auc=float(skm.roc_auc_score(labels_array, scores_array)),
        average_precision=float(skm.average_precision_score(labels_array, scores_array)),
        eer=float((false_positive_rate[eer_index] + false_negative_rate[eer_index]) / 2.0),
        eer_threshold=_finite_threshold(thresholds[eer_index]),
        best_balanced_accuracy=float(balanced_accuracies[best_index]),
        best_balanced_accuracy_threshold=_finite_threshold(thresholds[best_index]),
    )
    return result


def source_balanced_weights(labels: np.ndarray, source_ids: np.ndarray) -> np.ndarray:
    """Sample weights giving every (source, class) stratum present the same total weight."""
    weights = np.zeros(len(labels), np.float64)
    strata = list(zip(np.asarray(source_ids).tolist(), np.asarray(labels).tolist()))
    counts: dict = {}
    for stratum in strata:
        counts[stratum] = counts.get(stratum, 0) + 1
    for index, stratum in enumerate(strata):
        weights[index] = 1.0 / counts[stratum]
    return weights


def balanced_eer_threshold(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                           source_ids: Sequence | np.ndarray | None = None) -> float | None:
    """The equal-error threshold of ``scores`` with every (source, class) weighted equally (so a small
    source counts as much as a large one), or None with one class only. A score >= it is judged real."""
    labels_array = np.asarray(labels, np.int64)
    if labels_array.size == 0 or labels_array.min() == labels_array.max():
        return None
    sources = np.zeros(len(labels_array), np.int64) if source_ids is None else np.asarray(source_ids)
    false_positive_rate, true_positive_rate, thresholds = skm.roc_curve(
        labels_array, np.asarray(scores, np.float64), sample_weight=source_balanced_weights(labels_array, sources),
        drop_intermediate=False)
    eer_index = int(np.argmin(np.abs(1.0 - true_positive_rate - false_positive_rate)))
    return _finite_threshold(thresholds[eer_index])


def plot_roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], png_path: str, title: str) -> None:
    """Writes one ROC plot with a curve per entry of ``curves`` (name -> (labels, scores)) to ``png_path``.

    Entries whose labels hold a single class have no ROC curve and are listed in the legend as such.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel  (only eval draws plots)
    matplotlib.use("Agg")
    from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

    figure, axes = pyplot.subplots(figsize=(5.5, 5.0), dpi=120)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    for name, (labels, scores) in curves.items():
        labels_array = np.asarray(labels, dtype=np.int64)
        if labels_array.size == 0 or labels_array.min() == labels_array.max():
            axes.plot([], [], label=f"{name}: needs real and fake samples")
            continue
        false_positive_rate, true_positive_rate, _ = skm.roc_curve(labels_array, np.asarray(scores, np.float64))
        auc = skm.auc(false_positive_rate, true_positive_rate)
        axes.plot(false_positive_rate, true_positive_rate, linewidth=1.5,
                  label=f"{name} (AUC {auc:.3f}, n={labels_array.size})")
    axes.set_xlabel("false positive rate (fakes judged real)")
    axes.set_ylabel("true positive rate (reals judged real)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(png_path)
    pyplot.close(figure)
