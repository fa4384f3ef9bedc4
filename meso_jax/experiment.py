"""A whole training run from a configuration: data, model start, the loop, the export of the best checkpoint."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from data_pipelines.faces import FaceDetectorUnavailable
from data_pipelines.samples import face_detector
from meso_jax import checkpoints, keras_import, models
from meso_jax.config import TrainConfig
from meso_jax.run_control import check_workdir, check_writable_dir, release_iterator
from meso_jax.train import TrainingError
from meso_jax.training_loop import fit, log_to_stdout
from meso_jax.validation import path_text


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Starts multi-host JAX when asked (flags, or the TPU/SLURM environment with no flags)."""
    if coordinator_address or num_processes:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif any(name in os.environ for name in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")) \
            and os.environ.get("SLURM_NTASKS", "2") != "1":
        jax.distributed.initialize()


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | None,
                       export_dir: str | os.PathLike | None = None, log: Callable[[str], None] = log_to_stdout) -> dict:
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
        check_writable_dir(pathlib.Path(export_dir), "--export_checkpoint")
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
                log: Callable[[str], None] = log_to_stdout,
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
                {**batch, "source": [names.get(path_text(p), "") for p in batch["path"]]} for batch in batches)))
        finally:
            release_iterator(batches)
        log(f"verdict threshold {extra['threshold']:.4f} ({extra['threshold_rule']})")
    checkpoints.save_model(export_dir, best.model_name, best.variables, best.preprocessing, extra)
    log(f"exported {best.source} to {export_dir}")
