"""Training augmentation presets: what each one changes, determinism, clips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_pipelines import augment


def _face_like_image(size: int = 64) -> np.ndarray:
    """A smooth, asymmetric uint8 RGB image (JPEG keeps it close; a flip changes it)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.stack([x * 255 / size, y * 255 / size, (x + 2 * y) % 97 * 2.5], axis=-1)
    return cv2.GaussianBlur(image, (5, 5), 1.5).astype(np.uint8)


def _outcomes(preset: str, image: np.ndarray, draws: int = 40) -> list[np.ndarray]:
    settings = augment.augmentation_settings(preset)
    return [augment.augment_images(image, np.random.default_rng(seed), settings) for seed in range(draws)]


def test_flip_preset_only_mirrors() -> None:
    image = _face_like_image()
    outcomes = _outcomes("flip", image)
    mirrored = sum(np.array_equal(out, image[:, ::-1]) for out in outcomes)
    unchanged = sum(np.array_equal(out, image) for out in outcomes)
    assert mirrored + unchanged == len(outcomes) and mirrored > 0 and unchanged > 0


def test_jpeg_preset_recompresses_some_images_without_moving_pixels() -> None:
    image = _face_like_image()
    recompressed = 0
    for out in _outcomes("jpeg", image):
        reference = image[:, ::-1] if np.mean(np.abs(out.astype(int) - image[:, ::-1])) < \
            np.mean(np.abs(out.astype(int) - image)) else image
        if not np.array_equal(out, reference):
            recompressed += 1
            # JPEG at quality >= 60 keeps a smooth image within a few levels: no geometric change.
            assert np.mean(np.abs(out.astype(int) - reference)) < 4.0
    assert 0 < recompressed < 40


def test_augmentation_is_deterministic_for_a_seed_and_shares_parameters_over_a_clip() -> None:
    image = _face_like_image()
    settings = augment.augmentation_settings("full")
    first = augment.augment_images(image, np.random.default_rng(7), settings)
    again = augment.augment_images(image, np.random.default_rng(7), settings)
    np.testing.assert_array_equal(first, again)
    clip = np.stack([image, image, image])
    augmented_clip = augment.augment_images(clip, np.random.default_rng(7), settings)
    assert augmented_clip.shape == clip.shape
    for frame in augmented_clip:  # one set of random parameters for every frame of a clip
        np.testing.assert_array_equal(frame, first)


@pytest.mark.parametrize("preset", ["seed", "full"])
def test_geometric_presets_move_pixels(preset: str) -> None:
    image = _face_like_image()
    outcomes = _outcomes(preset, image, draws=10)
    assert all(out.shape == image.shape and out.dtype == np.uint8 for out in outcomes)
    assert all(not np.array_equal(out, image) and not np.array_equal(out, image[:, ::-1]) for out in outcomes)


def _detail(image: np.ndarray) -> float:
    """Mean absolute Laplacian: fine detail that a downscale round trip removes."""
    return float(np.mean(np.abs(cv2.Laplacian(image.astype(np.float32), cv2.CV_32F))))


def test_resize_preset_blurs_some_images_and_keeps_their_size() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # all detail: any round trip removes some
    outcomes = _outcomes("resize", image)
    assert all(out.shape == image.shape for out in outcomes)
    details = np.array([_detail(out) for out in outcomes])
    blurred = details < 0.8 * _detail(image)
    assert 0 < blurred.sum() < len(outcomes)  # about half of the images go through a smaller size


def test_light_jpeg_compresses_less_than_jpeg() -> None:
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (3, 3), 0.8)

    def worst_change(preset: str) -> float:
        return max(min(np.mean(np.abs(out.astype(int) - image)), np.mean(np.abs(out.astype(int) - image[:, ::-1])))
                   for out in _outcomes(preset, image))

    assert augment.AUGMENTATIONS["light_jpeg"].jpeg_quality_range == (80, 95)
    assert 0 < worst_change("light_jpeg") < worst_change("jpeg")


def test_parse_augmentations_one_preset_or_one_per_source() -> None:
    everywhere = augment.parse_augmentations("jpeg", ["dfdc", "ffpp"])
    assert augment.settings_for_source(everywhere, "ffpp") == augment.AUGMENTATIONS["jpeg"]
    per_source = augment.parse_augmentations("dfdc=resize, ffpp=light_jpeg", ["dfdc", "ffpp"])
    assert augment.settings_for_source(per_source, "dfdc") == augment.AUGMENTATIONS["resize"]
    assert augment.settings_for_source(per_source, "ffpp") == augment.AUGMENTATIONS["light_jpeg"]
    assert augment.settings_for_source(augment.parse_augmentations("a=none", ["a"]), "a") is None
    for bad, names, message in (("blur", None, "unknown augmentation 'blur'"), ("a=blur", None, "unknown"),
                                ("a=jpeg,a=flip", None, "twice"), ("a=", None, "source=preset"),
                                ("a=jpeg,c=flip", ["a", "b"], "c, not a source"),
                                ("a=jpeg", ["a", "b"], "no preset for source b")):
        with pytest.raises(ValueError, match=message):
            augment.parse_augmentations(bad, names)
