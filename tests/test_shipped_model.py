"""The model shipped in checkpoints/ loads with its metadata and is what predict_main uses by default."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import sklearn.metrics

from data_pipelines import samples
from data_pipelines.preprocessing import Preprocessing
from meso_jax import checkpoints, models, scoring


def test_shipped_model_loads_with_its_metadata() -> None:
    loaded = checkpoints.load_model(checkpoints.DEFAULT_MODEL_DIR)
    assert loaded.model_name == "meso4"
    assert "probability that the content is REAL" in loaded.metadata["label_convention"]
    assert loaded.preprocessing["face_detector"] == "haar"  # trained on crops; scans find faces first
    assert loaded.preprocessing["resize"] == "nearest" and loaded.preprocessing["image_size"] == 256
    assert loaded.metadata["metrics"]["val_auc"] > 0.6
    assert models.count_params(loaded.variables["params"]) == 27_977
    images = np.random.default_rng(0).uniform(0, 1, (2, 256, 256, 3)).astype(np.float32)
    scores = jax.nn.sigmoid(models.get_model("meso4").module.apply(loaded.variables, images))
    assert np.all((scores >= 0) & (scores <= 1))


def test_shipped_model_reproduces_its_recorded_validation_auc(shared_dir) -> None:
    """The checkpoint is the one its metadata (and the model card) describe: the validation AUC
    recorded at training time comes out again when the scanner's code path scores the val split."""
    val_dir = shared_dir / "dfdc_faces" / "val"
    if not val_dir.is_dir():
        pytest.skip(f"{val_dir} absent")
    loaded = checkpoints.load_model(checkpoints.DEFAULT_MODEL_DIR)
    prep = dataclasses.replace(Preprocessing.from_dict(loaded.preprocessing), face_detector="none")
    scorer = scoring.Scorer(loaded, batch_size=64)
    labeled = [(path, label) for label, folder in ((1, "real"), (0, "fake"))
               for path in sorted((val_dir / folder).iterdir())]
    scores = []
    for start in range(0, len(labeled), scorer.batch_size):
        crops = np.concatenate([samples.extract_face_crops(path, prep).crops_bhwc
                                for path, _ in labeled[start:start + scorer.batch_size]])
        scores.extend(scorer.score_batch(crops))
    auc = sklearn.metrics.roc_auc_score([label for _, label in labeled], scores)
    assert abs(auc - loaded.metadata["metrics"]["val_auc"]) < 1e-3, (auc, loaded.metadata["metrics"])
