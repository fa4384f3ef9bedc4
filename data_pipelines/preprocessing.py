"""Image decoding and the one resize rule shared by training, evaluation and prediction.

Every user-facing file problem surfaces as :class:`MediaError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Literal

import cv2
import numpy as np

from data_pipelines.faces import FACE_DETECTORS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")

MAX_IMAGE_PIXELS = 100_000_000
# Shorter side below which an image or video frame holds too little detail to judge (Meso-4 looks at
# mesoscopic texture; the smallest face in the DFDC training crops was 36 px wide before upscaling).
MIN_IMAGE_SIDE = 32
MAX_IMAGE_FILE_BYTES = 1 << 30

RESIZE_INTERPOLATIONS = {
    # INTER_NEAREST_EXACT picks the same pixels as Keras/PIL `load_img(..., interpolation="nearest")`.
    "nearest": cv2.INTER_NEAREST_EXACT,
    "area": cv2.INTER_AREA,
    "bilinear": cv2.INTER_LINEAR,
}


class MediaError(Exception):
    """A file that cannot be used; ``str(err)`` is one line fit to show a user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Every setting that changes what the model sees; stored with checkpoints."""

    image_size: int = 256
    resize: str = "nearest"
    face_detector: str = "blazeface"
    face_margin: float = 1.3
    frames_per_video: int = 32

    def __post_init__(self):
        if self.resize not in RESIZE_INTERPOLATIONS:
            raise ValueError(
                f"unknown resize {self.resize!r}; choose one of {', '.join(RESIZE_INTERPOLATIONS)}")
        if self.face_detector not in FACE_DETECTORS:
            raise ValueError(
                f"unknown face_detector {self.face_detector!r}; choose one of {', '.join(FACE_DETECTORS)}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.face_margin < 1.0:
            raise ValueError(f"face_margin must be >= 1.0, got {self.face_margin}")
        if self.frames_per_video < 1:
            raise ValueError(f"frames_per_video must be >= 1, got {self.frames_per_video}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the settings."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: dict) -> "Preprocessing":
        """Builds settings from a dict, ignoring unknown keys (forward compatibility)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names})


def media_kind(path: str | os.PathLike) -> Literal["image", "video"] | None:
    """"image" or "video" by file extension (case-insensitive), None for anything else."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in VIDEO_EXTENSIONS:
        return "video"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's SOF marker; also checks the scan is not truncated."""
    sof_markers = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
    size = None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise MediaError("corrupt JPEG header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in sof_markers and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (width, height)
        if marker == 0xDA:  # start of scan: the entropy-coded image follows
            if size is None:
                raise MediaError("corrupt JPEG header (no frame size before the image data)")
            if data.rfind(b"\xff\xd9") < pos:
                raise MediaError("truncated JPEG (no end-of-image marker)")
            return size
        pos += 2 + length
    raise MediaError("truncated JPEG (header ends before the image data)")


def _image_size_from_header(data: bytes) -> tuple[int, int]:
    """(width, height) declared by the file header; MediaError for unknown or broken headers."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise MediaError("corrupt PNG header")
        if data.rfind(b"IEND") == -1:
            raise MediaError("truncated PNG (no end chunk)")
        return struct.unpack(">II", data[16:24])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        raise MediaError("corrupt WebP header")
    if data[:2] == b"BM" and len(data) >= 26:
        (header_size,) = struct.unpack("<I", data[14:18])
        if header_size == 12:
            width, height = struct.unpack("<hh", data[18:22])
        else:
            width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    raise MediaError("not a supported image (JPEG, PNG, WebP or BMP)")


def _check_header(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes after checking emptiness, size limit and truncation."""
    if not data:
        raise MediaError("empty file")
    width, height = _image_size_from_header(data)
    if width <= 0 or height <= 0:
        raise MediaError(f"image header declares an empty {width}x{height} image")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(f"image header declares {width}x{height} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS // 1_000_000} megapixel limit")
    check_min_size(width, height, "image")
    return width, height


def check_min_size(width: int, height: int, what: str) -> None:
    """MediaError when an image or video frame is too small to judge (shorter side < MIN_IMAGE_SIDE)."""
    if min(width, height) < MIN_IMAGE_SIDE:
        raise MediaError(f"{what} is {width}x{height} pixels, too small to judge "
                         f"(the shorter side must be at least {MIN_IMAGE_SIDE} pixels)")


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decodes encoded image bytes to uint8 HxWx3 RGB; ``name`` only labels error messages.

    Refuses headers that declare more than MAX_IMAGE_PIXELS before decoding anything.
    """
    try:
        _check_header(data)
        # Any depth and colour layout (alpha is dropped), turned upright by the EXIF orientation as
        # phones record it; IMREAD_UNCHANGED would ignore the orientation and hand over rotated faces.
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        if image is None or image.size == 0:
            raise MediaError("image data could not be decoded (corrupt or unsupported)")
        return _to_rgb_uint8(image)
    except MediaError as err:
        raise MediaError(f"{name}: {err}") from None


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """OpenCV decode output (BGR or gray, 8/16-bit; alpha already dropped) -> uint8 HxWx3 RGB."""
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise MediaError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise MediaError(f"unsupported image with {image.shape[2]} channels")


def _read_image_file(path: str) -> bytes:
    try:
        file_size = os.path.getsize(path)
        if file_size > MAX_IMAGE_FILE_BYTES:
            raise MediaError(f"{path}: file is {file_size} bytes, too large for an image")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise MediaError(f"{path}: cannot read file ({err.strerror or err})") from None
    return data


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as uint8 HxWx3 RGB; MediaError for anything unusable."""
    path = os.fspath(path)
    return decode_image_bytes(_read_image_file(path), path)


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file after the header checks of read_image_rgb, without decoding pixels."""
    path = os.fspath(path)
    data = _read_image_file(path)
    try:
        return _check_header(data)
    except MediaError as err:
        raise MediaError(f"{path}: {err}") from None


def read_face_crop(path: str | os.PathLike, prep: Preprocessing) -> np.ndarray:
    """A pre-cropped face image file as a model input: decoded and resized by the one rule, uint8 (S, S, 3).
    Both training pipelines read their examples with it. Raises MediaError."""
    return resize_image(read_image_rgb(path), prep)


def resize_image(image_rgb: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The one resize rule: uint8 HxWx3 -> uint8 (S, S, 3) with ``prep.resize`` interpolation."""
    size = prep.image_size
    if image_rgb.shape[:2] == (size, size):
        return np.ascontiguousarray(image_rgb)
    return cv2.resize(image_rgb, (size, size), interpolation=RESIZE_INTERPOLATIONS[prep.resize])


def scale_to_unit(crops: np.ndarray) -> np.ndarray:
    """The one pixel scaling rule, uint8 [0, 255] -> float32 [0, 1]. Works on numpy and JAX arrays
    alike, so scorers can ship uint8 crops and scale them on the device."""
    return crops.astype(np.float32) / np.float32(255.0)


def as_model_input(images: np.ndarray) -> np.ndarray:
    """float32 model input from uint8 crops (scaled with scale_to_unit) or from floats already in [0, 1]."""
    return scale_to_unit(images) if images.dtype == np.uint8 else images.astype(np.float32)
