"""The verdict threshold a model ships with, chosen on labelled validation data from one or more sources.

A score (probability real) >= the threshold is judged real. The threshold is the equal-error point of
the validation scores computed as the scanner computes them by default (each face and its mirror image,
mean logit), with every (source, class) weighted equally, so that a small source counts as much as a
large one. It is stored in the exported checkpoint's metadata (``threshold``), with the rule and the
per-source AUCs it was measured with; predict_main and eval_main use it unless --threshold is given.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from data_pipelines import sources
from data_pipelines.preprocessing import MediaError, Preprocessing, read_image_rgb, resize_image
from meso_jax import checkpoints, metrics, scoring

THRESHOLD_RULE = ("equal error rate on validation scores (flip-averaged, as scanned) with every source and class "
                  "weighted equally")


def calibrate(loaded: checkpoints.LoadedModel, batches: Iterable[dict]) -> dict:
    """``threshold``, ``threshold_rule`` and ``calibration_auc_by_source`` of ``loaded`` on ``batches`` of
    {"image": uint8 model inputs, "label": 1 real / 0 fake, "source": source name per input}."""
    scorer = scoring.Scorer(loaded, batch_size=64, flip_average=True)
    scores, labels, names = [], [], []
    for batch in batches:
        scores.append(scorer.score(np.asarray(batch["image"])))
        labels.append(np.asarray(batch["label"]).round().astype(np.int64))
        names += list(batch["source"])
    if not scores:
        return {"threshold": scoring.DEFAULT_THRESHOLD, "threshold_rule": "0.5: no validation data"}
    scores_all, labels_all = np.concatenate(scores), np.concatenate(labels)
    source_names = sorted(set(names))
    source_ids = np.array([source_names.index(name) for name in names])
    threshold = metrics.balanced_eer_threshold(labels_all, scores_all, source_ids)
    if threshold is None:
        return {"threshold": scoring.DEFAULT_THRESHOLD,
                "threshold_rule": "0.5: the validation data held one class, no threshold could be chosen"}
    return {"threshold": round(float(threshold), 4), "threshold_rule": THRESHOLD_RULE,
            "calibration_auc_by_source": {
                name or "all": metrics.binary_metrics(labels_all[source_ids == index],
                                                      scores_all[source_ids == index])["auc"]
                for index, name in enumerate(source_names)}}


def folder_batches(data_sources: list[sources.DataSource], prep: Preprocessing,
                   batch_size: int = 64) -> Iterator[dict]:
    """Batches of the face crops in each source's folder (real/ and fake/, decoded and resized by ``prep``),
    for calibrate; unreadable files are left out."""
    for data_source in data_sources:
        splits = sources.load_labelled_splits(data_source.path, ("image",), val_fraction=0.0)
        files = splits.train
        for first in range(0, len(files), batch_size):
            images, labels = [], []
            for labelled in files[first:first + batch_size]:
                try:
                    images.append(resize_image(read_image_rgb(labelled.path), prep))
                except MediaError:  # a file that cannot be read is left out
                    continue
                labels.append(labelled.label)
            if images:
                yield {"image": np.stack(images), "label": np.array(labels),
                       "source": [data_source.name] * len(images)}
