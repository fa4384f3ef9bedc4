"""The rules both training pipelines share (tf.data in input_pipeline.py, host memory in in_memory.py):
which files are usable, the order of an epoch, each example's random stream, augmentation and class
weights. Written once so that the two pipelines yield the same batches for the same seed.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from data_pipelines.augment import AugmentationSettings, augment_images
from data_pipelines.preprocessing import MediaError, probe_image
from data_pipelines.sources import FAKE, LabelledFile
from data_pipelines.synthesize import self_blend

SYNTHESIZERS = ("sbi",)


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``count`` training files."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(count)


def element_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of the ``index``-th sample of an epoch (augmentation, self-blending)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def train_examples(images: np.ndarray, label: float, rng: np.random.Generator,
                   augmentation: AugmentationSettings | None,
                   synthesize_fakes: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One sample -> stacked training examples: itself, plus its self-blended fake in "sbi" mode; augmented."""
    examples = [(images, label)]
    if synthesize_fakes == "sbi":
        examples.append((self_blend(images, rng), FAKE))
    if augmentation is not None:
        examples = [(augment_images(example, rng, augmentation), example_label)
                    for example, example_label in examples]
    return (np.stack([example for example, _ in examples]),
            np.array([example_label for _, example_label in examples], np.float32))


def class_weights(real_count: int, fake_count: int) -> tuple[float, float]:
    """Weights making both classes count equally in the loss (1.0 for a class without samples)."""
    total = real_count + fake_count
    return (total / (2 * real_count) if real_count else 1.0, total / (2 * fake_count) if fake_count else 1.0)


def probe_images(files: list[LabelledFile]) -> tuple[list[LabelledFile], list[tuple[str, str]]]:
    """Checks every image header in parallel (no pixel decoding): (usable files, skipped (path, reason))."""

    def probe(labelled: LabelledFile) -> str | None:
        try:
            probe_image(labelled.path)
        except MediaError as err:
            return str(err)
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        errors = list(pool.map(probe, files))
    usable = [f for f, error in zip(files, errors) if error is None]
    skipped = [(f.path, error) for f, error in zip(files, errors) if error is not None]
    return usable, skipped
