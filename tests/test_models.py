"""The networks are exactly the published ones: parameter counts, shapes, BatchNorm behaviour."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meso_jax import models
from tests.conftest import REPO_ROOT


def _abstract_variables(name: str) -> dict:
    return jax.eval_shape(lambda: models.init_variables(models.get_model(name), 0))


@pytest.mark.parametrize("name, trainable, batch_stats", [
    ("meso4", 27_977, 96),
    ("mesoinception4", 28_615, 110),
    ("meso4_video", 49_009, 176),
])
def test_parameter_counts(name: str, trainable: int, batch_stats: int) -> None:
    variables = _abstract_variables(name)
    assert models.count_params(variables["params"]) == trainable
    assert models.count_params(variables["batch_stats"]) == batch_stats


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_output_is_one_logit_per_input(name: str) -> None:
    spec = models.get_model(name)
    variables = _abstract_variables(name)
    inputs = jax.ShapeDtypeStruct((3, *spec.input_shape), jnp.float32)
    logits = jax.eval_shape(lambda v, x: spec.module.apply(v, x, train=False), variables, inputs)
    assert logits.shape == (3,)
    assert spec.is_clip_model == (name == "meso4_video")


def test_meso4_layer_shapes_match_the_paper() -> None:
    params = _abstract_variables("meso4")["params"]
    kernels = [params[f"ConvBlock_{i}"]["Conv_0"]["kernel"].shape for i in range(4)]
    assert kernels == [(3, 3, 3, 8), (5, 5, 8, 8), (5, 5, 8, 16), (5, 5, 16, 16)]
    assert params["ClassifierHead_0"]["Dense_0"]["kernel"].shape == (8 * 8 * 16, 16)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="meso4, mesoinception4, meso4_video"):
        models.get_model("resnet")


def test_batch_norm_updates_in_train_mode_only() -> None:
    spec = models.get_model("meso4")
    variables = models.init_variables(spec, seed=0)
    images = jax.random.uniform(jax.random.key(1), (2, 256, 256, 3))
    _, updates = spec.module.apply(variables, images, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.key(2)})
    before = variables["batch_stats"]["ConvBlock_0"]["BatchNorm_0"]["mean"]
    after = updates["batch_stats"]["ConvBlock_0"]["BatchNorm_0"]["mean"]
    assert not np.allclose(before, after)
    # Keras momentum 0.99: the running mean moves 1% of the way to the batch mean.
    np.testing.assert_array_less(np.abs(np.asarray(after)), 0.05)

    eval_logits_1 = spec.module.apply(variables, images, train=False)
    eval_logits_2 = spec.module.apply(variables, images[::-1], train=False)[::-1]
    # In eval mode each image's score is independent of its batch (running statistics are used).
    np.testing.assert_allclose(eval_logits_1, eval_logits_2, rtol=1e-5, atol=1e-5)


def test_keras_kernel_init_is_glorot_uniform_and_keeps_the_rest() -> None:
    spec = models.get_model("meso4")
    flax_init = models.init_variables(spec, seed=3)
    keras_init = models.init_variables(spec, seed=3, kernel_init="keras")
    again = models.init_variables(spec, seed=3, kernel_init="keras")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, keras_init, again))  # deterministic
    assert jax.tree_util.tree_structure(keras_init) == jax.tree_util.tree_structure(flax_init)
    conv = keras_init["params"]["ConvBlock_2"]["Conv_0"]["kernel"]  # 5x5, 8 -> 16
    limit = np.sqrt(6.0 / (25 * 8 + 25 * 16))  # Keras: fans include the receptive field
    assert np.abs(conv).max() <= limit and np.abs(conv).max() > 0.9 * limit
    assert np.std(conv) == pytest.approx(limit / np.sqrt(3), rel=0.1)  # uniform(-a, a): std a / sqrt(3)
    dense = keras_init["params"]["ClassifierHead_0"]["Dense_0"]["kernel"]  # 1024 -> 16
    assert np.abs(dense).max() <= np.sqrt(6.0 / (1024 + 16))
    for block in ("ConvBlock_0", "ConvBlock_3"):  # biases and BatchNorm untouched
        np.testing.assert_array_equal(keras_init["params"][block]["Conv_0"]["bias"],
                                      flax_init["params"][block]["Conv_0"]["bias"])
        np.testing.assert_array_equal(keras_init["params"][block]["BatchNorm_0"]["scale"],
                                      flax_init["params"][block]["BatchNorm_0"]["scale"])
    with pytest.raises(ValueError, match="choose one of flax, keras"):
        models.init_variables(spec, seed=3, kernel_init="he")


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_shifted_conv_is_flax_conv(dilation: int, backend: str, monkeypatch) -> None:
    """Same parameters, initial values, outputs and gradients as nn.Conv, on either formulation."""
    import flax.linen as nn

    images = jax.random.normal(jax.random.PRNGKey(0), (2, 13, 11, 4))
    reference = nn.Conv(3, (3, 3), padding="SAME", kernel_dilation=dilation)
    shifted = models.ShiftedConv(3, 3, dilation)
    variables = reference.init(jax.random.PRNGKey(1), images)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # the formulation is chosen at trace time
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, shifted.init(jax.random.PRNGKey(1), images))

    def loss(module, params):
        return jnp.sum(jnp.sin(module.apply(params, images)))

    np.testing.assert_allclose(shifted.apply(variables, images), reference.apply(variables, images), atol=2e-6)
    # Each gradient entry sums 286 products; float32 rounding differs by CPU (AVX-512 vs AMX kernels),
    # so the tolerance is relative to the largest entry, not to each (small) entry.
    jax.tree_util.tree_map(
        lambda want, got: np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max())),
        jax.grad(lambda p: loss(reference, p))(variables),
        jax.grad(lambda p: loss(shifted, p))(variables))


@pytest.mark.parametrize("pool,shape", [(2, (2, 8, 8, 3)), (4, (2, 8, 12, 2)), (2, (2, 6, 5, 2))])
def test_max_pool_equals_reduce_window_in_values_and_gradient_ties_included(pool, shape) -> None:
    # Values rounded to integers: many windows hold their maximum more than once.
    rng = np.random.default_rng(pool)
    x = jnp.asarray(np.round(rng.standard_normal(shape) * 1.5).astype(np.float32))

    def reference(x):
        window = (pool, pool)
        return nn.max_pool(x, window, strides=window, padding="SAME")

    pooled, pool_vjp = jax.vjp(lambda x: models._max_pool(x, pool), x)  # pylint: disable=protected-access
    expected, reference_vjp = jax.vjp(reference, x)
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(expected))
    grad_pooled = jnp.asarray(rng.standard_normal(expected.shape).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(pool_vjp(grad_pooled)[0]), np.asarray(reference_vjp(grad_pooled)[0]))


def test_the_model_definitions_import_no_engine():
    """models.py holds the plain Flax modules only: faster paths (meso_jax.cpu) are reached through the
    engine switch (meso_jax.engine), never imported by the models."""
    lines = (REPO_ROOT / "meso_jax" / "models.py").read_text().splitlines()
    imports = [line.strip() for line in lines if line.lstrip().startswith(("import ", "from "))]
    ours = [line for line in imports if "meso_jax" in line]
    assert not [line for line in ours if "meso_jax.cpu" in line or "fast_" in line or "onednn" in line], ours
    assert set(ours) == {"from meso_jax import engine", "from meso_jax.config import DROPOUT_RATE"}, ours
