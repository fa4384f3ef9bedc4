"""predict_main and meso_jax.scan on synthetic files: scores belong to their paths, hostile inputs get
error records, limits, output formats, exit codes, and the published weights' reference scores."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_pipelines.preprocessing import Preprocessing, media_kind
from meso_jax import checkpoints, models, records, scan, scoring
from conftest import png_declaring, random_model_variables, write_video

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_PREPROCESSING = Preprocessing(face_detector="none", frames_per_video=4)
SMALL_BATCH = 3  # smaller than a video's frames, so files share and straddle batches
IMAGE_PATTERNS = ("black", "white", "noise", "gradient", "checker")


def _pattern(name: str, seed: int = 0) -> np.ndarray:
    """A 64x64 BGR test image that the sharpened random model scores clearly differently from the others."""
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    images = {
        "black": np.zeros((64, 64, 3), np.uint8),
        "white": np.full((64, 64, 3), 255, np.uint8),
        "noise": np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "gradient": ramp,
        "checker": (np.indices((64, 64)).sum(axis=0) // 8 % 2 * 255).astype(np.uint8)[:, :, None].repeat(3, 2),
    }
    return images[name]


def _write_video(path: pathlib.Path, frames: int = 6) -> None:
    """A 64x48 mp4 of flat frames, each brighter than the one before."""
    write_video(path, [np.full((48, 64, 3), 20 + index * 25, np.uint8) for index in range(frames)], fps=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """A random Meso-4 whose scores differ clearly between the test images."""
    variables = random_model_variables(seed=0, head_gain=50.0)
    directory = tmp_path_factory.mktemp("model") / "meso4_random"
    checkpoints.save_model(directory, "meso4", variables, TEST_PREPROCESSING.to_dict(), {"note": "test model"})
    return directory


@pytest.fixture(scope="module")
def scorer(model_dir) -> scoring.Scorer:
    """Scores as predict_main does by default (--flip_average)."""
    return scoring.Scorer(scoring.load_model_source(checkpoint=str(model_dir)), batch_size=SMALL_BATCH,
                          flip_average=True)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> pathlib.Path:
    """Five distinct images (mixed formats and case of extensions) and two videos, in nested folders."""
    root = tmp_path_factory.mktemp("media")
    (root / "b" / "c").mkdir(parents=True)
    for index, (name, file_name) in enumerate(zip(IMAGE_PATTERNS, ("a1.jpg", "a2.PNG", "b/b1.png", "b/c/c1.bmp",
                                                                    "b/c/c2.webp"))):
        params = [cv2.IMWRITE_JPEG_QUALITY, 100] if file_name.endswith(".jpg") else []
        assert cv2.imwrite(str(root / file_name), _pattern(name, index), params)
    _write_video(root / "b" / "v1.mp4", frames=6)
    _write_video(root / "v2.MP4", frames=9)
    (root / "notes.txt").write_text("not media")
    return root


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> pathlib.Path:
    """One good image beside files that cannot be scored, and links that go nowhere or in circles."""
    root = tmp_path_factory.mktemp("hostile")
    assert cv2.imwrite(str(root / "good.png"), _pattern("noise"))
    assert cv2.imwrite(str(root / "ünïcødé 画像.png"), _pattern("gradient"))
    (root / "empty.jpg").write_bytes(b"")
    good_jpeg = cv2.imencode(".jpg", _pattern("noise"))[1].tobytes()
    (root / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "garbage.png").write_bytes(os.urandom(2000))
    (root / "text.jpg").write_text("this is not a picture\n")
    (root / "huge.png").write_bytes(png_declaring(20_000, 20_000))
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(500))
    assert cv2.imwrite(str(root / "tiny.png"), _pattern("noise")[:2, :3])  # nothing to judge in 3x2 pixels
    writer = cv2.VideoWriter(str(root / "tiny.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (8, 8))
    for _ in range(3):
        writer.write(_pattern("noise")[:8, :8])
    writer.release()
    assert cv2.imwrite(str(root / "line\nbreak.png"), _pattern("gradient"))  # a newline in a file name
    (root / "empty  line\nbreak.jpg").write_bytes(b"")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    (root / "self-loop.png").symlink_to(root / "self-loop.png")
    return root


def _scan(path, scorer, **option_values) -> list[records.ScanRecord]:
    records: list[records.ScanRecord] = []
    options = scan.ScanOptions(**option_values)
    summary = scan.scan_files(scan.select_media(str(path), options.image_limit, options.video_limit), scorer,
                              TEST_PREPROCESSING, options, records.append)
    assert summary.files == len(records)
    return records


def _run(script: str, *args: str, cache_dir: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_dir))
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("xdg_cache")


def test_a_lone_input_scores_as_in_a_full_batch(scorer):
    crops = np.random.default_rng(3).integers(0, 256, (SMALL_BATCH,) + scorer.input_shape, dtype=np.uint8)
    together = scorer.score_batch(crops)
    np.testing.assert_allclose(scorer.score_batch(crops[1:2]), together[1:2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(scorer.score(crops[:SMALL_BATCH - 1]), together[:-1], rtol=0, atol=1e-6)


def test_each_score_belongs_to_its_path(media_dir, scorer):
    records = _scan(media_dir, scorer)
    paths = [r.path for r in records]
    assert [os.path.relpath(p, media_dir) for p in paths] == [
        "a1.jpg", "a2.PNG", "v2.MP4", "b/b1.png", "b/v1.mp4", "b/c/c1.bmp", "b/c/c2.webp"]
    assert all(r.error is None for r in records)
    image_scores = [r.score for r in records if r.kind == "image"]
    assert max(image_scores) - min(image_scores) > 0.3, "test images must score clearly apart"
    for record in records:
        alone = _scan(record.path, scorer)
        assert len(alone) == 1 and alone[0].path == record.path
        assert alone[0].score == pytest.approx(record.score, abs=1e-6)
        assert alone[0].frame_scores == pytest.approx(record.frame_scores, abs=1e-6)


def test_video_records_aggregate_their_frames(media_dir, scorer):
    records = _scan(media_dir, scorer, aggregate="vote", threshold=0.5)
    video = next(r for r in records if r.path.endswith("v2.MP4"))
    assert video.kind == "video" and video.frames == 4 and video.faces == 4
    assert video.frame_indices == [0, 3, 5, 8]
    assert video.score == pytest.approx(np.mean(np.array(video.frame_scores) >= 0.5))
    mean_record = next(r for r in _scan(video.path, scorer) if r.kind == "video")
    assert mean_record.score == pytest.approx(np.mean(video.frame_scores))
    assert mean_record.label == ("real" if mean_record.score >= 0.5 else "fake")


@pytest.mark.parametrize("limits, expected_images, expected_videos", [
    ({"image_limit": 2, "video_limit": 2}, 2, 2),
    ({"image_limit": 1, "video_limit": None}, 1, 2),
    ({"image_limit": None, "video_limit": 0}, 5, 0),
    ({"image_limit": 0, "video_limit": 1}, 0, 1),
])
def test_limits(media_dir, limits, expected_images, expected_videos):
    paths = list(scan.select_media(str(media_dir), **limits))
    kinds = [media_kind(p) for p in paths]
    assert (kinds.count("image"), kinds.count("video")) == (expected_images, expected_videos)
    assert paths == [p for p in scan.select_media(str(media_dir)) if p in paths]  # the first ones, in order


def test_hostile_inputs_get_error_records(hostile_dir, scorer):
    records = {os.path.basename(r.path): r for r in _scan(hostile_dir, scorer)}
    assert records["good.png"].error is None and records["ünïcødé 画像.png"].error is None
    assert records["line\nbreak.png"].error is None
    assert records["empty  line\nbreak.jpg"].error == "empty file"  # the reason alone, without the path
    expected_errors = {"empty.jpg": "empty", "truncated.jpg": "truncated", "garbage.png": "not a supported image",
                       "text.jpg": "not a supported image", "huge.png": "megapixel", "broken.mp4": "cannot open video",
                       "tiny.png": "image is 3x2 pixels, too small to judge", "tiny.avi": "frame is 8x8 pixels, too small"}
    for name, phrase in expected_errors.items():
        error = records[name].error
        assert error and "\n" not in error and phrase in error, (name, error)
        assert records[name].score is None and records[name].label is None
    # The folder link to itself is not walked again: no record below hostile_dir/loop/.
    assert not [r.path for r in _scan(hostile_dir, scorer) if os.path.join(str(hostile_dir), "loop") in r.path]


def test_broken_links_get_error_records(hostile_dir, scorer):
    records = {os.path.basename(r.path): r for r in _scan(hostile_dir, scorer)}
    for name in ("dangling.jpg", "self-loop.png"):
        assert name in records and records[name].error, name
    assert records["dangling.jpg"].error.startswith("broken symbolic link")
    assert records["self-loop.png"].error == "symbolic link loop"


def test_no_face_is_an_error_record(media_dir, scorer):
    haar = Preprocessing(face_detector="haar", frames_per_video=4)
    records = []
    scan.scan_files([str(media_dir / "a1.jpg")], scorer, haar, scan.ScanOptions(), records.append)
    assert records[0].error == "no face found (use --face_detector=none for pre-cropped faces)"


def test_clip_model_scores_videos_and_refuses_images(media_dir):
    variables = random_model_variables(seed=2, model_name="meso4_video")
    clip_scorer = scoring.Scorer(checkpoints.LoadedModel("meso4_video", variables, {}, {}), batch_size=1)
    records = []
    scan.scan_files([str(media_dir / "a1.jpg"), str(media_dir / "b" / "v1.mp4")], clip_scorer, TEST_PREPROCESSING,
                    scan.ScanOptions(), records.append)
    image, video = records
    assert "videos only" in image.error and image.frames == 0
    assert video.error is None and video.faces == 4 and video.frame_indices == [0]  # 4 frames fill one 24-frame clip
    assert 0.0 <= video.score <= 1.0 and video.frame_scores == [video.score]


def test_flip_average_mirrors_clips_along_their_width():
    variables = random_model_variables(seed=2, model_name="meso4_video")
    loaded = checkpoints.LoadedModel("meso4_video", variables, {}, {})
    spec = models.get_model("meso4_video")
    clips = np.random.default_rng(0).uniform(0, 1, (1, *spec.input_shape)).astype(np.float32)
    logits = [float(spec.module.apply(variables, x, train=False)[0]) for x in (clips, clips[..., ::-1, :])]
    expected = 1 / (1 + np.exp(-(logits[0] + logits[1]) / 2))
    score = scoring.Scorer(loaded, batch_size=1, flip_average=True).score(clips)
    np.testing.assert_allclose(score, [expected], atol=1e-6, rtol=0)


@pytest.mark.parametrize("score, threshold, expected", [
    (0.9, 0.5, "very confident"), (0.1, 0.5, "very confident"), (0.75, 0.5, "confident"),
    (0.4, 0.5, "fairly confident"), (0.55, 0.5, "uncertain"), (0.5, 0.5, "uncertain"),
    (0.96, 0.8, "very confident"), (0.6, 0.8, "fairly confident"), (0.7, 0.8, "uncertain"),
])
def test_certainty_bands(score, threshold, expected):
    assert records.certainty(score, threshold) == expected


def test_writers():
    good = records.ScanRecord("dir/clip.mp4", "video", 0.8123, "real", "confident", 8, 7, None, [0, 5], [0.7, 0.9],
                           [records.PersonResult(0.8123, "real", 2, (10, 20, 30, 40))], [0, 0])
    bad = records.ScanRecord("dir/x.jpg", "image", error="truncated JPEG")
    text = io.StringIO()
    writer = records.make_writer("text", text, per_frame=False, threshold=0.5)
    writer.write(good)
    writer.write(bad)
    header, good_line, bad_line = text.getvalue().splitlines()
    assert good_line.index("dir/clip.mp4") == bad_line.index("dir/x.jpg") == header.index("file")
    assert "0.8123  real (confident)" in good_line and "7/8" in good_line
    assert "error" in bad_line and "(truncated JPEG)" in bad_line

    text = io.StringIO()  # a newline in a file name stays on the record's line, escaped
    writer = records.make_writer("text", text, per_frame=False, threshold=0.5)
    writer.write(records.ScanRecord("dir/a\nb.jpg", "image", error="empty file"))
    assert text.getvalue().splitlines()[1].endswith("dir/a\\nb.jpg  (empty file)")

    lines = io.StringIO()
    writer = records.make_writer("json", lines, per_frame=True, threshold=0.5)
    writer.write(good)
    writer.write(bad)
    first, second = (json.loads(line) for line in lines.getvalue().splitlines())
    assert first["frame_scores"] == [{"frame": 0, "person": 1, "score": 0.7}, {"frame": 5, "person": 1, "score": 0.9}]
    assert first["people"] == [{"score": 0.8123, "label": "real", "frames": 2, "box": [10, 20, 30, 40]}]
    assert second == {"path": "dir/x.jpg", "kind": "image", "score": None, "label": None, "certainty": None,
                      "frames": 0, "faces": 0, "people": [], "error": "truncated JPEG", "frame_scores": []}

    table = io.StringIO()
    writer = records.make_writer("csv", table, per_frame=True, threshold=0.5)
    writer.write(good)
    writer.write(bad)
    rows = list(csv.DictReader(io.StringIO(table.getvalue())))
    assert rows[0]["score"] == "0.8123" and rows[0]["frame_scores"] == "0:0.700000;5:0.900000"
    assert (rows[0]["people"], rows[0]["box"]) == ("1", "10 20 30 40") and (rows[1]["people"], rows[1]["box"]) == ("", "")


def test_predict_main_json_folder_with_bad_files(hostile_dir, model_dir, scorer, cache_dir):
    result = _run("predict_main.py", f"--path={hostile_dir}", f"--checkpoint={model_dir}", "--format=json",
                  "--batch_size=3", "--noprogress", cache_dir=cache_dir)
    assert result.returncode == 1, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    in_process = {r.path: r for r in _scan(hostile_dir, scorer)}
    assert [r["path"] for r in records] == list(in_process)
    for record in records:
        assert set(record) >= {"path", "kind", "score", "label", "frames", "faces", "error"}
        assert record["score"] == pytest.approx(in_process[record["path"]].score, abs=1e-6) \
            if record["error"] is None else record["score"] is None
    huge = next(r for r in records if r["path"].endswith("huge.png"))
    assert "megapixel" in huge["error"] and huge["score"] is None
    # Nothing but the summary on stderr: no tracebacks, no OpenCV/FFmpeg warnings about the broken files.
    assert result.stderr.strip().splitlines() == [
        f"scanned {len(records)} files: {sum(r['label'] == 'real' for r in records)} real, "
        f"{sum(r['label'] == 'fake' for r in records)} fake, {sum(r['error'] is not None for r in records)} errors "
        "(real when score >= 0.5)"]


def test_predict_main_text_with_limit_and_csv_file(media_dir, model_dir, cache_dir, tmp_path):
    result = _run("predict_main.py", str(media_dir), f"--checkpoint={model_dir}", "--limit=1", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("a1.jpg") and lines[1].endswith("v2.MP4")
    for line in lines:
        assert (" real (" in line) != (" fake (" in line)
        assert line.index(str(media_dir)) == header.index("file")

    output = tmp_path / "scores.csv"
    result = _run("predict_main.py", f"--path={media_dir / 'b' / 'v1.mp4'}", f"--checkpoint={model_dir}",
                  "--format=csv", "--per_frame", "--aggregate=vote", f"--output={output}", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 1 and rows[0]["kind"] == "video" and len(rows[0]["frame_scores"].split(";")) == 4


@pytest.mark.parametrize("args, message", [
    ([], "nothing to scan"),
    (["--path=/no/such/place"], "no such file or folder"),
    (["--path=.", "--threshold=2"], "threshold"),
    (["--path=.", "--aggregate=median"], "aggregate"),
    (["--path=.", "--limit=-1"], "limit"),
    (["--path=.", "--checkpoint=/no/such/model"], "no such checkpoint"),
])
def test_usage_errors_exit_2_with_one_line(args, message, cache_dir):
    result = _run("predict_main.py", *args, cache_dir=cache_dir)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_published_weights_give_reference_scores(shared_dir, cache_dir):
    mesonet = shared_dir / "mesonet"
    # The authors' scores are the network's alone: --noflip_average.
    result = _run("predict_main.py", f"--keras_weights={mesonet / 'Meso4_DF.h5'}", "--face_detector=none",
                  "--noflip_average", "--format=json", f"--path={mesonet / 'test_images'}", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    reference = json.loads((mesonet / "reference_scores.json").read_text())["Meso4_DF.h5"]
    scores = {os.path.relpath(r["path"], mesonet): r["score"] for r in map(json.loads, result.stdout.splitlines())}
    assert scores.keys() == reference.keys()
    for name, expected in reference.items():
        assert scores[name] == pytest.approx(expected, abs=1e-4), name


def test_the_verdict_uses_the_models_threshold_unless_one_is_given(media_dir, model_dir, scorer, cache_dir, tmp_path):
    variables = checkpoints.load_model(model_dir).variables
    records = _scan(media_dir, scorer)
    scores = sorted(r.score for r in records if r.error is None)
    threshold = round((scores[1] + scores[2]) / 2, 6)  # between the 2nd and 3rd lowest: two files are fake
    calibrated = tmp_path / "calibrated"
    checkpoints.save_model(calibrated, "meso4", variables, TEST_PREPROCESSING.to_dict(), {"threshold": threshold})
    result = _run("predict_main.py", f"--path={media_dir}", f"--checkpoint={calibrated}", "--format=json",
                  "--noprogress", cache_dir=cache_dir)
    labels = [json.loads(line)["label"] for line in result.stdout.splitlines()]
    assert labels.count("fake") == 2 and result.stderr.strip().endswith(f"(real when score >= {threshold:.3g})")
    overridden = _run("predict_main.py", f"--path={media_dir}", f"--checkpoint={calibrated}", "--format=json",
                      "--noprogress", "--threshold=0", cache_dir=cache_dir)
    assert all(json.loads(line)["label"] == "real" for line in overridden.stdout.splitlines())
    assert overridden.stderr.strip().endswith("(real when score >= 0)")
