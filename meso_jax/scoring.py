"""Batched scoring with a loaded MesoNet model, and per-video aggregation of frame scores.

A Scorer holds one jit-compiled function of a fixed batch shape: every batch, the last partial one
included, is padded to ``batch_size`` rows, so a scan compiles once and a file's score does not
depend on which other files shared its batch. With several devices the batch is split across them.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from data_pipelines.preprocessing import Preprocessing, as_model_input
from meso_jax import checkpoints, models
from meso_jax.cpu import fast_inference
from meso_jax.user_cache import cache_root

AGGREGATIONS = ("mean", "vote")


DEFAULT_THRESHOLD = 0.5  # for a model whose metadata names no threshold (e.g. the published weights)


class ModelSourceError(Exception):
    """No usable model at the place the user named (one-line message)."""


def enable_compilation_cache() -> str:
    """Turns on JAX's persistent compilation cache under $XDG_CACHE_HOME (or ~/.cache)/meso_jax/jax.

    Returns the cache directory. Entry scripts call this once so a repeat scan skips the XLA compile.
    """
    cache_dir = str(cache_root() / "jax")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return cache_dir


def load_model_source(checkpoint: str | None = None, keras_weights: str | None = None) -> checkpoints.LoadedModel:
    """Loads the model to score with: an orbax checkpoint or training workdir, the authors' Keras .h5
    weights (with default preprocessing), or, when neither is given, the model shipped in checkpoints/.

    Raises ModelSourceError (one line) when the source is missing or unusable.
    """
    if checkpoint and keras_weights:
        raise ModelSourceError("give either --checkpoint or --keras_weights, not both")
    if keras_weights:
        # pylint: disable-next=import-outside-toplevel  (h5py is only needed for Keras weights)
        from meso_jax.keras_import import KerasWeightsError, load_keras_weights
        if not os.path.isfile(keras_weights):
            raise ModelSourceError(f"{keras_weights}: no such weight file")
        try:
            model_name, variables = load_keras_weights(keras_weights)
        except KerasWeightsError as error:
            raise ModelSourceError(str(error)) from None
        return checkpoints.LoadedModel(model_name=model_name, variables=variables,
                                       preprocessing=Preprocessing().to_dict(), metadata={},
                                       source=f"{os.path.abspath(keras_weights)} (Keras weights)")
    model_dir = checkpoint or checkpoints.DEFAULT_MODEL_DIR
    if not os.path.exists(model_dir):
        if checkpoint:
            raise ModelSourceError(f"{checkpoint}: no such checkpoint directory")
        raise ModelSourceError(f"no shipped model at {model_dir}; pass --checkpoint=DIR or --keras_weights=FILE.h5")
    try:
        return checkpoints.load_model(model_dir)
    except checkpoints.CheckpointError as error:
        raise ModelSourceError(str(error)) from None


def aggregate_scores(frame_scores: Sequence[float] | np.ndarray, method: str, threshold: float) -> float:
    """One score for a video from its frame (or clip) scores.

    mean: the mean probability real. vote: MesoNet's rule, the share of frames judged real
    (score >= threshold).
    """
    scores = np.asarray(frame_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("cannot aggregate an empty list of scores")
    if method == "mean":
        return float(scores.mean())
    if method == "vote":
        return float((scores >= threshold).mean())
    raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATIONS)}")


class Scorer:
    """Probability-real scores of model inputs, computed in fixed-size batches.

    Inputs are uint8 crops (scaled to [0, 1] on the device, inside the compiled program: a quarter of
    the bytes to move and no float copy on the host) or floats already in [0, 1].
    """

    def __init__(self, loaded_model: checkpoints.LoadedModel, batch_size: int, fast_path: bool | None = None,
                 flip_average: bool = False):
        """``fast_path``: compute Meso-4, and the Meso-4 members of an ensemble, with meso_jax.cpu.fast_inference
        (same scores to ~1e-6, ~2.5x faster on CPU); default on unless the environment sets
        MESO_JAX_FAST_INFERENCE=0.
        ``flip_average``: score each input as the mean of the model's logits for it and for its mirror
        image (left-right), twice the model's work; the models were trained with random flips."""
        if fast_path is None:
            fast_path = fast_inference.enabled()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = models.get_model(loaded_model.model_name)
        self.model_source = loaded_model.source
        # The verdict threshold chosen on the model's validation data (checkpoint metadata), else 0.5.
        self.threshold = float(loaded_model.metadata.get("threshold", DEFAULT_THRESHOLD))
        self.batch_size = batch_size
        self.flip_average = flip_average
        devices = jax.local_devices()  # each host scores its own files
        if len(devices) > 1 and batch_size % len(devices) == 0:
            mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
            self._input_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        else:
            self._input_sharding = replicated = jax.sharding.SingleDeviceSharding(devices[0])
        variables = {"params": loaded_model.variables["params"],
                     "batch_stats": loaded_model.variables["batch_stats"]}
        self._variables = jax.device_put(variables, replicated)
        module = self.spec.module
        self.uses_fast_path = fast_path and fast_inference.supports(self.spec.name, self.spec.input_shape)
        if self.uses_fast_path:
            # One shared compiled forward per model, batch shape and dtype.
            self._logits_fn = fast_inference.logits_function(self.spec.name)
        else:
            self._logits_fn = jax.jit(lambda variables, inputs: module.apply(variables, as_model_input(inputs),
                                                                              train=False))

    @property
    def variables(self) -> dict:
        """The model's Flax variables (params, batch_stats), on the scoring devices."""
        return self._variables

    @property
    def device_count(self) -> int:
        """How many devices each batch is split over (1 when the batch size does not divide evenly)."""
        return len(self._input_sharding.device_set)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input, without the batch dimension."""
        return self.spec.input_shape

    def score_batch(self, inputs: np.ndarray) -> np.ndarray:
        """Scores at most ``batch_size`` inputs (uint8 crops, or floats in [0, 1]); pads to the fixed
        batch shape, except that a lone input on one device is scored as a batch of one (a one-image
        scan then computes one input, not ``batch_size``, and still compiles one shape). Returns
        float64 (N,)."""
        count = inputs.shape[0]
        if count > self.batch_size or tuple(inputs.shape[1:]) != self.input_shape:
            raise ValueError(f"expected at most {self.batch_size} inputs of shape {self.input_shape}, "
                             f"got {inputs.shape}")
        dtype = np.dtype(np.uint8 if inputs.dtype == np.uint8 else np.float32)
        rows = 1 if count == 1 and self.device_count == 1 else self.batch_size
        padded = np.zeros((rows,) + self.input_shape, dtype)
        padded[:count] = inputs
        logits = self._logits_fn(self._variables, jax.device_put(padded, self._input_sharding))
        if self.flip_average:
            mirrored = np.ascontiguousarray(padded[..., ::-1, :])  # width is the second-last axis (images, clips)
            logits = (logits + self._logits_fn(self._variables, jax.device_put(mirrored, self._input_sharding))) / 2
        return np.asarray(jax.nn.sigmoid(logits), dtype=np.float64)[:count]

    def score(self, inputs: np.ndarray) -> np.ndarray:
        """Scores any number of inputs, ``batch_size`` at a time. Returns float64 (N,)."""
        return np.concatenate([self.score_batch(inputs[start:start + self.batch_size])
                               for start in range(0, inputs.shape[0], self.batch_size)] or [np.zeros(0)])
