"""The optional oneDNN convolution backend (meso_jax/cpu/onednn.py): same values and gradients as XLA's
convolution, used by the models on the CPU, and a clear fallback when it cannot be built."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging

from meso_jax import engine, models
from meso_jax.cpu import onednn
from tests.conftest import random_model_variables

pytestmark = pytest.mark.native  # the native CPU code (a C++ compiler) against the XLA reference

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module")
def backend() -> None:
    """Skips, saying why, when the backend cannot be used here (CI installs it from requirements.txt on
    Linux x86-64)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the oneDNN backend is for the CPU backend only")
    try:
        onednn._load()  # pylint: disable=protected-access  (for the reason; available() only logs it)
    except onednn.BackendUnavailable as reason:
        pytest.skip(f"the oneDNN backend is unavailable here ({reason}); XLA's convolution is used instead")


def _compiled(fn, use_onednn: bool, *args):
    with engine.selecting("native" if use_onednn else "xla"):
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()


@pytest.mark.parametrize("batch,height,width,in_channels,out_channels,kernel_size,dilation", [
    (3, 16, 19, 3, 8, 3, 1),   # Meso-4's first layer, odd width
    (2, 12, 12, 8, 8, 5, 1),   # 5x5 layers; 8 -> 8 channels run on column pairs
    (2, 11, 14, 8, 8, 3, 1),   # column pairs with other kernel sizes
    (2, 6, 10, 8, 8, 1, 1),
    (2, 12, 13, 8, 8, 5, 1),   # odd width: no column pairs
    (2, 10, 12, 8, 16, 5, 1),  # 8 -> 16: the input's gradient on column pairs
    (2, 10, 11, 8, 16, 5, 1),  # odd width: not
    (2, 17, 16, 2, 4, 3, 2),   # MesoInception-4's dilated branches
    (2, 16, 16, 4, 2, 3, 3),
    (2, 9, 9, 5, 7, 1, 1),     # 1x1
    (2, 10, 10, 3, 5, 4, 1),   # even kernel: SAME pads one more at the end
])
def test_convolution_and_both_gradients_match_xla(backend, batch, height, width, in_channels, out_channels,
                                                   kernel_size, dilation):
    rng = np.random.default_rng(kernel_size * 10 + dilation)
    x = rng.standard_normal((batch, height, width, in_channels), np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, in_channels, out_channels), np.float32)
    upstream = rng.standard_normal((batch, height, width, out_channels), np.float32)

    def conv(x, kernel):
        return onednn.conv_general_dilated(x, kernel, (1, 1), "SAME", rhs_dilation=(dilation, dilation),
                                           dimension_numbers=_DIMENSIONS)

    def value_and_grads(x, kernel):
        y, vjp = jax.vjp(conv, x, kernel)
        return y, *vjp(upstream)

    ours = _compiled(value_and_grads, True, x, kernel)
    assert "custom_call" in ours.as_text() and "convolution(" not in ours.as_text()
    expected = _compiled(value_and_grads, False, x, kernel)(x, kernel)
    for name, got, want in zip(("y", "grad_x", "grad_kernel"), ours(x, kernel), expected):
        scale = float(np.max(np.abs(want)))
        assert float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) <= 1e-5 * scale, name


@pytest.mark.parametrize("width,kernel_size,paired_kernel", [(12, 5, "f32[5,3,16,16]"), (12, 3, "f32[3,3,16,16]"),
                                                             (13, 5, None)])
def test_eight_channel_convolutions_run_on_column_pairs_where_the_width_is_even(backend, width, kernel_size,
                                                                                 paired_kernel):
    """oneDNN computes 16 channels at a time: 8 -> 8 convolutions run as 16 -> 16 on pairs of columns."""
    x = np.zeros((2, 8, width, 8), np.float32)
    kernel = np.zeros((kernel_size, kernel_size, 8, 8), np.float32)
    conv = lambda x, kernel: onednn.conv_general_dilated(x, kernel, (1, 1), "SAME",  # noqa: E731
                                                         dimension_numbers=_DIMENSIONS)
    text = _compiled(jax.grad(lambda x, kernel: jnp.sum(conv(x, kernel)), (0, 1)), True, x, kernel).as_text()
    calls = [line for line in text.splitlines() if "custom_call_target=\"MesoOnednnConv" in line]
    assert len(calls) == 2  # both gradients (the forward's value is unused)
    if paired_kernel:
        assert all(paired_kernel in line for line in calls)
    else:
        assert not any("16]" in line for line in calls)


@pytest.mark.parametrize("width,paired", [(12, True), (13, False)])
def test_an_eight_channel_inputs_gradient_runs_on_column_pairs(backend, width, paired):
    """8 -> 16: forward and kernel gradient as they are (16 output channels), the input's gradient (8
    channels) on pairs of columns: a 32 -> 16 computation with the paired kernel."""
    x = np.zeros((2, 8, width, 8), np.float32)
    kernel = np.zeros((5, 5, 8, 16), np.float32)
    conv = lambda x, kernel: onednn.conv_general_dilated(x, kernel, (1, 1), "SAME",  # noqa: E731
                                                         dimension_numbers=_DIMENSIONS)
    text = _compiled(jax.grad(lambda x, kernel: jnp.sum(conv(x, kernel) ** 2), (0, 1)), True, x, kernel).as_text()
    calls = {target: line for line in text.splitlines() for target in ("Forward", "BackwardData", "BackwardWeights")
             if f'custom_call_target="MesoOnednnConv{target}"' in line}
    assert set(calls) == {"Forward", "BackwardData", "BackwardWeights"}
    assert "f32[5,5,8,16]" in calls["Forward"] and "f32[5,5,8,16]" in calls["BackwardWeights"]
    assert ("f32[5,3,16,32]" in calls["BackwardData"]) == paired


@pytest.mark.parametrize("kernel_h,kernel_w", [(3, 5), (4, 3)])
def test_column_pairs_with_rectangular_kernels(backend, kernel_h, kernel_w):
    rng = np.random.default_rng(kernel_h * 10 + kernel_w)
    x = rng.standard_normal((2, 9, 12, 8), np.float32)
    kernel = rng.standard_normal((kernel_h, kernel_w, 8, 8), np.float32)
    conv = lambda x, kernel: onednn.conv_general_dilated(x, kernel, (1, 1), "SAME",  # noqa: E731
                                                         dimension_numbers=_DIMENSIONS)
    ours = _compiled(conv, True, x, kernel)
    assert "16,16]" in ours.as_text()
    np.testing.assert_allclose(np.asarray(ours(x, kernel)), np.asarray(_compiled(conv, False, x, kernel)(x, kernel)),
                               rtol=1e-5, atol=1e-4)


def test_both_gradients_repeatedly_in_one_program(backend):
    """XLA runs the two independent gradient calls concurrently; each must use its own scratchpad
    (oneDNN's shared default crashed the process here at MesoInception-4's sizes)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 96, 96, 4), np.float32)
    kernel = rng.standard_normal((3, 3, 4, 4), np.float32)
    loss = lambda x, kernel: jnp.sum(jnp.sin(onednn.conv2d_same(x, kernel, 2)))  # noqa: E731
    grads = jax.jit(jax.grad(loss, (0, 1)))
    first = grads(x, kernel)
    for _ in range(20):
        again = grads(x, kernel)
    np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(first[1]))


def test_materialize_passes_values_through_as_an_unfusable_call(backend):
    x = np.random.default_rng(1).standard_normal((4, 16, 16, 8), np.float32)

    def consumers(materialized: bool):
        def fn(x):
            y = jnp.sin(x) * 2.0 + 1.0
            y = onednn.materialize(y) if materialized else y
            return jnp.sum(y), jnp.max(y, axis=(1, 2)), y[:, ::2, 1::2] * 3.0
        return jax.jit(fn)

    for got, want in zip(consumers(True)(x), consumers(False)(x)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert "MesoMaterialize" in consumers(True).lower(x).compile().as_text()


@pytest.mark.parametrize("call", [
    dict(window_strides=(2, 2), padding="SAME"),
    dict(window_strides=(1, 1), padding="VALID"),
    dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(2, 2)),
    dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(1, 2)),
])
def test_calls_it_does_not_compute_go_to_xla(backend, call):
    x = np.ones((1, 8, 8, 2), np.float32)
    kernel = np.ones((3, 3, 2, 2), np.float32)
    fn = lambda x, kernel: onednn.conv_general_dilated(x, kernel, dimension_numbers=_DIMENSIONS, **call)  # noqa
    with engine.selecting("native"):
        text = jax.jit(fn).lower(x, kernel).as_text()
    assert "custom_call" not in text and "convolution" in text
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(x, kernel)),
                                  np.asarray(jax.lax.conv_general_dilated(x, kernel, dimension_numbers=_DIMENSIONS,
                                                                          **call)))


@pytest.mark.parametrize("model_name", ["meso4", "mesoinception4"])
def test_models_give_the_same_logits_and_gradients_with_either_backend(backend, model_name):
    spec = models.get_model(model_name)
    variables = random_model_variables(3, model_name=model_name)
    images = np.random.default_rng(1).random((2, *spec.input_shape), np.float32)

    def logits_and_grads(params, images):
        def loss(params):
            logits, _ = spec.module.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                          train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.key(0)})
            return jnp.sum(logits), logits
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads, spec.module.apply({**variables, "params": params}, images, train=False)

    ours = _compiled(logits_and_grads, True, variables["params"], images)
    assert "custom_call" in ours.as_text()
    got = ours(variables["params"], images)
    want = _compiled(logits_and_grads, False, variables["params"], images)(variables["params"], images)
    for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        scale = float(np.max(np.abs(want_leaf))) + 1e-6
        assert float(np.max(np.abs(np.asarray(got_leaf) - np.asarray(want_leaf)))) <= 2e-5 * scale


def test_a_failed_build_is_a_one_line_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(onednn.BackendUnavailable, match="building onednn_conv.cc, first_block.cc, pool_select.cc failed") as raised:
        onednn._build(tmp_path / "lib" / "libmeso_onednn.so", tmp_path, tmp_path)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "lib" / "libmeso_onednn.so").exists()


def test_a_missing_library_package_is_named():
    with pytest.raises(onednn.BackendUnavailable, match="no-such-onednn-package package is not installed"):
        onednn._distribution_file("no-such-onednn-package", "lib/libdnnl.so")


def test_without_the_backend_convolutions_go_to_xla_with_one_info_line_and_native_is_refused(monkeypatch, caplog):
    def unavailable():
        raise onednn.BackendUnavailable("the onednn-cpu-gomp package is not installed")

    monkeypatch.setattr(onednn, "_load", unavailable)
    onednn.available.cache_clear()
    onednn.unavailable_reason.cache_clear()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # the entry scripts' in-process tests leave it at WARNING
    try:
        x, kernel = np.ones((1, 8, 8, 2), np.float32), np.ones((3, 3, 2, 4), np.float32)
        conv = lambda x, kernel: onednn.conv_general_dilated(x, kernel, (1, 1), "SAME",  # noqa: E731
                                                             dimension_numbers=_DIMENSIONS)
        with caplog.at_level("INFO"):
            text = jax.jit(conv).lower(x, kernel).as_text()
            assert not onednn.available() and not onednn.enabled()
        assert "custom_call" not in text and "convolution" in text
        records = [record for record in caplog.records if "oneDNN" in record.getMessage()]
        assert [record.getMessage() for record in records] == [
            "oneDNN convolutions unavailable (the onednn-cpu-gomp package is not installed); "
            "using XLA's, which is slower on a CPU"]
        assert records[0].levelname == "INFO"  # quiet at the entry scripts' default verbosity
        with pytest.raises(engine.EngineUnavailable, match="cannot run here: the onednn-cpu-gomp package"):
            engine.select("native")
        assert engine.selected() == "auto" and "native library unavailable" in engine.describe()
    finally:
        absl_logging.set_verbosity(verbosity)
        onednn.available.cache_clear()  # the real backend again for later tests
        onednn.unavailable_reason.cache_clear()


def test_the_engine_switch_selects_the_reference_or_the_native_paths():
    from meso_jax.cpu import fast_inference, fast_training  # pylint: disable=import-outside-toplevel

    assert engine.selected() == "auto" and fast_inference.enabled()
    with engine.selecting("xla"):
        assert not (fast_inference.enabled() or fast_training.enabled() or onednn.enabled())
        assert engine.describe().startswith("xla")
    assert fast_training.enabled() == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="auto, xla, native"):
        engine.select("fast")
