"""The public API (meso_jax.load_detector): score_faces and scan give what predict_main prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_pipelines.preprocessing import Preprocessing
from meso_jax import checkpoints, load_detector
from tests.conftest import REPO_ROOT, random_model_variables


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "meso4_random"
    checkpoints.save_model(directory, "meso4", random_model_variables(seed=3, head_gain=40.0),
                           Preprocessing(face_detector="haar").to_dict(), {"threshold": 0.4})
    return directory


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Face crops of several sizes as RGB arrays, and the same pixels as PNG files (lossless)."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(5)
    faces = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
             for height, width in ((64, 64), (100, 80), (300, 300), (41, 57))]
    for index, face in enumerate(faces):
        assert cv2.imwrite(str(folder / f"face{index}.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    return faces, folder


def _predict_main_json(folder, model_dir, tmp_path, *flags, status: int = 0):
    result = subprocess.run([sys.executable, "predict_main.py", f"--path={folder}", f"--checkpoint={model_dir}",
                             "--format=json", "--noprogress", *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, check=False, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert result.returncode == status, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_score_faces_and_scan_give_what_predict_main_prints(model_dir, crops, tmp_path):
    faces, folder = crops
    detector = load_detector(model_dir)
    assert detector.threshold == 0.4 and detector.model_name == "meso4"
    printed = _predict_main_json(folder, model_dir, tmp_path, "--face_detector=none", "--per_frame")
    scores = detector.score_faces(faces)
    assert scores.shape == (4,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, [record["score"] for record in printed], atol=1e-6)
    scanned = list(detector.scan(str(folder), face_detector="none", per_frame=True))
    assert [r["path"] for r in scanned] == [r["path"] for r in printed]
    for mine, theirs in zip(scanned, printed):
        assert mine.keys() == theirs.keys()
        assert mine["label"] == theirs["label"] and mine["score"] == pytest.approx(theirs["score"], abs=1e-6)
    # The default face detector (Haar) finds no face in noise: the same error records as predict_main's.
    no_faces = list(detector.scan([str(folder / "face0.png"), str(folder / "face1.png")]))
    assert [r["error"] for r in no_faces] == [r["error"] for r in
                                               _predict_main_json(folder, model_dir, tmp_path, "--limit=2",
                                                                                  status=1)]


def test_scan_streams_and_stops_when_the_loop_is_left(model_dir, crops):
    _, folder = crops
    detector = load_detector(model_dir)
    first = next(iter(detector.scan(folder, face_detector="none", workers=1)))
    assert first["path"].endswith("face0.png") and first["error"] is None
    assert [r["path"] for r in detector.scan(folder, face_detector="none", limit=1)] == [first["path"]]
    with pytest.raises(Exception, match="no such file"):
        list(detector.scan(folder / "missing"))
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.score_faces([np.zeros((8, 8), np.uint8)])


def test_the_default_detector_is_the_shipped_model():
    detector = load_detector()
    shipped = checkpoints.load_model(checkpoints.DEFAULT_MODEL_DIR)
    assert detector.model_name == shipped.model_name
    assert detector.threshold == shipped.metadata.get("threshold", 0.5)
