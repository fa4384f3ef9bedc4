"""The one path from a media file to model inputs, shared by training (videos), prediction and evaluation."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading

import numpy as np

from data_pipelines.faces import Box, FaceDetector, crop_face, make_face_detector, reject_inconsistent_boxes
from data_pipelines.preprocessing import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, Preprocessing,
                                          check_min_size, media_kind, read_image_rgb, resize_image, scale_to_unit)
from data_pipelines.video import sample_video_frames

NO_FACE_MESSAGE = "no face found (use --face_detector=none for pre-cropped faces)"


@dataclasses.dataclass
class FaceCrops:
    """uint8 crops before scaling to [0, 1] (what the training cache stores)."""

    kind: str
    crops_bhwc: np.ndarray  # uint8 (N, S, S, 3)
    frame_indices: list[int]
    frames_read: int


@dataclasses.dataclass
class Samples:
    """Model inputs extracted from one file."""

    kind: str  # "image" | "video"
    inputs_bhwc: np.ndarray  # float32 (N, S, S, 3) in [0, 1]
    frame_indices: list[int]  # [0] for images
    frames_read: int


_detectors_lock = threading.Lock()
_detectors: dict[str, FaceDetector | None] = {}


def _detector(name: str) -> FaceDetector | None:
    """One shared detector per name (detectors are thread-safe)."""
    with _detectors_lock:
        if name not in _detectors:
            _detectors[name] = make_face_detector(name)
        return _detectors[name]


def _frames_and_faces(path: str, frames_per_video: int, detector: FaceDetector
                      ) -> tuple[list[tuple[int, np.ndarray]], list[Box | None]]:
    """Sampled frames and the face box of each; detection runs on a second thread while decoding goes on,
    frame after frame, each search told the previous frame's face (FaceDetector.detect)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="faces") as pool:
        pending: dict[int, concurrent.futures.Future] = {}
        previous_box: list[Box | None] = [None]  # written and read only by the pool's one thread

        def detect_after_previous(frame_rgb: np.ndarray) -> Box | None:
            previous_box[0] = detector.detect(frame_rgb, previous_box=previous_box[0])
            return previous_box[0]

        def start_detection(index: int, frame_rgb: np.ndarray) -> None:
            pending[index] = pool.submit(detect_after_previous, frame_rgb)

        frames = sample_video_frames(path, frames_per_video, on_frame=start_detection)
        return frames, [pending[index].result() for index, _ in frames]


def _check_frame_size(path: str, frames: list[tuple[int, np.ndarray]]) -> None:
    if frames:
        height, width = frames[0][1].shape[:2]
        check_min_size(width, height, f"{path}: the video frame")


def extract_face_crops(path: str | os.PathLike, prep: Preprocessing) -> FaceCrops:
    """Decodes ``path``, finds faces (unless prep.face_detector == "none") and resizes: uint8 crops.

    Raises MediaError for any problem with the file, including "no face".
    """
    path = os.fspath(path)
    kind = media_kind(path)
    detector = _detector(prep.face_detector)
    if kind == "image":
        image_rgb = read_image_rgb(path)
        if detector is not None:
            box = detector.detect(image_rgb)
            if box is None:
                raise MediaError(f"{path}: {NO_FACE_MESSAGE}")
            image_rgb = crop_face(image_rgb, box, prep.face_margin)
        return FaceCrops("image", resize_image(image_rgb, prep)[None], [0], 1)
    if kind == "video":
        if detector is None:
            crops = sample_video_frames(path, prep.frames_per_video)
            frames_read = len(crops)
            _check_frame_size(path, crops)
        else:
            frames, boxes = _frames_and_faces(path, prep.frames_per_video, detector)
            frames_read = len(frames)
            _check_frame_size(path, frames)
            crops = [(index, crop_face(frame, box, prep.face_margin))
                     for (index, frame), box in zip(frames, reject_inconsistent_boxes(boxes)) if box is not None]
        if not crops:
            raise MediaError(f"{path}: {NO_FACE_MESSAGE} in any of {frames_read} sampled frames")
        return FaceCrops("video", np.stack([resize_image(crop, prep) for _, crop in crops]),
                         [index for index, _ in crops], frames_read)
    extension = os.path.splitext(path)[1] or "(no extension)"
    raise MediaError(f"{path}: unsupported file type {extension}; "
                     f"images: {' '.join(IMAGE_EXTENSIONS)}; videos: {' '.join(VIDEO_EXTENSIONS)}")


def extract_samples(path: str | os.PathLike, prep: Preprocessing) -> Samples:
    """Model inputs for one file: float32 (N, S, S, 3) in [0, 1]; raises MediaError for bad files."""
    crops = extract_face_crops(path, prep)
    inputs = scale_to_unit(crops.crops_bhwc)
    return Samples(crops.kind, inputs, crops.frame_indices, crops.frames_read)


def clip_starts(num_samples: int, clip_frames: int) -> list[int]:
    """Start offsets of the clips cut from ``num_samples`` consecutive samples (see make_clips)."""
    if num_samples < 1:
        return []
    if num_samples <= clip_frames:
        return [0]
    num_clips = -(-num_samples // clip_frames)
    return np.linspace(0, num_samples - clip_frames, num_clips).round().astype(int).tolist()


def clip_indices(num_samples: int, clip_frames: int) -> np.ndarray:
    """int (C, clip_frames) sample indices of each clip.

    Enough clips of ``clip_frames`` consecutive samples to cover all samples (evenly spaced, possibly
    overlapping); fewer samples than ``clip_frames`` give one clip that repeats samples evenly.
    """
    if num_samples < clip_frames:
        return np.linspace(0, num_samples - 1, clip_frames).round().astype(np.int64)[None]
    starts = np.array(clip_starts(num_samples, clip_frames), dtype=np.int64)
    return starts[:, None] + np.arange(clip_frames, dtype=np.int64)[None]


def make_clips(inputs_bhwc: np.ndarray, clip_frames: int) -> np.ndarray:
    """(N, S, S, 3) samples of one video -> (C, clip_frames, S, S, 3) clips for the clip model."""
    if len(inputs_bhwc) == 0:
        raise ValueError("make_clips needs at least one sample")
    return inputs_bhwc[clip_indices(len(inputs_bhwc), clip_frames)]
