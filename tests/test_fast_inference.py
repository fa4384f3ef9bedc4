"""The fast inference-only Meso-4 forward equals the Flax module (random and published weights)."""

from __future__ import annotations

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import preprocessing
from meso_jax import checkpoints, keras_import, models, scoring
from meso_jax.cpu import fast_inference

BATCH = 4  # one compiled shape for every test in this file


def _random_variables(seed: int, model_name: str = "meso4") -> dict:
    """Random variables of ``model_name`` (numpy, no init compile) with non-trivial BatchNorm: running
    statistics, and scales of both signs (the fast path folds BatchNorm past the max-pool)."""
    shapes = jax.eval_shape(lambda: models.init_variables(models.get_model(model_name), 0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if "kernel" in name:  # He-like scale so activations stay O(1) through the network
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if "'var'" in name:
            return rng.uniform(0.2, 2.0, leaf.shape).astype(np.float32)
        if "'scale'" in name:
            return rng.normal(0, 1, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.2, leaf.shape).astype(np.float32)  # biases, means

    return jax.tree_util.tree_map_with_path(draw, shapes)


_reference_jit = jax.jit(lambda v, x: models.get_model("meso4").module.apply(v, x, train=False))


def _reference_logits(variables: dict, images: np.ndarray) -> np.ndarray:
    return np.asarray(_reference_jit(variables, images))


def _reference_input(path) -> np.ndarray:
    image_rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return cv2.resize(image_rgb, (256, 256), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.float32) / 255.0


def test_matches_flax_module_on_random_variables() -> None:
    variables = _random_variables(seed=7)
    scales = [variables["params"][f"ConvBlock_{b}"]["BatchNorm_0"]["scale"] for b in range(4)]
    assert any((s < 0).any() for s in scales) and any((s > 0).any() for s in scales)
    images = np.asarray(jax.random.uniform(jax.random.key(1), (BATCH, 256, 256, 3)))
    expected = _reference_logits(variables, images)
    fast = np.asarray(fast_inference.meso4_inference_fn(variables)(images))
    assert fast.shape == (BATCH,)
    np.testing.assert_allclose(fast, expected, atol=1e-5, rtol=1e-5)


def test_matches_published_weights_and_reference_scores(shared_dir) -> None:
    mesonet_dir = shared_dir / "mesonet"
    reference = json.loads((mesonet_dir / "reference_scores.json").read_text())["Meso4_DF.h5"]
    model_name, variables = keras_import.load_keras_weights(mesonet_dir / "Meso4_DF.h5")
    assert model_name == "meso4"
    images = np.stack([_reference_input(mesonet_dir / image) for image in reference])
    images = np.concatenate([images, np.zeros((BATCH - len(images), 256, 256, 3), np.float32)])[:BATCH]
    expected = _reference_logits(variables, images)
    fast = np.asarray(fast_inference.meso4_inference_fn(variables)(images))
    np.testing.assert_allclose(fast, expected, atol=1e-5, rtol=0)
    scores = np.asarray(jax.nn.sigmoid(fast))[:len(reference)]
    np.testing.assert_allclose(scores, list(reference.values()), atol=1e-4, rtol=0)


def test_scorer_uses_fast_path_for_meso4_with_same_scores() -> None:
    variables = _random_variables(seed=3)
    loaded = checkpoints.LoadedModel("meso4", variables, {}, {})
    fast_scorer = scoring.Scorer(loaded, batch_size=BATCH)
    assert fast_scorer.uses_fast_path
    assert not scoring.Scorer(loaded, batch_size=BATCH, fast_path=False).uses_fast_path
    images = np.asarray(jax.random.uniform(jax.random.key(5), (BATCH + 1, 256, 256, 3)))
    padded = np.concatenate([images, np.zeros((BATCH - 1, 256, 256, 3), np.float32)])
    expected = 1 / (1 + np.exp(-np.concatenate([_reference_logits(variables, padded[:BATCH]),
                                                _reference_logits(variables, padded[BATCH:])])))
    np.testing.assert_allclose(fast_scorer.score(images), expected[:BATCH + 1], atol=1e-6, rtol=0)


def test_ensembles_with_meso4_members_take_the_fast_path_with_the_same_scores() -> None:
    name = models.ensemble_name(["meso4", "mesoinception4", "meso4"])
    variables = _random_variables(seed=6, model_name=name)
    loaded = checkpoints.LoadedModel(name, variables, {}, {})
    fast_scorer, plain_scorer = (scoring.Scorer(loaded, batch_size=BATCH, fast_path=fast) for fast in (True, False))
    assert fast_scorer.uses_fast_path and not plain_scorer.uses_fast_path
    assert not fast_inference.supports(models.ensemble_name(["mesoinception4", "mesoinception4"]), (256, 256, 3))
    images = np.random.default_rng(2).integers(0, 256, (BATCH, 256, 256, 3), dtype=np.uint8)
    expected = plain_scorer.score(images)
    assert np.ptp(expected) > 1e-3  # the images get different scores
    np.testing.assert_allclose(fast_scorer.score(images), expected, atol=1e-5, rtol=0)


def test_flip_average_is_the_mean_logit_of_the_image_and_its_mirror() -> None:
    variables = _random_variables(seed=4)
    loaded = checkpoints.LoadedModel("meso4", variables, {}, {})
    images = np.asarray(jax.random.uniform(jax.random.key(9), (BATCH, 256, 256, 3)))
    mirrored = images[:, :, ::-1, :]
    logits, mirrored_logits = _reference_logits(variables, images), _reference_logits(variables, mirrored)
    assert np.max(np.abs(logits - mirrored_logits)) > 1e-3  # the mirror is another input to the model
    expected = 1 / (1 + np.exp(-(logits + mirrored_logits) / 2))
    for fast_path in (True, False):
        scorer = scoring.Scorer(loaded, batch_size=BATCH, fast_path=fast_path, flip_average=True)
        np.testing.assert_allclose(scorer.score(images), expected, atol=1e-6, rtol=0)
        # A lone image (scored as a batch of one) and uint8 crops take the same path.
        np.testing.assert_allclose(scorer.score(images[:1]), expected[:1], atol=1e-6, rtol=0)
        crops = np.round(images * 255).astype(np.uint8)
        np.testing.assert_allclose(scorer.score(crops), scorer.score(crops.astype(np.float32) / 255), atol=1e-6)
    # A mirror-symmetric image scores the same either way.
    symmetric = np.concatenate([images[:, :, :128], images[:, :, :128][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(scoring.Scorer(loaded, BATCH, flip_average=True).score(symmetric),
                               scoring.Scorer(loaded, BATCH).score(symmetric), atol=1e-6, rtol=0)


def test_uint8_crops_are_scaled_on_the_device_like_the_host_would() -> None:
    variables = _random_variables(seed=5)
    loaded = checkpoints.LoadedModel("meso4", variables, {}, {})
    crops = np.asarray(jax.random.randint(jax.random.key(7), (BATCH + 1, 256, 256, 3), 0, 256), np.uint8)
    on_host = preprocessing.scale_to_unit(crops)
    assert on_host.dtype == np.float32 and on_host.min() >= 0 and on_host.max() <= 1
    for fast_path in (True, False):
        scorer = scoring.Scorer(loaded, batch_size=BATCH, fast_path=fast_path)
        assert scorer.uses_fast_path == fast_path
        np.testing.assert_allclose(scorer.score(crops), scorer.score(on_host), atol=1e-6, rtol=0)


def test_supports_only_meso4_on_suitable_shapes() -> None:
    assert fast_inference.supports("meso4", (256, 256, 3))
    assert not fast_inference.supports("meso4", (250, 256, 3))
    assert not fast_inference.supports("mesoinception4", (256, 256, 3))
    assert not fast_inference.supports("meso4_video", (24, 256, 256, 3))
    with pytest.raises(ValueError, match="divisible by 64"):
        fast_inference.meso4_forward({}, jnp.zeros((1, 100, 256, 3)))


def test_large_cpu_batches_run_in_chunks_with_the_same_logits(monkeypatch) -> None:
    variables = _random_variables(seed=9)
    monkeypatch.setattr(fast_inference, "CPU_CHUNK_IMAGES", 2)  # batch 5: two chunks of 2, then 1
    images = np.asarray(jax.random.uniform(jax.random.key(11), (5, 256, 256, 3)))
    chunked_hlo = jax.jit(fast_inference.meso4_forward).lower(variables, images).as_text()
    assert "while" in chunked_hlo  # the lax.map loop over chunks
    chunked = np.asarray(jax.jit(fast_inference.meso4_forward)(variables, images))
    one_pass = np.asarray(jax.jit(fast_inference._meso4_forward_one_pass)(variables, images))  # pylint: disable=protected-access
    # Chunks of 2 and one batch of 5 may take different kernels (another float32 summation order):
    # equal to float32 rounding of O(1) activations, as in the other comparisons here.
    np.testing.assert_allclose(chunked, one_pass, atol=1e-5, rtol=0)
