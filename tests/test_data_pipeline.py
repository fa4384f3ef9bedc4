"""tf.data training/validation pipelines, the face cache and self-blended fakes (data_pipelines.input_pipeline)."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import cache, input_pipeline
from data_pipelines.input_pipeline import clip_indices_tf, create_datasets, train_dataset_for_epoch
from data_pipelines.preprocessing import Preprocessing, read_image_rgb, resize_image
from data_pipelines.samples import clip_indices
from data_pipelines.sources import LabelledFile
from data_pipelines.synthesize import _face_mask, self_blend

SMALL = Preprocessing(image_size=32, face_detector="none", frames_per_video=3)


def write_images(folder, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cv2.imwrite(str(folder / f"img{i:02d}.png"), rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def write_videos(folder, count: int, seed: int, frames: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        writer = cv2.VideoWriter(str(folder / f"vid{seed}{i}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, (48, 40))
        for _ in range(frames):
            writer.write(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        writer.release()


@pytest.fixture
def image_folder(tmp_path):
    write_images(tmp_path / "real", 12, seed=1)
    write_images(tmp_path / "fake", 8, seed=2)
    (tmp_path / "fake" / "empty.jpg").write_bytes(b"")
    (tmp_path / "real" / "garbage.png").write_bytes(b"not a png at all")
    return tmp_path


def batches(dataset: tf.data.Dataset) -> list[dict]:
    return list(dataset.as_numpy_iterator())


def test_image_training_data_shapes_weights_and_skipped_files(image_folder):
    data = create_datasets(str(image_folder), "image", SMALL, batch_size=4, seed=0, val_fraction=0.25)
    assert sorted(os.path.basename(path) for path, _ in data.skipped) == ["empty.jpg", "garbage.png"]
    assert all("\n" not in reason and reason for _, reason in data.skipped)
    assert data.train_count + data.val_count == 20 and data.val_count >= 4
    assert data.class_counts["real"] + data.class_counts["fake"] == data.train_count
    assert data.steps_per_epoch == data.train_count // 4
    train = batches(data.train)
    assert len(train) == data.steps_per_epoch
    for batch in train:
        assert set(batch) == {"image", "label", "weight"}
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8  # scaled on device
        real_weight = data.train_count / (2 * data.class_counts["real"])
        np.testing.assert_allclose(batch["weight"], np.where(batch["label"] == 1.0, real_weight,
                                                             data.train_count / (2 * data.class_counts["fake"])))


def test_a_file_that_fails_to_decode_loses_only_itself(image_folder, monkeypatch, caplog):
    """A file whose header passes but whose pixels do not decode is dropped from its group of
    SAMPLES_PER_CALL files (logged); every other image of the epoch and of validation still arrives once."""
    corrupt = bytearray((image_folder / "real" / "img00.png").read_bytes())
    corrupt[100:140] = bytes(40)  # header and end chunk intact, compressed pixels broken
    (image_folder / "real" / "corrupt.png").write_bytes(bytes(corrupt))
    monkeypatch.setattr(input_pipeline, "SAMPLES_PER_CALL", 4)  # several groups, one of them short a file
    data = create_datasets(str(image_folder), "image", SMALL, batch_size=1, seed=0, val_fraction=0.25,
                           augment="none")
    assert data.train_count + data.val_count == 21  # counted from the header, before decoding
    train_images = [batch["image"][0] for batch in batches(data.train)]
    val_images = [image for batch in batches(data.val) for image in batch["image"]]
    assert len(train_images) + len(val_images) == 20
    expected = sorted(resize_image(read_image_rgb(str(image_folder / label / f"img{i:02d}.png")), SMALL).tobytes()
                      for label, count in (("real", 12), ("fake", 8)) for i in range(count))
    assert sorted(image.tobytes() for image in train_images + val_images) == expected
    assert "corrupt.png" in caplog.text


def test_validation_is_unaugmented_unshuffled_and_keeps_the_last_batch(image_folder):
    data = create_datasets(str(image_folder), "image", SMALL, batch_size=3, seed=0, val_fraction=0.25)
    val = batches(data.val)
    assert sum(len(b["label"]) for b in val) == data.val_count
    paths = [p.decode() for b in val for p in b["path"]]
    assert paths == sorted(paths, key=lambda p: (os.path.dirname(p) != str(image_folder / "real"), p))
    images = np.concatenate([b["image"] for b in val])
    for path, image, label in zip(paths, images, np.concatenate([b["label"] for b in val])):
        np.testing.assert_array_equal(image, resize_image(read_image_rgb(path), SMALL))
        assert label == (1.0 if "/real/" in path else 0.0)


def test_training_order_is_a_function_of_seed_and_epoch(image_folder):
    data = create_datasets(str(image_folder), "image", SMALL, batch_size=4, seed=5, val_fraction=0.25)
    epoch1 = batches(train_dataset_for_epoch(data, 1))
    np.testing.assert_array_equal(np.stack([b["image"] for b in epoch1]),
                                  np.stack([b["image"] for b in batches(train_dataset_for_epoch(data, 1))]))
    epoch2 = batches(train_dataset_for_epoch(data, 2))
    assert not np.array_equal(np.stack([b["image"] for b in epoch1]), np.stack([b["image"] for b in epoch2]))


def test_training_without_augmentation_sees_the_plain_model_inputs(image_folder):
    data = create_datasets(str(image_folder), "image", SMALL, batch_size=2, seed=0, val_fraction=0.25,
                           augment="none")
    expected = {resize_image(read_image_rgb(path), SMALL).tobytes()
                for path in map(str, image_folder.glob("*/img*.png"))}
    for batch in batches(data.train):
        assert all(image.tobytes() in expected for image in batch["image"])


def test_a_class_without_files_is_a_value_error(tmp_path):
    write_images(tmp_path / "real", 3, seed=1)
    (tmp_path / "fake").mkdir()
    with pytest.raises(ValueError, match="fake") as info:
        create_datasets(str(tmp_path), "image", SMALL, batch_size=2, seed=0)
    assert "\n" not in str(info.value)


def test_a_class_whose_files_are_all_unusable_says_why(tmp_path):
    write_images(tmp_path / "real", 3, seed=1)
    (tmp_path / "fake").mkdir()
    for index in range(3):
        (tmp_path / "fake" / f"broken{index}.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no usable fake training samples .*: all 3 fake files were skipped "
                                         r"\(first: .*/fake/broken0\.jpg: empty file\)"):
        create_datasets(str(tmp_path), "image", SMALL, batch_size=2, seed=0, val_fraction=0.0)


@pytest.fixture
def video_folder(tmp_path):
    for split, count in (("train", 3), ("val", 1)):
        write_videos(tmp_path / "data" / split / "real", count, seed=10 + count)
        write_videos(tmp_path / "data" / split / "fake", count, seed=20 + count)
    (tmp_path / "data" / "train" / "fake" / "broken.mp4").write_bytes(b"\x00" * 100)
    return tmp_path / "data"


def test_video_faces_are_cached_reused_and_invalidated(video_folder, tmp_path, monkeypatch):
    extracted = []
    real_extract = cache.extract_face_crops
    monkeypatch.setattr(cache, "extract_face_crops", lambda path, prep: extracted.append(path) or real_extract(path, prep))
    cache_dir = str(tmp_path / "cache")

    data = create_datasets(str(video_folder), "video", SMALL, batch_size=4, seed=0, cache_dir=cache_dir)
    assert len(extracted) == 9 and [os.path.basename(p) for p, _ in data.skipped] == ["broken.mp4"]
    assert data.train_count == 6 * 3 and data.val_count == 2 * 3
    assert [b["image"].shape for b in batches(data.train)] == [(4, 32, 32, 3)] * 4
    val = batches(data.val)
    assert [len(b["path"]) for b in val] == [4, 2]
    assert len({p for b in val for p in b["path"]}) == 2

    extracted.clear()
    create_datasets(str(video_folder), "video", SMALL, batch_size=4, seed=0, cache_dir=cache_dir)
    assert extracted == []  # everything, including the broken file's failure, came from the cache

    changed = video_folder / "train" / "real" / "vid130.avi"
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    create_datasets(str(video_folder), "video", SMALL, batch_size=4, seed=0, cache_dir=cache_dir)
    assert extracted == [str(changed)]

    extracted.clear()
    more_frames = Preprocessing(image_size=32, face_detector="none", frames_per_video=4)
    data = create_datasets(str(video_folder), "video", more_frames, batch_size=4, seed=0, cache_dir=cache_dir)
    assert len(extracted) == 9 and data.train_count == 6 * 4


def test_video_clips(video_folder, tmp_path):
    prep = Preprocessing(image_size=32, face_detector="none", frames_per_video=6)
    data = create_datasets(str(video_folder), "video", prep, batch_size=2, seed=0, cache_dir=str(tmp_path / "c"),
                           clip_frames=4)
    assert data.train_count == 6 * 2  # clip_indices(6, 4) -> 2 clips per video
    train = batches(data.train)
    assert len(train) == 6 and train[0]["image"].shape == (2, 4, 32, 32, 3)
    assert sum(len(b["label"]) for b in batches(data.val)) == data.val_count == 2 * 2


def test_clip_indices_tensorflow_twin_matches_numpy():
    for clip_frames in (4, 24):
        for num_samples in range(1, 60):
            np.testing.assert_array_equal(clip_indices_tf(tf.constant(num_samples), clip_frames).numpy(),
                                          clip_indices(num_samples, clip_frames))


def test_self_blended_fakes_from_real_files_only(tmp_path):
    write_images(tmp_path / "real", 6, seed=3)
    data = create_datasets(str(tmp_path), "image", SMALL, batch_size=4, seed=0, val_fraction=0.0,
                           synthesize_fakes="sbi")
    assert data.class_counts == {"real": 6, "fake": 6} and data.steps_per_epoch == 3
    labels = np.concatenate([b["label"] for b in batches(data.train)])
    assert sorted(labels.tolist()) == [0.0] * 6 + [1.0] * 6


def test_self_blend_mixes_a_jittered_copy_through_a_soft_face_mask():
    masks = [_face_mask(64, np.random.default_rng(seed)) for seed in range(8)]
    assert all(m[32, 32] > 0.9 and m[:4, :4].max() < 0.05 and 0.0 <= m.min() and m.max() <= 1.0 for m in masks)
    assert all(0 < np.mean((m > 0.05) & (m < 0.95)) for m in masks)  # feathered edge
    face = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), (5, 5), 0)
    fakes = [self_blend(face, np.random.default_rng(seed)) for seed in range(8)]
    assert all(f.shape == face.shape and f.dtype == np.uint8 and not np.array_equal(f, face) for f in fakes)
    np.testing.assert_array_equal(fakes[0], self_blend(face, np.random.default_rng(0)))
    clip = self_blend(np.stack([face, face]), np.random.default_rng(1))
    np.testing.assert_array_equal(clip[0], clip[1])


def test_build_face_cache_reports_counts(tmp_path):
    write_videos(tmp_path / "v", 2, seed=4)
    files = [LabelledFile(str(p), 1.0, p.name) for p in sorted((tmp_path / "v").iterdir())]
    cached, skipped, extracted = cache.build_face_cache(files, SMALL, str(tmp_path / "c"), progress=False)
    assert extracted == 2 and skipped == [] and [c.num_samples for c in cached] == [3, 3]
    records = list(tf.data.TFRecordDataset(cached[0].record_path).map(cache.parse_record).as_numpy_iterator())
    assert [r["frame_index"] for r in records] == [0, 4, 7] and records[0]["image"].shape == (32, 32, 3)
    assert cache.build_face_cache(files, SMALL, str(tmp_path / "c"), progress=False)[2] == 0


def test_images_needing_face_detection_go_through_the_cache(tmp_path, shared_dir):
    for label, folder in (("real", "real"), ("fake", "df")):
        (tmp_path / "data" / label).mkdir(parents=True)
        for source in sorted((shared_dir / "mesonet" / "test_images" / folder).glob("*.jpg")):
            (tmp_path / "data" / label / source.name).write_bytes(source.read_bytes())
    data = create_datasets(str(tmp_path / "data"), "image", Preprocessing(), batch_size=2, seed=0, val_fraction=0.0,
                           cache_dir=str(tmp_path / "cache"))
    assert data.skipped == [] and data.class_counts == {"real": 2, "fake": 2}
    assert [b["image"].shape for b in batches(data.train)] == [(2, 256, 256, 3)] * 2
