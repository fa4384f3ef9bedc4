"""Keeping a training run safe to stop and resume: the last good checkpoint, signals, the workdir, the metrics log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from meso_jax import checkpoints
from meso_jax.train import TrainingError


MIN_FREE_DISK_BYTES = 200 * 1024 * 1024


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


def check_same_averaging(manager, ema_decay: float) -> None:
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


class StopSignals:
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

    def __enter__(self) -> "StopSignals":
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


def stop_requested_everywhere(stop_signals: StopSignals, step: int, sync_every_steps: int) -> bool:
    """Whether training stops after ``step``. One process: as soon as a signal came. Several (multi-host):
    all agree, every ``sync_every_steps`` steps, and stop together when any of them got a signal, so
    that they save the same step collectively."""
    if jax.process_count() == 1:
        return stop_signals.requested is not None
    if step % sync_every_steps:
        return False
    flags = multihost_utils.process_allgather(np.int32(stop_signals.requested is not None))
    return bool(np.any(flags))


def release_iterator(iterator: Any) -> None:
    """Closes an input iterator (a generator's close(); a tf.data iterator frees its resources when unreferenced)."""
    close = getattr(iterator, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # pylint: disable=broad-except  (best effort while already failing)
            pass


def metrics_records(path: pathlib.Path) -> list[tuple[str, dict]]:
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


def logged_steps(path: pathlib.Path) -> set[int]:
    """The steps of the epoch records in metrics.jsonl."""
    return {record.get("step") for _, record in metrics_records(path)}


def trim_metrics_log(path: pathlib.Path, last_step: int) -> None:
    """Drops metrics.jsonl records written after ``last_step`` (an epoch redone after a crash is logged once)."""
    if path.is_file():
        path.write_text("".join(line + "\n" for line, record in metrics_records(path)
                                if record.get("step", 0) <= last_step))


# ----------------------------------------------------------------------------------------------
# The loop.


def check_writable_dir(directory: pathlib.Path, flag: str) -> None:
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
    check_writable_dir(workdir, flag)
    free = shutil.disk_usage(workdir).free
    if free < MIN_FREE_DISK_BYTES:
        raise TrainingError(f"{flag} {workdir}: only {free // 2**20} MiB free on its disk; "
                            f"need at least {MIN_FREE_DISK_BYTES // 2**20} MiB for checkpoints")


class EventLog:
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
