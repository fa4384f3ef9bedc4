"""Even frame sampling from videos with grab()/retrieve() stepping (no seeking).

H.264/HEVC decoders must decode every reference frame to reach the sampled ones, but frames that
no other frame references (most B-frames) can be skipped: when the video is long enough, frames
are read with FFmpeg's ``avdiscard;nonref`` option (through OPENCV_FFMPEG_CAPTURE_OPTIONS), each
decoded frame's index is recovered from its timestamp, and each sampled index takes the first
decoded frame at or after it. Skipped frames are never decoded, so decoding takes about half the
time on typical H.264, and the frames that are decoded are bit-identical to a full decode.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

import cv2
import numpy as np

from data_pipelines.preprocessing import MAX_IMAGE_PIXELS, MediaError

# A declared frame count above this is treated as unknown (broken container metadata).
MAX_PLAUSIBLE_FRAMES = 10_000_000


def evenly_spaced_indices(frame_count: int, frames_per_video: int) -> list[int]:
    """``frames_per_video`` distinct indices spread evenly over [0, frame_count), first and last included."""
    if frame_count <= 0:
        return []
    if frames_per_video >= frame_count:
        return list(range(frame_count))
    return sorted(set(np.linspace(0, frame_count - 1, frames_per_video).round().astype(int).tolist()))


# Skipping non-reference frames is used only when sampled frames are at least this many frames apart,
# so that every sampled index has a decoded frame close after it.
MIN_FRAMES_BETWEEN_SAMPLES_FOR_SKIPPING = 8
# The sampled indices stay this many frames before the declared end (the last frames may be skipped).
SKIP_TAIL_FRAMES = 8
_FFMPEG_OPTIONS_VARIABLE = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_open_lock = threading.Lock()


@contextlib.contextmanager
def _ffmpeg_options(skip_nonreference: bool) -> Iterator[None]:
    """Holds the lock every capture is opened under, with FFmpeg told to skip non-reference frames or
    not (OpenCV reads the variable when it opens a capture; a user's own options are kept)."""
    with _open_lock:
        user_options = os.environ.get(_FFMPEG_OPTIONS_VARIABLE)
        if skip_nonreference:
            os.environ[_FFMPEG_OPTIONS_VARIABLE] = "|".join(filter(None, [user_options, "avdiscard;nonref"]))
        try:
            yield
        finally:
            if user_options is None:
                os.environ.pop(_FFMPEG_OPTIONS_VARIABLE, None)
            else:
                os.environ[_FFMPEG_OPTIONS_VARIABLE] = user_options


def _open_capture(path: str, skip_nonreference: bool = False) -> cv2.VideoCapture:
    with _ffmpeg_options(skip_nonreference):
        capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise MediaError(f"{path}: cannot open video (corrupt, truncated or unsupported codec)")
    # Applies the container's rotation metadata (phone videos) to the decoded frames.
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    width = capture.get(cv2.CAP_PROP_FRAME_WIDTH)
    height = capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    if width * height > MAX_IMAGE_PIXELS:
        capture.release()
        raise MediaError(f"{path}: video declares {width:.0f}x{height:.0f} frames, too large")
    return capture


def _declared_frame_count(capture: cv2.VideoCapture) -> int | None:
    """The container's frame count, or None when it is missing or absurd."""
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    if not np.isfinite(count) or count < 1 or count > MAX_PLAUSIBLE_FRAMES:
        return None
    return int(count)


def _count_frames(path: str) -> int:
    """Counts decodable frames by grabbing through the whole video."""
    capture = _open_capture(path)
    try:
        count = 0
        while capture.grab():
            count += 1
        return count
    finally:
        capture.release()


FrameCallback = Callable[[int, np.ndarray], None]


def _read_frames_at(path: str, indices: list[int], on_frame: FrameCallback | None = None
                    ) -> tuple[list[tuple[int, np.ndarray]], bool]:
    """Frames at sorted ``indices``, stepping with grab(); also whether the video has frames after the last index.
    ``on_frame(index, frame_rgb)`` is called as soon as each frame is decoded."""
    capture = _open_capture(path)
    frames: list[tuple[int, np.ndarray]] = []
    try:
        wanted = iter(indices)
        target = next(wanted, None)
        position = 0
        while target is not None:
            if not capture.grab():
                return frames, False
            if position == target:
                ok, frame_bgr = capture.retrieve()
                if ok and frame_bgr is not None and frame_bgr.size:
                    frames.append((position, cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)))
                    if on_frame is not None:
                        on_frame(*frames[-1])
                target = next(wanted, None)
            position += 1
        return frames, capture.grab()
    finally:
        capture.release()


def _read_frames_skipping(path: str, indices: list[int], on_frame: FrameCallback | None
                          ) -> list[tuple[int, np.ndarray]] | None:
    """Frames for sorted ``indices`` read with non-reference frames skipped: for each index, the first
    decoded frame at or after it, with its own index (from its timestamp). None when that cannot be
    done here (no usable frame rate or timestamps, two indices falling on one frame, the video ending
    early); the caller then reads every frame."""
    capture = _open_capture(path, skip_nonreference=True)
    try:
        frames_per_second = capture.get(cv2.CAP_PROP_FPS)
        if not np.isfinite(frames_per_second) or not 1.0 <= frames_per_second <= 1000.0:
            return None
        frames: list[tuple[int, np.ndarray]] = []
        previous_index = -1
        for target in indices:
            while True:
                if not capture.grab():
                    return None
                milliseconds = capture.get(cv2.CAP_PROP_POS_MSEC)
                if not np.isfinite(milliseconds):
                    return None
                index = round(milliseconds * frames_per_second / 1000.0)
                if index <= previous_index:  # timestamps not increasing: not trustworthy
                    return None
                previous_index = index
                if index >= target:
                    break
            if frames and index == frames[-1][0]:
                return None
            ok, frame_bgr = capture.retrieve()
            if not ok or frame_bgr is None or not frame_bgr.size:
                return None
            frames.append((index, cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)))
            if on_frame is not None:
                on_frame(*frames[-1])
        return frames
    finally:
        capture.release()


def sample_video_frames(path: str | os.PathLike, frames_per_video: int,
                        on_frame: FrameCallback | None = None,
                        skip_nonreference: bool = True) -> list[tuple[int, np.ndarray]]:
    """``frames_per_video`` (frame index, uint8 RGB frame) pairs spread evenly over the video.

    Uses the declared frame count when plausible; when it is missing, absurd or turns out wrong
    (the video ends early or goes on past it) the frames are counted and sampling is redone.
    With ``skip_nonreference`` and samples at least MIN_FRAMES_BETWEEN_SAMPLES_FOR_SKIPPING frames
    apart, frames no other frame needs are not decoded (module docstring); a returned index is then
    the first decoded frame at or after the evenly spaced one, and anything unexpected falls back
    to reading every frame.
    ``on_frame(index, frame_rgb)`` sees every frame as soon as it is decoded (e.g. to start face
    detection while decoding goes on); after a fallback or resampling it may have seen frames not
    returned. Raises MediaError when no frame can be decoded.
    """
    path = os.fspath(path)
    if frames_per_video < 1:
        raise ValueError(f"frames_per_video must be >= 1, got {frames_per_video}")
    try:
        if os.path.getsize(path) == 0:
            raise MediaError(f"{path}: empty file")
    except OSError as err:
        raise MediaError(f"{path}: cannot read file ({err.strerror or err})") from None
    capture = _open_capture(path)
    declared = _declared_frame_count(capture)
    capture.release()

    frames: list[tuple[int, np.ndarray]] = []
    if (skip_nonreference and declared is not None
            and declared - SKIP_TAIL_FRAMES >= frames_per_video * MIN_FRAMES_BETWEEN_SAMPLES_FOR_SKIPPING):
        skipped_read = _read_frames_skipping(
            path, evenly_spaced_indices(declared - SKIP_TAIL_FRAMES, frames_per_video), on_frame)
        if skipped_read is not None:
            return skipped_read
    if declared is not None:
        indices = evenly_spaced_indices(declared, frames_per_video)
        frames, more_frames = _read_frames_at(path, indices, on_frame)
        if len(frames) == len(indices) and not more_frames:
            return frames
    frame_count = _count_frames(path)
    if frame_count == 0:
        raise MediaError(f"{path}: no decodable video frames")
    frames, _ = _read_frames_at(path, evenly_spaced_indices(frame_count, frames_per_video), on_frame)
    if not frames:
        raise MediaError(f"{path}: no decodable video frames")
    return frames
