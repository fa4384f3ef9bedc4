"""The MesoNet family in Flax: Meso-4, MesoInception-4 and a 3D-conv clip model.

All modules take images in [0, 1] (NHWC, or NTHWC for clips) and return LOGITS of shape (B,);
the probability that the content is REAL is ``sigmoid(logits)`` (MesoNet's convention).
BatchNorm uses Keras' defaults (epsilon 1e-3, momentum 0.99) so the authors' weights give the
same outputs here as in Keras.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from meso_jax import engine
from meso_jax.config import DROPOUT_RATE

KERAS_BN_EPSILON = 1e-3
KERAS_BN_MOMENTUM = 0.99
LEAKY_RELU_SLOPE = 0.1


def _batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=KERAS_BN_MOMENTUM,
        epsilon=KERAS_BN_EPSILON,
        name=name,
    )


def _conv(features: int, kernel_size: int, name: str | None = None) -> nn.Conv:
    """A SAME 2-D convolution with bias, computed by the selected engine's convolution (meso_jax.engine)."""
    return nn.Conv(features, (kernel_size, kernel_size), padding="SAME", name=name,
                   conv_general_dilated=engine.conv_general_dilated)


class Normalized(NamedTuple):
    """A block's output with BatchNorm's per-channel affine map not yet applied: ``selected * scale + offset``
    (B, H, W, C), left to the next block, which folds it into its convolution (what a fused training
    block returns with ``defer_normalization``)."""

    selected: jax.Array
    scale: jax.Array
    offset: jax.Array

    def apply(self) -> jax.Array:
        """The block's output itself."""
        return self.selected * self.scale + self.offset


def interleave_pool_phases(phases: list[jax.Array], pool: int) -> jax.Array:
    """The inverse of splitting by pooling phase: ``phases`` [(dy, dx) row-major], each (B, h, w, C),
    woven into one (B, h * pool, w * pool, C) array with phase (dy, dx) at rows pool*i + dy, columns
    pool*j + dx."""
    batch, out_h, out_w, channels = phases[0].shape
    return (jnp.stack(phases).reshape(pool, pool, batch, out_h, out_w, channels)
            .transpose(2, 3, 0, 4, 1, 5).reshape(batch, out_h * pool, out_w * pool, channels))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_pool(x_bhwc: jax.Array, pool: int) -> jax.Array:
    """pool x pool max-pool with stride pool of an NHWC input whose height and width ``pool`` divides."""
    window = (pool, pool)
    return nn.max_pool(x_bhwc, window, strides=window, padding="VALID")


def _tiled_max_pool_forward(x_bhwc: jax.Array, pool: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    # The same maxima as reduce_window's; when a gradient follows, XLA:CPU runs this form faster.
    batch, height, width, channels = x_bhwc.shape
    pooled = x_bhwc.reshape(batch, height // pool, pool, width // pool, pool, channels).max(axis=(2, 4))
    return pooled, (x_bhwc, pooled)


def _tiled_max_pool_backward(pool: int, residuals: tuple[jax.Array, jax.Array], grad_pooled: jax.Array
                             ) -> tuple[jax.Array]:
    # Each window's gradient goes to its first maximum in row-major order, as with XLA's max-pool
    # gradient (select-and-scatter): one elementwise pass per window position, then re-interleaved.
    x_bhwc, pooled = residuals
    taken = jnp.zeros(pooled.shape, bool)
    grads = []
    for dy in range(pool):
        for dx in range(pool):
            chosen = (x_bhwc[:, dy::pool, dx::pool] == pooled) & ~taken
            taken = taken | chosen
            grads.append(jnp.where(chosen, grad_pooled, 0.0))
    return (interleave_pool_phases(grads, pool),)


_tiled_max_pool.defvjp(_tiled_max_pool_forward, _tiled_max_pool_backward)


def _max_pool(x: jax.Array, pool: int) -> jax.Array:
    """MesoNet's max-pool (window and stride ``pool``, SAME). On the CPU, where the windows tile an
    NHWC input exactly (every MesoNet layer at 256x256), its gradient is written out (each window's
    to its first maximum) instead of XLA's select-and-scatter, and under differentiation the forward
    is a reshape + max: same values and gradients, MesoInception-4's CPU training step ~1.3x faster
    (BENCHMARKS.md). Without a gradient (inference) it is reduce_window, faster there."""
    if jax.default_backend() == "cpu" and x.ndim == 4 and x.shape[1] % pool == 0 and x.shape[2] % pool == 0:
        return _tiled_max_pool(x, pool)
    window = (pool,) * (x.ndim - 2)
    return nn.max_pool(x, window, strides=window, padding="SAME")


class ConvBlock(nn.Module):
    """conv (SAME, bias) -> ReLU -> BatchNorm -> max-pool, as in MesoNet.

    fused_training: in training mode, compute the block with the engine's fused training block
    (``engine.fused_training_block()``: same variables, same results, its own gradient; faster on CPU). phased_conv: the fused op computes the convolution
    per pooling phase from the input (few input channels, e.g. RGB) rather than as one convolution.
    defer_normalization: where the fused op runs, return its output as Normalized (BatchNorm's
    affine map still to apply), for a next fused block to fold into its convolution. The block takes such
    an output as its input too.
    """

    features: int
    kernel_size: int
    pool: int
    fused_training: bool = False
    phased_conv: bool = True
    defer_normalization: bool = False

    @nn.compact
    def __call__(self, images_bhwc: jax.Array | Normalized, train: bool) -> jax.Array | Normalized:
        shape = images_bhwc.selected.shape if isinstance(images_bhwc, Normalized) else images_bhwc.shape
        fused = engine.fused_training_block() if train and self.fused_training else None
        if (fused is not None and not self.is_initializing()
                and fused.supports(shape, self.kernel_size, self.pool)
                and not (self.phased_conv and isinstance(images_bhwc, Normalized))):
            return self._fused_train(fused, images_bhwc)
        if isinstance(images_bhwc, Normalized):
            images_bhwc = images_bhwc.apply()
        x = _conv(self.features, self.kernel_size)(images_bhwc)
        x = _batch_norm(train)(nn.relu(x))
        return _max_pool(x, self.pool)

    def _fused_train(self, fused, images_bhwc: jax.Array | Normalized) -> jax.Array | Normalized:
        """The training-mode block on the variables nn.Conv ("Conv_0") and nn.BatchNorm ("BatchNorm_0")
        own, updating the running statistics as flax.linen.BatchNorm does."""
        conv, norm = self.variables["params"]["Conv_0"], self.variables["params"]["BatchNorm_0"]
        pooled, batch_mean, batch_var = fused.conv_relu_bn_pool_train(
            images_bhwc, conv["kernel"], conv["bias"], norm["scale"], norm["bias"], self.pool, KERAS_BN_EPSILON,
            self.phased_conv, self.defer_normalization)
        if self.is_mutable_collection("batch_stats"):
            running = self.variables["batch_stats"]["BatchNorm_0"]
            self.put_variable("batch_stats", "BatchNorm_0", {
                "mean": KERAS_BN_MOMENTUM * running["mean"] + (1 - KERAS_BN_MOMENTUM) * batch_mean,
                "var": KERAS_BN_MOMENTUM * running["var"] + (1 - KERAS_BN_MOMENTUM) * batch_var})
        return pooled


class ClassifierHead(nn.Module):
    """flatten -> [dropout] -> (Dense -> LeakyReLU 0.1 -> dropout) per hidden width -> Dense(1) logits."""

    hidden_features: Sequence[int] = (16,)
    input_dropout: bool = True
    dropout_rate: float = DROPOUT_RATE

    @nn.compact
    def __call__(self, features: jax.Array, train: bool) -> jax.Array:
        x = features.reshape((features.shape[0], -1))
        if self.input_dropout:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for width in self.hidden_features:
            x = nn.leaky_relu(nn.Dense(width)(x), LEAKY_RELU_SLOPE)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(1)(x)[:, 0]


class Meso4(nn.Module):
    """Meso-4 (Afchar et al., WIFS 2018): 27,977 trainable parameters at 256x256x3.

    fused_first_block: train the first block (3 -> 8 channels at full resolution, most of a CPU
    training step) with fast_training's fused op; fused_later_blocks: blocks 2-4 too (over one
    convolution each: pays off where oneDNN computes the convolutions), each block's BatchNorm then
    folded into the next block's convolution. Variables and results are the same either way.
    dropout_rate: the head's dropout in training (the paper's 0.5).
    """

    fused_first_block: bool = False
    fused_later_blocks: bool = False
    dropout_rate: float = DROPOUT_RATE

    @nn.compact
    def __call__(self, images_bhwc: jax.Array, train: bool = False) -> jax.Array:
        x = ConvBlock(8, 3, 2, fused_training=self.fused_first_block,
                      defer_normalization=self.fused_later_blocks)(images_bhwc, train)
        later_blocks = ((8, 5, 2), (16, 5, 2), (16, 5, 4))
        for index, (features, kernel_size, pool) in enumerate(later_blocks):
            x = ConvBlock(features, kernel_size, pool, fused_training=self.fused_later_blocks, phased_conv=False,
                          defer_normalization=self.fused_later_blocks and index < len(later_blocks) - 1)(x, train)
        return ClassifierHead(dropout_rate=self.dropout_rate)(x, train)


class ShiftedConv(nn.Module):
    """A k×k "SAME" convolution (any dilation) with nn.Conv's parameters ("kernel" (k, k, Cin, Cout),
    "bias"), initialisation and results. Off the CPU it is computed as the sum of its k² shifted taps,
    which XLA fuses into one loop and whose gradient is slices and reductions: on an H100 that made the
    MesoInception-4 training step 21x faster (the convolution's weight gradient with dilation and 2–4
    channels was the slowest op). On the CPU, where a convolution is faster (XLA's 2.7x for training),
    the convolution is used (oneDNN's where available, see meso_jax.cpu.onednn).
    """

    features: int
    kernel_size: int = 3
    dilation: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, dilation = self.kernel_size, self.dilation
        kernel = self.param("kernel", nn.linear.default_kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if jax.default_backend() == "cpu":
            return engine.conv_general_dilated(x, kernel, (1, 1), "SAME", rhs_dilation=(dilation, dilation),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
        reach = dilation * (k // 2)
        padded = jnp.pad(x, ((0, 0), (reach, reach), (reach, reach), (0, 0)))
        height, width = x.shape[1:3]
        y = bias
        for row in range(k):
            for col in range(k):
                window = padded[:, row * dilation:row * dilation + height, col * dilation:col * dilation + width]
                y = y + jnp.sum(window[..., :, None] * kernel[row, col], axis=-2)
        return y


class InceptionBlock(nn.Module):
    """MesoNet's inception layer: four ReLU branches (1x1; 1x1-3x3; 1x1-3x3 d2; 1x1-3x3 d3)."""

    branch_features: tuple[int, int, int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a, b, c, d = self.branch_features
        branches = [nn.relu(_conv(a, 1, name="branch1_1x1")(x))]
        for name, width, dilation in (("branch2", b, 1), ("branch3", c, 2), ("branch4", d, 3)):
            y = nn.relu(_conv(width, 1, name=f"{name}_1x1")(x))
            y = ShiftedConv(width, 3, dilation, name=f"{name}_3x3")(y)
            branches.append(nn.relu(y))
        return jnp.concatenate(branches, axis=-1)


class MesoInception4(nn.Module):
    """MesoInception-4: 28,615 trainable parameters at 256x256x3."""

    dropout_rate: float = DROPOUT_RATE

    @nn.compact
    def __call__(self, images_bhwc: jax.Array, train: bool = False) -> jax.Array:
        x = images_bhwc
        for features in ((1, 4, 4, 2), (2, 4, 4, 2)):
            x = InceptionBlock(features)(x)
            x = _max_pool(_batch_norm(train)(x), 2)
        x = ConvBlock(16, 5, 2)(x, train)
        x = ConvBlock(16, 5, 4)(x, train)
        return ClassifierHead(dropout_rate=self.dropout_rate)(x, train)


class Meso4Video(nn.Module):
    """Clip model: four Conv3D 3x3x3 blocks (8, 16, 32, 32), global average pool, MLP head."""

    dropout_rate: float = DROPOUT_RATE

    @nn.compact
    def __call__(self, clips_bthwc: jax.Array, train: bool = False) -> jax.Array:
        x = clips_bthwc
        for index, features in enumerate((8, 16, 32, 32)):
            x = nn.Conv(features, (3, 3, 3), padding="SAME")(x)
            x = _batch_norm(train)(nn.relu(x))
            if index < 3:
                x = _max_pool(x, 2)
        x = jnp.mean(x, axis=(1, 2, 3))
        return ClassifierHead(hidden_features=(64, 16), input_dropout=False, dropout_rate=self.dropout_rate)(x, train)


class MesoEnsemble(nn.Module):
    """Registered image models applied to the same input; the logit is the mean of theirs (each
    member's parameters under ``member_<i>``)."""

    member_names: tuple[str, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        logits = [_REGISTRY[name].module.clone(parent=self, name=f"member_{index}")(x, train)
                  for index, name in enumerate(self.member_names)]
        return jnp.mean(jnp.stack(logits), axis=0)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: its Flax module and the shape of one input (no batch dimension)."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]

    @property
    def is_clip_model(self) -> bool:
        """True when one input is a clip of frames rather than one image."""
        return len(self.input_shape) == 4


IMAGE_SIZE = 256
CLIP_FRAMES = 24

_REGISTRY: dict[str, ModelSpec] = {
    "meso4": ModelSpec("meso4", Meso4(), (IMAGE_SIZE, IMAGE_SIZE, 3)),
    "mesoinception4": ModelSpec("mesoinception4", MesoInception4(), (IMAGE_SIZE, IMAGE_SIZE, 3)),
    "meso4_video": ModelSpec("meso4_video", Meso4Video(), (CLIP_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)),
}
MODEL_NAMES = tuple(_REGISTRY)
ENSEMBLE_PREFIX = "ensemble:"


def ensemble_name(member_names: Sequence[str]) -> str:
    """The model name of an ensemble of registered image models, e.g. "ensemble:meso4,mesoinception4"."""
    return ENSEMBLE_PREFIX + ",".join(member_names)


def get_model(name: str) -> ModelSpec:
    """Returns the registered model called ``name``, or the ensemble an ensemble_name() names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and name.startswith(ENSEMBLE_PREFIX):
        return _ensemble_spec(tuple(name[len(ENSEMBLE_PREFIX):].split(",")))
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


@functools.cache
def _ensemble_spec(member_names: tuple[str, ...]) -> ModelSpec:
    if len(member_names) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(member_names)}")
    member_specs = [get_model(name) for name in member_names if not name.startswith(ENSEMBLE_PREFIX)]
    if len(member_specs) != len(member_names) or any(spec.is_clip_model for spec in member_specs) or len(
            {spec.input_shape for spec in member_specs}) != 1:
        raise ValueError(f"ensemble members must be image models with one input shape "
                         f"({', '.join(n for n in MODEL_NAMES if not _REGISTRY[n].is_clip_model)}), "
                         f"got {', '.join(member_names)}")
    return ModelSpec(ensemble_name(member_names), MesoEnsemble(member_names), member_specs[0].input_shape)


KERNEL_INITS = ("flax", "keras")


def init_variables(spec: ModelSpec, seed: int, kernel_init: str = "flax") -> dict:
    """Initialises ``{"params", "batch_stats"}`` for ``spec`` from an integer seed.

    kernel_init: "flax" (LeCun-normal kernels, Flax's default) or "keras" (Glorot-uniform kernels,
    Keras' default and so the authors'); biases start at zero either way.
    """
    if kernel_init not in KERNEL_INITS:
        raise ValueError(f"unknown kernel_init {kernel_init!r}; choose one of {', '.join(KERNEL_INITS)}")
    variables = _compiled_init(spec)(jax.random.key(seed))
    params = variables["params"]
    if kernel_init == "keras":
        params = _glorot_uniform_kernels(params, jax.random.key(seed))
    return {"params": params, "batch_stats": variables["batch_stats"]}


@functools.cache
def _compiled_init(spec: ModelSpec):
    """``key -> variables`` for ``spec``, jitted once per model (XLA takes seconds to compile it). The
    dummy input is made inside, so a call under another trace (e.g. jax.eval_shape) captures no tracer."""
    return jax.jit(lambda key: spec.module.init(key, jnp.zeros((1, *spec.input_shape), jnp.float32), train=False))


def _glorot_uniform_kernels(params, key: jax.Array):
    """``params`` with every conv/dense "kernel" redrawn Glorot-uniform (fan over the last two axes,
    earlier axes the receptive field, as Keras computes it)."""
    glorot = jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    redrawn = [glorot(leaf_key, leaf.shape, leaf.dtype) if path[-1].key == "kernel" else leaf
               for (path, leaf), leaf_key in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, redrawn)


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))
