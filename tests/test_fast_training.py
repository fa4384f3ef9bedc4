"""The fused training block (meso_jax/cpu/fast_training.py) against the Flax ConvBlock and a float64 reference."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meso_jax import engine, models, train
from meso_jax.cpu import fast_training, onednn

pytestmark = pytest.mark.native  # the native CPU code (a C++ compiler) against the XLA reference

EPSILON = models.KERAS_BN_EPSILON


def _reference_block(x, kernel, bias, scale, offset, pool):
    """conv -> ReLU -> BatchNorm (batch statistics) -> max-pool, with XLA's ops and autodiff."""
    z = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    a = jax.nn.relu(z)
    mean = a.mean((0, 1, 2))
    var = jnp.mean(jnp.square(a), (0, 1, 2)) - jnp.square(mean)
    y = (a - mean) * jax.lax.rsqrt(var + EPSILON) * scale + offset
    window = (1, pool, pool, 1)
    return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, window, window, "VALID"), mean, var


def _random_block(rng, batch, size, kernel_size, in_channels, out_channels, pool):
    x = rng.random((batch, size, size, in_channels), np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, in_channels, out_channels), np.float32) * 0.3
    bias = rng.standard_normal(out_channels, np.float32) * 0.1
    scale = rng.standard_normal(out_channels, np.float32)  # both signs: max and min pooling paths
    scale[0], scale[1] = abs(scale[0]) + 0.1, -abs(scale[1]) - 0.1
    offset = rng.standard_normal(out_channels, np.float32)
    upstream = rng.standard_normal((batch, size // pool, size // pool, out_channels), np.float32)
    return (x, kernel, bias, scale, offset), upstream


@pytest.mark.parametrize("kernel_size,in_channels,out_channels,pool,phased_conv,flat_patches", [
    (3, 3, 8, 2, True, False), (5, 8, 8, 2, True, False), (3, 2, 4, 4, True, False), (5, 8, 16, 4, False, False),
    (5, 8, 8, 2, False, False), (3, 3, 8, 2, True, True), (5, 8, 16, 4, False, True)])
def test_fused_block_matches_a_float64_reference_in_value_and_gradient(kernel_size, in_channels, out_channels, pool,
                                                                      phased_conv, flat_patches):
    inputs, upstream = _random_block(np.random.default_rng(kernel_size * 10 + pool), 3, 32, kernel_size,
                                     in_channels, out_channels, pool)
    if flat_patches:
        # Constant 8x8 patches: inside them every pooling window holds equal values, so the gradient
        # must go to each window's first maximum (or minimum), as XLA's max-pool gradient does.
        patches = np.random.default_rng(1).integers(0, 3, (3, 4, 4, in_channels)).astype(np.float32) / 2
        inputs = (np.repeat(np.repeat(patches, 8, axis=1), 8, axis=2), *inputs[1:])

    def loss(block, *arrays):
        pooled, _, _ = block(*arrays, pool)
        return jnp.sum(pooled * arrays[0].dtype.type(1) * upstream.astype(arrays[0].dtype))

    fused = lambda *a: fast_training.conv_relu_bn_pool_train(*a, EPSILON, phased_conv)  # noqa: E731
    outputs = jax.jit(fused, static_argnums=5)(*inputs, pool)
    grads = jax.jit(jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2, 3, 4)))(*inputs)
    with jax.enable_x64(True):
        inputs64 = [np.asarray(a, np.float64) for a in inputs]
        expected = _reference_block(*inputs64, pool)
        expected_grads = jax.grad(lambda *a: loss(_reference_block, *a), argnums=(0, 1, 2, 3, 4))(*inputs64)
        expected = [np.asarray(e) for e in expected]
        expected_grads = [np.asarray(g) for g in expected_grads]
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("x", "kernel", "bias", "scale", "offset"), grads, expected_grads):
        scale_of = np.max(np.abs(want)) + 1e-6
        assert np.max(np.abs(np.asarray(got) - want)) / scale_of < 1e-4, name


@pytest.mark.slow
def test_meso4_fused_blocks_train_like_the_flax_module():
    """Same logits (dropout on), running statistics and parameter gradients as the plain module."""
    spec = models.get_model("meso4")
    variables = models.init_variables(spec, seed=3)
    images = np.random.default_rng(0).random((4, 256, 256, 3), np.float32)
    rngs = {"dropout": jax.random.key(7)}

    def run(module):
        def loss(params):
            logits, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                           train=True, mutable=["batch_stats"], rngs=rngs)
            return jnp.sum(jnp.sin(logits)), (logits, updates)
        (_, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return logits, updates["batch_stats"], grads

    plain = run(spec.module)
    for module in (spec.module.clone(fused_first_block=True),
                   spec.module.clone(fused_first_block=True, fused_later_blocks=True)):
        fused = run(module)
        np.testing.assert_allclose(fused[0], plain[0], rtol=1e-4, atol=1e-4)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), fused[1],
                               plain[1])
        plain_grads = jax.tree_util.tree_leaves_with_path(plain[2])
        for (path, want), got in zip(plain_grads, jax.tree_util.tree_leaves(fused[2])):
            error = np.max(np.abs(np.asarray(got) - np.asarray(want))) / (np.max(np.abs(np.asarray(want))) + 1e-6)
            assert error < 2e-3, (jax.tree_util.keystr(path), error)
        # Inference is untouched by the flags.
        np.testing.assert_array_equal(module.apply(variables, images[:1], train=False),
                                      spec.module.apply(variables, images[:1], train=False))


def test_training_uses_the_fused_block_on_cpu_unless_turned_off():
    spec = models.get_model("meso4")
    assert train.training_module(spec).fused_first_block == (jax.default_backend() == "cpu")
    assert train.training_module(spec).fused_later_blocks == (jax.default_backend() == "cpu" and onednn.enabled())
    with engine.selecting("xla"):
        assert not train.training_module(spec).fused_first_block
        assert not train.training_module(spec).fused_later_blocks
    assert train.training_module(models.get_model("mesoinception4")) == models.get_model("mesoinception4").module


def _assert_native_matches_xla(monkeypatch, native_predicate: str, targets: tuple[str, ...], block, arrays, upstream):
    """``block`` with the native kernels ``targets`` against the same block with ``native_predicate``
    (a fast_training function) answering False: pooled values, statistics and all five gradients."""

    def run(native: bool):
        if not native:
            monkeypatch.setattr(fast_training, native_predicate, lambda *args: False)
        loss = lambda *a: jnp.sum(block(*a)[0] * upstream)  # noqa: E731
        compiled = jax.jit(lambda *a: (block(*a), jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*a)))
        text = compiled.lower(*arrays).compile().as_text()
        assert all(target in text for target in targets) == native
        return compiled(*arrays)

    native, xla = run(True), run(False)
    for name, got, want in zip(("pooled", "mean", "var", "x", "kernel", "bias", "scale", "offset"),
                               jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(xla)):
        error = np.max(np.abs(np.asarray(got) - np.asarray(want))) / (np.max(np.abs(np.asarray(want))) + 1e-6)
        assert error < 1e-5, (name, error)


@pytest.fixture(scope="module")
def eight_wide_first_block(tmp_path_factory) -> tuple[str, str]:
    """first_block.cc built without AVX-512 (its 8-wide kernels, what an AVX2 machine's build runs) and
    registered under names of its own: (forward, backward) targets. Skips where the library's own build
    already is that one."""
    if not onednn.enabled():
        pytest.skip("the native library (meso_jax.cpu.onednn) is unavailable here")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or " avx512f" not in cpuinfo.read_text():
        pytest.skip("no AVX-512 here: the library's own build is the 8-wide one, tested against XLA as it is")
    library = tmp_path_factory.mktemp("eight_wide") / "libfirst_block_8_wide.so"
    subprocess.run([onednn.find_compiler(), *onednn.COMPILE_FLAGS, "-mno-avx512f", f"-I{jax.ffi.include_dir()}",
                    str(Path(onednn.__file__).with_name("first_block.cc")), "-o", str(library)],
                   check=True, capture_output=True)
    handle = ctypes.cdll.LoadLibrary(str(library))
    targets = (onednn.FIRST_BLOCK_FORWARD, onednn.FIRST_BLOCK_BACKWARD)
    for target in targets:
        jax.ffi.register_ffi_target(f"{target}8Wide", jax.ffi.pycapsule(getattr(handle, target)), platform="cpu")
    return tuple(f"{target}8Wide" for target in targets)


@pytest.mark.parametrize("height,width,flat", [(6, 10, False), (2, 4, False), (16, 12, True)])
@pytest.mark.parametrize("build", ["library", "8-wide"])
def test_native_first_block_matches_the_xla_formulation(monkeypatch, request, build, height, width, flat):
    """first_block.cc (Meso-4's first block on CPU with the native library) against the same block in XLA
    ops, at image edges and on ties: the library's build (16-wide kernels on an AVX-512 machine) and the
    8-wide kernels an AVX2 machine builds."""
    if not onednn.enabled():
        pytest.skip("the native library (meso_jax.cpu.onednn) is unavailable here")
    if build == "8-wide":
        forward, backward = request.getfixturevalue("eight_wide_first_block")
        monkeypatch.setattr(onednn, "FIRST_BLOCK_FORWARD", forward)
        monkeypatch.setattr(onednn, "FIRST_BLOCK_BACKWARD", backward)
    rng = np.random.default_rng(height * width)
    (x, kernel, bias, scale, offset), _ = _random_block(rng, 3, 2, 3, 3, 8, 2)
    x = rng.random((3, height, width, 3), np.float32)
    if flat:  # constant 4x4 patches: windows full of equal values, the gradient to the first position
        x = np.repeat(np.repeat(x[:, ::4, ::4], 4, axis=1), 4, axis=2)
    upstream = rng.standard_normal((3, height // 2, width // 2, 8), np.float32)
    _assert_native_matches_xla(monkeypatch, "_native_first_block",
                               (onednn.FIRST_BLOCK_FORWARD, onednn.FIRST_BLOCK_BACKWARD),
                               lambda *a: fast_training.conv_relu_bn_pool_train(*a, 2, EPSILON),
                               (x, kernel, bias, scale, offset), upstream)


def test_both_first_block_builds_sum_the_convolution_in_the_same_order(eight_wide_first_block):
    """The 16-wide (AVX-512) and 8-wide kernels add the taps in the same order, so their window maxima and
    winning positions are the same to the last bit (the statistics' sums to float rounding): a last-bit
    difference would send the gradient of a near-tied window to another position, which Adam amplifies
    (8 devices, where XLA computes the block, would then train differently from 1)."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (2, 64, 96, 3)).astype(np.float32) / 255
    kernel = rng.standard_normal((3, 3, 3, 8), np.float32) * 0.3
    bias, sign = rng.standard_normal(8, np.float32) * 0.1, np.where(rng.random(8) < 0.5, -1.0, 1.0).astype(np.float32)
    pooled = jax.ShapeDtypeStruct((2, 32, 48, 8), jnp.float32)
    shapes = (pooled, pooled, jax.ShapeDtypeStruct((2, 8), jnp.float32))
    library, eight_wide = (jax.jit(lambda *a, target=target: onednn.native_call(target, shapes, *a))(
        x, kernel, bias, sign) for target in (onednn.FIRST_BLOCK_FORWARD, eight_wide_first_block[0]))
    for got, want in zip(library[:2], eight_wide[:2]):  # selected, winner
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.asarray(library[2]), np.asarray(eight_wide[2]), rtol=1e-6)


@pytest.mark.parametrize("channels,pool,flat,folded", [(8, 2, False, False), (16, 4, False, False),
                                                       (16, 4, True, False), (8, 2, False, True)])
def test_native_pool_selection_matches_the_xla_formulation(monkeypatch, channels, pool, flat, folded):
    """pool_select.cc (ReLU, statistics and pooling selection after a later block's convolution, and their
    gradient) against the same block in XLA ops, also on ties, and with the previous block's BatchNorm
    folded into the convolution (a bias that changes near the edges)."""
    if not onednn.enabled():
        pytest.skip("the native library (meso_jax.cpu.onednn) is unavailable here")
    rng = np.random.default_rng(channels * pool)
    (x, kernel, bias, scale, offset), upstream = _random_block(rng, 3, 16, 5, 8, channels, pool)
    if flat:  # constant patches: windows full of equal values, the gradient to the first position
        x = np.repeat(np.repeat(x[:, ::8, ::8], 8, axis=1), 8, axis=2)
    previous_scale, previous_offset = rng.standard_normal((2, 8), np.float32)

    def block(x, *parameters):
        inputs = models.Normalized(x, previous_scale, previous_offset) if folded else x
        return fast_training.conv_relu_bn_pool_train(inputs, *parameters, pool, EPSILON, False)

    _assert_native_matches_xla(monkeypatch, "_native_pool_select",
                               (onednn.POOL_SELECT_FORWARD, onednn.POOL_SELECT_BACKWARD), block,
                               (x, kernel, bias, scale, offset), upstream)


@pytest.mark.parametrize("shape,kernel_size", [((2, 12, 10, 8), 5), ((2, 4, 2, 8), 5), ((3, 6, 8, 3), 3)])
def test_conv_of_normalized_is_the_convolution_of_the_normalized_input(shape, kernel_size):
    """A previous block's BatchNorm folded into the convolution (scaled kernel, per-position offsets' part)
    gives the convolution of the normalized input, in value and in every gradient, at the edges too and on
    images smaller than the kernel."""
    rng = np.random.default_rng(kernel_size)
    selected = rng.random(shape, np.float32)
    scale = rng.standard_normal(shape[3], np.float32)
    offset = rng.standard_normal(shape[3], np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, shape[3], 4), np.float32)
    upstream = rng.standard_normal((*shape[:3], 4), np.float32)

    def folded(selected, scale, offset, kernel):
        z, offsets_part = fast_training.conv_of_normalized(models.Normalized(selected, scale, offset), kernel)
        return jnp.sum((z + offsets_part) * upstream)

    def explicit(selected, scale, offset, kernel):
        normalized = models.Normalized(selected, scale, offset).apply()
        z = jax.lax.conv_general_dilated(normalized, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(z * upstream)

    arguments = (selected, scale, offset, kernel)
    got = jax.jit(jax.value_and_grad(folded, argnums=(0, 1, 2, 3)))(*arguments)
    want = jax.jit(jax.value_and_grad(explicit, argnums=(0, 1, 2, 3)))(*arguments)
    for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        error = np.max(np.abs(np.asarray(got_leaf) - np.asarray(want_leaf))) / (np.max(np.abs(want_leaf)) + 1e-6)
        assert error < 1e-5


@pytest.mark.parametrize("kernel_size,in_channels,phased_conv", [(3, 3, True), (5, 8, False)])
def test_native_blocks_propagate_nan_like_xla(kernel_size, in_channels, phased_conv):
    """A NaN in the input (first_block.cc for the first block, pool_select.cc for a later one) makes the
    statistics and every output NaN, as in XLA (so training stops on a NaN loss)."""
    if not onednn.enabled():
        pytest.skip("the native library (meso_jax.cpu.onednn) is unavailable here")
    (x, kernel, bias, scale, offset), _ = _random_block(np.random.default_rng(5), 2, 8, kernel_size, in_channels, 8, 2)
    x[1, 3, 5, 2] = np.nan
    pooled, mean, var = jax.jit(lambda *a: fast_training.conv_relu_bn_pool_train(*a, 2, EPSILON, phased_conv))(
        x, kernel, bias, scale, offset)
    assert np.isnan(np.asarray(pooled)).all() and np.isnan(np.asarray(mean)).any()
