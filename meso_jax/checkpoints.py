"""orbax checkpoints: training state in a workdir, and exported models that carry their metadata.

Layout: every checkpoint directory is an orbax ``CheckpointManager`` root whose steps hold the items
``model`` (params + batch_stats), ``metadata`` (JSON: model name, input shape, preprocessing, label
convention, flags, metrics) and, for training checkpoints only, ``train`` (optimizer state, step,
rng, data position). A training ``--workdir`` keeps them in ``<workdir>/checkpoints``; an exported
model (``checkpoints/mesoinception4`` and ``checkpoints/meso4`` here) is the same format with one step and no ``train``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from meso_jax import models

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "checkpoints" / "meso4x4"  # the best shipped model on its worst source (model card)
LABEL_CONVENTION = "score = sigmoid(logit) = probability that the content is REAL (1 real, 0 fake)"
WORKDIR_CHECKPOINTS = "checkpoints"
BEST_METRIC = "val_selection"  # validation.selection_metrics: worst source AUC, AUC, or minus loss
LEGACY_BEST_METRIC = "val_auc"  # what checkpoints written before val_selection were chosen by


class CheckpointError(Exception):
    """A checkpoint that cannot be used (one-line message)."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready to score: its registry name, Flax variables, preprocessing and metadata."""

    model_name: str
    variables: dict
    preprocessing: dict
    metadata: dict
    source: str = ""


def _manager_root(path: pathlib.Path) -> pathlib.Path:
    return path / WORKDIR_CHECKPOINTS if (path / WORKDIR_CHECKPOINTS).is_dir() else path


def open_manager(directory: str | os.PathLike, keep_last: int = 3, keep_best: int = 1,
                 create: bool = True) -> ocp.CheckpointManager:
    """An orbax CheckpointManager keeping the last ``keep_last`` steps and the best by validation AUC."""
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        create=create,
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep_last),
            policies.BestN(get_metric_fn=_rank, n=keep_best,
                           keep_checkpoints_without_metrics=False),
        ]),
        # best_fn makes orbax write each step's metrics into the checkpoint (its "metrics" item), so that
        # after a restart BestN still knows which checkpoint is best; without it a resumed run's next
        # saves delete the best checkpoint from before the restart.
        best_fn=_rank,
        best_mode="max",
        enable_async_checkpointing=False,
        # A save cut short (kill -9, power loss) leaves only a *.orbax-checkpoint-tmp folder, never a step;
        # a writable manager removes such leftovers when it opens. Readers never delete anything.
        cleanup_tmp_directories=create,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                 item_names=("model", "train", "metadata"))


def selection_value(metrics: dict) -> float | None:
    """The number checkpoints are ranked by (higher is better), or None when ``metrics`` has none."""
    value = metrics.get(BEST_METRIC, metrics.get(LEGACY_BEST_METRIC))
    return float(value) if isinstance(value, (int, float)) else None


def _rank(metrics: dict) -> float:
    """selection_value for orbax, which sorts the values: a checkpoint whose metrics hold no number ranks last."""
    value = selection_value(metrics)
    return float("-inf") if value is None else value


def model_metadata(model_name: str, preprocessing: dict, extra: dict | None = None) -> dict:
    """The metadata saved beside every checkpoint so that prediction needs no extra flags."""
    spec = models.get_model(model_name)
    return {
        "model": model_name,
        "input_shape": list(spec.input_shape),
        "preprocessing": dict(preprocessing),
        "label_convention": LABEL_CONVENTION,
        **(extra or {}),
    }


def check_new_directory(directory: str | os.PathLike) -> None:
    """Raises CheckpointError unless ``directory`` is absent or empty (exports never overwrite)."""
    directory = pathlib.Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: already exists and is not empty; choose a new directory")


def all_finite(variables: Any) -> bool:
    """Whether every array in ``variables`` holds only finite numbers (no NaN, no infinity)."""
    return all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(variables))


def save_model(directory: str | os.PathLike, model_name: str, variables: dict, preprocessing: dict,
               metadata: dict | None = None) -> None:
    """Exports ``variables`` of ``model_name`` as a one-step orbax checkpoint with its metadata."""
    check_new_directory(directory)
    model_variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    with open_manager(directory) as manager:
        manager.save(0, args=ocp.args.Composite(
            model=ocp.args.StandardSave(jax.tree_util.tree_map(np.asarray, model_variables)),
            metadata=ocp.args.JsonSave(model_metadata(model_name, preprocessing, metadata)),
        ))


def read_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON metadata item of checkpoint ``step`` (raises if it is missing or unreadable)."""
    return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors; an OSError
    gives its plain reason ("No space left on device") and the file it names, if any."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror + (f": {error.filename}" if error.filename else "")
    else:
        text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _array_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"params/ConvBlock_0/Conv_0/kernel": shape} for a tree of arrays or array metadata."""
    return {"/".join(str(getattr(key, "key", key)) for key in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_mismatch(item_dir: pathlib.Path, expected_tree: Any) -> str | None:
    """How the arrays saved in the orbax item ``item_dir`` differ from ``expected_tree`` (the first missing,
    extra or differently shaped array), or None when they fit or the item's metadata cannot be read
    (a damaged checkpoint: restoring it reports that)."""
    try:
        found = _array_shapes(ocp.StandardCheckpointHandler().metadata(item_dir))
    except Exception:  # pylint: disable=broad-except  (orbax raises many types for damaged files)
        return None
    expected = _array_shapes(expected_tree)
    for name, shape in expected.items():
        if name not in found:
            return f"it has no array {name}"
        if found[name] != shape:
            return f"{name} has shape {found[name]}, expected {shape}"
    extra = sorted(set(found) - set(expected))
    return f"it has an unexpected array {extra[0]}" if extra else None


def _steps_best_first(manager: ocp.CheckpointManager) -> list[tuple[int, dict | None]]:
    """(step, metadata or None when unreadable), best first: by selection_value, then the latest steps."""
    readable, unreadable = [], []
    for step in manager.all_steps():
        try:
            metadata = read_metadata(manager, step)
        except Exception as error:  # pylint: disable=broad-except  (orbax raises many types for damaged files)
            logging.warning("checkpoint %s step %d has unreadable metadata (%s); skipping it",
                            manager.directory, step, first_line(error))
            unreadable.append((step, None))
            continue
        auc = selection_value(metadata.get("metrics", {})) if isinstance(metadata, dict) else None
        readable.append(((auc is not None, auc if auc is not None else 0.0, step), step, metadata))
    readable.sort(key=lambda item: item[0], reverse=True)
    return [(step, metadata) for _, step, metadata in readable] + unreadable


def best_step(manager: ocp.CheckpointManager) -> int:
    """The step with the highest validation AUC in its metadata, else the latest step (skipping steps whose
    metadata cannot be read)."""
    if not manager.all_steps():
        raise CheckpointError(f"{manager.directory}: holds no checkpoint")
    ordered = _steps_best_first(manager)
    return next((step for step, metadata in ordered if metadata is not None), ordered[0][0])


def _check_model_name(path: pathlib.Path, metadata: dict) -> str:
    model_name = metadata.get("model") if isinstance(metadata, dict) else None
    try:
        models.get_model(model_name)
    except ValueError:
        found = f"model {model_name!r}" if model_name is not None else "no model name in its metadata"
        raise CheckpointError(f"{path}: expected a MesoNet checkpoint ({', '.join(models.MODEL_NAMES)} or "
                              f"an ensemble of them), found {found}") from None
    return model_name


def scan_preprocessing(metadata: dict) -> dict:
    """The preprocessing a checkpoint scans with: the recorded one, except that a model trained on
    pre-cropped face images (dataset "image", face_detector "none") finds faces with BlazeFace first, since
    users scan whole photos and videos and the crops it learned from were faces."""
    preprocessing = dict(metadata.get("preprocessing", {}))
    if metadata.get("dataset") == "image" and preprocessing.get("face_detector") == "none":
        preprocessing["face_detector"] = "blazeface"
    return preprocessing


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Loads an exported model directory or a training workdir (its best checkpoint), with the
    preprocessing to scan with (scan_preprocessing).

    A damaged checkpoint (truncated or corrupted files) is skipped with a warning in favour of the next
    best readable one; a checkpoint of another model is an error.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    root = _manager_root(path)
    try:
        with open_manager(root, create=False) as manager:
            if not manager.all_steps():
                raise CheckpointError(f"{path}: holds no checkpoint (expected an exported model or a training "
                                      "--workdir)")
            first_error = None
            for step, metadata in _steps_best_first(manager):
                if metadata is None:
                    first_error = first_error or "unreadable metadata"
                    continue
                model_name = _check_model_name(path, metadata)
                spec = models.get_model(model_name)
                abstract = jax.eval_shape(lambda: models.init_variables(spec, 0))
                abstract = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract)
                mismatch = shape_mismatch(pathlib.Path(manager.directory) / str(step) / "model", abstract)
                if mismatch:
                    raise CheckpointError(f"{path}: step {step} says it is {model_name}, but its arrays do not fit "
                                          f"{model_name}: {mismatch}")
                try:
                    restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract)))
                except Exception as error:  # pylint: disable=broad-except  (damaged files: try the next one)
                    first_error = first_error or first_line(error)
                    logging.warning("%s: checkpoint step %d is unreadable (%s); trying the next best one",
                                    path, step, first_line(error))
                    continue
                variables = jax.tree_util.tree_map(np.asarray, restored["model"])
                if not all_finite(variables):
                    first_error = first_error or f"step {step} holds NaN or infinite weights"
                    logging.warning("%s: checkpoint step %d holds NaN or infinite weights; trying the next best one",
                                    path, step)
                    continue
                return LoadedModel(model_name, variables, scan_preprocessing(metadata), metadata,
                                   source=f"{path} (step {step})")
    except CheckpointError:
        raise
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable meso-jax checkpoint ({first_line(error)})") from None
    raise CheckpointError(f"{path}: not a readable meso-jax checkpoint: every step is damaged ({first_error})")


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores a full training checkpoint: (state shaped like ``abstract_state``, metadata)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_state["model"]),
        train=ocp.args.StandardRestore(abstract_state["train"]),
        metadata=ocp.args.JsonRestore(),
    ))
    return {"model": restored["model"], "train": restored["train"]}, restored["metadata"]


def save_train_state(manager: ocp.CheckpointManager, step: int, state_tree: dict, metadata: dict,
                     metrics: dict | None = None) -> None:
    """Saves one training checkpoint (``state_tree`` = {"model": ..., "train": ...})."""
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(state_tree["model"]),
        train=ocp.args.StandardSave(state_tree["train"]),
        metadata=ocp.args.JsonSave(metadata),
    ), metrics=metrics, force=True)
