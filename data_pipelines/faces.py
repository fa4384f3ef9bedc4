"""Face detection behind a small interface (Viola-Jones now, a DNN detector can be added) and face cropping."""

from __future__ import annotations

import os
import threading
from typing import Protocol, Sequence

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h in frame pixels

# Detection runs on a copy whose longer side is at most this many pixels.
DETECTION_MAX_SIDE = 480
# A face narrower than this fraction of the frame's shorter side is rejected as implausible.
MIN_FACE_FRACTION = 0.1
# Given the previous sampled frame's face, search first the region around it (the box widened by
# PREVIOUS_FACE_REGION_MARGIN of its size on every side) for faces at least PREVIOUS_FACE_MIN_RATIO of its
# size, and the whole frame over all sizes only when there is none. Viola-Jones spends its time in
# proportion to the windows it tries, most of them small, so the region search costs a fraction of the
# full one; it follows the face it was shown (a larger face elsewhere is not looked for while the tracked
# one is found). BENCHMARKS.md compares its boxes with the full search's on the dev_videos frames.
PREVIOUS_FACE_MIN_RATIO = 0.6
PREVIOUS_FACE_REGION_MARGIN = 1.0


class FaceDetector(Protocol):
    """Finds the largest plausible face in an RGB frame."""

    def detect(self, frame_rgb: np.ndarray, previous_box: Box | None = None) -> Box | None:
        """Box of the largest plausible face, or None. ``previous_box``: the face found in the previous
        sampled frame of the same video, a hint that may make the search cheaper."""


class HaarFaceDetector:
    """Viola-Jones detector with OpenCV's shipped frontal-face cascade, run on a downscaled frame.

    One instance is safe to share between threads (each thread gets its own cascade).
    """

    def __init__(self, cascade_path: str | None = None, scale_factor: float = 1.1, min_neighbors: int = 5):
        self.cascade_path = cascade_path or os.path.join(
            cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        if cv2.CascadeClassifier(self.cascade_path).empty():
            raise RuntimeError(f"cannot load the Haar cascade {self.cascade_path}")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self._local = threading.local()

    def _cascade(self) -> cv2.CascadeClassifier:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = cv2.CascadeClassifier(self.cascade_path)
        return cascade

    def detect(self, frame_rgb: np.ndarray, previous_box: Box | None = None) -> Box | None:
        """Largest face at least MIN_FACE_FRACTION of the frame's shorter side, in full-frame pixels.
        With ``previous_box``, the region around it is searched first for faces at least
        PREVIOUS_FACE_MIN_RATIO of its size (the largest there is returned), and the whole frame only
        when there is none."""
        height, width = frame_rgb.shape[:2]
        scale = min(1.0, DETECTION_MAX_SIDE / max(height, width))
        gray = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        min_side = max(20, round(MIN_FACE_FRACTION * min(gray.shape)))
        searches = []  # (left, top, region, minimum face side), in detection pixels
        if previous_box is not None:
            x, y, w, h = (value * scale for value in previous_box)
            margin = PREVIOUS_FACE_REGION_MARGIN * max(w, h)
            left, top = max(0, round(x - margin)), max(0, round(y - margin))
            right, bottom = min(gray.shape[1], round(x + w + margin)), min(gray.shape[0], round(y + h + margin))
            region_min_side = max(min_side, round(PREVIOUS_FACE_MIN_RATIO * max(w, h)))
            if min(right - left, bottom - top) >= region_min_side:
                searches.append((left, top, gray[top:bottom, left:right], region_min_side))
        searches.append((0, 0, gray, min_side))
        for left, top, region, side in searches:
            boxes = self._cascade().detectMultiScale(
                region, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(side, side))
            if len(boxes):
                x, y, w, h = max(boxes.tolist(), key=lambda b: b[2] * b[3])
                return (round((x + left) / scale), round((y + top) / scale), round(w / scale), round(h / scale))
        return None


def make_face_detector(name: str) -> FaceDetector | None:
    """"haar" -> HaarFaceDetector, "none" -> None (whole frames); anything else is a ValueError."""
    if name == "haar":
        return HaarFaceDetector()
    if name == "none":
        return None
    raise ValueError(f"unknown face detector {name!r}; choose one of haar, none")


def square_crop_box(box: Box, margin: float, frame_height: int, frame_width: int) -> Box:
    """The face box made square, enlarged by ``margin`` and moved/clipped to lie inside the frame."""
    x, y, w, h = box
    side = min(round(max(w, h) * margin), frame_height, frame_width)
    center_x, center_y = x + w / 2, y + h / 2
    left = int(np.clip(round(center_x - side / 2), 0, frame_width - side))
    top = int(np.clip(round(center_y - side / 2), 0, frame_height - side))
    return left, top, side, side


def crop_face(frame_rgb: np.ndarray, box: Box, margin: float) -> np.ndarray:
    """Square crop around ``box`` enlarged by ``margin``, clipped to the frame (not yet resized)."""
    height, width = frame_rgb.shape[:2]
    left, top, side, _ = square_crop_box(box, margin, height, width)
    return frame_rgb[top:top + side, left:left + side]


def reject_inconsistent_boxes(boxes: Sequence[Box | None], window: int = 2,
                              max_size_ratio: float = 1.8, max_shift: float = 0.75) -> list[Box | None]:
    """Drops boxes that disagree with the neighbouring frames' detections (a false detection elsewhere).

    A box is compared with the median of up to ``window`` detections on each side: it is rejected when
    its size differs by more than ``max_size_ratio`` or its centre moved more than ``max_shift`` face
    widths. Boxes with fewer than two neighbouring detections are kept.
    """
    detected = [i for i, box in enumerate(boxes) if box is not None]
    kept: list[Box | None] = list(boxes)
    for rank, i in enumerate(detected):
        neighbours = detected[max(0, rank - window):rank] + detected[rank + 1:rank + 1 + window]
        if len(neighbours) < 2:
            continue
        reference = np.median(np.array([boxes[j] for j in neighbours], dtype=np.float64), axis=0)
        x, y, w, h = boxes[i]
        ref_x, ref_y, ref_w, ref_h = reference
        size_ratio = max(w, ref_w) / max(1.0, min(w, ref_w))
        shift = np.hypot(x + w / 2 - (ref_x + ref_w / 2), y + h / 2 - (ref_y + ref_h / 2)) / max(1.0, ref_w)
        if size_ratio > max_size_ratio or shift > max_shift:
            kept[i] = None
    return kept
