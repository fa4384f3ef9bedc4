"""Training from several named sources: parsing --data_dir, batches balanced by source and class, and
validation metrics per source (the best checkpoint chosen by the worst source)."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import in_memory, input_pipeline
from data_pipelines.sources import REAL, FAKE, DataSource, LabelledFile, parse_data_sources
from data_pipelines.training_examples import balanced_epoch_order, stratum_shares
from meso_jax import metrics, train, validation
from tests.test_data_in_memory import assert_same_batches
from tests.test_data_pipeline import SMALL, write_images


def test_parse_data_sources():
    assert parse_data_sources("data/faces") == [DataSource("faces", "data/faces", 1.0)]
    assert parse_data_sources("dfdc=a/b:3, ffpp=/c/d") == [DataSource("dfdc", "a/b", 3.0),
                                                           DataSource("ffpp", "/c/d", 1.0)]
    for bad, message in (("a=x:0", "positive"), ("a=x:-1", "positive"), ("a=x,a=y", "twice"),
                         ("1a=x", "source name"), ("a=", "name=path"), ("", "empty")):
        with pytest.raises(ValueError, match=message):
            parse_data_sources(bad)


def _files(counts: dict[tuple[str, float], int]) -> list[LabelledFile]:
    return [LabelledFile(f"{name}/{label}/{i}", label, f"{name}{i}", name)
            for (name, label), count in counts.items() for i in range(count)]


def test_every_batch_holds_each_source_and_class_in_proportion():
    # A large source (900 files, mostly fake) and a small one (60): weights 1 : 3.
    files = _files({("big", REAL): 300, ("big", FAKE): 600, ("small", REAL): 20, ("small", FAKE): 40})
    weights = {"big": 1.0, "small": 3.0}
    shares = stratum_shares(files, weights, None)
    assert shares == pytest.approx({("big", REAL): 0.125, ("big", FAKE): 0.125,
                                    ("small", REAL): 0.375, ("small", FAKE): 0.375})
    order = balanced_epoch_order(7, 0, files, weights, samples_per_batch=32)
    assert len(order) == len(files)
    strata = np.array([[f.source_name == "small", f.label == REAL] for f in (files[i] for i in order)])
    batch_size = 32
    for first in range(0, len(order) - batch_size + 1, batch_size):
        batch = strata[first:first + batch_size]
        for small, real in ((0, 0), (0, 1), (1, 0), (1, 1)):
            count = np.sum((batch[:, 0] == small) & (batch[:, 1] == real))
            expected = batch_size * shares[("small" if small else "big", REAL if real else FAKE)]
            assert abs(count - expected) <= 1, (first, small, real, count, expected)
    # The small source's files are all visited (repeated), each about equally often.
    small_real_visits = np.bincount([i for i in order if files[i].source_name == "small" and files[i].label == REAL],
                                    minlength=len(files))[600 + 300:600 + 300 + 20]
    assert small_real_visits.min() >= 18 and small_real_visits.max() <= 19  # 0.375 * 960 / 20 = 18
    # Deterministic per (seed, epoch), different across epochs.
    np.testing.assert_array_equal(order, balanced_epoch_order(7, 0, files, weights))
    assert not np.array_equal(order, balanced_epoch_order(7, 1, files, weights))


def test_a_source_with_one_class_gives_its_whole_share_to_it():
    files = _files({("a", REAL): 10, ("a", FAKE): 10, ("reals", REAL): 10})
    assert stratum_shares(files, {"a": 1.0, "reals": 1.0}, None) == pytest.approx(
        {("a", REAL): 0.25, ("a", FAKE): 0.25, ("reals", REAL): 0.5})
    # Self-blending: every sample is a real one bringing its own fake; the share is the source's.
    reals = [f for f in files if f.label == REAL]
    assert stratum_shares(reals, {"a": 1.0, "reals": 3.0}, "sbi") == pytest.approx(
        {("a", REAL): 0.25, ("reals", REAL): 0.75})


@pytest.fixture
def two_sources(tmp_path):
    for name, (real, fake, seed) in {"big": (16, 16, 1), "small": (4, 6, 3)}.items():
        for split, share in (("train", 1.0), ("val", 0.5)):
            write_images(tmp_path / name / split / "real", int(real * share), seed=seed)
            write_images(tmp_path / name / split / "fake", int(fake * share), seed=seed + 1)
    return [DataSource("big", str(tmp_path / "big"), 1.0), DataSource("small", str(tmp_path / "small"), 1.0)]


def test_both_pipelines_give_the_same_balanced_batches(two_sources):
    streamed = input_pipeline.create_datasets(two_sources, "image", SMALL, batch_size=4, seed=3, augment="flip")
    held = in_memory.create_datasets(two_sources, "image", SMALL, batch_size=4, seed=3, augment="flip")
    assert held.steps_per_epoch == streamed.steps_per_epoch == (32 + 10) // 4
    held_batches = list(held.train_batches(0))
    assert_same_batches(list(input_pipeline.train_dataset_for_epoch(streamed, 0).as_numpy_iterator()), held_batches)
    # Balanced classes: the class weights are 1 and every batch of 4 is two real, two fake.
    for batch in held_batches:
        assert batch["label"].sum() == 2 and np.all(batch["weight"] == 1.0)
    assert set(held.val_source_names.values()) == {"big", "small"}
    assert held.val_source_names == streamed.val_source_names


def test_validation_metrics_per_source_and_the_selection_rule():
    # "big" is ranked perfectly, "small" backwards: the pooled AUC is high, the worst source's is 0.
    source_of_path = {f"big{i}": "big" for i in range(20)} | {f"small{i}": "small" for i in range(4)}
    labels = np.array([1] * 10 + [0] * 10 + [1, 1, 0, 0], np.float32)
    scores = np.array([0.9] * 10 + [0.1] * 10 + [0.2, 0.3, 0.6, 0.7], np.float32)
    paths = [f"big{i}" for i in range(20)] + [f"small{i}" for i in range(4)]

    parallel = train.DataParallel.create()
    batches = [{"image": np.zeros((24, 4, 4, 3), np.uint8), "label": labels, "path": np.array(paths, object)}]

    def eval_step(state, batch):  # stands for the model: the scores above, in batch order
        del state
        return {"score": scores, "loss": np.abs(np.asarray(batch["label"]) - scores)}

    result = validation.evaluate(None, batches, parallel, 24, eval_step, (4, 4, 3), False, source_of_path, "worst")
    assert result["val_big_auc"] == 1.0 and result["val_small_auc"] == 0.0
    assert result["val_auc"] > 0.8
    assert result["val_selection"] == 0.0 and result["val_selection_rule"] == "worst source AUC"
    mean = validation.selection_metrics(result, ["big", "small"], "mean")
    assert mean["val_selection"] == 0.5


def test_selection_falls_back_to_the_loss_when_an_auc_is_undefined():
    chosen = validation.selection_metrics({"val_auc": None, "val_loss": 0.25}, [], "worst")
    assert chosen == {"val_selection": -0.25, "val_selection_rule": "minus loss (AUC undefined)"}
    assert validation.selection_metrics({"val_auc": 0.7, "val_loss": 0.25}, [], "worst")["val_selection"] == 0.7


def test_balanced_eer_threshold_weighs_sources_equally():
    # Source 0 (many samples) separates at 0.5, source 1 (few) at 0.8; balanced, the threshold lies
    # between the two, pooled it would follow source 0 alone.
    labels = np.array([1] * 100 + [0] * 100 + [1] * 5 + [0] * 5)
    scores = np.concatenate([np.linspace(0.55, 1, 100), np.linspace(0, 0.45, 100),
                             np.linspace(0.85, 1, 5), np.linspace(0.6, 0.75, 5)])
    sources = np.array([0] * 200 + [1] * 10)
    pooled = metrics.balanced_eer_threshold(labels, scores)
    balanced = metrics.balanced_eer_threshold(labels, scores, sources)
    assert pooled < 0.6 and balanced > pooled
    assert metrics.balanced_eer_threshold([1, 1], [0.2, 0.3]) is None


def test_paired_batches_hold_the_originals_of_their_fakes():
    # Source "pairs": 10 groups, each a real and two fakes made from it; source "plain": no groups.
    files = [LabelledFile(f"p/{g}/{k}", REAL if k == 0 else FAKE, f"pairs/g{g}", "pairs")
             for g in range(10) for k in range(3)]
    files += _files({("plain", REAL): 12, ("plain", FAKE): 12})
    order = balanced_epoch_order(2, 0, files, {"pairs": 1.0, "plain": 1.0}, samples_per_batch=8, paired=True)
    for first in range(0, len(order) - 7, 8):
        batch = [files[i] for i in order[first:first + 8]]
        fake_groups = sorted(f.source for f in batch if f.source_name == "pairs" and f.label == FAKE)
        real_groups = sorted(f.source for f in batch if f.source_name == "pairs" and f.label == REAL)
        assert fake_groups == real_groups and len(fake_groups) == 2
    unpaired = balanced_epoch_order(2, 0, files, {"pairs": 1.0, "plain": 1.0}, samples_per_batch=8)
    assert any(sorted(f.source for f in (files[i] for i in unpaired[first:first + 8]) if f.source_name == "pairs"
                      and f.label == FAKE) != sorted(f.source for f in (files[i] for i in unpaired[first:first + 8])
                                                     if f.source_name == "pairs" and f.label == REAL)
               for first in range(0, len(unpaired) - 7, 8))


def test_calibration_stores_a_threshold_the_scanner_uses_unless_overridden(tmp_path):
    from meso_jax import calibration, checkpoints, scoring
    from tests.conftest import random_model_variables

    loaded = checkpoints.LoadedModel("meso4", random_model_variables(0, head_gain=30.0), {}, {})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 256, 256, 3), dtype=np.uint8)
    labels = np.array([1, 0] * 12)
    batches = [{"image": images[:16], "label": labels[:16], "source": ["a"] * 16},
               {"image": images[16:], "label": labels[16:], "source": ["b"] * 8}]
    found = calibration.calibrate(loaded, batches)
    scores = scoring.Scorer(loaded, batch_size=64, flip_average=True).score(images)
    sources = np.array([0] * 16 + [1] * 8)
    assert found["threshold"] == pytest.approx(metrics.balanced_eer_threshold(labels, scores, sources), abs=1e-4)
    assert set(found["calibration_auc_by_source"]) == {"a", "b"}
    assert found["threshold_rule"] == calibration.THRESHOLD_RULE
    checkpoints.save_model(tmp_path / "model", "meso4", loaded.variables, {}, found)
    assert scoring.Scorer(checkpoints.load_model(tmp_path / "model"), batch_size=4).threshold == found["threshold"]
    assert scoring.Scorer(loaded, batch_size=4).threshold == 0.5  # no threshold in the metadata
    # One class only: no threshold can be chosen, and the rule says so.
    one_class = calibration.calibrate(loaded, [{"image": images[:4], "label": np.ones(4), "source": ["a"] * 4}])
    assert one_class["threshold"] == 0.5 and "one class" in one_class["threshold_rule"]


def test_video_sources_train_from_the_face_cache_with_validation_per_source(tmp_path):
    from tests.test_data_pipeline import write_videos

    for name, seed in (("first", 1), ("second", 5)):
        for split in ("train", "val"):
            write_videos(tmp_path / name / split / "real", 2, seed=seed)
            write_videos(tmp_path / name / split / "fake", 2, seed=seed + 1)
    data = input_pipeline.create_datasets(
        [DataSource("first", str(tmp_path / "first"), 1.0), DataSource("second", str(tmp_path / "second"), 3.0)],
        "video", SMALL, batch_size=4, seed=0, cache_dir=str(tmp_path / "cache"))
    batches = list(input_pipeline.train_dataset_for_epoch(data, 0).as_numpy_iterator())
    assert len(batches) == data.steps_per_epoch > 0
    assert all(batch["image"].shape[1:] == (32, 32, 3) and np.all(batch["weight"] == 1.0) for batch in batches)
    assert set(data.val_source_names.values()) == {"first", "second"}
    val_paths = [p.decode() for batch in data.val.as_numpy_iterator() for p in batch["path"]]
    assert {data.val_source_names[p] for p in val_paths} == {"first", "second"}


def test_augmentation_per_source(two_sources):
    # "big" trains on its plain pixels, "small" mirrored or not: both pipelines agree, batch for batch.
    spec = "big=none,small=flip"
    streamed = input_pipeline.create_datasets(two_sources, "image", SMALL, batch_size=4, seed=3, augment=spec)
    held = in_memory.create_datasets(two_sources, "image", SMALL, batch_size=4, seed=3, augment=spec)
    held_batches = list(held.train_batches(0))
    assert_same_batches(list(input_pipeline.train_dataset_for_epoch(streamed, 0).as_numpy_iterator()), held_batches)
    plain = in_memory.create_datasets(two_sources, "image", SMALL, batch_size=4, seed=3, augment="none")
    plain_images = np.concatenate([b["image"] for b in plain.train_batches(0)])
    small_images = {plain._train.images[i].tobytes() for i, f in enumerate(plain._train.files)
                    if f.source_name == "small"}
    big_images = {plain._train.images[i].tobytes() for i, f in enumerate(plain._train.files) if f.source_name == "big"}
    mirrored = 0
    for image in np.concatenate([b["image"] for b in held_batches]):
        if image.tobytes() in big_images:
            continue
        assert image.tobytes() in small_images or image[:, ::-1].tobytes() in small_images
        mirrored += image.tobytes() not in small_images
    assert mirrored > 0 and len(plain_images) == sum(len(b["image"]) for b in held_batches)
    with pytest.raises(ValueError, match="no preset for source small"):
        in_memory.create_datasets(two_sources, "image", SMALL, batch_size=4, seed=3, augment="big=flip")
