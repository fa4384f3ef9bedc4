"""A faster, inference-only Meso-4 forward pass for CPUs (same numbers as the Flax module).

On CPU, convolutions with few channels (Meso-4 has 3 -> 8 -> 8 -> 16 -> 16) are slow: the first
layer (3 input channels at 256x256) takes 8x as long with XLA's convolution and 3.7x with oneDNN's as
the formulation here. This module computes the first "conv (SAME, bias) -> ReLU -> BatchNorm ->
max-pool p" block without a convolution op:

* Pool-phase decomposition. The p x p max-pool (stride p) reads every conv output exactly once,
  so for each pooling phase (dy, dx) the conv outputs at rows p*i + dy and columns p*j + dx are
  computed directly, as a sum over the k*k*Cin kernel taps of a stride-p slice of the padded input
  times that tap's weight vector (Cout wide). XLA fuses the whole sum, the ReLU/BatchNorm and the
  max over the phases into one loop that writes only the pooled output.
* BatchNorm folding. With s = gamma / sqrt(var + eps) and t = beta - mean * s (running statistics),
  ``relu(z) * s + t`` is monotone per channel (increasing if s >= 0, decreasing if s < 0), so
  max over phases of it equals ``relu(m) * s + t`` where m is the max (s >= 0) or min (s < 0) of
  the raw conv outputs over the phases: the BatchNorm is applied once, after pooling. Kernel and bias
  are multiplied by -1 for the channels that need the minimum (min(z) = -max(-z), exactly), so one
  maximum per window serves every channel, in every block.

The later blocks (8-16 channels) use a convolution (oneDNN's where meso_jax.cpu.onednn is on, else
XLA's), both faster than the phased sum there (benchmarks/layer_breakdown.py); phasing blocks 1-3
also made a 15x larger program, 1 s more tracing and 4 s more compiling at start-up. Their pooling is
a maximum of strided slices, and the bias is added after it. The result
equals ``models.get_model("meso4").module.apply(variables, x, train=False)`` to float32 rounding
(sums in a different order; |difference| ~1e-6 on logits). Inference only: the autodiff of this
formulation is slow; training uses fast_training's fused block, which has its own gradient.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import preprocessing
from meso_jax import engine, models
from meso_jax.cpu import fast_training, onednn

# Max-pool size of each Meso-4 block; kernel sizes and channels come from the variables.
MESO4_POOLS = (2, 2, 2, 4)
# Blocks computed with the phased formulation (the first); the rest use a convolution.
PHASED_BLOCKS = 1
# On a single CPU device, larger batches run as a loop over chunks of this many images (lax.map), so
# each block's activations stay in cache: batch 128 at 1.2-1.5x the throughput of one pass over all
# 128 (BENCHMARKS.md). Same numbers: every image's arithmetic is unchanged.
CPU_CHUNK_IMAGES = 32


def _fold_batch_norm(params: dict, stats: dict) -> tuple[jax.Array, jax.Array]:
    """(scale, shift) of an inference-mode BatchNorm: y = x * scale + shift."""
    scale = params["scale"] * jax.lax.rsqrt(stats["var"] + models.KERAS_BN_EPSILON)
    shift = params["bias"] - stats["mean"] * scale
    return scale, shift


def _relu_bn(extreme: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """relu(z) * scale + shift at each window's extreme z (max over a window of the block's output)."""
    return jnp.maximum(extreme, 0.0) * scale + shift


def _phased_block(x: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array, shift: jax.Array,
                  pool: int) -> jax.Array:
    """conv(SAME)+bias -> ReLU -> BatchNorm(folded) -> max-pool(pool), without a conv op (NHWC)."""
    sign = fast_training.window_sign(scale)
    phases = fast_training.pool_phase_conv(x, kernel * sign, bias * sign, pool)
    return _relu_bn(functools.reduce(jax.lax.max, phases) * sign, scale, shift)


def _conv_block(x: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array, shift: jax.Array,
                pool: int) -> jax.Array:
    """The same block with a convolution (oneDNN's or XLA's), for the later layers. The bias is added
    after pooling: max(c + b) = max(c) + b, exactly (rounding is monotone). The pooling is a maximum of
    strided slices, which XLA fuses into one pass (its reduce_window ran 2-3x slower here)."""
    sign = fast_training.window_sign(scale)
    conv = onednn.conv_general_dilated(x, kernel * sign, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    window_max = functools.reduce(jax.lax.max, [conv[:, dy::pool, dx::pool, :]
                                                for dy in range(pool) for dx in range(pool)])
    return _relu_bn(window_max * sign + bias, scale, shift)


def meso4_forward(variables: dict, images_bhwc: jax.Array) -> jax.Array:
    """Meso-4 logits (B,) for float images in [0, 1] or uint8 crops (scaled here, in the same fused
    loop as the first block), inference mode. Traceable; jit it (or use meso4_inference_fn). Image
    height and width must be divisible by 64 (256 in MesoNet)."""
    height, width = images_bhwc.shape[1:3]
    if height % 64 or width % 64:
        raise ValueError(f"the fast Meso-4 path needs height and width divisible by 64, got {height}x{width}")
    chunks = images_bhwc.shape[0] // CPU_CHUNK_IMAGES
    if chunks < 2 or jax.default_backend() != "cpu" or jax.device_count() > 1:
        return _meso4_forward_one_pass(variables, images_bhwc)
    chunked = images_bhwc[:chunks * CPU_CHUNK_IMAGES].reshape((chunks, CPU_CHUNK_IMAGES) + images_bhwc.shape[1:])
    logits = jax.lax.map(functools.partial(_meso4_forward_one_pass, variables), chunked).reshape(-1)
    remainder = images_bhwc[chunks * CPU_CHUNK_IMAGES:]
    if remainder.shape[0]:
        logits = jnp.concatenate([logits, _meso4_forward_one_pass(variables, remainder)])
    return logits


def _meso4_forward_one_pass(variables: dict, images_bhwc: jax.Array) -> jax.Array:
    """meso4_forward over the whole batch at once."""
    params, stats = variables["params"], variables["batch_stats"]
    x = preprocessing.as_model_input(images_bhwc)
    for index, pool in enumerate(MESO4_POOLS):
        block = params[f"ConvBlock_{index}"]
        scale, shift = _fold_batch_norm(block["BatchNorm_0"], stats[f"ConvBlock_{index}"]["BatchNorm_0"])
        kernel, bias = block["Conv_0"]["kernel"], block["Conv_0"]["bias"]
        block_fn = _phased_block if index < PHASED_BLOCKS else _conv_block
        x = block_fn(x, kernel, bias, scale, shift, pool)
    head = params["ClassifierHead_0"]
    x = x.reshape((x.shape[0], -1))
    x = jax.nn.leaky_relu(x @ head["Dense_0"]["kernel"] + head["Dense_0"]["bias"], models.LEAKY_RELU_SLOPE)
    return (x @ head["Dense_1"]["kernel"] + head["Dense_1"]["bias"])[:, 0]


# The compiled forward, shared by every caller (one compilation per input shape and sharding).
meso4_logits = jax.jit(meso4_forward)


def meso4_inference_fn(variables: dict) -> Callable[[jax.Array], jax.Array]:
    """A jit-compiled ``images_bhwc -> logits`` for Meso-4 with ``variables`` ({"params",
    "batch_stats"}) bound; equal to the Flax module in inference mode up to float32 rounding."""
    device = jax.devices()[0]
    bound = jax.device_put(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32),
                                                  {"params": variables["params"],
                                                   "batch_stats": variables["batch_stats"]}), device)
    # Committed to one device like scoring.Scorer's arguments, so both share one compilation.
    return lambda images_bhwc: meso4_logits(bound, jax.device_put(images_bhwc, device))


def ensemble_forward(member_names: tuple[str, ...], variables: dict, images_bhwc: jax.Array) -> jax.Array:
    """models.MesoEnsemble's logits (the mean of its members'), its Meso-4 members computed with
    meso4_forward and the others with their Flax module, inference mode. Traceable; jit it."""
    logits = []
    for index, name in enumerate(member_names):
        member = {"params": variables["params"][f"member_{index}"],
                  "batch_stats": variables["batch_stats"][f"member_{index}"]}
        if name == "meso4":
            logits.append(meso4_forward(member, images_bhwc))
        else:
            logits.append(models.get_model(name).module.apply(member, preprocessing.as_model_input(images_bhwc),
                                                              train=False))
    return jnp.mean(jnp.stack(logits), axis=0)


@functools.cache
def logits_function(model_name: str) -> Callable[[dict, jax.Array], jax.Array]:
    """The compiled ``(variables, images_bhwc) -> logits`` of this path for a model it supports (one per
    model name, shared by every caller)."""
    if model_name == "meso4":
        return meso4_logits
    return jax.jit(functools.partial(ensemble_forward, _ensemble_members(model_name)))


def _ensemble_members(model_name: str) -> tuple[str, ...] | None:
    """The member names of an ensemble's model name, None for any other model."""
    if not model_name.startswith(models.ENSEMBLE_PREFIX):
        return None
    return models.get_model(model_name).module.member_names


def enabled() -> bool:
    """Use this path wherever it supports the model, unless the engine is xla (meso_jax.engine)."""
    return engine.native()


def supports(model_name: str, input_shape: tuple[int, ...]) -> bool:
    """Whether the fast path computes ``model_name`` on inputs of ``input_shape`` (no batch dim): Meso-4,
    or an ensemble with Meso-4 members (its other members run their module)."""
    members = _ensemble_members(model_name)
    has_meso4 = model_name == "meso4" or (members is not None and "meso4" in members)
    return (has_meso4 and len(input_shape) == 3 and input_shape[2] == 3
            and input_shape[0] % 64 == 0 and input_shape[1] % 64 == 0)


__all__ = ["enabled", "ensemble_forward", "logits_function", "meso4_forward", "meso4_inference_fn", "supports"]
