"""tf.data input pipelines for training and validation, over image folders or cached video faces.

Two sources feed the same batching code:
  * images with ``face_detector="none"`` (pre-cropped faces) are decoded on the fly: the file list from
    sources.py goes through tf.data, decoding with the shared OpenCV path inside tf.numpy_function;
  * videos, and images that need face detection, are extracted once into the TFRecord face cache
    (cache.py) and every epoch reads only the cache.
Training elements: {"image": uint8 (B, S, S, 3) or (B, T, S, S, 3), "label": float32 (B,) (1.0 = real),
"weight": float32 (B,) class-balance weights}; validation elements add "path" (B,) strings. Images stay
uint8 until the train/eval step scales them on the device (preprocessing.scale_to_unit, the rule
prediction uses too), which also quarters the bytes copied to an accelerator.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import numpy as np
import tensorflow as tf

from data_pipelines.augment import parse_augmentations, settings_for_source
from data_pipelines.cache import CachedFile, build_face_cache, parse_record
from data_pipelines.preprocessing import MediaError, Preprocessing, read_face_crop
from data_pipelines.samples import clip_starts
from data_pipelines.sources import FAKE, REAL, DataSource, LabelledFile, as_data_sources, load_sources
from data_pipelines.training_examples import (check_arguments, class_weights, element_rng, probe_images,
                                              train_examples, training_class_weights, training_counts,
                                              training_files, training_order)

AUTOTUNE = tf.data.AUTOTUNE
FRAME_SHUFFLE_BUFFER = 2048
CLIP_SHUFFLE_BUFFER = 32
INTERLEAVE_FILES = 16
# Images decoded, and samples augmented, per tf.numpy_function call: a call per image (two per training
# sample) cost more CPU than the decoding itself (pipeline alone 1,300 -> 2,100 img/s on 2 cores).
SAMPLES_PER_CALL = 32


@dataclasses.dataclass
class TrainingData:
    """Datasets and bookkeeping for one training run. ``train`` is epoch 0; see train_dataset_for_epoch."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    train_count: int
    val_count: int
    class_counts: dict
    skipped: list[tuple[str, str]]
    steps_per_epoch: int
    val_source_names: dict = dataclasses.field(default_factory=dict)  # validation file path -> its source's name
    make_train: Callable[[int], tf.data.Dataset] = dataclasses.field(default=None, repr=False)


def train_dataset_for_epoch(data: TrainingData, epoch: int) -> tf.data.Dataset:
    """The training pass of ``epoch``: order and augmentation are a deterministic function of (seed, epoch)."""
    return data.make_train(epoch)


class _ImageFiles:
    """On-the-fly source: one sample per image file, decoded with the shared OpenCV path."""

    def __init__(self, files: list[LabelledFile], prep: Preprocessing):
        self.files = files
        self.prep = prep
        self.element_shape = (prep.image_size, prep.image_size, 3)

    def sample_counts(self) -> tuple[int, int]:
        return sum(f.label == REAL for f in self.files), sum(f.label == FAKE for f in self.files)

    def _load(self, path: bytes) -> np.ndarray:
        """uint8 (1, S, S, 3), or (0, S, S, 3) when the file turns out unreadable (logged)."""
        try:
            return read_face_crop(path.decode(), self.prep)[None]
        except MediaError as err:
            logging.warning("skipping unreadable training file: %s", err)
            return np.zeros((0,) + self.element_shape, np.uint8)

    def _load_files(self, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The readable ones of ``paths`` stacked (uint8 (N, S, S, 3)), and how many images each gave (0 or 1)."""
        images = [self._load(path) for path in paths]
        return np.concatenate(images), np.array([len(image) for image in images], np.int32)

    def samples(self, order: np.ndarray) -> tf.data.Dataset:
        """(image uint8, label, path) per readable file, in ``order``."""
        paths = tf.constant([self.files[i].path for i in order], tf.string)
        labels = tf.constant([self.files[i].label for i in order], tf.float32)

        def load(paths, labels):
            images, counts = tf.numpy_function(self._load_files, [paths], (tf.uint8, tf.int32), stateful=False)
            images = tf.ensure_shape(images, (None,) + self.element_shape)
            return images, tf.repeat(labels, counts), tf.repeat(paths, counts)

        dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).batch(SAMPLES_PER_CALL)
        return dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()


class _CachedFaces:
    """Cache source: the face crops of each file (or clips of ``clip_frames`` consecutive crops of one
    person: a clip never mixes two people of a video)."""

    def __init__(self, files: list[CachedFile], prep: Preprocessing, clip_frames: int | None):
        self.files = files
        self.clip_frames = clip_frames
        size = prep.image_size
        self.element_shape = (clip_frames, size, size, 3) if clip_frames else (size, size, 3)

    def _count(self, cached: CachedFile) -> int:
        if not self.clip_frames:
            return cached.num_samples
        return sum(len(clip_starts(count, self.clip_frames)) for _, count in cached.people())

    def sample_counts(self) -> tuple[int, int]:
        real = sum(self._count(f) for f in self.files if f.label == REAL)
        fake = sum(self._count(f) for f in self.files if f.label == FAKE)
        return real, fake

    def _person_samples(self, record_path, label, path, first_sample, num_samples) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(record_path).skip(first_sample).take(num_samples).map(parse_record)
        if not self.clip_frames:
            return records.map(lambda r: (r["image"], label, path))
        all_faces = records.map(lambda r: r["image"]).batch(num_samples)
        clips = all_faces.map(lambda faces: tf.gather(faces, clip_indices_tf(tf.shape(faces)[0], self.clip_frames)))
        return clips.unbatch().map(lambda clip: (tf.ensure_shape(clip, self.element_shape), label, path))

    def samples(self, order: np.ndarray, shuffle_seed: int | None = None) -> tf.data.Dataset:
        """(image(s) uint8, label, path) per cached sample; files in ``order`` (each person of a file after
        the other), mixed when shuffle_seed is given."""
        people = [(self.files[i], first, count) for i in order for first, count in self.files[i].people()]
        columns = (tf.constant([f.record_path for f, _, _ in people], tf.string),
                   tf.constant([f.label for f, _, _ in people], tf.float32),
                   tf.constant([f.path for f, _, _ in people], tf.string),
                   tf.constant([first for _, first, _ in people], tf.int64),
                   tf.constant([count for _, _, count in people], tf.int64))
        dataset = tf.data.Dataset.from_tensor_slices(columns)
        if shuffle_seed is None:
            return dataset.flat_map(self._person_samples)
        dataset = dataset.interleave(self._person_samples, cycle_length=INTERLEAVE_FILES, block_length=1,
                                     num_parallel_calls=AUTOTUNE, deterministic=True)
        buffer = CLIP_SHUFFLE_BUFFER if self.clip_frames else FRAME_SHUFFLE_BUFFER
        return dataset.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)


def clip_indices_tf(num_samples: tf.Tensor, clip_frames: int) -> tf.Tensor:
    """TensorFlow twin of samples.clip_indices: int (C, clip_frames) sample indices of each clip."""
    n = tf.cast(num_samples, tf.float64)
    frames = tf.constant(float(clip_frames), tf.float64)

    def repeated():
        return tf.cast(tf.round(tf.linspace(tf.constant(0.0, tf.float64), n - 1, clip_frames)), tf.int64)[None]

    def windows():
        num_clips = tf.cast(tf.math.ceil(n / frames), tf.int32)
        starts = tf.cast(tf.round(tf.linspace(tf.constant(0.0, tf.float64), n - frames, num_clips)), tf.int64)
        return starts[:, None] + tf.range(clip_frames, dtype=tf.int64)[None]

    return tf.cond(num_samples < clip_frames, repeated, windows)


def create_datasets(data: str | os.PathLike | list[DataSource], dataset: str, prep: Preprocessing, batch_size: int,
                    seed: int, val_fraction: float = 0.1, augment: str = "full", cache_dir: str | None = None,
                    synthesize_fakes: str | None = None, clip_frames: int | None = None,
                    num_shards: int = 1, shard_index: int = 0, paired: bool = False) -> TrainingData:
    """Training and validation datasets for the labelled folder ``data``, or the named folders (see sources.py
    for layouts; several sources: every batch balanced by source and class, see training_examples.training_order).

    dataset: "image" or "video". augment: a preset of augment.AUGMENTATIONS, or one per source
    (augment.parse_augmentations). Unreadable files (and files without a face) are skipped and listed in
    ``skipped``. synthesize_fakes="sbi" trains on the real files plus one self-blended fake per real
    sample (fake files in the training split are not used). clip_frames=T yields (T, S, S, 3) clips.
    num_shards/shard_index give each host a disjoint, equally long part of every epoch and of val.
    """
    if dataset not in ("image", "video"):
        raise ValueError(f"unknown dataset {dataset!r}; choose image or video")
    data_sources = as_data_sources(data)
    augmentations = parse_augmentations(augment, [s.name for s in data_sources])
    check_arguments(synthesize_fakes, batch_size, num_shards, shard_index)
    if clip_frames is not None and clip_frames < 1:
        raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
    splits = load_sources(data_sources, (dataset,), val_fraction, seed, require_fakes=synthesize_fakes is None)
    train_files = training_files(splits, synthesize_fakes)

    on_the_fly = dataset == "image" and prep.face_detector == "none" and clip_frames is None
    if on_the_fly:
        train_usable, skipped = probe_images(train_files)
        val_usable, val_skipped = probe_images(splits.val)
        train_source, val_source = _ImageFiles(train_usable, prep), _ImageFiles(val_usable, prep)
    else:
        cached, skipped, extracted = build_face_cache(train_files + splits.val, prep, cache_dir)
        val_paths = {f.path for f in splits.val}
        logging.info("face cache: %d files extracted now, %d reused, %d skipped", extracted,
                     len(cached) + len(skipped) - extracted, len(skipped))
        val_skipped = [s for s in skipped if s[0] in val_paths]
        skipped = [s for s in skipped if s[0] not in val_paths]
        train_source = _CachedFaces([f for f in cached if f.path not in val_paths], prep, clip_frames)
        val_source = _CachedFaces([f for f in cached if f.path in val_paths], prep, clip_frames)
    if skipped or val_skipped:
        logging.warning("skipped %d unreadable training and %d validation files (first: %s)", len(skipped),
                        len(val_skipped), (skipped + val_skipped)[0][1])

    real_count, fake_count, steps_per_epoch = training_counts(
        *train_source.sample_counts(), synthesize_fakes, skipped, splits, ", ".join(s.path for s in data_sources),
        batch_size, num_shards)
    train_count = real_count + fake_count
    source_weights = {s.name: s.weight for s in data_sources}
    real_weight, fake_weight = training_class_weights(real_count, fake_count, source_weights, paired)
    logging.info("train: %d real + %d fake samples, class weights real=%.3f fake=%.3f", real_count, fake_count,
                 real_weight, fake_weight)
    element_shape = train_source.element_shape
    source_of_path = {f.path: f.source_name for f in train_files}

    def weight_of(label: tf.Tensor) -> tf.Tensor:
        return tf.where(label > 0.5, real_weight, fake_weight)

    def make_train(epoch: int) -> tf.data.Dataset:
        order = training_order(seed, epoch, train_source.files, source_weights, synthesize_fakes, batch_size,
                               num_shards, paired)
        if on_the_fly:
            samples = train_source.samples(order)
        else:
            samples = train_source.samples(order, shuffle_seed=(seed & 0xFFFFFFFF) * 1009 + epoch)
        samples = samples.enumerate().shard(num_shards, shard_index)

        def transform(indices, images, labels, paths):
            """Up to SAMPLES_PER_CALL samples -> their training examples, stacked in order."""
            examples = [train_examples(images[k], float(labels[k]), element_rng(seed, epoch, int(indices[k])),
                                       settings_for_source(augmentations, source_of_path[paths[k].decode()]),
                                       synthesize_fakes) for k in range(len(indices))]
            return np.concatenate([e[0] for e in examples]), np.concatenate([e[1] for e in examples])

        def to_examples(indices, samples):
            images, labels, paths = samples
            if all(settings is None for settings in augmentations.values()) and synthesize_fakes is None:
                return images, labels
            examples, example_labels = tf.numpy_function(transform, [indices, images, labels, paths],
                                                         (tf.uint8, tf.float32), stateful=False)
            return (tf.ensure_shape(examples, (None,) + element_shape),
                    tf.ensure_shape(example_labels, [None]))

        examples = samples.batch(SAMPLES_PER_CALL).map(to_examples, num_parallel_calls=AUTOTUNE,
                                                       deterministic=True).unbatch()
        batches = examples.batch(batch_size, drop_remainder=True).take(steps_per_epoch)
        batches = batches.map(lambda images, labels: {"image": images, "label": labels,
                                                      "weight": weight_of(labels)},
                              num_parallel_calls=AUTOTUNE, deterministic=True)
        return batches.prefetch(AUTOTUNE)

    val_real, val_fake = val_source.sample_counts()
    val_real_weight, val_fake_weight = class_weights(val_real, val_fake)
    val = val_source.samples(np.arange(len(val_source.files))).shard(num_shards, shard_index)
    val = val.batch(batch_size, drop_remainder=False).map(
        lambda images, labels, paths: {
            "image": images, "label": labels, "path": paths,
            "weight": tf.where(labels > 0.5, val_real_weight, val_fake_weight)},
        num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)
    logging.info("val: %d real + %d fake samples", val_real, val_fake)

    return TrainingData(train=make_train(0), val=val, train_count=train_count, val_count=val_real + val_fake,
                        class_counts={"real": real_count, "fake": fake_count},
                        skipped=skipped + val_skipped, steps_per_epoch=steps_per_epoch,
                        val_source_names={f.path: f.source_name for f in val_source.files}, make_train=make_train)
