"""The one path from a media file to model inputs, shared by training (videos), prediction and evaluation."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading

import numpy as np

from data_pipelines import people as people_lib
from data_pipelines.faces import Box, FaceDetector, crop_face, make_face_detector
from data_pipelines.preprocessing import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, Preprocessing,
                                          check_min_size, media_kind, read_image_rgb, resize_image, scale_to_unit)
from data_pipelines.video import sample_video_frames

NO_FACE_MESSAGE = "no face found (use --face_detector=none for pre-cropped faces)"


@dataclasses.dataclass
class FaceCrops:
    """uint8 crops before scaling to [0, 1] (what the training cache stores), person after person.

    Each crop shows person ``person_ids[i]`` on frame ``frame_indices[i]``; ``person_boxes[p]`` is where
    person p was first seen (x, y, w, h in pixels of the original frame; the whole frame without a face
    detector). Every face of an image is a person; in a video, people are tracks (data_pipelines.people).
    """

    kind: str
    crops_bhwc: np.ndarray  # uint8 (N, S, S, 3)
    frame_indices: list[int]
    frames_read: int
    person_ids: list[int]
    person_boxes: list[Box]


@dataclasses.dataclass
class Samples:
    """Model inputs extracted from one file."""

    kind: str  # "image" | "video"
    inputs_bhwc: np.ndarray  # float32 (N, S, S, 3) in [0, 1]
    frame_indices: list[int]  # [0] for images
    frames_read: int


_detectors_lock = threading.Lock()
_detectors: dict[str, FaceDetector | None] = {}


def face_detector(name: str) -> FaceDetector | None:
    """One shared detector per name (detectors are thread-safe); raises faces.FaceDetectorUnavailable."""
    with _detectors_lock:
        if name not in _detectors:
            _detectors[name] = make_face_detector(name)
        return _detectors[name]


def _frames_and_faces(path: str, frames_per_video: int, detector: FaceDetector
                      ) -> tuple[list[tuple[int, np.ndarray]], list[list[Box]]]:
    """Sampled frames and the faces of each; detection runs on a second thread while decoding goes on."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="faces") as pool:
        pending: dict[int, concurrent.futures.Future] = {}

        def start_detection(index: int, frame_rgb: np.ndarray) -> None:
            pending[index] = pool.submit(detector.detect_faces, frame_rgb)

        frames = sample_video_frames(path, frames_per_video, on_frame=start_detection)
        return frames, [pending[index].result() for index, _ in frames]


def _check_frame_size(path: str, frames: list[tuple[int, np.ndarray]]) -> None:
    if frames:
        height, width = frames[0][1].shape[:2]
        check_min_size(width, height, f"{path}: the video frame")


def extract_face_crops(path: str | os.PathLike, prep: Preprocessing) -> FaceCrops:
    """Decodes ``path``, finds every face (unless prep.face_detector == "none"), links a video's faces into
    people seen on enough frames (people.people_to_judge) and resizes: uint8 crops, person after person.

    Raises MediaError for any problem with the file, including "no face".
    """
    path = os.fspath(path)
    kind = media_kind(path)
    detector = face_detector(prep.face_detector)
    if kind == "image":
        image_rgb = read_image_rgb(path)
        height, width = image_rgb.shape[:2]
        if detector is None:
            return FaceCrops("image", resize_image(image_rgb, prep)[None], [0], 1, [0], [(0, 0, width, height)])
        boxes = detector.detect_faces(image_rgb)
        if not boxes:
            raise MediaError(f"{path}: {NO_FACE_MESSAGE}")
        crops = np.stack([resize_image(crop_face(image_rgb, box, prep.face_margin), prep) for box in boxes])
        return FaceCrops("image", crops, [0] * len(boxes), 1, list(range(len(boxes))), list(boxes))
    if kind == "video":
        if detector is None:
            frames = sample_video_frames(path, prep.frames_per_video)
            _check_frame_size(path, frames)
            boxes_per_frame = [[(0, 0, frame.shape[1], frame.shape[0])] for _, frame in frames]
        else:
            frames, boxes_per_frame = _frames_and_faces(path, prep.frames_per_video, detector)
            _check_frame_size(path, frames)
        people = people_lib.people_to_judge(people_lib.link_people(boxes_per_frame))
        if not people:
            raise MediaError(f"{path}: no face found in any of {len(frames)} sampled frames")
        crops, frame_indices, person_ids = [], [], []
        for person_id, person in enumerate(people):
            for sample, box in zip(person.samples, person.boxes):
                index, frame = frames[sample]
                crop = frame if detector is None else crop_face(frame, box, prep.face_margin)
                crops.append(resize_image(crop, prep))
                frame_indices.append(index)
                person_ids.append(person_id)
        return FaceCrops("video", np.stack(crops), frame_indices, len(frames), person_ids,
                         [person.first_box for person in people])
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
