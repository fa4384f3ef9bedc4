"""Pre-cropped face images decoded once into host memory, yielding the same batches as input_pipeline.

For ``--dataset=image --face_detector=none`` data that fits in RAM (uint8 S×S×3 per image: the 27,804
DFDC crops at 256×256 take 5.5 GB). Every epoch yields exactly the batches of input_pipeline's tf.data
pipeline for the same seed (same files, order, per-example augmentation and self-blending, class
weights, sharding and validation batches), so a run does not depend on which pipeline fed it. Use it
where TensorFlow is not installed, or where decoding every file every epoch would starve a fast
accelerator. Batches are assembled by a thread pool a few steps ahead of the training loop.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Iterator

import numpy as np

from data_pipelines.augment import parse_augmentations, settings_for_source
from data_pipelines.preprocessing import MediaError, Preprocessing, read_face_crop
from data_pipelines.sources import FAKE, REAL, DataSource, LabelledFile, as_data_sources, load_sources
from data_pipelines.training_examples import (check_arguments, class_weights, element_rng, probe_images,
                                              train_examples, training_class_weights, training_counts,
                                              training_files, training_order)

PREFETCH_BATCHES = 8
MAX_MEMORY_FRACTION = 0.8


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclasses.dataclass
class _DecodedSplit:
    """The usable files of a split (in split order), their decoded images and which of them decoded."""

    files: list[LabelledFile]
    decoded: np.ndarray  # bool (N,)
    images: np.ndarray

    def readable(self) -> np.ndarray:
        return np.flatnonzero(self.decoded)

    def counts(self) -> tuple[int, int]:
        labels = np.array([f.label for f in self.files])[self.readable()]
        return int(np.sum(labels == REAL)), int(np.sum(labels == FAKE))


def _decode_all(splits: dict[str, list[LabelledFile]], prep: Preprocessing
                ) -> tuple[dict[str, _DecodedSplit], list[tuple[str, str]]]:
    """Decodes every file of every split into one uint8 array per split, in parallel with OpenCV."""
    shape = (prep.image_size, prep.image_size, 3)
    total = sum(len(files) for files in splits.values())
    needed = total * int(np.prod(shape))
    available = _available_memory_bytes()
    if available is not None and needed > MAX_MEMORY_FRACTION * available:
        raise ValueError(f"the {total} images need {needed / 2**30:.1f} GiB decoded, more than "
                         f"{MAX_MEMORY_FRACTION:.0%} of the {available / 2**30:.1f} GiB available; "
                         f"use --input_pipeline=tfdata")
    logging.info("decoding %d images into memory (%.1f GiB)", total, needed / 2**30)

    def load(path: str) -> np.ndarray | str:
        try:
            return read_face_crop(path, prep)
        except MediaError as err:
            return str(err)

    decoded, failed = {}, []
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for name, files in splits.items():
            images = np.empty((len(files),) + shape, np.uint8)
            ok = np.zeros(len(files), bool)
            for index, (labelled, result) in enumerate(zip(files, pool.map(load, [f.path for f in files]))):
                if isinstance(result, str):
                    logging.warning("skipping unreadable training file: %s", result)
                    failed.append((labelled.path, result))
                else:
                    images[index] = result
                    ok[index] = True
            decoded[name] = _DecodedSplit(files, ok, images)
    return decoded, failed


@dataclasses.dataclass
class InMemoryData:
    """Training and validation batches from memory; the fields mirror input_pipeline.TrainingData."""

    train_count: int
    val_count: int
    class_counts: dict
    skipped: list[tuple[str, str]]
    steps_per_epoch: int
    val_source_names: dict  # validation file path -> its source's name
    _train: _DecodedSplit = dataclasses.field(repr=False)
    _val: _DecodedSplit = dataclasses.field(repr=False)
    _settings: dict = dataclasses.field(repr=False)
    _teacher_probabilities: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _teacher_weight: float = 0.0

    def train_images(self) -> np.ndarray:
        """The decoded training images (N, S, S, 3) uint8 in split order; rows of unreadable files are zero."""
        return self._train.images

    def soften_targets(self, teacher_probabilities: np.ndarray, teacher_weight: float) -> None:
        """Distillation: from now on each training example's label is (1 - w) * label + w * p, with p the
        teacher's probability real for its unaugmented image (``teacher_probabilities``, one per
        train_images() row). Class weights still follow the hard labels."""
        if teacher_probabilities.shape != (len(self._train.files),):
            raise ValueError(f"expected {len(self._train.files)} teacher probabilities, got "
                             f"{teacher_probabilities.shape}")
        self._teacher_probabilities, self._teacher_weight = teacher_probabilities, teacher_weight

    def train_batches(self, epoch: int, skip_steps: int = 0) -> Iterator[dict]:
        """The batches of epoch ``epoch`` from step ``skip_steps`` on: {"image", "label", "weight"}."""
        settings = self._settings
        seed, batch_size = settings["seed"], settings["batch_size"]
        num_shards, shard_index = settings["num_shards"], settings["shard_index"]
        examples_per_sample = 2 if settings["synthesize_fakes"] == "sbi" else 1
        order = training_order(seed, epoch, self._train.files, settings["source_weights"],
                               settings["synthesize_fakes"], batch_size, num_shards, settings["paired"])
        stream = order[self._train.decoded[order]]  # the readable samples in epoch order
        indices = np.arange(len(stream))[shard_index::num_shards]  # enumerate, then shard (as tf.data does)
        real_weight, fake_weight = settings["train_weights"]

        def batch(step: int) -> dict:
            first, last = step * batch_size, (step + 1) * batch_size
            images, labels, rows = [], [], []
            for sample in range(first // examples_per_sample, -(-last // examples_per_sample)):
                index = int(indices[sample])
                sample_file = self._train.files[stream[index]]
                sample_images, sample_labels = train_examples(
                    self._train.images[stream[index]], sample_file.label, element_rng(seed, epoch, index),
                    settings_for_source(settings["augmentations"], sample_file.source_name),
                    settings["synthesize_fakes"])
                images.append(sample_images)
                labels.append(sample_labels)
                rows.append(np.full(len(sample_labels), stream[index]))
            offset = first % examples_per_sample
            images_bhwc = np.concatenate(images)[offset:offset + batch_size]
            label_b = np.concatenate(labels)[offset:offset + batch_size]
            weight_b = np.where(label_b > 0.5, real_weight, fake_weight).astype(np.float32)
            if self._teacher_probabilities is not None:
                teacher_b = self._teacher_probabilities[np.concatenate(rows)[offset:offset + batch_size]]
                label_b = ((1 - self._teacher_weight) * label_b + self._teacher_weight * teacher_b).astype(np.float32)
            return {"image": images_bhwc, "label": label_b, "weight": weight_b}

        yield from _prefetched(batch, range(skip_steps, self.steps_per_epoch))

    def val_batches(self) -> Iterator[dict]:
        """Unaugmented validation batches in file order, the last one short: adds "path"."""
        settings = self._settings
        batch_size = settings["batch_size"]
        mine = self._val.readable()[settings["shard_index"]::settings["num_shards"]]
        real_weight, fake_weight = settings["val_weights"]
        for first in range(0, len(mine), batch_size):
            chosen = mine[first:first + batch_size]
            label_b = np.array([self._val.files[i].label for i in chosen], np.float32)
            yield {"image": self._val.images[chosen], "label": label_b,
                   "path": np.array([self._val.files[i].path.encode() for i in chosen], object),
                   "weight": np.where(label_b > 0.5, real_weight, fake_weight).astype(np.float32)}


def _prefetched(make_batch, steps: range) -> Iterator[dict]:
    """make_batch(step) for each step, computed by a thread pool up to PREFETCH_BATCHES steps ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        pending = [pool.submit(make_batch, step) for step in steps[:PREFETCH_BATCHES]]
        for step in steps[PREFETCH_BATCHES:]:
            yield pending.pop(0).result()
            pending.append(pool.submit(make_batch, step))
        for future in pending:
            yield future.result()


def create_datasets(data: str | os.PathLike | list[DataSource], dataset: str, prep: Preprocessing, batch_size: int,
                    seed: int, val_fraction: float = 0.1, augment: str = "full", synthesize_fakes: str | None = None,
                    num_shards: int = 1, shard_index: int = 0, paired: bool = False) -> InMemoryData:
    """input_pipeline.create_datasets for pre-cropped images, held in memory (see the module docstring).
    ``data``: a folder, or the named folders (sources.parse_data_sources) whose batches are balanced by source.

    Raises ValueError (one line) for data this pipeline does not take (videos, face detection), data
    larger than the memory, or a class without usable files.
    """
    if dataset != "image" or prep.face_detector != "none":
        raise ValueError("the in-memory pipeline takes pre-cropped face images (--dataset=image "
                         "--face_detector=none); use --input_pipeline=tfdata")
    data_sources = as_data_sources(data)
    augmentations = parse_augmentations(augment, [s.name for s in data_sources])
    check_arguments(synthesize_fakes, batch_size, num_shards, shard_index)
    splits = load_sources(data_sources, ("image",), val_fraction, seed, require_fakes=synthesize_fakes is None)
    train_usable, skipped = probe_images(training_files(splits, synthesize_fakes))
    val_usable, val_skipped = probe_images(splits.val)
    decoded, failed = _decode_all({"train": train_usable, "val": val_usable}, prep)
    skipped = skipped + val_skipped + failed
    if skipped:
        logging.warning("skipped %d unreadable files (first: %s)", len(skipped), skipped[0][1])

    real_count, fake_count, steps_per_epoch = training_counts(
        *decoded["train"].counts(), synthesize_fakes, skipped, splits,
        ", ".join(s.path for s in data_sources), batch_size, num_shards)
    source_weights = {s.name: s.weight for s in data_sources}
    train_count = real_count + fake_count
    val_real, val_fake = decoded["val"].counts()
    settings = {"seed": seed, "batch_size": batch_size, "num_shards": num_shards, "shard_index": shard_index,
                "augmentations": augmentations, "synthesize_fakes": synthesize_fakes,
                "source_weights": source_weights, "paired": paired,
                "train_weights": training_class_weights(real_count, fake_count, source_weights, paired),
                "val_weights": class_weights(val_real, val_fake)}
    logging.info("in memory: train %d real + %d fake, val %d real + %d fake", real_count, fake_count,
                 val_real, val_fake)
    return InMemoryData(train_count=train_count, val_count=val_real + val_fake,
                        class_counts={"real": real_count, "fake": fake_count}, skipped=skipped,
                        steps_per_epoch=steps_per_epoch,
                        val_source_names={f.path: f.source_name for f in decoded["val"].files},
                        _train=decoded["train"], _val=decoded["val"],
                        _settings=settings)
