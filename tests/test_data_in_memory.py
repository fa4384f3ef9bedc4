"""The in-memory image pipeline (data_pipelines.in_memory) yields exactly the tf.data pipeline's batches."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data_pipelines import in_memory, input_pipeline
from data_pipelines.preprocessing import Preprocessing
from tests.test_data_pipeline import SMALL, image_folder  # noqa: F401  (the fixture: 12 real, 8 fake, 2 unreadable)


def assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual) > 0
    for want, got in zip(expected, actual):
        assert set(want) == set(got)
        for key in want:
            if key == "path":
                assert [bytes(p) for p in want[key]] == [bytes(p) for p in got[key]]
            else:
                assert want[key].dtype == got[key].dtype, key
                np.testing.assert_array_equal(want[key], got[key], err_msg=key)


@pytest.mark.parametrize("augment, synthesize_fakes, num_shards", [
    ("jpeg", None, 1), ("flip", None, 2), ("none", None, 1), ("flip", "sbi", 1)])
def test_same_batches_as_the_tf_data_pipeline(image_folder, augment, synthesize_fakes, num_shards):
    for shard_index in range(num_shards):
        kwargs = dict(val_fraction=0.25, augment=augment, synthesize_fakes=synthesize_fakes,
                      num_shards=num_shards, shard_index=shard_index)
        streamed = input_pipeline.create_datasets(str(image_folder), "image", SMALL, batch_size=3, seed=5, **kwargs)
        held = in_memory.create_datasets(str(image_folder), "image", SMALL, batch_size=3, seed=5, **kwargs)
        assert (held.train_count, held.val_count, held.class_counts, held.steps_per_epoch) == (
            streamed.train_count, streamed.val_count, streamed.class_counts, streamed.steps_per_epoch)
        assert sorted(held.skipped) == sorted(streamed.skipped)
        for epoch in (0, 1):
            assert_same_batches(list(input_pipeline.train_dataset_for_epoch(streamed, epoch).as_numpy_iterator()),
                                list(held.train_batches(epoch)))
        assert_same_batches(list(input_pipeline.train_dataset_for_epoch(streamed, 2).skip(1).as_numpy_iterator()),
                            list(held.train_batches(2, skip_steps=1)))
        assert_same_batches(list(streamed.val.as_numpy_iterator()), list(held.val_batches()))


def test_a_file_that_fails_to_decode_is_skipped_and_listed(image_folder):
    truncated = image_folder / "real" / "truncated.png"
    truncated.write_bytes((image_folder / "real" / "img00.png").read_bytes()[:60])  # header fine, pixels gone
    data = in_memory.create_datasets(str(image_folder), "image", SMALL, batch_size=2, seed=0, val_fraction=0.25)
    assert os.path.basename(next(path for path, _ in data.skipped if "truncated" in path)) == "truncated.png"
    seen = sum(len(batch["label"]) for batch in data.train_batches(0)) + \
        sum(len(batch["label"]) for batch in data.val_batches())
    assert data.train_count + data.val_count == 12 + 8  # the truncated file is not counted
    assert seen == data.steps_per_epoch * 2 + data.val_count


def test_refuses_videos_face_detection_and_data_larger_than_memory(image_folder, monkeypatch):
    with pytest.raises(ValueError, match="pre-cropped face images"):
        in_memory.create_datasets(str(image_folder), "video", SMALL, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="pre-cropped face images"):
        in_memory.create_datasets(str(image_folder), "image", Preprocessing(face_detector="haar"), batch_size=2, seed=0)
    monkeypatch.setattr(in_memory, "_available_memory_bytes", lambda: 10_000)
    with pytest.raises(ValueError, match="use --input_pipeline=tfdata"):
        in_memory.create_datasets(str(image_folder), "image", SMALL, batch_size=2, seed=0)


def test_a_teacher_softens_each_training_target_and_nothing_else(image_folder):
    kwargs = dict(val_fraction=0.25, augment="flip")
    plain = in_memory.create_datasets(str(image_folder), "image", SMALL, batch_size=3, seed=5, **kwargs)
    taught = in_memory.create_datasets(str(image_folder), "image", SMALL, batch_size=3, seed=5, **kwargs)
    images = taught.train_images()
    # A score per image that a horizontal flip keeps: its mean brightness.
    teacher = (images.reshape(len(images), -1).mean(axis=1) / 255).astype(np.float32)
    assert len(set(teacher.round(6))) > 1
    with pytest.raises(ValueError, match="teacher probabilities"):
        taught.soften_targets(teacher[1:], 0.3)
    taught.soften_targets(teacher, 0.3)
    for want, got in zip(plain.train_batches(1), taught.train_batches(1), strict=True):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["weight"], got["weight"])  # class weights follow the hard labels
        brightness = got["image"].reshape(len(got["image"]), -1).mean(axis=1) / 255
        np.testing.assert_allclose(got["label"], 0.7 * want["label"] + 0.3 * brightness, rtol=0, atol=1e-6)
        assert got["label"].dtype == np.float32
    assert_same_batches(list(plain.val_batches()), list(taught.val_batches()))  # validation keeps true labels
