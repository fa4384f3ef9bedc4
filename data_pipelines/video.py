"""Even frame sampling from videos with grab()/retrieve() stepping (no seeking)."""

from __future__ import annotations

import os
from typing import Callable

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


def _open_capture(path: str) -> cv2.VideoCapture:
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


def sample_video_frames(path: str | os.PathLike, frames_per_video: int,
                        on_frame: FrameCallback | None = None) -> list[tuple[int, np.ndarray]]:
    """``frames_per_video`` (frame index, uint8 RGB frame) pairs spread evenly over the video.

    Uses the declared frame count when plausible; when it is missing, absurd or turns out wrong
    (the video ends early or goes on past it) the frames are counted and sampling is redone.
    ``on_frame(index, frame_rgb)`` sees every frame as soon as it is decoded (e.g. to start face
    detection while decoding goes on); after a resampling it may have seen frames not returned.
    Raises MediaError when no frame can be decoded.
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
