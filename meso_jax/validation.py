"""Validation during training: AUC, EER and balanced accuracy per source, and the metric that picks the best
checkpoint."""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from meso_jax import metrics
from meso_jax.config import SELECTION_RULES
from meso_jax.train import DataParallel, TrainState, TrainingError


def path_text(path: bytes | str) -> str:
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
                local["source"][:count] = [source_index[source_of_path[path_text(p)]]
                                           for p in np.asarray(batch["path"])]
            if video_level and "path" in batch:
                local["video"][:count] = _video_ids(path_text(p) for p in np.asarray(batch["path"]))
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


def format_epoch(epoch_metrics: dict) -> str:
    """One log line for an epoch's metrics."""
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_video_auc", "val_eer",
            "raw_val_auc")
    keys += tuple(sorted(k for k in epoch_metrics if k.startswith("val_") and k.endswith("_auc") and k not in keys))
    keys += ("val_selection",)
    parts = [f"{k}={epoch_metrics[k]:.4f}" for k in keys if isinstance(epoch_metrics.get(k), float)]
    return (f"epoch {epoch_metrics['epoch']} step {epoch_metrics['step']}: " + " ".join(parts)
            + f" ({epoch_metrics['train_images_per_second']:.0f} img/s, {epoch_metrics['seconds']:.0f} s)")
