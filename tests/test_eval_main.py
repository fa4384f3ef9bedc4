"""eval_main and meso_jax.evaluate: metrics on a hand-checked case, unscorable files left out, outputs."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_pipelines.preprocessing import Preprocessing
from meso_jax import checkpoints, evaluate, records
from conftest import random_model_variables

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _record(path: str, kind: str, frame_scores: list[float] | None, error: str | None = None) -> records.ScanRecord:
    if error is not None:
        return records.ScanRecord(path, kind, error=error)
    score = float(np.mean(frame_scores))
    return records.ScanRecord(path, kind, score, records.verdict(score, 0.5), records.certainty(score, 0.5),
                           len(frame_scores), len(frame_scores), None, list(range(len(frame_scores))), frame_scores)


def test_report_separates_frame_and_video_level_and_leaves_out_errors():
    labelled = [
        evaluate.LabelledRecord(_record("real/v.mp4", "video", [0.9, 0.7]), 1),
        evaluate.LabelledRecord(_record("real/bad.jpg", "image", None, "truncated JPEG"), 1),
        evaluate.LabelledRecord(_record("fake/a.png", "image", [0.3]), 0),
        evaluate.LabelledRecord(_record("fake/b.png", "image", [0.75]), 0),
        evaluate.LabelledRecord(_record("fake/w.mp4", "video", [0.2, 0.4]), 0),
    ]
    report, _ = evaluate.evaluation_report(labelled, threshold=0.5)
    assert report["counts"] == {"files": 5, "scored_files": 4, "unscored_files": 1, "real_files": 1,
                                "fake_files": 3, "images": 2, "videos": 2, "frames": 6}
    frame, video = report["frame_level"], report["video_level"]
    # Frames: reals 0.9, 0.7; fakes 0.3, 0.75, 0.2, 0.4. 0.9 beats all 4 fakes, 0.7 beats 3: AUC 7/8.
    assert frame["auc"] == pytest.approx(7 / 8)
    assert frame["accuracy"] == pytest.approx(5 / 6)  # only the 0.75 fake is misjudged
    assert frame["confusion_matrix"] == [[3, 1], [0, 2]]
    # Videos: real 0.8; fakes 0.3, 0.75, 0.3 -> perfectly ranked, 0.75 still misjudged at 0.5.
    assert video["auc"] == 1.0 and video["eer"] == 0.0
    assert video["accuracy"] == pytest.approx(3 / 4) and video["balanced_accuracy"] == pytest.approx(5 / 6)
    assert video["best_balanced_accuracy_threshold"] == pytest.approx(0.8)
    assert report["unscored"] == [{"path": "real/bad.jpg", "label": "real", "error": "truncated JPEG"}]
    assert "real/bad.jpg  (truncated JPEG)" in evaluate.format_report(
        {"threshold": 0.5, **report})


def test_report_needs_a_scored_file():
    with pytest.raises(evaluate.EvaluationError, match="none of the 1 files"):
        evaluate.evaluation_report([evaluate.LabelledRecord(_record("x.jpg", "image", None, "empty file"), 0)], 0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    variables = random_model_variables(seed=1)
    directory = tmp_path_factory.mktemp("model") / "meso4_random"
    checkpoints.save_model(directory, "meso4", variables,
                           Preprocessing(face_detector="none", frames_per_video=3).to_dict(), {})
    return directory


def test_eval_main_writes_metrics_roc_and_scores(tmp_path, model_dir):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        (data / label).mkdir(parents=True)
        for index in range(3):
            assert cv2.imwrite(str(data / label / f"{label}{index}.png"),
                               rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    writer = cv2.VideoWriter(str(data / "fake" / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (48, 48))
    for index in range(5):
        writer.write(np.full((48, 48, 3), 40 * index, np.uint8))
    writer.release()
    (data / "real" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    output_dir = tmp_path / "out"

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "eval_main.py"), f"--path={data}", f"--output_dir={output_dir}",
         f"--checkpoint={model_dir}", "--batch_size=4"],
        cwd=REPO_ROOT, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")),
        capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 0, result.stderr
    assert "AUC" in result.stdout and "broken.jpg" in result.stdout
    report = json.loads((output_dir / "metrics.json").read_text())
    assert report["counts"]["files"] == 8 and report["counts"]["scored_files"] == 7
    assert report["counts"]["frames"] == 9  # 6 images + 3 frames of the video
    assert report["frame_level"]["n"] == 9 and report["video_level"]["n"] == 7
    for level in ("frame_level", "video_level"):
        assert set(report[level]) >= {"auc", "accuracy", "balanced_accuracy", "eer", "eer_threshold",
                                      "average_precision", "confusion_matrix", "best_balanced_accuracy_threshold"}
    assert [item["path"] for item in report["unscored"]] == [str(data / "real" / "broken.jpg")]
    assert report["model"]["name"] == "meso4"
    assert (output_dir / "roc.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((output_dir / "scores.csv").open()))
    assert len(rows) == 8
    assert {row["true_label"] for row in rows if "/real/" in row["path"]} == {"real"}
    video_row = next(row for row in rows if row["path"].endswith("clip.mp4"))
    assert len(video_row["frame_scores"].split(";")) == 3


def test_eval_main_usage_error_for_unlabelled_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "eval_main.py"), f"--path={tmp_path}", f"--output_dir={tmp_path / 'o'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "real" in result.stderr, result.stderr


def test_eval_main_on_a_set_of_one_class_reports_what_is_undefined_and_why(tmp_path, model_dir):
    data = tmp_path / "data"
    (data / "fake").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for index in range(3):
        assert cv2.imwrite(str(data / "fake" / f"fake{index}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    output_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "eval_main.py"), f"--path={data}", f"--output_dir={output_dir}",
         f"--checkpoint={model_dir}", "--noprogress"],
        cwd=REPO_ROOT, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")),
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads((output_dir / "metrics.json").read_text())
    assert report["frame_level"]["auc"] is None and report["frame_level"]["accuracy"] is not None
    assert "need real and fake files" in report["undefined"] and "all fake" in report["undefined"]
    assert "undefined ('-'): AUC" in result.stdout
    assert (output_dir / "roc.png").read_bytes()[:4] == b"\x89PNG"
