"""The epoch loop: steps, validation, checkpoints, logs, and stopping cleanly at any moment."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import sys
import time
from typing import Callable, Iterator

import flax
import jax
import numpy as np

from meso_jax import checkpoints, engine, keras_import, models
from meso_jax.cpu import fast_inference
from meso_jax.config import TrainConfig
from meso_jax.run_control import (EventLog, StopSignals, TrainingInterrupted, check_same_averaging, logged_steps,
                                  release_iterator, restore_latest_good, stop_requested_everywhere, trim_metrics_log)
from meso_jax.train import (DataParallel, TrainState, TrainingError, create_train_state, eval_step,
                            learning_rate_schedule, state_to_tree, train_step, tree_to_state)
from meso_jax.validation import evaluate, format_epoch


def log_to_stdout(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def fit(config: TrainConfig, workdir: str | os.PathLike, steps_per_epoch: int, run_metadata: dict,
        epoch_batches: Callable[[int, int], Iterator[dict]], val_batches: Callable[[], Iterator[dict]],
        log: Callable[[str], None] = log_to_stdout, source_of_path: dict[str, str] | None = None) -> dict:
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
    check_same_averaging(manager, config.ema_decay)
    restored = restore_latest_good(manager, abstract_tree, log, expected_model=config.model)
    events = EventLog(workdir)
    if restored is not None:
        tree, restored_metadata, restored_step = restored  # restore_latest_good checked the model name
        state = tree_to_state(state, tree)
        if events.enabled:
            trim_metrics_log(events.jsonl_path, restored_step)
            # A kill between an epoch's checkpoint and its log line: the checkpoint holds the epoch's metrics.
            epoch_metrics = restored_metadata.get("metrics") or {}
            if epoch_metrics.get("step") == restored_step and not logged_steps(events.jsonl_path) & {restored_step}:
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
    stop_signals = StopSignals()
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
                    release_iterator(batches)
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
                        release_iterator(validation)
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

def library_versions() -> dict:
    """Versions of the libraries that define a checkpoint's numbers."""
    import cv2
    import optax as optax_module
    import orbax.checkpoint as ocp
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax_module.__version__,
            "orbax-checkpoint": ocp.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}
