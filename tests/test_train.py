"""Training engine: learning, checkpoints, resume, divergence, export."""

from __future__ import annotations

import json
from unittest import mock

import jax
import numpy as np
import pytest

from data_pipelines.preprocessing import scale_to_unit
from meso_jax import checkpoints, experiment, models, run_control, train, training_loop

BATCH = 8
STEPS_PER_EPOCH = 20


def _synthetic_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images, as the input pipelines yield them. Real images have a brighter red channel:
    separable, but only by learning."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count).astype(np.float32)
    images = rng.integers(0, 154, (count, 256, 256, 3), dtype=np.uint8)
    images[labels == 1, :, :, 0] += 77
    return images, labels


TRAIN_IMAGES, TRAIN_LABELS = _synthetic_split(BATCH * STEPS_PER_EPOCH, seed=0)
VAL_IMAGES, VAL_LABELS = _synthetic_split(20, seed=1)


def _epoch_batches(epoch: int, skip_steps: int):
    order = np.random.default_rng(epoch).permutation(len(TRAIN_LABELS))
    for step in range(skip_steps, STEPS_PER_EPOCH):
        index = order[step * BATCH:(step + 1) * BATCH]
        yield {"image": TRAIN_IMAGES[index], "label": TRAIN_LABELS[index], "weight": np.ones(BATCH, np.float32)}


def _val_batches():
    for start in range(0, len(VAL_LABELS), BATCH):  # the last batch is partial: padded inside evaluate()
        yield {"image": VAL_IMAGES[start:start + BATCH], "label": VAL_LABELS[start:start + BATCH]}


def _config(**overrides) -> train.TrainConfig:
    settings = dict(batch_size=BATCH, schedule="constant", checkpoint_every_steps=20, log_every_steps=4,
                    progress_bar=False)
    settings.update(overrides)
    return train.TrainConfig(**settings)


def _fit(workdir, epochs: int, messages: list[str]) -> dict:
    run_metadata = {"dataset": "image", "preprocessing": {"resize": "nearest", "face_detector": "none"}}
    return training_loop.fit(_config(epochs=epochs), workdir, STEPS_PER_EPOCH, run_metadata, _epoch_batches, _val_batches,
                     log=messages.append)


def test_training_separates_two_classes_and_resumes(tmp_path) -> None:
    first_messages: list[str] = []
    first = _fit(tmp_path, epochs=4, messages=first_messages)
    assert "devices: 1" in first_messages[0]
    assert first["step"] == 4 * STEPS_PER_EPOCH

    second_messages: list[str] = []
    final = _fit(tmp_path, epochs=10, messages=second_messages)
    assert f"resumed from step {4 * STEPS_PER_EPOCH}" in second_messages
    assert final["step"] == 10 * STEPS_PER_EPOCH  # the step count continues, 200 steps in all
    assert final["train_loss"] < 0.3
    assert final["val_accuracy"] > 0.9 and final["val_auc"] > 0.95

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 11))
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert list((tmp_path / "tensorboard").iterdir())

    # The workdir and its exported best checkpoint score exactly like the variables it was trained to,
    # and, trained on pre-cropped faces, both scan with BlazeFace faces.
    loaded = checkpoints.load_model(tmp_path)
    assert loaded.model_name == "meso4" and loaded.metadata["metrics"]["val_auc"] > 0.95
    assert loaded.preprocessing == {"resize": "nearest", "face_detector": "blazeface"}
    export_dir = tmp_path / "exported"
    experiment.export_best(tmp_path, export_dir, log=first_messages.append)
    exported = checkpoints.load_model(export_dir)
    assert exported.preprocessing == loaded.preprocessing
    assert "scans find faces with blazeface" in exported.metadata["trained_on"]
    assert exported.metadata["metrics"] == loaded.metadata["metrics"]
    module = models.get_model("meso4").module
    inputs = scale_to_unit(VAL_IMAGES[:4])
    np.testing.assert_array_equal(module.apply(loaded.variables, inputs), module.apply(exported.variables, inputs))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    def poisoned_batches(epoch: int, skip_steps: int):
        for step, batch in enumerate(_epoch_batches(epoch, skip_steps)):
            if epoch == 1 and step == 2:
                batch = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))  # steps take floats too
            yield batch

    with pytest.raises(train.TrainingError, match=r"loss became nan at step 23"):
        training_loop.fit(_config(epochs=3), tmp_path, STEPS_PER_EPOCH, {}, poisoned_batches, _val_batches, log=print)
    manager = checkpoints.open_manager(tmp_path / "checkpoints", create=False)
    assert manager.all_steps() == [STEPS_PER_EPOCH]


def test_unwritable_workdir_fails_before_training(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(train.TrainingError, match="is not writable"):
        run_control.check_workdir(blocker / "workdir")


def test_batch_size_must_divide_by_device_count() -> None:
    parallel = train.DataParallel.create()
    parallel.check_batch_size(parallel.device_count * 4)
    if parallel.device_count > 1:
        with pytest.raises(train.TrainingError, match="does not divide"):
            parallel.check_batch_size(parallel.device_count + 1)


def test_schedules() -> None:
    paper = train.learning_rate_schedule(_config(schedule="paper"), total_steps=10_000)
    assert paper(0) == pytest.approx(1e-3) and paper(1_000) == pytest.approx(1e-4)
    assert paper(2_999) == pytest.approx(1e-5) and paper(9_000) == pytest.approx(1e-6)
    cosine = train.learning_rate_schedule(_config(schedule="cosine", warmup_steps=10), total_steps=100)
    assert cosine(0) == 0 and cosine(10) == pytest.approx(1e-3) and cosine(100) < 1e-5


def test_constant_schedule_with_final_decay() -> None:
    # 10 epochs of 100 steps, the last 4 decayed: steps 0-599 are the plain constant rate (so a
    # constant-rate run's checkpoint from before step 600 resumes into this schedule unchanged).
    decayed = train.learning_rate_schedule(_config(schedule="constant", epochs=10, decay_epochs=4), total_steps=1000)
    constant = train.learning_rate_schedule(_config(schedule="constant", epochs=10), total_steps=1000)
    for step in (0, 300, 599, 600):  # Adam applies the rate in float32
        assert np.float32(decayed(step)) == np.float32(constant(step)) == np.float32(1e-3)
    assert float(decayed(800)) == pytest.approx(0.5e-3)
    assert float(decayed(650)) > float(decayed(900)) > float(decayed(999)) > float(decayed(1000)) == 0.0
    with pytest.raises(ValueError, match="between 0 and epochs"):  # refused when the config is made
        _config(schedule="constant", epochs=3, decay_epochs=4)
    with pytest.raises(ValueError, match="constant schedule"):
        _config(schedule="cosine", decay_epochs=2)


def test_mse_loss_is_the_papers_squared_error() -> None:
    logits = np.array([0.0, 2.0])
    labels = np.array([1.0, 0.0])
    expected = (jax.nn.sigmoid(logits) - labels) ** 2
    np.testing.assert_allclose(train.per_example_loss(logits, labels, "mse"), expected, rtol=1e-6)


@pytest.mark.parametrize("model", ["meso4", "mesoinception4"])
def test_dropout_rate_reaches_the_head_in_training_only(model) -> None:
    spec = models.get_model(model)
    variables = models.init_variables(spec, seed=0)
    images = jax.random.uniform(jax.random.key(1), (2, *spec.input_shape))

    def train_logits(dropout_rate: float, dropout_seed: int) -> np.ndarray:
        logits, _ = train.training_module(spec, dropout_rate).apply(
            variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(dropout_seed)})
        return np.asarray(logits)

    assert not np.allclose(train_logits(0.5, 0), train_logits(0.5, 1))  # the paper's dropout
    np.testing.assert_array_equal(train_logits(0.0, 0), train_logits(0.0, 1))  # none at all
    inference = train.training_module(spec, 0.0).apply(variables, images, train=False)
    np.testing.assert_allclose(inference, spec.module.apply(variables, images, train=False), atol=1e-6)
    with pytest.raises(ValueError, match="dropout_rate"):
        _config(dropout_rate=1.0)


def test_init_checkpoint_starts_from_its_weights_and_must_be_the_same_model(tmp_path) -> None:
    start = jax.tree_util.tree_map(np.asarray, models.init_variables(models.get_model("meso4"), 7))
    checkpoints.save_model(tmp_path / "start", "meso4", start, {"resize": "nearest"})
    run_metadata = {"dataset": "image", "preprocessing": {"resize": "nearest", "face_detector": "none"}}
    messages: list[str] = []
    # At learning rate 0 the parameters stay those of the checkpoint (seed 0 would draw others).
    training_loop.fit(_config(epochs=1, learning_rate=0.0, init_checkpoint=str(tmp_path / "start")), tmp_path / "run",
              STEPS_PER_EPOCH, run_metadata, _epoch_batches, _val_batches, log=messages.append)
    assert any(message.startswith(f"initialised from {tmp_path / 'start'}") for message in messages)
    trained = checkpoints.load_model(tmp_path / "run")
    for want, got in zip(jax.tree_util.tree_leaves(start["params"]), jax.tree_util.tree_leaves(trained.variables["params"])):
        np.testing.assert_array_equal(want, got)

    with pytest.raises(train.TrainingError, match="holds meso4, but --model=mesoinception4"):
        training_loop.fit(_config(epochs=1, model="mesoinception4", init_checkpoint=str(tmp_path / "start")), tmp_path / "other",
                  STEPS_PER_EPOCH, run_metadata, _epoch_batches, _val_batches, log=messages.append)


@pytest.mark.parametrize("overrides, message", [
    (dict(teacher="t"), "--teacher needs --input_pipeline=memory"),
    (dict(teacher="t", input_pipeline="memory", synthesize_fakes="sbi"), "no --synthesize_fakes"),
    (dict(teacher="t", input_pipeline="memory", teacher_weight=0.6), r"teacher_weight=0.6 must be in \(0, 0.5\]"),
    (dict(keras_weights="k.h5", init_checkpoint="c"), "either --keras_weights or --init_checkpoint"),
])
def test_distillation_and_initialisation_settings_are_checked_up_front(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_weight_average_moves_towards_each_steps_weights() -> None:
    spec = models.get_model("meso4")
    config = _config(ema_decay=0.9, dropout_rate=0.0)
    state = train.create_train_state(spec, config, total_steps=10)
    assert train.create_train_state(spec, _config(), total_steps=10).ema is None  # off by default
    step_fn = jax.jit(lambda s, b: train.train_step(s, b, "bce", config.ema_decay))
    expected = jax.tree_util.tree_map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    batches = _epoch_batches(0, 0)
    for step in range(1, 4):
        state, _ = step_fn(state, next(batches))
        decay = min(0.9, (1 + step) / (10 + step))  # 0.18, 0.25, 0.31: the early-steps rule
        trained = {"params": state.params, "batch_stats": state.batch_stats}
        expected = jax.tree_util.tree_map(lambda old, new: decay * old + (1 - decay) * np.asarray(new), expected, trained)
        for want, got in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(state.ema)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # What eval_step scores is the average, not the trained weights.
    assert train.model_variables(state) is state.ema
    images = {"image": VAL_IMAGES[:4], "label": VAL_LABELS[:4]}
    averaged = train.eval_step(state, images)["score"]
    np.testing.assert_allclose(averaged, jax.nn.sigmoid(state.apply_fn(state.ema, scale_to_unit(VAL_IMAGES[:4]))),
                               rtol=1e-5)
    assert not np.allclose(averaged, train.eval_step(state.replace(ema=None), images)["score"])


def test_weight_averaged_run_checkpoints_the_average_and_resumes_exactly(tmp_path) -> None:
    run_metadata = {"dataset": "image", "preprocessing": {"resize": "nearest", "face_detector": "none"}}

    def run(workdir, epochs: int, ema_decay: float = 0.9) -> dict:
        return training_loop.fit(_config(epochs=epochs, ema_decay=ema_decay), workdir, STEPS_PER_EPOCH, run_metadata,
                         _epoch_batches, _val_batches, log=lambda message: None)

    straight = run(tmp_path / "straight", epochs=2)
    assert {"val_auc", "raw_val_auc", "raw_val_loss"} <= set(straight)
    assert straight["val_loss"] != straight["raw_val_loss"]
    run(tmp_path / "resumed", epochs=1)
    assert run(tmp_path / "resumed", epochs=2) == {**straight, "seconds": mock.ANY,
                                                   "train_images_per_second": mock.ANY}
    # The workdir's model (what load_model and export give) is the average; it resumed bit for bit.
    straight_model = checkpoints.load_model(tmp_path / "straight").variables
    resumed_model = checkpoints.load_model(tmp_path / "resumed").variables
    for want, got in zip(jax.tree_util.tree_leaves(straight_model), jax.tree_util.tree_leaves(resumed_model)):
        np.testing.assert_array_equal(want, got)
    with pytest.raises(train.TrainingError, match=r"trained with --ema_decay=0.9, not 0.0"):
        run(tmp_path / "resumed", epochs=3, ema_decay=0.0)
    with pytest.raises(ValueError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
        _config(ema_decay=1.0)


def test_meso4_is_validated_with_the_scanners_fast_path_to_float32_rounding() -> None:
    spec = models.get_model("meso4")
    state = train.create_train_state(spec, _config(dropout_rate=0.0), total_steps=10)
    state, _ = jax.jit(train.train_step)(state, next(_epoch_batches(0, 0)))  # BatchNorm statistics off 0/1
    batch = {"image": VAL_IMAGES[:8], "label": VAL_LABELS[:8]}
    fast = jax.jit(lambda s, b: train.eval_step(s, b, "bce", fast_meso4=True))(state, batch)
    plain = jax.jit(lambda s, b: train.eval_step(s, b, "bce", fast_meso4=False))(state, batch)
    np.testing.assert_allclose(fast["score"], plain["score"], atol=1e-5)
    np.testing.assert_allclose(fast["loss"], plain["loss"], atol=1e-5)
    assert not np.allclose(plain["score"], plain["score"][0])  # the images get different scores
