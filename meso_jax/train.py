"""Training state and steps: a TrainState, pure jitted train/eval steps, the optimizer and the data-parallel sharding.

Every global batch is sharded over all devices along the ``data`` mesh axis while the state is
replicated, so BatchNorm statistics and gradients are those of the global batch whatever the device
count (XLA inserts the cross-device reductions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines.preprocessing import as_model_input
from meso_jax import models
from meso_jax.cpu import fast_inference, fast_training, onednn
from meso_jax.config import DROPOUT_RATE, TrainConfig

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
