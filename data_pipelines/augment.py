"""Training augmentation with OpenCV on uint8 RGB, deterministic for a given numpy Generator.

Presets (``AUGMENTATIONS``): "flip" (horizontal flip only), "jpeg" (flip plus JPEG re-compression,
quality 60-95), "light_jpeg" (flip plus JPEG at quality 80-95: mildly compressed material such as
FaceForensics++ c23), "resize" (jpeg plus a round trip through a smaller size: faces of every size
upscaled to the crop, such as DFDC's), "seed" (the seed's Keras ImageDataGenerator settings: rotation
+-20 degrees, width/height shifts 0.2, horizontal flip, bilinear interpolation) and "full" (seed plus
brightness/contrast jitter and JPEG re-compression). ``--augment`` takes one preset for every source or
one per named source (``parse_augmentations``). A clip (T, S, S, 3) gets one set of parameters for all
its frames. OpenCV runs these ~10x faster than the equivalent TensorFlow image ops on CPU and releases
the GIL, so they run in parallel inside tf.data's numpy_function calls.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentationSettings:
    """Ranges of the random training transforms."""

    rotation_degrees: float = 20.0
    shift_fraction: float = 0.2
    horizontal_flip: bool = True
    brightness_delta: float = 0.1  # fraction of the full 0..255 range
    contrast_range: tuple[float, float] = (0.8, 1.2)
    jpeg_probability: float = 0.5
    jpeg_quality_range: tuple[int, int] = (60, 95)
    resize_probability: float = 0.0
    resize_scale_range: tuple[float, float] = (0.35, 1.0)  # the smaller size, as a fraction of the crop's


AUGMENTATIONS: dict[str, AugmentationSettings | None] = {
    "none": None,
    "flip": AugmentationSettings(rotation_degrees=0.0, shift_fraction=0.0, brightness_delta=0.0,
                                 contrast_range=(1.0, 1.0), jpeg_probability=0.0),
    "jpeg": AugmentationSettings(rotation_degrees=0.0, shift_fraction=0.0, brightness_delta=0.0,
                                 contrast_range=(1.0, 1.0)),
    "light_jpeg": AugmentationSettings(rotation_degrees=0.0, shift_fraction=0.0, brightness_delta=0.0,
                                       contrast_range=(1.0, 1.0), jpeg_quality_range=(80, 95)),
    "resize": AugmentationSettings(rotation_degrees=0.0, shift_fraction=0.0, brightness_delta=0.0,
                                   contrast_range=(1.0, 1.0), resize_probability=0.5),
    "seed": AugmentationSettings(brightness_delta=0.0, contrast_range=(1.0, 1.0), jpeg_probability=0.0),
    "full": AugmentationSettings(),
}


def augmentation_settings(name: str) -> AugmentationSettings | None:
    """The preset called ``name`` (None for "none"); ValueError naming the choices otherwise."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]


def parse_augmentations(spec: str, source_names: list[str] | None = None) -> dict[str, AugmentationSettings | None]:
    """``--augment``: a preset for every source ({"": settings}), or ``source=preset,...`` per named source.

    With ``source_names``, every source needs a preset and no other name may appear. ValueError (one line)
    for an unknown preset, a malformed item, a repeated or unknown source, or a source without a preset.
    """
    spec = spec.strip()
    if "=" not in spec:
        return {"": augmentation_settings(spec)}
    chosen: dict[str, AugmentationSettings | None] = {}
    for item in spec.split(","):
        name, _, preset = (part.strip() for part in item.partition("="))
        if not name or not preset:
            raise ValueError(f"--augment item {item!r}: expected source=preset")
        if name in chosen:
            raise ValueError(f"--augment names source {name!r} twice")
        chosen[name] = augmentation_settings(preset)
    if source_names is not None:
        unknown = sorted(set(chosen) - set(source_names))
        missing = [name for name in source_names if name not in chosen]
        if unknown:
            raise ValueError(f"--augment names {', '.join(unknown)}, not a source of --data_dir "
                             f"({', '.join(source_names)})")
        if missing:
            raise ValueError(f"--augment gives no preset for source {', '.join(missing)}")
    return chosen


def settings_for_source(augmentations: dict[str, AugmentationSettings | None],
                        source_name: str) -> AugmentationSettings | None:
    """The settings ``parse_augmentations`` chose for ``source_name`` (the one preset when it named no source)."""
    return augmentations[""] if "" in augmentations else augmentations[source_name]


def augment_images(images: np.ndarray, rng: np.random.Generator,
                   settings: AugmentationSettings = AugmentationSettings()) -> np.ndarray:
    """Random train-time transforms of uint8 RGB images (S, S, 3) or a clip (T, S, S, 3)."""
    frames = images.reshape((-1,) + images.shape[-3:])
    height, width = frames.shape[1:3]
    angle = rng.uniform(-settings.rotation_degrees, settings.rotation_degrees)
    shift_x, shift_y = rng.uniform(-settings.shift_fraction, settings.shift_fraction, size=2) * (width, height)
    mirror = settings.horizontal_flip and rng.random() < 0.5
    brightness = rng.uniform(-settings.brightness_delta, settings.brightness_delta) * 255.0
    contrast = rng.uniform(*settings.contrast_range)
    jpeg_quality = int(rng.integers(settings.jpeg_quality_range[0], settings.jpeg_quality_range[1] + 1))
    use_jpeg = rng.random() < settings.jpeg_probability
    resize_scale = rng.uniform(*settings.resize_scale_range)
    use_resize = rng.random() < settings.resize_probability

    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
    matrix[:, 2] += (shift_x, shift_y)
    geometric = settings.rotation_degrees > 0 or settings.shift_fraction > 0
    photometric = settings.brightness_delta > 0 or settings.contrast_range != (1.0, 1.0)
    augmented = []
    for frame in frames:
        if geometric:
            frame = cv2.warpAffine(frame, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
        if mirror:
            frame = cv2.flip(frame, 1)
        if photometric:
            mean = float(frame.mean())
            levels = np.arange(256, dtype=np.float32)
            lookup = np.clip(np.round((levels - mean) * contrast + mean + brightness), 0, 255).astype(np.uint8)
            frame = cv2.LUT(frame, lookup)
        if use_resize:
            small = (max(1, round(width * resize_scale)), max(1, round(height * resize_scale)))
            frame = cv2.resize(cv2.resize(frame, small, interpolation=cv2.INTER_AREA), (width, height),
                               interpolation=cv2.INTER_LINEAR)
        if use_jpeg:
            ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
            if not ok:
                raise RuntimeError("JPEG re-compression failed")
            frame = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        augmented.append(frame)
    return np.stack(augmented).reshape(images.shape)
