"""The rules both training pipelines share (tf.data in input_pipeline.py, host memory in in_memory.py):
which files are usable, the order of an epoch, each example's random stream, augmentation and class
weights. Written once so that the two pipelines yield the same batches for the same seed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np

from data_pipelines.augment import AugmentationSettings, augment_images
from data_pipelines.preprocessing import MediaError, probe_image
from data_pipelines.sources import FAKE, REAL, LabelledFile, LabelledSplits
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


def check_arguments(synthesize_fakes: str | None, batch_size: int, num_shards: int, shard_index: int) -> None:
    """ValueError (one line) for arguments no pipeline takes."""
    if synthesize_fakes not in (None, *SYNTHESIZERS):
        raise ValueError(f"unknown synthesize_fakes {synthesize_fakes!r}; choose one of {', '.join(SYNTHESIZERS)}")
    if batch_size < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need batch_size >= 1 and 0 <= shard_index < num_shards, got {batch_size}, "
                         f"{shard_index}, {num_shards}")


def training_files(splits: LabelledSplits, synthesize_fakes: str | None) -> list[LabelledFile]:
    """The training split's files a run reads: only the real ones when it makes its own (SBI) fakes."""
    if synthesize_fakes != "sbi":
        return splits.train
    real_files = [f for f in splits.train if f.label == REAL]
    logging.info("synthesize_fakes=sbi: training on %d real files and their self-blended fakes "
                 "(%d fake files in the training split not used)", len(real_files),
                 len(splits.train) - len(real_files))
    return real_files


def training_counts(real_count: int, fake_count: int, synthesize_fakes: str | None, skipped: list[tuple[str, str]],
                    data_dir: str, batch_size: int, num_shards: int) -> tuple[int, int, int]:
    """(real, fake, steps per epoch) of the training examples; ValueError (one line) when a class has no
    usable sample (naming the first skipped file and why) or one shard holds less than a batch."""
    if synthesize_fakes == "sbi":
        fake_count = real_count  # one self-blended fake per real sample
    if real_count == 0 or fake_count == 0:
        first_reason = f"; first: {skipped[0][1]}" if skipped else ""
        raise ValueError(f"no usable {'real' if real_count == 0 else 'fake'} training samples in {data_dir} "
                         f"({len(skipped)} files skipped{first_reason})")
    per_shard = (real_count + fake_count) // num_shards
    if per_shard < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the {per_shard} training samples per shard")
    return real_count, fake_count, per_shard // batch_size
