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


def stratum_shares(files: list[LabelledFile], source_weights: dict[str, float],
                   synthesize_fakes: str | None) -> dict[tuple[str, float], float]:
    """Each (source name, label) stratum's share of the training samples: a source's weight (normalised
    over the sources) split evenly between its classes. With self-blending every sample is a real one
    that brings its own fake, so a source's share stays with its real files."""
    present = {(f.source_name, f.label) for f in files}
    total_weight = sum(source_weights[name] for name in {name for name, _ in present})
    shares = {}
    for name, label in sorted(present):
        classes = 1 if synthesize_fakes else sum((name, other) in present for other in (REAL, FAKE))
        shares[(name, label)] = source_weights[name] / total_weight / classes
    return shares


def balanced_epoch_order(seed: int, epoch: int, files: list[LabelledFile], source_weights: dict[str, float],
                         synthesize_fakes: str | None = None, samples_per_batch: int = 32,
                         paired: bool = False) -> np.ndarray:
    """Epoch ``epoch``'s sequence of ``len(files)`` training file indices in which every run of
    ``samples_per_batch`` (every batch) holds each (source, class) stratum in its stratum_shares() proportion,
    to within one sample (largest-remainder apportionment, the remainders carried to the next batch).

    Each stratum visits its files in a fresh random permutation, cycling through them again when its
    share of the epoch is larger than its files (small sources repeat, large ones are subsampled).
    ``paired``: a source's real samples in a batch are, where they exist, the originals of the fakes drawn
    from that source for the same batch (same source group: a fake and the real it was made from, or an
    FF++ group), so the batch holds both sides of each manipulation and the scene cannot tell them apart.
    """
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x5A17])
    shares = stratum_shares(files, source_weights, synthesize_fakes)
    strata = sorted(shares)
    share_s = np.array([shares[stratum] for stratum in strata])
    members_by_stratum: dict[tuple[str, float], list[int]] = {stratum: [] for stratum in strata}
    for index, labelled in enumerate(files):
        members_by_stratum[(labelled.source_name, labelled.label)].append(index)
    streams = [np.array(members_by_stratum[stratum]) for stratum in strata]
    permutations = [members[rng.permutation(len(members))] for members in streams]
    taken = [0] * len(strata)
    carry = np.zeros(len(strata))
    reals_by_group: dict[str, list[int]] = {}
    for index, labelled in enumerate(files):
        if labelled.label == REAL:
            reals_by_group.setdefault(labelled.source, []).append(index)
    order = []
    for first in range(0, len(files), samples_per_batch):
        size = min(samples_per_batch, len(files) - first)
        quota = share_s * size + carry
        counts = np.floor(quota).astype(np.int64)
        counts[np.argsort(counts - quota, kind="stable")[:size - int(counts.sum())]] += 1
        carry = quota - counts
        batch = []
        fake_groups: dict[str, list[str]] = {}  # source name -> groups of the fakes drawn for this batch
        for stratum_index, count in enumerate(counts):  # strata sort fakes (0.0) before reals (1.0)
            name, label = strata[stratum_index]
            for _ in range(int(count)):
                pending = fake_groups.get(name) if paired and label == REAL else None
                while pending and pending[0] not in reals_by_group:
                    pending.pop(0)
                if pending:
                    group_reals = reals_by_group[pending.pop(0)]
                    batch.append(group_reals[int(rng.integers(len(group_reals)))])
                    continue
                if taken[stratum_index] == len(permutations[stratum_index]):  # next cycle through the stratum
                    members = streams[stratum_index]
                    permutations[stratum_index] = members[rng.permutation(len(members))]
                    taken[stratum_index] = 0
                batch.append(permutations[stratum_index][taken[stratum_index]])
                taken[stratum_index] += 1
                if label == FAKE:
                    fake_groups.setdefault(name, []).append(files[batch[-1]].source)
        order.extend(np.array(batch)[rng.permutation(len(batch))])
    return np.array(order, np.int64)


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


def training_order(seed: int, epoch: int, files: list[LabelledFile], source_weights: dict[str, float],
                   synthesize_fakes: str | None, batch_size: int, num_shards: int,
                   paired: bool = False) -> np.ndarray:
    """The file indices epoch ``epoch`` trains on: a permutation of ``files`` from one source, batches
    balanced by source and class (balanced_epoch_order) from several or when ``paired``. ``batch_size`` is a
    shard's batch of examples; the shards take turns along the order, so a global batch is one run of the
    order. ``paired``: see balanced_epoch_order."""
    if balances_batches(source_weights, paired):
        examples_per_sample = 2 if synthesize_fakes == "sbi" else 1
        samples_per_batch = max(1, batch_size * num_shards // examples_per_sample)
        return balanced_epoch_order(seed, epoch, files, source_weights, synthesize_fakes, samples_per_batch, paired)
    return epoch_order(seed, epoch, len(files))


def balances_batches(source_weights: dict[str, float], paired: bool) -> bool:
    """Whether training_order balances every batch by source and class (several sources, or pairing)."""
    return len(source_weights) > 1 or paired


def training_class_weights(real_count: int, fake_count: int, source_weights: dict[str, float],
                           paired: bool = False) -> tuple[float, float]:
    """Loss weights of (real, fake) training examples: class_weights() for a permuted epoch; 1.0 where
    training_order already balances every batch by class."""
    return (1.0, 1.0) if balances_batches(source_weights, paired) else class_weights(real_count, fake_count)


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
                    splits: LabelledSplits, data_dir: str, batch_size: int, num_shards: int) -> tuple[int, int, int]:
    """(real, fake, steps per epoch) of the training examples; ValueError (one line) when a class has no
    usable sample (its files all went to validation, or how many were skipped, the first and why) or one
    shard holds less than a batch."""
    if synthesize_fakes == "sbi":
        fake_count = real_count  # one self-blended fake per real sample
    if real_count == 0 or fake_count == 0:
        label, word = (REAL, "real") if real_count == 0 else (FAKE, "fake")
        paths = {f.path for f in training_files(splits, synthesize_fakes) if f.label == label}
        lost = [(path, reason) for path, reason in skipped if path in paths]
        if not lost:
            in_val = sum(f.label == label for f in splits.val)
            where = (f": its {in_val} {word} file{'s' if in_val != 1 else ''} went to validation (split by source)"
                     if in_val else "")
            raise ValueError(f"no {word} training files in {data_dir}{where}; add more {word} files")
        raise ValueError(f"no usable {word} training samples in {data_dir}: all {len(lost)} {word} files were "
                         f"skipped (first: {lost[0][1]})")
    per_shard = (real_count + fake_count) // num_shards
    if per_shard < batch_size:
        shards = f" per shard ({num_shards} shards)" if num_shards > 1 else ""
        raise ValueError(f"--batch_size={batch_size} is larger than the {per_shard} usable training samples{shards}; "
                         f"use --batch_size={max(1, per_shard)} or less, or add data")
    return real_count, fake_count, per_shard // batch_size
