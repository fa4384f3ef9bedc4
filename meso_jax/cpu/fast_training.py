"""A fused training-mode "conv (SAME, bias) -> ReLU -> BatchNorm -> max-pool" block with its own gradient.

Meso-4's first block (256x256, 3 -> 8 channels, 3x3, pool 2) is most of a training step on CPU: XLA's
convolution with 3 input channels is slow, and so is the automatic gradient of the max-pool. The block is
computed in two parts:

* conv -> ReLU -> pooling selection, with its own gradient (``_first_block`` over the image for a first
  layer, ``_pool_select`` over one convolution's output for the later blocks): BatchNorm's per-channel
  affine map y = (a - mean) * s + offset is monotone, so the max over a window of y comes from the
  window's max of a = relu(z) (s >= 0) or its min (s < 0). Its outputs are each window's selected
  activation and the batch mean and variance of the activations, all three differentiable; the backward
  is d(loss)/dz = [z > 0] * ([chosen] * d(loss)/d(selected) + d(loss)/d(mean) / N + 2 d(loss)/d(var) *
  (a - mean) / N), then the weight (and input) gradients of the convolution (oneDNN's where available,
  see meso_jax.cpu.onednn, else XLA's). For a first layer the forward is the pool-phase decomposition (shared
  with fast_inference): for each pooling phase (dy, dx) the conv outputs at rows p*i + dy, columns
  p*j + dx are one fused sum of k*k*Cin stride-p slices of the padded input times weight vectors; the
  input gradient is dead code there and XLA removes it.
* BatchNorm's affine map, by ordinary JAX ops (so its gradient, the sums over the pooled outputs, is
  automatic), or, between two such blocks, not at all: the next block takes the selected activations
  with the map (``Normalized``) and folds it into its convolution (``conv_of_normalized``: kernel scaled
  per input channel, the offsets' part a per-position bias), which saves a pass over the block's output
  in the forward and the two sums over it in the backward (the scaled kernel's gradient carries them).

On the CPU with the native library (meso_jax.cpu.onednn), Meso-4's first block (RGB -> 8 channels, 3x3,
pool 2) runs as two calls of ``first_block.cc``: the forward in one pass over the image (each window's
selected activation and its position, and the sums for the statistics; no activations kept), the
backward recomputing the convolution while it accumulates the kernel and bias gradients (the image's
gradient, when something needs it, still comes from the XLA formulation). The later blocks' ReLU,
statistics and pooling selection is one pass of ``pool_select.cc`` there instead of XLA's pass for each,
and so is their backward up to the convolution's (d(loss)/dz and the bias gradient).

Results equal the Flax ConvBlock's (models.ConvBlock) in float32 (tests against the Flax module and a
float64 reference). Measured in benchmarks/model_throughput.py ("training" rows); used by train.py on CPU
for Meso-4's first block, and for its later blocks too where oneDNN computes the convolutions
(``--engine=xla`` turns it off: meso_jax.engine).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from meso_jax import engine
from meso_jax.cpu import onednn
from meso_jax.models import Normalized, interleave_pool_phases

_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def pool_phase_conv(x_bhwc: jax.Array, kernel: jax.Array, bias: jax.Array, pool: int) -> list[jax.Array]:
    """conv(SAME) + bias of ``x_bhwc``, split by max-pool phase: ``[z(dy, dx) for dy, dx]`` (row-major),
    each (B, H // pool, W // pool, Cout) holding the outputs at rows pool*i + dy, columns pool*j + dx.

    Built from lax primitives with explicit broadcasts, one term per kernel tap and input channel, so
    XLA fuses each phase into a single loop (and the Python tracing cost stays small).
    """
    batch, height, width, in_channels = x_bhwc.shape
    k = kernel.shape[0]
    half = (k - 1) // 2
    out_h, out_w = height // pool, width // pool
    padded = jnp.pad(x_bhwc, ((0, 0), (half, k - 1 - half), (half, k - 1 - half), (0, 0)))
    out_shape = (batch, out_h, out_w, kernel.shape[-1])
    weights = [[[jax.lax.broadcast_in_dim(kernel[ky, kx, c], out_shape, (3,)) for c in range(in_channels)]
                for kx in range(k)] for ky in range(k)]
    bias_b = jax.lax.broadcast_in_dim(bias, out_shape, (3,))
    phases = []
    for dy in range(pool):
        for dx in range(pool):
            total = bias_b
            for ky in range(k):
                for kx in range(k):
                    for c in range(in_channels):
                        plane = jax.lax.slice(
                            padded,
                            (0, dy + ky, dx + kx, c),
                            (batch, dy + ky + pool * (out_h - 1) + 1, dx + kx + pool * (out_w - 1) + 1, c + 1),
                            (1, pool, pool, 1))
                        plane = jax.lax.broadcast_in_dim(plane, out_shape, (0, 1, 2, 3))
                        total = jax.lax.add(total, jax.lax.mul(plane, weights[ky][kx][c]))
            phases.append(total)
    return phases


def _conv(x_bhwc: jax.Array, kernel: jax.Array) -> jax.Array:
    return onednn.conv_general_dilated(x_bhwc, kernel, (1, 1), "SAME", dimension_numbers=_CONV_DIMENSIONS)


def window_sign(scale: jax.Array) -> jax.Array:
    """+1 for channels whose pooled output comes from the window's maximum (BatchNorm scale >= 0), -1 for
    those that need its minimum: with the values multiplied by it, max(-z) = -min(z) serves both, one
    maximum per window."""
    return jnp.where(scale >= 0, 1.0, -1.0).astype(scale.dtype)


def _native_first_block(x_bhwc: jax.Array, kernel: jax.Array, pool: int) -> bool:
    """Whether first_block.cc computes this block: Meso-4's first (RGB -> 8 channels, 3x3, pool 2), float32,
    with the native library available (see meso_jax.cpu.onednn)."""
    return (pool == 2 and x_bhwc.shape[3] == 3 and kernel.shape == (3, 3, 3, 8) and x_bhwc.dtype == jnp.float32
            and kernel.dtype == jnp.float32 and onednn.enabled())


def _native_pool_select(z_bhwc: jax.Array, pool: int) -> bool:
    """Whether pool_select.cc computes the ReLU, statistics and pooling selection of this convolution's
    output: float32, channels a multiple of 8, sides divisible by the pool, the native library available."""
    _, height, width, channels = z_bhwc.shape
    return (z_bhwc.dtype == jnp.float32 and channels % 8 == 0 and height % pool == 0 and width % pool == 0
            and onednn.enabled())


def _moments(sums: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """Batch mean and (biased) variance from the sums of the activations and of their squares."""
    mean, mean_of_squares = sums[0] / count, sums[1] / count
    return mean, jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)


def _native_selection(target: str, z_shape: tuple[int, ...], pool: int, *operands: jax.Array):
    """A native forward (first_block.cc or pool_select.cc) over a convolution output of ``z_shape``: each
    window's selected activation and its position, and the batch mean and variance."""
    batch, height, width, channels = z_shape
    pooled_shape = jax.ShapeDtypeStruct((batch, height // pool, width // pool, channels), jnp.float32)
    sums_shape = jax.ShapeDtypeStruct((2, channels), jnp.float32)
    selected, winner, sums = onednn.native_call(target, (pooled_shape, pooled_shape, sums_shape), *operands)
    return (selected, winner, *_moments(sums, batch * height * width))


def _select(activations: list[jax.Array], sign: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each window's selected activation (the maximum over its positions ``activations``, the minimum for
    channels with a negative ``sign``) and the position holding it (the first, as XLA's max-pool gradient
    picks), as float32."""
    activation_max = functools.reduce(jnp.maximum, activations)
    activation_min = functools.reduce(jnp.minimum, activations)
    selected = jnp.where(sign >= 0, activation_max, activation_min)
    winner = jnp.full(selected.shape, len(activations) - 1, jnp.float32)
    for position in reversed(range(len(activations) - 1)):
        winner = jnp.where(activations[position] == selected, jnp.float32(position), winner)
    if onednn.enabled():
        # Kept in memory for the backward, which would otherwise re-derive them in every fusion reading them.
        selected, winner = onednn.materialize(selected), onednn.materialize(winner)
    return selected, winner


def _grad_z(activation, chosen, grad_selected, c0, c2, mean):
    """d(loss)/dz where relu(z) = ``activation``: the selected values' gradient where the position was
    ``chosen``, and the batch statistics' (c0 = d(loss)/d(mean) / count, c2 = 2 d(loss)/d(var) / count)."""
    return jnp.where(activation > 0, jnp.where(chosen, grad_selected, 0.0) + c0 + (activation - mean) * c2, 0.0)


def _statistics_gradient_coefficients(cotangents, count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(d(loss)/d(selected), c0, c2) for _grad_z from the cotangents of (selected, mean, var)."""
    grad_selected, grad_mean, grad_var = cotangents
    return grad_selected, grad_mean / count, 2.0 * grad_var / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _first_block(x_bhwc, kernel, bias, sign, pool):
    """conv(SAME) + bias -> ReLU -> pooling selection of a block with few input channels, by pooling phase:
    (selected (B, H/pool, W/pool, Cout), batch mean, batch variance), all three differentiable."""
    return _first_block_forward(x_bhwc, kernel, bias, sign, pool)[0]


def _first_block_forward(x_bhwc, kernel, bias, sign, pool):
    batch, height, width, _ = x_bhwc.shape
    count = batch * height * width
    if _native_first_block(x_bhwc, kernel, pool):
        # first_block.cc: one pass over the image, no activations kept (kept=None).
        selected, winner, mean, var = _native_selection(
            onednn.FIRST_BLOCK_FORWARD, (batch, height, width, kernel.shape[3]), pool, x_bhwc, kernel, bias, sign)
        return (selected, mean, var), (x_bhwc, kernel, bias, sign, None, winner, mean)
    activations = [jax.nn.relu(z) for z in pool_phase_conv(x_bhwc, kernel, bias, pool)]
    if onednn.enabled():
        # Each phase's 27-tap sum looks cheap to XLA, which then recomputes it inside every consumer
        # (statistics, pooling, the four backward fusions): computed once into memory instead, the
        # training step takes ~320 ms instead of ~400 (BENCHMARKS.md). Kept after the ReLU, so no
        # consumer writes a second copy.
        activations = [onednn.materialize(a) for a in activations]
    mean, var = _moments(jnp.stack([sum(jnp.sum(a, axis=(0, 1, 2)) for a in activations),
                                    sum(jnp.sum(jnp.square(a), axis=(0, 1, 2)) for a in activations)]), count)
    selected, winner = _select(activations, sign)
    return (selected, mean, var), (x_bhwc, kernel, bias, sign, activations, winner, mean)


def _first_block_backward(pool, residuals, cotangents):
    x_bhwc, kernel, bias, sign, kept, winner, mean = residuals
    batch, height, width, _ = x_bhwc.shape
    grad_selected, c0, c2 = _statistics_gradient_coefficients(cotangents, batch * height * width)
    native = kept is None  # the forward ran first_block.cc, which keeps no activations
    if native:
        # The kernel and bias gradients from first_block.cc. The image's gradient (rarely wanted: XLA removes
        # it when nothing uses it) from the activations recomputed below, as without it.
        per_channel = jax.ShapeDtypeStruct(bias.shape, jnp.float32)
        native_grad_kernel, native_grad_bias = onednn.native_call(
            onednn.FIRST_BLOCK_BACKWARD, (jax.ShapeDtypeStruct(kernel.shape, jnp.float32), per_channel),
            x_bhwc, kernel, bias, winner, grad_selected, jnp.stack([c0, c2, mean]))
        kept = [jax.nn.relu(z) for z in pool_phase_conv(x_bhwc, kernel, bias, pool)]
    grad_phases = [_grad_z(activation, winner == phase, grad_selected, c0, c2, mean)
                   for phase, activation in enumerate(kept)]
    grad_x, grad_kernel = jax.vjp(_conv, x_bhwc, kernel)[1](interleave_pool_phases(grad_phases, pool))
    if native:
        return grad_x, native_grad_kernel, native_grad_bias, jnp.zeros_like(sign)
    return grad_x, grad_kernel, sum(jnp.sum(g, axis=(0, 1, 2)) for g in grad_phases), jnp.zeros_like(sign)


_first_block.defvjp(_first_block_forward, _first_block_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pool_select(z_bhwc, bias_hwc, sign, pool):
    """ReLU(z + bias) -> pooling selection of a convolution's output ``z_bhwc`` with a bias per position
    ``bias_hwc`` (H, W, C): (selected, batch mean, batch variance), all three differentiable."""
    return _pool_select_forward(z_bhwc, bias_hwc, sign, pool)[0]


def _pool_select_forward(z_bhwc, bias_hwc, sign, pool):
    batch, height, width, _ = z_bhwc.shape
    count = batch * height * width
    if _native_pool_select(z_bhwc, pool):
        # pool_select.cc: ReLU, statistics and selection in one pass (XLA makes one each).
        selected, winner, mean, var = _native_selection(
            onednn.POOL_SELECT_FORWARD, z_bhwc.shape, pool, z_bhwc, bias_hwc, sign)
        return (selected, mean, var), (z_bhwc, bias_hwc, sign, winner, mean)
    # The pooling phases are strided views of the activations; statistics and the backward run over the
    # whole array (one pass each instead of one per phase; the gradient needs no re-interleaving). The
    # backward recomputes relu(z + bias) from z inside its own loop.
    full = jax.nn.relu(z_bhwc + bias_hwc)
    mean, var = _moments(jnp.stack([jnp.sum(full, axis=(0, 1, 2)), jnp.sum(jnp.square(full), axis=(0, 1, 2))]), count)
    selected, winner = _select([full[:, dy::pool, dx::pool, :] for dy in range(pool) for dx in range(pool)], sign)
    return (selected, mean, var), (z_bhwc, bias_hwc, sign, winner, mean)


def _pool_select_backward(pool, residuals, cotangents):
    z_bhwc, bias_hwc, sign, winner, mean = residuals
    batch, height, width, channels = z_bhwc.shape
    grad_selected, c0, c2 = _statistics_gradient_coefficients(cotangents, batch * height * width)
    if _native_pool_select(z_bhwc, pool):
        # pool_select.cc (as in the forward): d(loss)/dz and the bias gradient in one pass.
        grad_z, grad_bias = onednn.native_call(
            onednn.POOL_SELECT_BACKWARD,
            (jax.ShapeDtypeStruct(z_bhwc.shape, jnp.float32), jax.ShapeDtypeStruct(bias_hwc.shape, jnp.float32)),
            z_bhwc, bias_hwc, winner, grad_selected, jnp.stack([c0, c2, mean]))
        return grad_z, grad_bias, jnp.zeros_like(sign)
    # In window layout (B, H/pool, pool, W/pool, pool, C): position (dy, dx) of a window is phase dy * pool + dx.
    windows_shape = (batch, height // pool, pool, width // pool, pool, channels)
    position = jnp.arange(pool * pool, dtype=jnp.float32).reshape(1, 1, pool, 1, pool, 1)
    grad_z = _grad_z(jax.nn.relu(z_bhwc + bias_hwc).reshape(windows_shape),
                     winner[:, :, None, :, None, :] == position, grad_selected[:, :, None, :, None, :], c0, c2,
                     mean).reshape(z_bhwc.shape)
    return grad_z, jnp.sum(grad_z, axis=0), jnp.zeros_like(sign)


_pool_select.defvjp(_pool_select_forward, _pool_select_backward)


def _constant_image_conv(value: jax.Array, kernel: jax.Array, height: int, width: int) -> jax.Array:
    """conv(SAME, zero padding) with ``kernel`` (k, k, Cin, Cout) of a (height, width) image whose every pixel
    is ``value`` (Cin,): (height, width, Cout), the sum of the kernel taps that fall inside the image."""
    half = kernel.shape[0] // 2

    def inside(size: int) -> np.ndarray:  # (size, k): whether tap t of position p reads inside the image
        read = np.arange(size)[:, None] + np.arange(kernel.shape[0])[None, :] - half
        return ((read >= 0) & (read < size)).astype(np.float32)

    taps = jnp.einsum("yxio,i->yxo", kernel, value)
    return jnp.einsum("hy,wx,yxo->hwo", inside(height), inside(width), taps)


def conv_of_normalized(inputs: Normalized, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """conv(SAME, zero padding, no bias) of ``inputs.apply()`` without computing it (a pass over memory saved
    each way): the convolution of ``inputs.selected`` with the kernel's input channels scaled, plus that of
    the image of offsets, the same for every image of the batch: (z (B, H, W, Cout), the offsets' part
    (H, W, Cout)), whose sum is the convolution."""
    selected, scale, offset = inputs
    _, height, width, _ = selected.shape
    return _conv(selected, kernel * scale[:, None]), _constant_image_conv(offset, kernel, height, width)


def supports(input_shape: tuple[int, ...], kernel_size: int, pool: int) -> bool:
    """Whether the fused block computes an input of ``input_shape`` (B, H, W, C): odd kernel,
    height and width divisible by the pool."""
    return len(input_shape) == 4 and kernel_size % 2 == 1 and input_shape[1] % pool == 0 \
        and input_shape[2] % pool == 0


def conv_relu_bn_pool_train(inputs: jax.Array | Normalized, kernel: jax.Array, bias: jax.Array, scale: jax.Array,
                            offset: jax.Array, pool: int, epsilon: float, phased_conv: bool = True,
                            defer_normalization: bool = False
                            ) -> tuple[jax.Array | Normalized, jax.Array, jax.Array]:
    """Training-mode block: max_pool(BatchNorm(relu(conv(inputs) + bias))) with batch statistics.

    kernel (k, k, Cin, Cout) with k odd, SAME padding; BatchNorm ``scale``/``offset`` (Cout,); H and W
    divisible by ``pool``. ``phased_conv``: compute the convolution per pooling phase from the input (fast for
    few input channels, e.g. RGB) instead of as one convolution. ``inputs``: an array (B, H, W, Cin), or
    (not with ``phased_conv``) a previous block's Normalized output, folded into this convolution.
    ``defer_normalization``: return the pooled output as Normalized (for the next block to fold). Returns
    (pooled (B, H/pool, W/pool, Cout), batch mean, batch variance (biased) of the ReLU outputs); the
    statistics carry no gradient.
    """
    sign = jax.lax.stop_gradient(window_sign(scale))  # BatchNorm is monotone: pool its input, max or min
    if phased_conv:
        selected, mean, var = _first_block(inputs, kernel, bias, sign, pool)
    else:
        if isinstance(inputs, Normalized):
            z, offsets_part = conv_of_normalized(inputs, kernel)
            bias_hwc = offsets_part + bias
        else:
            z = _conv(inputs, kernel)
            bias_hwc = jnp.broadcast_to(bias, z.shape[1:])
        selected, mean, var = _pool_select(z, bias_hwc, sign, pool)
    channel_scale = scale * jax.lax.rsqrt(var + epsilon)
    if defer_normalization:
        pooled = Normalized(selected, channel_scale, offset - mean * channel_scale)
    else:
        pooled = (selected - mean) * channel_scale + offset
    return pooled, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def enabled() -> bool:
    """Use the fused block in training: on CPU (where it is faster), unless the engine is xla
    (meso_jax.engine)."""
    return engine.native() and jax.default_backend() == "cpu"
