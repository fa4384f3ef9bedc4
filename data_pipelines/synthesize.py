"""Self-Blended Images (Shiohara & Yamasaki, CVPR 2022): training fakes made from real faces alone.

A face crop is blended with a colour- and scale-jittered copy of itself through a soft face-shaped
mask, which leaves the blending boundary and colour/frequency mismatch that face swaps show. Without
landmarks the mask is a randomly sized, rotated and warped ellipse centred on the crop, where our
face crops (detector box x margin, square) put the face.
"""

from __future__ import annotations

import cv2
import numpy as np

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)


def _face_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (size, size) soft ellipse mask in [0, 1] with random shape, warp and blur."""
    mask = np.zeros((size, size), np.float32)
    center = (size / 2 + rng.uniform(-0.04, 0.04) * size, size / 2 + rng.uniform(-0.02, 0.06) * size)
    axes = (rng.uniform(0.26, 0.38) * size, rng.uniform(0.32, 0.45) * size)
    cv2.ellipse(mask, (round(center[0]), round(center[1])), (round(axes[0]), round(axes[1])),
                rng.uniform(-12, 12), 0, 360, 1.0, thickness=-1)
    # Smooth random displacement makes the outline irregular like a landmark hull.
    grid = 4
    displacement = rng.uniform(-0.04, 0.04, size=(2, grid, grid)).astype(np.float32) * size
    dx, dy = (cv2.resize(d, (size, size), interpolation=cv2.INTER_CUBIC) for d in displacement)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = cv2.remap(mask, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    # Erode or dilate a little, then feather the edge.
    kernel_size = int(rng.integers(1, max(2, size // 32)))
    kernel = np.ones((kernel_size, kernel_size), np.uint8)
    mask = cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)
    blur = int(rng.integers(size // 32, size // 8)) * 2 + 1
    mask = cv2.GaussianBlur(mask, (blur, blur), 0)
    mask /= max(float(mask.max()), 1e-6)
    return mask


def _color_jitter(image: np.ndarray, params: dict) -> np.ndarray:
    """Per-channel shift, hue/saturation shift and brightness/contrast on uint8 RGB."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + params["hue"]) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * params["saturation"], 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    out = (out - 128.0) * params["contrast"] + 128.0 + params["brightness"] + params["channel_shift"]
    return np.clip(out, 0, 255)


def _scale_jitter(image: np.ndarray, params: dict) -> np.ndarray:
    """Rescales about the centre and translates slightly, keeping the size (edges replicated)."""
    size = image.shape[0]
    scale = params["scale"]
    matrix = np.array([[scale, 0, (1 - scale) * size / 2 + params["shift"][0] * size],
                       [0, scale, (1 - scale) * size / 2 + params["shift"][1] * size]], np.float32)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def self_blend(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Self-blended fake(s) of uint8 RGB face crop(s) (S, S, 3) or a clip (T, S, S, 3).

    All frames of a clip share one set of random parameters so the fake is temporally consistent.
    """
    return self_blend_with_mask(images, rng)[0]


def self_blend_with_mask(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """self_blend, and the float32 (S, S) blend mask in [0, 1]: where (and how much) the jittered copy
    replaced the original."""
    if images.dtype != np.uint8 or images.shape[-1] != 3 or images.shape[-2] != images.shape[-3]:
        raise ValueError(f"self_blend needs uint8 (..., S, S, 3) images, got {images.dtype} {images.shape}")
    frames = images.reshape((-1,) + images.shape[-3:])
    size = frames.shape[1]
    color = {"hue": rng.uniform(-8, 8), "saturation": rng.uniform(0.8, 1.2), "contrast": rng.uniform(0.85, 1.15),
             "brightness": rng.uniform(-20, 20), "channel_shift": rng.uniform(-12, 12, size=3)}
    geometry = {"scale": rng.uniform(0.94, 1.06), "shift": rng.uniform(-0.03, 0.03, size=2)}
    jitter_source_color = rng.random() < 0.5
    mask = (_face_mask(size, rng) * rng.choice(BLEND_RATIOS))[..., None]
    blended = []
    for frame in frames:
        source = frame.astype(np.float32)
        target = frame.astype(np.float32)
        if jitter_source_color:
            source = _color_jitter(frame, color)
        else:
            target = _color_jitter(frame, color)
        source = _scale_jitter(source, geometry)
        blended.append(np.clip(mask * source + (1.0 - mask) * target, 0, 255).round().astype(np.uint8))
    return np.stack(blended).reshape(images.shape), mask[..., 0]
