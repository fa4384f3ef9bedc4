"""Ensembles of exported image models: one checkpoint whose logit is the mean of its members' logits.

The members are loaded from their own checkpoints, must scan with the same preprocessing, and are
stored side by side (``member_<i>``) in an ordinary exported checkpoint of the model
``ensemble:<name>,<name>,...``, so predict_main and eval_main use it like any other model. The
metadata keeps each member's source, training flags and metrics, and, when a validation folder of
face crops is given, the ensemble's own validation metrics measured on it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

from data_pipelines.preprocessing import Preprocessing
from meso_jax import checkpoints, models

MEMBER_METADATA_KEYS = ("model", "train_config", "data", "metrics", "library_versions", "step")


class EnsembleError(Exception):
    """Members that cannot form an ensemble (one-line message)."""


def combine(members: Sequence[checkpoints.LoadedModel]) -> checkpoints.LoadedModel:
    """The ensemble of loaded image models that share their preprocessing."""
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 members, got {len(members)}")
    first = members[0]
    for member in members[1:]:
        if member.preprocessing != first.preprocessing:
            raise EnsembleError(f"{member.source} scans with {member.preprocessing}, {first.source} with "
                                f"{first.preprocessing}; members must share their preprocessing")
        if member.metadata.get("dataset") != first.metadata.get("dataset"):
            raise EnsembleError(f"{member.source} was trained on {member.metadata.get('dataset')!r} data, "
                                f"{first.source} on {first.metadata.get('dataset')!r}")
    try:
        name = models.get_model(models.ensemble_name([member.model_name for member in members])).name
    except ValueError as error:
        raise EnsembleError(str(error)) from None
    variables = {collection: {f"member_{index}": member.variables[collection] for index, member in enumerate(members)}
                 for collection in ("params", "batch_stats")}
    metadata = {
        "dataset": first.metadata.get("dataset"),
        "trained_on": first.metadata.get("trained_on"),
        "members": [{"source": member.source, **{key: member.metadata[key] for key in MEMBER_METADATA_KEYS
                                                  if key in member.metadata}} for member in members],
    }
    return checkpoints.LoadedModel(name, variables, dict(first.preprocessing), metadata,
                                   source=f"ensemble of {len(members)}")


def validation_metrics(ensemble: checkpoints.LoadedModel, val_dir: str, batch_size: int = 32) -> dict:
    """``val_*`` metrics of ``ensemble`` on a folder of face crops (real/ and fake/), scored as
    eval_main --face_detector=none --noflip_average does (each face alone, as training's validation
    scores it, so the metadata of ensembles and of trained models compare)."""
    # pylint: disable=import-outside-toplevel  (scanning pulls in OpenCV and the video readers)
    from meso_jax import evaluate, scan, scoring

    files = evaluate.labelled_media(val_dir)
    prep = Preprocessing.from_dict({**ensemble.preprocessing, "face_detector": "none"})
    scorer = scoring.Scorer(ensemble, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as report_dir:
        report = evaluate.evaluate(val_dir, files, scorer, prep, scan.ScanOptions(), report_dir)
    frame_level = report["frame_level"]
    return {f"val_{key}": frame_level[key]
            for key in ("auc", "eer", "accuracy", "balanced_accuracy", "average_precision",
                        "best_balanced_accuracy", "best_balanced_accuracy_threshold")} | {
        "val_count": report["counts"]["scored_files"], "val_dir": os.path.abspath(val_dir)}


def export(member_dirs: Sequence[str], output_dir: str, val_dir: str | None = None) -> checkpoints.LoadedModel:
    """Loads the members, combines them, measures them on ``val_dir`` if given (a folder, or named folders
    ``name=folder,...``: metrics of the first, the verdict threshold on all, see calibration), and exports
    the ensemble to the new directory ``output_dir``. Raises EnsembleError or checkpoints.CheckpointError."""
    from data_pipelines.sources import parse_data_sources  # pylint: disable=import-outside-toplevel
    from meso_jax import calibration  # pylint: disable=import-outside-toplevel

    checkpoints.check_new_directory(output_dir)  # before the slow work
    ensemble = combine([checkpoints.load_model(member_dir) for member_dir in member_dirs])
    if val_dir:
        try:
            val_sources = parse_data_sources(val_dir)
        except ValueError as error:
            raise EnsembleError(f"--val_path: {error}") from None
        ensemble.metadata["metrics"] = validation_metrics(ensemble, val_sources[0].path)
        prep = Preprocessing.from_dict({**ensemble.preprocessing, "face_detector": "none"})
        ensemble.metadata.update(calibration.calibrate(ensemble, calibration.folder_batches(val_sources, prep)))
    checkpoints.save_model(output_dir, ensemble.model_name, ensemble.variables, ensemble.preprocessing,
                           ensemble.metadata)
    return ensemble
