"""A fused training-mode "conv (SAME, bias) -> ReLU -> BatchNorm -> max-pool" block with its own gradient.

Meso-4's first block (256x256, 3 -> 8 channels, 3x3, pool 2) is most of a training step on CPU: XLA's
convolution with 3 input channels is slow, and so is the automatic gradient of the max-pool. This op
computes the same block (BatchNorm on batch statistics, as in training) in two parts:

* Forward, pool-phase decomposition (shared with fast_inference): for each pooling phase (dy, dx) the
  conv outputs at rows p*i + dy, columns p*j + dx are one fused sum of k*k*Cin stride-p slices of the
  padded input times weight vectors (``phased_conv``, for a first layer), or strided slices of one
  convolution's output (for the later blocks). BatchNorm's per-channel affine map
  y = (a - mean) * s + offset is monotone, so the max over a window of y comes from the window's max
  of a = relu(z) (s >= 0) or its min (s < 0): the normalisation is applied once, after pooling.
* Backward, written out: BatchNorm's gradient in closed form (every pooled output selects exactly one
  position of its window: the forward keeps which), the ReLU mask, then the weight (and input)
  gradients of the convolution (oneDNN's where available, see meso_jax.onednn, else XLA's) on the
  full-resolution gradient: re-interleaved from the phases for a first layer, computed in place over
  the convolution's output for the later blocks. The input gradient is dead code for a first layer and
  XLA removes it. The phase outputs, the selected values and their phase are kept in memory for the
  backward (``onednn.materialize``, where oneDNN is on) rather than recomputed by each of XLA's
  fusions that reads them.

On the CPU with the native library (meso_jax.onednn), Meso-4's first block (RGB -> 8 channels, 3x3,
pool 2) runs as two calls of ``first_block.cc`` instead: the forward in one pass over the image (each
window's selected activation and its position, and the sums for the statistics; no activations kept),
the backward recomputing the convolution while it accumulates the kernel and bias gradients (the
image's gradient, when something needs it, still comes from the XLA formulation): the training step
takes ~1.45x less time than with the XLA formulation (BENCHMARKS.md). The later blocks' forward after
their convolution (ReLU, statistics, pooling selection) is one pass of ``pool_select.cc`` there instead
of XLA's pass for each, and so is their backward up to the convolution's (d(loss)/dz with the bias,
scale and offset gradients).

Results equal the Flax ConvBlock's (models.ConvBlock) in float32; in tests against a float64
reference the fused gradients are the more accurate of the two (first_block.cc's kernel gradient is
~40x closer to float64 than XLA's at batch 32: it sums in double across rows). Measured in
benchmarks/model_throughput.py ("training" rows); used by train.py on CPU for Meso-4's first block,
and for its later blocks too where oneDNN computes the convolutions (``MESO_JAX_FAST_TRAINING=0``
turns it off).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from meso_jax import onednn

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


def interleave_pool_phases(phases: list[jax.Array], pool: int) -> jax.Array:
    """The inverse of splitting by pooling phase: ``phases`` [(dy, dx) row-major], each (B, h, w, C),
    woven into one (B, h * pool, w * pool, C) array with phase (dy, dx) at rows pool*i + dy, columns
    pool*j + dx."""
    batch, out_h, out_w, channels = phases[0].shape
    return (jnp.stack(phases).reshape(pool, pool, batch, out_h, out_w, channels)
            .transpose(2, 3, 0, 4, 1, 5).reshape(batch, out_h * pool, out_w * pool, channels))


def _conv(x_bhwc: jax.Array, kernel: jax.Array) -> jax.Array:
    return onednn.conv_general_dilated(x_bhwc, kernel, (1, 1), "SAME", dimension_numbers=_CONV_DIMENSIONS)


def window_sign(scale: jax.Array) -> jax.Array:
    """+1 for channels whose pooled output comes from the window's maximum (BatchNorm scale >= 0), -1 for
    those that need its minimum: with the values multiplied by it, max(-z) = -min(z) serves both, one
    maximum per window."""
    return jnp.where(scale >= 0, 1.0, -1.0).astype(scale.dtype)


def _native_first_block(x_bhwc: jax.Array, kernel: jax.Array, pool: int) -> bool:
    """Whether first_block.cc computes this block: Meso-4's first (RGB -> 8 channels, 3x3, pool 2), float32,
    with the native library available (see meso_jax.onednn)."""
    return (pool == 2 and x_bhwc.shape[3] == 3 and kernel.shape == (3, 3, 3, 8) and x_bhwc.dtype == jnp.float32
            and kernel.dtype == jnp.float32 and onednn.enabled())


def _native_pool_select(z_bhwc: jax.Array, pool: int) -> bool:
    """Whether pool_select.cc computes the ReLU, statistics and pooling selection of this convolution's
    output: float32, channels a multiple of 8, sides divisible by the pool, the native library available."""
    _, height, width, channels = z_bhwc.shape
    return (z_bhwc.dtype == jnp.float32 and channels % 8 == 0 and height % pool == 0 and width % pool == 0
            and onednn.enabled())


def _native_selection(target, operands, z_shape, pool, scale, offset, epsilon):
    """A native forward (first_block.cc or pool_select.cc): each window's selected activation and its
    position, and the sums for the batch statistics, then BatchNorm of the selected activations."""
    batch, height, width, channels = z_shape
    pooled_shape = jax.ShapeDtypeStruct((batch, height // pool, width // pool, channels), jnp.float32)
    sums_shape = jax.ShapeDtypeStruct((2, channels), jnp.float32)
    sign = window_sign(scale)  # the sign of scale * inv_std
    selected, winner, sums = onednn.native_call(target, (pooled_shape, pooled_shape, sums_shape), *operands, sign)
    count = batch * height * width
    mean, mean_of_squares = sums[0] / count, sums[1] / count
    var = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
    inv_std = jax.lax.rsqrt(var + epsilon)
    pooled = (selected - mean) * (scale * inv_std) + offset
    return (pooled, mean, var), selected, winner, mean, inv_std


def _forward(x_bhwc, kernel, bias, scale, offset, pool, epsilon, phased_conv):
    batch, height, width, _ = x_bhwc.shape
    z_shape = (batch, height, width, kernel.shape[3])
    if phased_conv and _native_first_block(x_bhwc, kernel, pool):
        # first_block.cc: one pass over the image, no activations kept (kept=None).
        outputs, selected, winner, mean, inv_std = _native_selection(
            onednn.FIRST_BLOCK_FORWARD, (x_bhwc, kernel, bias), z_shape, pool, scale, offset, epsilon)
        return outputs, (x_bhwc, kernel, bias, None, selected, winner, mean, inv_std, scale)
    # relu(z): everything after the ReLU, and its mask (relu(z) > 0 exactly where z > 0), needs only it.
    if phased_conv:
        # Split by pooling phase, each computed from the input (pool_phase_conv).
        activations = [jax.nn.relu(z) for z in pool_phase_conv(x_bhwc, kernel, bias, pool)]
        if onednn.enabled():
            # Each phase's 27-tap sum looks cheap to XLA, which then recomputes it inside every consumer
            # (statistics, pooling, the four backward fusions): computed once into memory instead, the
            # training step takes ~320 ms instead of ~400 (BENCHMARKS.md). Kept after the ReLU, so no
            # consumer writes a second copy.
            activations = [onednn.materialize(a) for a in activations]
        kept = activations
        statistics_over = activations
    else:
        # One convolution; its phases are strided views of it, but statistics and the backward run over
        # the whole array (one pass each instead of one per phase; the gradient needs no re-interleaving).
        # The backward recomputes relu(z + bias) from z inside its own loop.
        kept = z = _conv(x_bhwc, kernel)
        if _native_pool_select(z, pool):
            # pool_select.cc: ReLU, statistics and selection in one pass (XLA makes one each).
            outputs, selected, winner, mean, inv_std = _native_selection(
                onednn.POOL_SELECT_FORWARD, (z, bias), z_shape, pool, scale, offset, epsilon)
            return outputs, (x_bhwc, kernel, bias, kept, selected, winner, mean, inv_std, scale)
        full = jax.nn.relu(z + bias)
        activations = [full[:, dy::pool, dx::pool, :] for dy in range(pool) for dx in range(pool)]
        statistics_over = [full]
    count = batch * height * width
    # Batch statistics of relu(z) over all positions, as flax.linen.BatchNorm computes them.
    mean = sum(jnp.sum(a, axis=(0, 1, 2)) for a in statistics_over) / count
    mean_of_squares = sum(jnp.sum(jnp.square(a), axis=(0, 1, 2)) for a in statistics_over) / count
    var = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
    inv_std = jax.lax.rsqrt(var + epsilon)
    channel_scale = scale * inv_std
    activation_max = functools.reduce(jnp.maximum, activations)
    activation_min = functools.reduce(jnp.minimum, activations)
    selected = jnp.where(channel_scale >= 0, activation_max, activation_min)  # the activation each output takes
    # The phase each output took its value from (the first holding it, as XLA's max-pool gradient picks
    # the first maximum), kept for the backward, which would otherwise re-derive it (and ``selected``)
    # from all phases in every phase's gradient.
    winner = jnp.full(selected.shape, len(activations) - 1, jnp.float32)
    for phase in reversed(range(len(activations) - 1)):
        winner = jnp.where(activations[phase] == selected, jnp.float32(phase), winner)
    if onednn.enabled():
        selected, winner = onednn.materialize(selected), onednn.materialize(winner)
    pooled = (selected - mean) * channel_scale + offset
    return (pooled, mean, var), (x_bhwc, kernel, bias, kept, selected, winner, mean, inv_std, scale)


def _backward(pool, epsilon, phased_conv, residuals, cotangents):
    del epsilon
    x_bhwc, kernel, bias, kept, selected, winner, mean, inv_std, scale = residuals
    grad_pooled = cotangents[0]  # the statistics outputs are returned under stop_gradient
    batch, height, width, _ = x_bhwc.shape
    count = batch * height * width
    per_channel = jax.ShapeDtypeStruct(bias.shape, jnp.float32)
    statistics = jnp.stack([scale * inv_std, inv_std, mean])  # the native backwards' BatchNorm coefficients
    native_first_block = kept is None  # the forward ran first_block.cc, which keeps no activations
    if native_first_block:
        # The kernel, bias, scale and offset gradients from first_block.cc. The image's gradient (rarely
        # wanted: XLA removes it when nothing uses it) from the activations recomputed below, as without it.
        native_grad_kernel, native_grad_bias, grad_scale, grad_offset = onednn.native_call(
            onednn.FIRST_BLOCK_BACKWARD, (jax.ShapeDtypeStruct(kernel.shape, jnp.float32),) + (per_channel,) * 3,
            x_bhwc, kernel, bias, winner, selected, grad_pooled, statistics)
        kept = [jax.nn.relu(z) for z in pool_phase_conv(x_bhwc, kernel, bias, pool)]
    elif not phased_conv and _native_pool_select(kept, pool):
        # pool_select.cc (as in the forward): d(loss)/dz and the bias, scale and offset gradients in one pass.
        grad_z, grad_bias, grad_scale, grad_offset = onednn.native_call(
            onednn.POOL_SELECT_BACKWARD, (jax.ShapeDtypeStruct(kept.shape, jnp.float32),) + (per_channel,) * 3,
            kept, bias, winner, selected, grad_pooled, statistics)
        grad_x, grad_kernel = jax.vjp(_conv, x_bhwc, kernel)[1](grad_z)
        return grad_x, grad_kernel, grad_bias, grad_scale, grad_offset
    else:
        grad_offset = jnp.sum(grad_pooled, axis=(0, 1, 2))
        grad_scale = jnp.sum(grad_pooled * (selected - mean) * inv_std, axis=(0, 1, 2))

    def grad_z_of(activation, chosen, grad_pooled_at):
        """d/dz of BatchNorm (batch statistics) after the ReLU; the pooled gradient reaches only the
        winning phase's position."""
        grad_activation = scale * inv_std * (jnp.where(chosen, grad_pooled_at, 0.0) - grad_offset / count
                                             - (activation - mean) * inv_std * grad_scale / count)
        return jnp.where(activation > 0, grad_activation, 0.0)

    if phased_conv:
        grad_phases = [grad_z_of(activation, winner == phase, grad_pooled)
                       for phase, activation in enumerate(kept)]
        grad_bias = sum(jnp.sum(g, axis=(0, 1, 2)) for g in grad_phases)
        grad_z = interleave_pool_phases(grad_phases, pool)
    else:
        # In window layout (B, H/pool, pool, W/pool, pool, C): position (dy, dx) of a window is phase
        # dy * pool + dx.
        windows_shape = (batch, height // pool, pool, width // pool, pool, kept.shape[-1])
        phase_of_position = jnp.arange(pool * pool, dtype=jnp.float32).reshape(1, 1, pool, 1, pool, 1)
        chosen = winner[:, :, None, :, None, :] == phase_of_position
        grad_z = grad_z_of(jax.nn.relu(kept + bias).reshape(windows_shape), chosen,
                           grad_pooled[:, :, None, :, None, :]).reshape(kept.shape)
        grad_bias = jnp.sum(grad_z, axis=(0, 1, 2))
    _, conv_vjp = jax.vjp(_conv, x_bhwc, kernel)
    grad_x, grad_kernel = conv_vjp(grad_z)
    if native_first_block:
        grad_kernel, grad_bias = native_grad_kernel, native_grad_bias
    return grad_x, grad_kernel, grad_bias, grad_scale, grad_offset


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused_block(x_bhwc, kernel, bias, scale, offset, pool, epsilon, phased_conv):
    return _forward(x_bhwc, kernel, bias, scale, offset, pool, epsilon, phased_conv)[0]


_fused_block.defvjp(_forward, _backward)


def supports(input_shape: tuple[int, ...], kernel_size: int, pool: int) -> bool:
    """Whether the fused block computes an input of ``input_shape`` (B, H, W, C): odd kernel,
    height and width divisible by the pool."""
    return len(input_shape) == 4 and kernel_size % 2 == 1 and input_shape[1] % pool == 0 \
        and input_shape[2] % pool == 0


def conv_relu_bn_pool_train(x_bhwc: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array,
                            offset: jax.Array, pool: int, epsilon: float, phased_conv: bool = True
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode block: max_pool(BatchNorm(relu(conv(x) + bias))) with batch statistics.

    kernel (k, k, Cin, Cout) with k odd, SAME padding; BatchNorm ``scale``/``offset`` (Cout,);
    H and W divisible by ``pool``. ``phased_conv``: compute the convolution per pooling phase from the
    input (fast for few input channels) instead of as one convolution. Returns (pooled (B, H/pool,
    W/pool, Cout), batch mean, batch variance (biased) of the ReLU outputs); the statistics carry no
    gradient.
    """
    pooled, mean, var = _fused_block(x_bhwc, kernel, bias, scale, offset, pool, epsilon, phased_conv)
    return pooled, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def enabled() -> bool:
    """Use the fused block in training: on CPU (where it is faster), unless MESO_JAX_FAST_TRAINING=0."""
    return os.environ.get("MESO_JAX_FAST_TRAINING", "1") != "0" and jax.default_backend() == "cpu"
