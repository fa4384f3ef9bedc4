"""The model shipped in checkpoints/ loads with its metadata and is what predict_main uses by default."""

from __future__ import annotations

import jax
import numpy as np

from meso_jax import checkpoints, models


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
