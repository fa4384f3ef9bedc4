"""Frame sampling, face detection/cropping and extract_samples (data_pipelines.video/faces/samples)."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from data_pipelines import video
from data_pipelines.faces import (BlazeFaceDetector, HaarFaceDetector, crop_face, make_face_detector,
                                  square_crop_box)
from data_pipelines.preprocessing import MediaError, Preprocessing
from data_pipelines.samples import clip_indices, extract_samples, make_clips
from tests.conftest import write_video

LEVEL_STEP = 7  # frame i is a flat gray frame of level i * LEVEL_STEP


def numbered_video(path, frame_count: int) -> str:
    return write_video(path, [np.full((48, 64, 3), i * LEVEL_STEP, np.uint8) for i in range(frame_count)])


def frame_number(frame_rgb: np.ndarray) -> int:
    return int(round(float(frame_rgb.mean()) / LEVEL_STEP))


@pytest.mark.parametrize("name", ["numbered.avi", "numbered.mp4"])
def test_sampling_returns_the_requested_evenly_spaced_frames(tmp_path, name):
    path = numbered_video(tmp_path / name, 30)
    sampled = video.sample_video_frames(path, 5)
    assert [index for index, _ in sampled] == [0, 7, 14, 22, 29] == video.evenly_spaced_indices(30, 5)
    assert [frame_number(frame) for _, frame in sampled] == [0, 7, 14, 22, 29]
    assert sampled[0][1].shape == (48, 64, 3) and sampled[0][1].dtype == np.uint8
    assert [index for index, _ in video.sample_video_frames(path, 100)] == list(range(30))


def test_long_videos_are_sampled_by_timestamp_keeping_the_users_ffmpeg_options(tmp_path, monkeypatch):
    # 120 frames, 5 samples: far enough apart to read with non-reference frames skipped (mp4v has none
    # to skip, so every frame is decoded, but each one's index now comes from its timestamp).
    frames = [np.zeros((32, 256, 3), np.uint8) for _ in range(120)]
    for i, frame in enumerate(frames):
        frame[:, 2 * i:2 * i + 2] = 255  # frame i: a white stripe at x = 2i
    path = write_video(tmp_path / "long.mp4", frames)
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "probesize;5000000")
    expected = video.evenly_spaced_indices(120 - video.SKIP_TAIL_FRAMES, 5)
    sampled = video.sample_video_frames(path, 5)
    assert [index for index, _ in sampled] == expected == [0, 28, 56, 83, 111]
    columns = np.arange(256)
    stripe_positions = [float((frame.mean(axis=(0, 2)) * columns).sum() / frame.mean(axis=(0, 2)).sum())
                        for _, frame in sampled]
    assert [round((x - 0.5) / 2) for x in stripe_positions] == expected
    assert video.os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "probesize;5000000"
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS")
    video.sample_video_frames(path, 5)
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in video.os.environ


def test_skipping_nonreference_frames_returns_the_fully_decoded_frames(shared_dir):
    path = str(shared_dir / "dev_videos" / "fake" / "dfdc_yhffcuhhjy.mp4")  # H.264 with B-frames, 301 frames
    skipped = video.sample_video_frames(path, 32)
    targets = video.evenly_spaced_indices(301 - video.SKIP_TAIL_FRAMES, 32)
    indices = [index for index, _ in skipped]
    assert len(skipped) == 32 and indices == sorted(set(indices))
    assert all(0 <= index - target < video.MIN_FRAMES_BETWEEN_SAMPLES_FOR_SKIPPING
               for index, target in zip(indices, targets))
    assert any(index != target for index, target in zip(indices, targets))  # some frames were skipped
    fully_decoded, _ = video._read_frames_at(path, indices)
    assert [index for index, _ in fully_decoded] == indices
    for (_, frame), (_, reference) in zip(skipped, fully_decoded):
        np.testing.assert_array_equal(frame, reference)


def rotate_mp4_display_matrix(path) -> None:
    """Sets the video track's display matrix (MP4 'tkhd' box) to a 90-degree clockwise rotation, as phones
    record portrait video: the pixels stay landscape, the player is told to turn them."""
    data = bytearray(open(path, "rb").read())
    box = data.find(b"tkhd")
    assert box > 0
    version = data[box + 4]
    # type, version/flags, times + track id + reserved + duration, reserved, layer, group, volume, reserved
    matrix = box + 4 + 4 + (20 if version == 0 else 32) + 8 + 2 + 2 + 2 + 2
    assert struct.unpack(">9i", data[matrix:matrix + 36]) == (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    open(path, "wb").write(data)


def test_rotation_metadata_is_applied(tmp_path):
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:, :32] = 255  # left half white
    path = write_video(tmp_path / "phone.mp4", [frame] * 6)
    rotate_mp4_display_matrix(path)
    sampled = video.sample_video_frames(path, 3)
    assert len(sampled) == 3
    for _, rotated in sampled:
        assert rotated.shape == (64, 32, 3)  # shown upright (portrait), as a player shows it
        assert rotated[:28].mean() > 240 and rotated[36:].mean() < 15  # the left half is now on top


@pytest.mark.parametrize("declared", [None, 100, 12])
def test_sampling_survives_wrong_or_unknown_frame_counts(tmp_path, monkeypatch, declared):
    path = numbered_video(tmp_path / "numbered.avi", 30)
    monkeypatch.setattr(video, "_declared_frame_count", lambda capture: declared)
    sampled = video.sample_video_frames(path, 4)
    assert [index for index, _ in sampled] == [0, 10, 19, 29]
    assert [frame_number(frame) for _, frame in sampled] == [0, 10, 19, 29]


@pytest.mark.parametrize("count, expected", [(0.0, None), (-1.0, None), (float("nan"), None), (4e9, None),
                                             (300.0, 300)])
def test_absurd_declared_frame_counts_are_unknown(count, expected):
    class Capture:
        def get(self, prop):
            assert prop == cv2.CAP_PROP_FRAME_COUNT
            return count

    assert video._declared_frame_count(Capture()) == expected


def test_bad_videos_raise_one_line_media_error(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(b"\x00junk" * 500)
    good = numbered_video(tmp_path / "good.mp4", 20)
    data = open(good, "rb").read()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("empty.mp4", "garbage.mp4", "truncated.mp4", "notes.txt", "missing.mkv"):
        with pytest.raises(MediaError) as info:
            extract_samples(tmp_path / name, Preprocessing(face_detector="none", frames_per_video=4))
        assert "\n" not in str(info.value) and name in str(info.value)


def test_square_crop_box_is_enlarged_and_kept_inside_the_frame():
    assert square_crop_box((40, 40, 20, 20), 1.3, 100, 100) == (37, 37, 26, 26)
    left, top, side, _ = square_crop_box((0, 0, 30, 40), 1.5, 100, 200)  # near the corner: shifted inside
    assert (left, top, side) == (0, 0, 60)
    assert square_crop_box((10, 10, 90, 90), 2.0, 80, 120)[2] == 80  # larger than the frame: clipped
    frame = np.zeros((80, 120, 3), np.uint8)
    assert crop_face(frame, (100, 60, 30, 30), 1.3).shape == (39, 39, 3)


def test_face_detector_registry():
    assert make_face_detector("none") is None
    assert isinstance(make_face_detector("haar"), HaarFaceDetector)
    assert isinstance(make_face_detector("blazeface"), BlazeFaceDetector)
    with pytest.raises(ValueError, match="blazeface, haar, none"):
        make_face_detector("retinaface")


def test_whole_frames_without_detector(tmp_path):
    path = numbered_video(tmp_path / "numbered.avi", 10)
    samples = extract_samples(path, Preprocessing(face_detector="none", frames_per_video=3, image_size=32))
    assert samples.kind == "video" and samples.inputs_bhwc.shape == (3, 32, 32, 3)
    assert samples.frame_indices == [0, 4, 9] and samples.frames_read == 3
    assert samples.inputs_bhwc.dtype == np.float32 and 0.0 <= samples.inputs_bhwc.min() <= 1.0


def test_no_face_is_a_media_error(tmp_path):
    path = numbered_video(tmp_path / "flat.avi", 6)
    with pytest.raises(MediaError, match="no face found"):
        extract_samples(path, Preprocessing(frames_per_video=2))
    image = tmp_path / "flat.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    with pytest.raises(MediaError, match="face_detector=none"):
        extract_samples(image, Preprocessing())


def test_faces_found_in_a_synthetic_video_of_a_real_face(tmp_path, shared_dir):
    face_bgr = cv2.resize(cv2.imread(str(shared_dir / "mesonet/test_images/real/real00240.jpg")), (160, 160))
    frames = []
    for i in range(12):
        frame = np.full((360, 480, 3), 40, np.uint8)
        frame[80 + i:240 + i, 150 + 2 * i:310 + 2 * i] = face_bgr
        frames.append(frame)
    path = write_video(tmp_path / "face.mp4", frames)
    samples = extract_samples(path, Preprocessing(frames_per_video=4))
    assert samples.inputs_bhwc.shape[1:] == (256, 256, 3) and len(samples.frame_indices) >= 3
    image_samples = extract_samples(shared_dir / "mesonet/test_images/real/real00240.jpg", Preprocessing())
    assert image_samples.kind == "image" and image_samples.inputs_bhwc.shape == (1, 256, 256, 3)


def test_real_dev_clips_yield_face_crops(shared_dir):
    for name in ("real/ffpp_004.mp4", "fake/dfdc_yhffcuhhjy.mp4"):  # landscape 720p and portrait 1280x720
        samples = extract_samples(shared_dir / "dev_videos" / name, Preprocessing(frames_per_video=3))
        assert samples.kind == "video" and samples.frames_read == 3 and len(samples.frame_indices) >= 2, name
        assert samples.inputs_bhwc.shape[1:] == (256, 256, 3)


def test_clips_cover_all_samples():
    assert clip_indices(32, 24).tolist() == [list(range(0, 24)), list(range(8, 32))]
    assert clip_indices(24, 24).tolist() == [list(range(24))]
    assert clip_indices(3, 6).tolist() == [[0, 0, 1, 1, 2, 2]]
    inputs = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32)
    clips = make_clips(inputs, 24)
    assert clips.shape == (3, 24, 2, 2, 3) and clips[-1, -1, 0, 0, 0] == 49
