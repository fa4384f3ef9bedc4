"""Training engine: a TrainState, pure jitted train/eval steps, and the epoch loop with orbax checkpoints.

Every global batch is sharded over all devices along the ``data`` mesh axis while the state is
replicated, so BatchNorm statistics and gradients are those of the global batch whatever the device
count (XLA inserts the cross-device reductions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines.faces import FaceDetectorUnavailable
from data_pipelines.preprocessing import as_model_input
from data_pipelines.samples import face_detector
from meso_jax import checkpoints, engine, fast_inference, fast_training, keras_import, metrics, models, onednn
from meso_jax.config import DROPOUT_RATE, SELECTION_RULES, TrainConfig

MIN_FREE_DISK_BYTES = 200 * 1024 * 1024


class TrainingError(Exception):
    """A training run that cannot start or go on (one-line message)."""


class TrainState(train_state.TrainState):
    """params, optimizer state and step (from flax), plus BatchNorm statistics, the dropout key and, with
    weight averaging, ``ema`` = {"params", "batch_stats"}: their exponential moving average (None without)."""

    batch_stats: Any
    rng: jax.Array
    ema: Any = None


# ----------------------------------------------------------------------------------------------
# Pure functions: optimizer, state, loss, steps.


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule named by ``config.schedule``."""
    if config.schedule == "paper":
        return optax.exponential_decay(config.learning_rate, transition_steps=1000, decay_rate=0.1,
                                       staircase=True, end_value=min(1e-6, config.learning_rate))
    if config.schedule == "cosine":
        warmup = min(config.warmup_steps, max(total_steps - 1, 1))
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(total_steps, warmup + 1),
                                                  end_value=config.learning_rate * 1e-3)
    if config.schedule == "constant":
        if config.decay_epochs == 0:
            return optax.constant_schedule(config.learning_rate)
        # Before the decay the rate is exactly the plain constant schedule's, so a constant-rate run's
        # checkpoint from before the boundary resumes into this schedule unchanged.
        decay_steps = total_steps * config.decay_epochs // config.epochs
        return optax.join_schedules(
            [optax.constant_schedule(config.learning_rate),
             optax.cosine_decay_schedule(config.learning_rate, decay_steps, alpha=0.0)],
            boundaries=[total_steps - decay_steps])
    raise ValueError(f"unknown schedule {config.schedule!r}; choose paper, cosine or constant")


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Adam (AdamW when weight decay is set) on the configured schedule."""
    schedule = learning_rate_schedule(config, total_steps)
    if config.weight_decay > 0:
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    return optax.adam(schedule)


def training_module(spec: models.ModelSpec, dropout_rate: float = DROPOUT_RATE) -> nn.Module:
    """The module train steps apply: ``spec.module`` with the head's ``dropout_rate``, and for Meso-4 its
    fused first block where fast_training is enabled and fused later blocks where oneDNN computes the
    convolutions too (same variables and results as ``spec.module``)."""
    module = spec.module.clone(dropout_rate=dropout_rate)
    if isinstance(module, models.Meso4) and fast_training.enabled():
        return module.clone(fused_first_block=True, fused_later_blocks=onednn.enabled())
    return module


def create_train_state(spec: models.ModelSpec, config: TrainConfig, total_steps: int,
                       variables: dict | None = None) -> TrainState:
    """A fresh TrainState, initialised from ``variables`` when given (e.g. imported Keras weights)."""
    variables = variables or models.init_variables(spec, config.seed, config.kernel_init)
    # The average starts at the initial weights, in buffers of its own (train steps donate the state).
    ema = None
    if config.ema_decay > 0:
        ema = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True),
                                     {"params": variables["params"], "batch_stats": variables["batch_stats"]})
    return TrainState.create(
        apply_fn=training_module(spec, config.dropout_rate).apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=make_optimizer(config, total_steps),
        rng=jax.random.PRNGKey(config.seed + 1),
        ema=ema,
    )


def per_example_loss(logits: jax.Array, labels: jax.Array, loss: str) -> jax.Array:
    """Binary cross-entropy on logits, or the paper's squared error on probabilities."""
    if loss == "bce":
        return optax.sigmoid_binary_cross_entropy(logits, labels)
    if loss == "mse":
        return jnp.square(jax.nn.sigmoid(logits) - labels)
    raise ValueError(f"unknown loss {loss!r}; choose bce or mse")


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def ema_decay_at(ema_decay: float, step: jax.Array) -> jax.Array:
    """The averaging decay after ``step`` updates: ``ema_decay``, lowered early on to (1 + step) / (10 + step)
    (tf.train.ExponentialMovingAverage's rule) so the average soon leaves the initial weights behind."""
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict, loss: str = "bce",
               ema_decay: float = 0.0) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch`` = {"image", "label" (1 real), "weight"}; returns (state, metrics).

    Images are uint8 (scaled to [0, 1] here, on the device, by the one scaling rule) or floats in [0, 1].
    With ``state.ema``, the weights' moving average moves towards the new weights by 1 - ema_decay_at()."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, as_model_input(batch["image"]), train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        value = _weighted_mean(per_example_loss(logits, batch["label"], loss), batch["weight"])
        return value, (logits, updates)

    (loss_value, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    if state.ema is not None:
        new_weights = {"params": state.params, "batch_stats": state.batch_stats}
        step_size = 1.0 - ema_decay_at(ema_decay, state.step)
        state = state.replace(ema=optax.incremental_update(new_weights, state.ema, step_size))
    correct = ((logits >= 0) == (batch["label"] >= 0.5)).astype(jnp.float32)
    return state, {"loss": loss_value, "accuracy": jnp.mean(correct)}


def model_variables(state: TrainState) -> dict:
    """The weights a run validates, checkpoints as its model and exports: the moving average when the run
    keeps one, else the trained weights."""
    if state.ema is not None:
        return state.ema
    return {"params": state.params, "batch_stats": state.batch_stats}


def eval_step(state: TrainState, batch: dict, loss: str = "bce", fast_meso4: bool = False) -> dict:
    """Inference-mode probabilities (real) and per-example losses for ``batch`` (images as in train_step),
    from model_variables(state). ``fast_meso4``: compute Meso-4 with fast_inference, the scanner's path
    (the same scores to float32 rounding, ~2.5x faster on a CPU)."""
    if fast_meso4:
        logits = fast_inference.meso4_forward(model_variables(state), batch["image"])
    else:
        logits = state.apply_fn(model_variables(state), as_model_input(batch["image"]), train=False)
    return {"score": jax.nn.sigmoid(logits), "loss": per_example_loss(logits, batch["label"], loss)}


# ----------------------------------------------------------------------------------------------
# Devices and sharding.


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A 1-D ``data`` mesh over every device of every process."""

    mesh: Mesh

    @classmethod
    def create(cls) -> "DataParallel":
        return cls(Mesh(np.asarray(jax.devices()), ("data",)))

    @property
    def device_count(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def check_batch_size(self, global_batch_size: int) -> None:
        """A clear error when the global batch does not split evenly over the devices."""
        if global_batch_size % self.device_count:
            raise TrainingError(f"batch size {global_batch_size} does not divide by the {self.device_count} devices; "
                                f"use a multiple of {self.device_count}")

    def shard_batch(self, local_batch: dict) -> dict:
        """Builds global arrays, split along the batch axis, from this process's part of the batch."""
        return {key: jax.make_array_from_process_local_data(self.batch_sharded, np.asarray(value))
                for key, value in local_batch.items()}

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)


# ----------------------------------------------------------------------------------------------
# Checkpoint trees.


def state_to_tree(state: TrainState) -> dict:
    """The checkpointed part of a TrainState, split into the ``model`` item (model_variables: what loading
    the checkpoint gives) and the ``train`` item (the rest; with weight averaging also the trained weights)."""
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    tree = {"model": model_variables(state),
            "train": {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}}
    if state.ema is not None:
        tree["train"]["weights"] = trained
    return tree


def tree_to_state(state: TrainState, tree: dict) -> TrainState:
    """``state`` with the values of a restored checkpoint tree."""
    train_item = tree["train"]
    if state.ema is not None:
        trained, ema = train_item["weights"], tree["model"]
    else:
        trained, ema = tree["model"], None
    return state.replace(params=trained["params"], batch_stats=trained["batch_stats"], ema=ema,
                         opt_state=train_item["opt_state"], step=train_item["step"], rng=train_item["rng"])


def restore_latest_good(manager, abstract_tree: dict, log: Callable[[str], None],
                        expected_model: str | None = None) -> tuple[dict, dict, int] | None:
    """Restores the newest readable checkpoint, warning about and skipping corrupted newer ones.

    Returns None when ``manager`` holds no checkpoint. Raises TrainingError when a checkpoint is of
    another model than ``expected_model`` (a workdir is never silently reused for another network),
    or when every checkpoint is unreadable (nothing is overwritten: the user decides).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    for step in steps:
        if expected_model is not None:
            try:
                found_model = checkpoints.read_metadata(manager, step).get("model")
            except Exception:  # pylint: disable=broad-except  (unreadable metadata: the restore below reports it)
                found_model = None
            if found_model is not None and found_model != expected_model:
                raise TrainingError(f"--workdir {pathlib.Path(manager.directory).parent} holds checkpoints of "
                                    f"model {found_model}, not --model={expected_model}; use another --workdir")
            mismatch = checkpoints.shape_mismatch(pathlib.Path(manager.directory) / str(step) / "model",
                                                  abstract_tree["model"])
            if mismatch:
                raise TrainingError(f"--workdir {pathlib.Path(manager.directory).parent}: the checkpoint of step {step} "
                                    f"does not fit --model={expected_model} ({mismatch}); use another --workdir")
        try:
            tree, metadata = checkpoints.restore_train_state(manager, step, abstract_tree)
            return tree, metadata, step
        except Exception as error:  # orbax/tensorstore raise many types for a damaged checkpoint
            log(f"warning: checkpoint at step {step} is unreadable ({checkpoints.first_line(error)}); "
                "trying the previous one")
    raise TrainingError(f"no readable checkpoint in {manager.directory} (steps {', '.join(map(str, steps))} are all "
                        "damaged); move that folder away to train from scratch")


def _check_same_averaging(manager, ema_decay: float) -> None:
    """A workdir resumes only with the weight averaging it was trained with (the checkpoints differ in layout)."""
    steps = manager.all_steps()
    if not steps:
        return
    try:
        saved = checkpoints.read_metadata(manager, max(steps)).get("train_config", {}).get("ema_decay", 0.0)
    except Exception:  # pylint: disable=broad-except  (unreadable metadata: the restore reports the checkpoint)
        return
    if saved != ema_decay:
        raise TrainingError(f"--workdir {pathlib.Path(manager.directory).parent} was trained with --ema_decay={saved}, "
                            f"not {ema_decay}; resume with the same setting or use another --workdir")


class TrainingInterrupted(TrainingError):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM (e.g. a cluster's pre-emption); the checkpoints on disk
    are complete. ``exit_code`` is the shell's convention for the signal (128 + its number)."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signal_number)


class _StopSignals:
    """SIGINT and SIGTERM during training: the first one asks the loop to stop after the current step
    (``requested`` holds the signal), so it can save a checkpoint there; a second SIGINT raises
    KeyboardInterrupt at once, except while a checkpoint is written (``saving()``), where it waits until the
    checkpoint is complete. Handlers are installed in the main thread only and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._previous: dict = {}
        self._saving = False
        self._held_interrupt = False

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                try:
                    self._previous[signum] = signal.signal(signum, self._handle)
                except ValueError:  # not the main interpreter
                    break
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.requested is None:
            self.requested = signal.Signals(signum)
        elif signum == signal.SIGINT:
            if self._saving:
                self._held_interrupt = True
            else:
                raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving(self):
        """A checkpoint is being written: a second Ctrl-C waits for it."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._held_interrupt:
            raise KeyboardInterrupt


def stop_requested_everywhere(stop_signals: _StopSignals, step: int, sync_every_steps: int) -> bool:
    """Whether training stops after ``step``. One process: as soon as a signal came. Several (multi-host):
    all agree, every ``sync_every_steps`` steps, and stop together when any of them got a signal, so
    that they save the same step collectively."""
    if jax.process_count() == 1:
        return stop_signals.requested is not None
    if step % sync_every_steps:
        return False
    flags = multihost_utils.process_allgather(np.int32(stop_signals.requested is not None))
    return bool(np.any(flags))


def _release(iterator: Any) -> None:
    """Closes an input iterator (a generator's close(); a tf.data iterator frees its resources when unreferenced)."""
    close = getattr(iterator, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # pylint: disable=broad-except  (best effort while already failing)
            pass


def _metrics_records(path: pathlib.Path) -> list[tuple[str, dict]]:
    """(line, record) of every complete line of metrics.jsonl (a line cut short by a crash is left out)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append((line, json.loads(line)))
        except ValueError:
            continue
    return records


def _logged_steps(path: pathlib.Path) -> set[int]:
    """The steps of the epoch records in metrics.jsonl."""
    return {record.get("step") for _, record in _metrics_records(path)}


def _trim_metrics_log(path: pathlib.Path, last_step: int) -> None:
    """Drops metrics.jsonl records written after ``last_step`` (an epoch redone after a crash is logged once)."""
    if path.is_file():
        path.write_text("".join(line + "\n" for line, record in _metrics_records(path)
                                if record.get("step", 0) <= last_step))


# ----------------------------------------------------------------------------------------------
# The loop.


def _check_writable_dir(directory: pathlib.Path, flag: str) -> None:
    """Creates ``directory`` and proves a file can be written there (TrainingError otherwise)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"{flag} {directory} is not writable: {error.strerror or error}") from None


def check_workdir(workdir: pathlib.Path, flag: str = "--workdir") -> None:
    """Fails before any work when the workdir cannot be written or its disk is nearly full."""
    workdir = pathlib.Path(workdir)
    _check_writable_dir(workdir, flag)
    free = shutil.disk_usage(workdir).free
    if free < MIN_FREE_DISK_BYTES:
        raise TrainingError(f"{flag} {workdir}: only {free // 2**20} MiB free on its disk; "
                            f"need at least {MIN_FREE_DISK_BYTES // 2**20} MiB for checkpoints")


class _EventLog:
    """metrics.jsonl plus TensorBoard events in the workdir, written by process 0 only."""

    def __init__(self, workdir: pathlib.Path):
        self.enabled = jax.process_index() == 0
        self.jsonl_path = workdir / "metrics.jsonl"
        self._summary_writer = None
        if self.enabled:
            try:
                import tensorflow as tf  # tf.summary only; JAX owns the accelerators
            except ImportError:
                logging.warning("TensorFlow is not installed: no TensorBoard events, metrics go to %s only",
                                self.jsonl_path)
                return
            tf.config.set_visible_devices([], "GPU")
            self._tf = tf
            self._summary_writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        with self.jsonl_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._summary_writer is None:
            return
        with self._summary_writer.as_default(step=step):
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
                    self._tf.summary.scalar(key, value)
        self._summary_writer.flush()


def _path_text(path: bytes | str) -> str:
    """A batch's "path" entry as text (tf.data yields bytes, the in-memory pipeline strings)."""
    return path.decode() if isinstance(path, bytes) else str(path)


def _video_ids(paths: Iterable[str]) -> np.ndarray:
    """int32 (N, 2): a 62-bit hash of each path, so that frames of one video can be grouped after they
    were gathered from several processes (strings cannot be)."""
    ids = [int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little") >> 2 for path in paths]
    return np.array([[value >> 31, value & 0x7FFFFFFF] for value in ids], np.int32).reshape(-1, 2)


def evaluate(state: TrainState, batches: Iterable[dict], parallel: DataParallel, batch_size: int,
             jitted_eval_step: Callable, input_shape: tuple[int, ...], video_level: bool = False,
             source_of_path: dict[str, str] | None = None, select_by: str = "worst") -> dict:
    """Validation loss and metrics over ``batches``: this process's part of the split, in batches of at most
    ``batch_size`` / processes of uint8 images of ``input_shape`` (as the input pipelines yield them), each
    padded to that size (padding rows are left out of the metrics).

    With several processes (multi-host), all of them run the same number of steps (one that has run out
    feeds padding) and every example's result is gathered from all of them.

    ``source_of_path`` (validation path -> source name) adds each source's metrics (``val_<name>_auc``...);
    ``val_selection`` is what the best checkpoint is chosen by (higher is better; see selection_metrics).
    """
    source_names = sorted(set((source_of_path or {}).values()))
    source_index = {name: index for index, name in enumerate(source_names)}
    processes = jax.process_count()
    local_batch_size = batch_size // processes
    iterator = iter(batches)
    columns: dict[str, list[np.ndarray]] = {"score": [], "loss": [], "label": [], "valid": [], "video": [],
                                            "source": []}
    while True:
        batch = next(iterator, None)
        count = 0 if batch is None else len(batch["label"])
        if processes > 1:
            if not np.any(multihost_utils.process_allgather(np.int32(count))):
                break
        elif batch is None:
            break
        if count and np.asarray(batch["image"]).dtype != np.uint8:
            raise ValueError(f"evaluate() takes uint8 images, got {np.asarray(batch['image']).dtype}")
        local = {"image": np.zeros((local_batch_size, *input_shape), np.uint8),
                 "label": np.zeros(local_batch_size, np.float32), "valid": np.zeros(local_batch_size, np.int32),
                 "video": np.zeros((local_batch_size, 2), np.int32), "source": np.zeros(local_batch_size, np.int32)}
        if count:
            local["image"][:count] = batch["image"]
            local["label"][:count] = batch["label"]
            local["valid"][:count] = 1
            if len(source_names) > 1:
                local["source"][:count] = [source_index[source_of_path[_path_text(p)]]
                                           for p in np.asarray(batch["path"])]
            if video_level and "path" in batch:
                local["video"][:count] = _video_ids(_path_text(p) for p in np.asarray(batch["path"]))
        sharded = parallel.shard_batch(local)
        output = jitted_eval_step(state, {"image": sharded["image"], "label": sharded["label"]})
        fetched = {**output, **{key: sharded[key] for key in ("label", "valid", "video", "source")}}
        fetched = (multihost_utils.process_allgather(fetched, tiled=True) if processes > 1
                   else jax.device_get(fetched))
        for key in columns:
            columns[key].append(np.asarray(fetched[key]))
    if not columns["valid"] or not np.concatenate(columns["valid"]).any():
        raise TrainingError("the validation split is empty")
    valid = np.concatenate(columns["valid"]).astype(bool)
    scores_all = np.concatenate(columns["score"])[valid].astype(np.float64)
    labels_all = np.concatenate(columns["label"])[valid].round().astype(np.int64)
    losses_all = np.concatenate(columns["loss"])[valid]
    sources_all = np.concatenate(columns["source"])[valid]
    result = {"val_loss": float(np.mean(losses_all))}
    result.update({f"val_{k}": v for k, v in metrics.binary_metrics(labels_all, scores_all).items()
                   if k in ("auc", "accuracy", "balanced_accuracy", "eer", "average_precision")})
    if len(source_names) > 1:
        for index, name in enumerate(source_names):
            mine = sources_all == index
            if not mine.any():
                continue
            result[f"val_{name}_loss"] = float(np.mean(losses_all[mine]))
            result.update({f"val_{name}_{k}": v for k, v in metrics.binary_metrics(labels_all[mine],
                                                                                  scores_all[mine]).items()
                           if k in ("auc", "balanced_accuracy", "eer")})
    result.update(selection_metrics(result, source_names, select_by))
    if video_level:
        per_video: dict[tuple[int, int], list[float]] = {}
        video_labels: dict[tuple[int, int], int] = {}
        for video, score, label in zip(map(tuple, np.concatenate(columns["video"])[valid]), scores_all, labels_all):
            per_video.setdefault(video, []).append(float(score))
            video_labels[video] = int(label)
        video_metrics = metrics.binary_metrics([video_labels[v] for v in per_video],
                                               [float(np.mean(s)) for s in per_video.values()])
        result["val_video_auc"] = video_metrics["auc"]
    return result


def selection_metrics(result: dict, source_names: list[str], select_by: str) -> dict:
    """``val_selection``, the number the best checkpoint is chosen by (higher is better), and its rule:
    with several sources the worst (or mean) per-source AUC, never the pooled one, which hides a small
    source; with one, the AUC; where an AUC is undefined (a validation split with one class) minus the
    validation loss."""
    if select_by not in SELECTION_RULES:
        raise ValueError(f"unknown select_by {select_by!r}; choose {' or '.join(SELECTION_RULES)}")
    if len(source_names) > 1:
        aucs = [result.get(f"val_{name}_auc") for name in source_names]
        if all(auc is not None for auc in aucs):
            value = min(aucs) if select_by == "worst" else float(np.mean(aucs))
            return {"val_selection": float(value), "val_selection_rule": f"{select_by} source AUC"}
    elif result.get("val_auc") is not None:
        return {"val_selection": float(result["val_auc"]), "val_selection_rule": "AUC"}
    return {"val_selection": -float(result["val_loss"]), "val_selection_rule": "minus loss (AUC undefined)"}


def _log_to_stdout(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def fit(config: TrainConfig, workdir: str | os.PathLike, steps_per_epoch: int, run_metadata: dict,
        epoch_batches: Callable[[int, int], Iterator[dict]], val_batches: Callable[[], Iterator[dict]],
        log: Callable[[str], None] = _log_to_stdout, source_of_path: dict[str, str] | None = None) -> dict:
    """Trains ``config.model`` for ``config.epochs`` epochs, checkpointing into ``workdir``.

    ``epoch_batches(epoch, skip_steps)`` yields that epoch's training batches (numpy dicts) in a
    deterministic order, skipping the first ``skip_steps`` (used on resume); ``val_batches()``
    yields the validation batches. ``run_metadata`` (preprocessing, data description) is saved
    with each checkpoint. ``source_of_path`` names each validation file's source, for per-source metrics.
    Returns the last epoch's metrics.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = models.get_model(config.model)
    parallel = DataParallel.create()
    parallel.check_batch_size(config.batch_size)
    log(f"devices: {parallel.device_count} ({jax.devices()[0].platform}), hosts: {jax.process_count()}; "
        f"engine {engine.describe()}")

    if steps_per_epoch < 1:
        raise TrainingError(f"the training split has fewer examples than one batch of {config.batch_size}")
    total_steps = steps_per_epoch * config.epochs

    initial_variables = None
    if config.keras_weights:
        try:
            keras_model, initial_variables = keras_import.load_keras_weights(config.keras_weights)
        except keras_import.KerasWeightsError as error:
            raise TrainingError(f"--keras_weights: {error}") from None
        if keras_model != config.model:
            raise TrainingError(f"--keras_weights {config.keras_weights} holds {keras_model}, but --model={config.model}")
        log(f"initialised from Keras weights {config.keras_weights}")
    if config.init_checkpoint:
        start = checkpoints.load_model(config.init_checkpoint)
        if start.model_name != config.model:
            raise TrainingError(f"--init_checkpoint {config.init_checkpoint} holds {start.model_name}, "
                                f"but --model={config.model}")
        initial_variables = start.variables
        log(f"initialised from {start.source}")
    state = create_train_state(spec, config, total_steps, initial_variables)
    manager = checkpoints.open_manager(workdir / checkpoints.WORKDIR_CHECKPOINTS, keep_last=config.keep_checkpoints)
    try:
        return _fit_loop(config, workdir, steps_per_epoch, total_steps, run_metadata, epoch_batches, val_batches,
                         log, parallel, state, manager, source_of_path)
    finally:
        manager.close()


def _fit_loop(config: TrainConfig, workdir: pathlib.Path, steps_per_epoch: int, total_steps: int,
              run_metadata: dict, epoch_batches: Callable[[int, int], Iterator[dict]],
              val_batches: Callable[[], Iterator[dict]], log: Callable[[str], None],
              parallel: DataParallel, state: TrainState, manager, source_of_path: dict[str, str] | None) -> dict:
    abstract_tree = jax.tree_util.tree_map(np.asarray, state_to_tree(state))
    _check_same_averaging(manager, config.ema_decay)
    restored = restore_latest_good(manager, abstract_tree, log, expected_model=config.model)
    events = _EventLog(workdir)
    if restored is not None:
        tree, restored_metadata, restored_step = restored  # restore_latest_good checked the model name
        state = tree_to_state(state, tree)
        if events.enabled:
            _trim_metrics_log(events.jsonl_path, restored_step)
            # A kill between an epoch's checkpoint and its log line: the checkpoint holds the epoch's metrics.
            epoch_metrics = restored_metadata.get("metrics") or {}
            if epoch_metrics.get("step") == restored_step and not _logged_steps(events.jsonl_path) & {restored_step}:
                events.write(restored_step, epoch_metrics)
        log(f"resumed from step {restored_step}")
    state = parallel.replicate(state)
    metadata_base = checkpoints.model_metadata(config.model, run_metadata.get("preprocessing", {}), {
        "train_config": dataclasses.asdict(config), **run_metadata, "steps_per_epoch": steps_per_epoch,
        "library_versions": library_versions()})

    jitted_train_step = jax.jit(lambda s, b: train_step(s, b, config.loss, config.ema_decay), donate_argnums=0)
    # Meso-4 is validated as the scanner scores it (fast_inference), the others with their module.
    fast_meso4 = fast_inference.enabled() and fast_inference.supports(config.model,
                                                                      models.get_model(config.model).input_shape)
    jitted_eval_step = jax.jit(lambda s, b: eval_step(s, b, config.loss, fast_meso4))
    video_level = run_metadata.get("dataset") == "video"

    def save(step: int, epoch_metrics: dict | None) -> None:
        metadata = dict(metadata_base, step=step, metrics=epoch_metrics or {})
        tree = jax.device_get(state_to_tree(state))
        if not checkpoints.all_finite(tree["model"]):
            # The loss of the last step was finite, but its update was not: never save a broken model.
            raise TrainingError(f"the model's parameters became non-finite at step {step}; stopped; {last_saved()}")
        try:
            with stop_signals.saving():  # a Ctrl-C now would leave only a temporary folder; waiting costs < 1 s
                checkpoints.save_train_state(manager, step, tree, metadata, metrics=epoch_metrics)
        except (OSError, ValueError, RuntimeError) as error:  # disk full, folder removed...: orbax/tensorstore
            raise TrainingError(f"cannot save the checkpoint of step {step} in {manager.directory} "
                                f"({checkpoints.first_line(error)}); {last_saved()}") from None

    def last_saved() -> str:
        steps = manager.all_steps()
        return (f"the last good checkpoint (step {max(steps)}) is kept in {manager.directory}" if steps
                else "no checkpoint had been saved yet")

    step = int(jax.device_get(state.step))
    last_metrics: dict = {}
    start_epoch = step // steps_per_epoch
    if start_epoch >= config.epochs:
        log(f"nothing to do: {workdir} already holds {start_epoch} epochs (--epochs={config.epochs})")
    stop_signals = _StopSignals()
    warned_selection = False

    def stop_if_requested(saved: bool) -> None:
        if not stop_requested_everywhere(stop_signals, step, config.log_every_steps):
            return
        if not saved:
            save(step, None)
            manager.wait_until_finished()
        cause = stop_signals.requested or signal.SIGTERM
        by = cause.name if stop_signals.requested else "a signal to another process"
        raise TrainingInterrupted(f"stopped by {by} at step {step}; checkpoint of step {step} saved in "
                                  f"{manager.directory}; run the same command again to resume", cause)

    try:
        with stop_signals:
            for epoch in range(start_epoch, config.epochs):
                skip = step - epoch * steps_per_epoch
                started = time.time()
                loss_sum, accuracy_sum, counted = 0.0, 0.0, 0
                progress = _progress(config, steps_per_epoch, skip, f"epoch {epoch + 1}/{config.epochs}")
                pending: list[dict] = []
                batches = epoch_batches(epoch, skip)
                try:
                    for batch in batches:
                        state, step_metrics = jitted_train_step(state, parallel.shard_batch(
                            {key: batch[key] for key in ("image", "label", "weight")}))
                        pending.append(step_metrics)
                        step += 1
                        if progress is not None:
                            progress.update(1)
                        if (step % config.log_every_steps == 0 or step % steps_per_epoch == 0
                                or step % config.checkpoint_every_steps == 0):
                            values = jax.device_get(pending)
                            pending = []
                            losses = np.array([v["loss"] for v in values])
                            if not np.all(np.isfinite(losses)):
                                first_bad = int(np.argmin(np.isfinite(losses)))
                                raise TrainingError(f"loss became {losses[first_bad]} at step "
                                                    f"{step - len(losses) + first_bad + 1}; stopped; {last_saved()}")
                            loss_sum += float(losses.sum())
                            accuracy_sum += float(sum(v["accuracy"] for v in values))
                            counted += len(values)
                            if progress is not None:
                                progress.set_postfix(loss=f"{loss_sum / counted:.4f}", acc=f"{accuracy_sum / counted:.3f}")
                        if step % steps_per_epoch:  # the epoch's last step is saved after validation
                            checkpoint_due = step % config.checkpoint_every_steps == 0
                            if checkpoint_due:
                                save(step, None)
                            stop_if_requested(saved=checkpoint_due)
                finally:
                    # The epoch's input iterator (tf.data: threads and C++ resources) must not outlive the epoch,
                    # also on an error or Ctrl-C: one left alive at interpreter exit can hang or abort TensorFlow.
                    _release(batches)
                    del batches
                    if progress is not None:
                        progress.close()
                train_seconds = time.time() - started
                trained_steps = step - epoch * steps_per_epoch - skip
                epoch_metrics = {
                    "epoch": epoch + 1, "step": step,
                    "train_loss": loss_sum / max(counted, 1), "train_accuracy": accuracy_sum / max(counted, 1),
                    "learning_rate": float(learning_rate_schedule(config, total_steps)(step)),
                    "train_images_per_second": trained_steps * config.batch_size / max(train_seconds, 1e-9),
                }
                # With weight averaging the average is validated (val_*) and, for comparison, the trained
                # weights too (raw_val_*).
                states_by_prefix = {"": state}
                if state.ema is not None:
                    states_by_prefix["raw_"] = state.replace(ema=None)
                for prefix, evaluated in states_by_prefix.items():
                    validation = val_batches()
                    try:
                        result = evaluate(evaluated, validation, parallel, config.batch_size, jitted_eval_step,
                                          models.get_model(config.model).input_shape, video_level,
                                          source_of_path, config.select_by)
                    finally:
                        _release(validation)
                        del validation
                    epoch_metrics.update({prefix + key: value for key, value in result.items()})
                if epoch_metrics["val_selection_rule"].startswith("minus loss") and not warned_selection:
                    log("warning: a validation AUC is undefined (a split or source with one class); "
                        "the best checkpoint is chosen by validation loss")
                    warned_selection = True
                epoch_metrics["seconds"] = time.time() - started
                save(step, epoch_metrics)
                events.write(step, epoch_metrics)
                log(format_epoch(epoch_metrics))
                last_metrics = epoch_metrics
                stop_if_requested(saved=True)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted at step {step}; {last_saved()}; "
                                  "run the same command again to resume") from None
    manager.wait_until_finished()
    return last_metrics


def _progress(config: TrainConfig, total: int, initial: int, description: str):
    if not config.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True)


def format_epoch(epoch_metrics: dict) -> str:
    """One log line for an epoch's metrics."""
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_video_auc", "val_eer",
            "raw_val_auc")
    keys += tuple(sorted(k for k in epoch_metrics if k.startswith("val_") and k.endswith("_auc") and k not in keys))
    keys += ("val_selection",)
    parts = [f"{k}={epoch_metrics[k]:.4f}" for k in keys if isinstance(epoch_metrics.get(k), float)]
    return (f"epoch {epoch_metrics['epoch']} step {epoch_metrics['step']}: " + " ".join(parts)
            + f" ({epoch_metrics['train_images_per_second']:.0f} img/s, {epoch_metrics['seconds']:.0f} s)")


def library_versions() -> dict:
    """Versions of the libraries that define a checkpoint's numbers."""
    import cv2
    import optax as optax_module
    import orbax.checkpoint as ocp
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax_module.__version__,
            "orbax-checkpoint": ocp.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Starts multi-host JAX when asked (flags, or the TPU/SLURM environment with no flags)."""
    if coordinator_address or num_processes:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif any(name in os.environ for name in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")) \
            and os.environ.get("SLURM_NTASKS", "2") != "1":
        jax.distributed.initialize()


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | None,
                       export_dir: str | os.PathLike | None = None, log: Callable[[str], None] = _log_to_stdout) -> dict:
    """Trains on ``config.data_dir`` (see data_pipelines.input_pipeline) and optionally exports the best model.

    With ``config.epochs == 0`` and Keras weights, only converts those weights to ``export_dir``.
    """
    from data_pipelines.preprocessing import Preprocessing
    from data_pipelines.sources import parse_data_sources

    if config.epochs == 0 and export_dir:
        if not config.keras_weights:
            raise TrainingError("--epochs=0 exports only with --keras_weights (nothing was trained)")
        name = keras_import.convert_keras_weights(config.keras_weights, export_dir)
        log(f"exported {name} from {config.keras_weights} to {export_dir}")
        return {}

    workdir = pathlib.Path(workdir)
    check_workdir(workdir)
    if export_dir:  # an existing or unwritable export place must fail now, not after the training
        try:
            checkpoints.check_new_directory(export_dir)
        except checkpoints.CheckpointError as error:
            raise TrainingError(f"--export_checkpoint {error}") from None
        _check_writable_dir(pathlib.Path(export_dir), "--export_checkpoint")
    spec = models.get_model(config.model)
    prep = Preprocessing.from_dict(config.preprocessing)
    data_sources = parse_data_sources(config.data_dir)
    processes = jax.process_count()
    if config.batch_size % processes:
        raise TrainingError(f"batch size {config.batch_size} does not divide by the {processes} hosts")
    try:
        face_detector(prep.face_detector)  # made now: a detector missing here is one error, not one per file
    except FaceDetectorUnavailable as error:
        raise TrainingError(str(error)) from None
    local_batch_size = config.batch_size // processes
    if config.input_pipeline == "memory":
        from data_pipelines import in_memory  # needs no TensorFlow

        if spec.is_clip_model:
            raise TrainingError(f"--input_pipeline=memory takes images; {spec.name} trains on video clips")
        data = in_memory.create_datasets(
            data_sources, config.dataset, prep, local_batch_size, config.seed, val_fraction=config.val_fraction,
            augment=config.augment, synthesize_fakes=config.synthesize_fakes, num_shards=processes,
            shard_index=jax.process_index(), paired=config.paired_batches)
        if config.teacher:
            data.soften_targets(_teacher_probabilities(config.teacher, data, prep, log), config.teacher_weight)
        epoch_batches, val_batches = data.train_batches, data.val_batches
    else:
        from data_pipelines import input_pipeline

        data = input_pipeline.create_datasets(
            data_sources, config.dataset, prep, local_batch_size, config.seed,
            val_fraction=config.val_fraction, augment=config.augment,
            cache_dir=config.cache_dir or str(workdir / "face_cache"), synthesize_fakes=config.synthesize_fakes,
            clip_frames=spec.input_shape[0] if spec.is_clip_model else None,
            num_shards=processes, shard_index=jax.process_index(), paired=config.paired_batches)

        def epoch_batches(epoch: int, skip_steps: int) -> Iterator[dict]:
            return input_pipeline.train_dataset_for_epoch(data, epoch).skip(skip_steps).as_numpy_iterator()

        def val_batches() -> Iterator[dict]:
            return data.val.as_numpy_iterator()
    if data.val_count == 0:
        raise TrainingError(f"no usable validation samples in {config.data_dir} ({len(data.skipped)} files skipped); "
                            "put real and fake files in its val/ folder, or leave val/ out and let --val_fraction "
                            "split them off the training files")
    log(f"data: {data.train_count} training and {data.val_count} validation examples; "
        f"classes {data.class_counts}; {len(data.skipped)} files skipped")
    if data.skipped and jax.process_index() == 0:
        skipped_path = workdir / "skipped_files.tsv"
        skipped_path.write_text("".join(f"{path}\t{reason}\n" for path, reason in data.skipped))
        log(f"the skipped files and why are listed in {skipped_path}")

    if len(data_sources) > 1:
        log("sources (share of every batch): " + ", ".join(
            f"{s.name} {s.weight / sum(t.weight for t in data_sources):.2f} ({s.path})" for s in data_sources)
            + f"; best checkpoint by the {config.select_by} source validation AUC")
    run_metadata = {
        "preprocessing": prep.to_dict(), "dataset": config.dataset,
        "data": {"data_dir": ",".join(f"{s.name}={os.path.abspath(s.path)}:{s.weight:g}" for s in data_sources)
                 if len(data_sources) > 1 else os.path.abspath(data_sources[0].path),
                 "sources": [dataclasses.asdict(s) for s in data_sources], "train_count": data.train_count,
                 "val_count": data.val_count, "class_counts": data.class_counts,
                 "skipped_count": len(data.skipped)},
    }
    result = fit(config, workdir, data.steps_per_epoch, run_metadata, epoch_batches, val_batches, log,
                 source_of_path=data.val_source_names)
    if export_dir and jax.process_index() == 0:
        export_best(workdir, export_dir, log, calibration_batches=val_batches, source_of_path=data.val_source_names)
    return result


def _teacher_probabilities(teacher_dir: str, data: Any, prep: Any, log: Callable[[str], None]) -> np.ndarray:
    """The teacher's probability real for every training image of ``data`` (in_memory.InMemoryData),
    unaugmented, scored once; ``prep`` is the training data's Preprocessing."""
    from meso_jax import scoring  # pylint: disable=import-outside-toplevel  (only for distillation)

    teacher = checkpoints.load_model(teacher_dir)
    for setting in ("image_size", "resize"):
        if teacher.preprocessing.get(setting) != getattr(prep, setting):
            raise TrainingError(f"--teacher {teacher_dir} takes {setting}={teacher.preprocessing.get(setting)}, "
                                f"the training data {setting}={getattr(prep, setting)}")
    images_bhwc = data.train_images()
    log(f"teacher {teacher.source} ({teacher.model_name}): scoring the {len(images_bhwc)} training images once")
    started = time.time()
    probabilities = scoring.Scorer(teacher, batch_size=64).score(images_bhwc)
    log(f"teacher: done in {time.time() - started:.0f} s")
    return probabilities.astype(np.float32)


def export_best(workdir: str | os.PathLike, export_dir: str | os.PathLike,
                log: Callable[[str], None] = _log_to_stdout,
                calibration_batches: Callable[[], Iterable[dict]] | None = None,
                source_of_path: dict[str, str] | None = None) -> None:
    """Exports the best checkpoint of a training workdir as a model directory for prediction, with the
    preprocessing it scans with (checkpoints.scan_preprocessing: Haar faces for a model trained on
    pre-cropped face images) and, given ``calibration_batches`` (the validation batches), the verdict
    threshold chosen on them (calibration.calibrate)."""
    best = checkpoints.load_model(workdir)
    extra = {k: v for k, v in best.metadata.items()
             if k not in ("model", "input_shape", "preprocessing", "label_convention")}
    if best.preprocessing != best.metadata.get("preprocessing"):
        extra["trained_on"] = "pre-cropped face images (face_detector=none); scans find faces with blazeface"
    if calibration_batches is not None:
        from meso_jax import calibration  # pylint: disable=import-outside-toplevel  (only when exporting)

        batches = calibration_batches()
        names = source_of_path or {}
        try:
            extra.update(calibration.calibrate(best, (
                {**batch, "source": [names.get(_path_text(p), "") for p in batch["path"]]} for batch in batches)))
        finally:
            _release(batches)
        log(f"verdict threshold {extra['threshold']:.4f} ({extra['threshold_rule']})")
    checkpoints.save_model(export_dir, best.model_name, best.variables, best.preprocessing, extra)
    log(f"exported {best.source} to {export_dir}")
