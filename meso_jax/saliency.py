"""Saliency maps: which pixels of a face moved the model's score (SmoothGrad of the logit, in JAX).

SmoothGrad (Smilkov et al., 2017): the gradient of the model's logit with respect to the input pixels,
averaged over copies of the face with Gaussian noise added, which removes most of the plain gradient's
speckle. The logit is the one the scan reports: with flip averaging, the mean of the logits of the face
and of its mirror image, so the map explains the score actually printed (each noisy copy goes through
one of the two views, alternately: the same expectation at half the cost). A map is the magnitude of that
mean gradient summed over colour channels, lightly blurred, and scaled to [0, 1] by its 99th percentile.
Computed with the model's plain Flax module (the reference path), for any model the scanner loads:
ours, an ensemble, or the published weights.
"""

from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.preprocessing import as_model_input
from meso_jax import scoring

NOISE_SAMPLES = 2  # noisy copies per face (with flip averaging, half for each view)
NOISE_STD = 0.1  # of the input range [0, 1]
BLUR_SIGMA_FRACTION = 1 / 128  # of the face side


@functools.lru_cache(maxsize=8)
def _smoothgrad_function(module, flip_average: bool, samples: int, noise_std: float):
    """jit: (variables, float inputs (N, S, S, 3), key) -> (N, S, S) |mean d logit / d pixel| over noise.

    With flip averaging the reported logit is (f(x) + f(mirror(x))) / 2; each noisy copy is given to one
    of the two terms in turn (half the copies each), an unbiased estimate of the mean's SmoothGrad at
    the cost of one gradient per copy."""
    views = 2 if flip_average else 1
    rounds = max(1, samples // views)

    def view_logit_sum(variables, inputs_bhwc, mirrored):
        if mirrored:
            return jnp.sum(module.apply(variables, inputs_bhwc[:, :, ::-1, :], train=False)) / views
        return jnp.sum(module.apply(variables, inputs_bhwc, train=False)) / views

    gradients = [jax.grad(functools.partial(view_logit_sum, mirrored=bool(view)), argnums=1) for view in range(views)]

    @jax.jit
    def smoothgrad(variables, inputs_bhwc, key):
        def one_round(total, round_key):
            view_keys = jax.random.split(round_key, views)
            for gradient, view_key in zip(gradients, view_keys):
                noise = noise_std * jax.random.normal(view_key, inputs_bhwc.shape, inputs_bhwc.dtype)
                total = total + gradient(variables, inputs_bhwc + noise)
            return total, None

        total, _ = jax.lax.scan(one_round, jnp.zeros_like(inputs_bhwc), jax.random.split(key, rounds))
        return jnp.abs(total / rounds).sum(axis=-1)

    return smoothgrad


def saliency_maps(scorer: scoring.Scorer, faces_bhwc: np.ndarray, samples: int = NOISE_SAMPLES,
                  noise_std: float = NOISE_STD, seed: int = 0) -> np.ndarray:
    """float32 (N, S, S) maps in [0, 1] of the scorer's model for uint8 (or [0, 1] float) face crops
    (N, S, S, 3) of its input size; 1 marks the pixels that moved the reported logit most."""
    if len(scorer.input_shape) != 3:
        raise ValueError(f"{scorer.spec.name} scores clips; saliency maps are computed for face models")
    if len(faces_bhwc) == 0:
        return np.zeros((0,) + tuple(scorer.input_shape[:2]), np.float32)
    function = _smoothgrad_function(scorer.spec.module, scorer.flip_average, samples, noise_std)
    inputs = as_model_input(np.asarray(faces_bhwc))
    key = jax.random.PRNGKey(seed)
    # One face per call: a CPU computes a batch no faster per face, and one input shape means one trace
    # and one compilation per process, however many faces each file shows.
    raw = [np.asarray(function(scorer.variables, jnp.asarray(face[None]), key), dtype=np.float32)[0]
           for face in inputs]
    maps = []
    for heat in raw:
        sigma = max(1.0, heat.shape[0] * BLUR_SIGMA_FRACTION)
        heat = cv2.GaussianBlur(heat, (0, 0), sigma)
        top = float(np.percentile(heat, 99))
        maps.append(np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat))
    return np.stack(maps)


def overlay(face_rgb: np.ndarray, heat: np.ndarray, opacity: float = 0.55) -> np.ndarray:
    """uint8 RGB: the face with the map drawn over it in a perceptual colour map (inferno)."""
    colours_bgr = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    weight = (opacity * np.sqrt(heat))[..., None]  # cold pixels stay visible
    blended = face_rgb.astype(np.float32) * (1 - weight) + colours_bgr[..., ::-1].astype(np.float32) * weight
    return np.clip(blended, 0, 255).round().astype(np.uint8)


def mass_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    """Ratio of the map's mean inside ``mask`` (bool) to its mean outside: > 1 when the map concentrates
    on the masked region."""
    inside, outside = heat[mask], heat[~mask]
    return float(inside.mean() / max(outside.mean(), 1e-12))
