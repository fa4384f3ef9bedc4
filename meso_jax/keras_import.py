"""Import of the authors' published MesoNet Keras 2 weight files (``save_weights`` .h5) with h5py.

No Keras is needed: the architecture is detected from the layers' weight shapes and the kernels,
biases and BatchNorm statistics are mapped onto this package's Flax variables. Keras 2 names
layers ``conv2d_<N>`` with N counting up in creation order; MesoInception's branches (two of which
have identical shapes) are told apart by that order.
"""

from __future__ import annotations

import os
import re
from typing import Any

import h5py
import jax
import numpy as np

from meso_jax import checkpoints, models


class KerasWeightsError(Exception):
    """A file that is not a readable MesoNet Keras weight file (one-line message)."""


_INCEPTION_CONV_ORDER = (
    "branch1_1x1", "branch2_1x1", "branch2_3x3", "branch3_1x1", "branch3_3x3", "branch4_1x1", "branch4_3x3",
)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _creation_index(layer_name: str, file_position: int) -> tuple[int, int]:
    match = re.search(r"_(\d+)$", layer_name)
    return (int(match.group(1)) if match else 0, file_position)


def _read_layers(h5_path: str) -> dict[str, list[dict[str, np.ndarray]]]:
    """Reads the weighted layers of a Keras weight file, grouped by kind, in creation order."""
    by_kind: dict[str, list[tuple[tuple[int, int], dict[str, np.ndarray]]]] = {"conv": [], "bn": [], "dense": []}
    with h5py.File(h5_path, "r") as h5:
        weights_root = h5["model_weights"] if "model_weights" in h5 else h5
        if "layer_names" not in weights_root.attrs:
            raise KerasWeightsError(f"{h5_path}: not a Keras weight file (no 'layer_names' attribute)")
        for position, layer_name in enumerate(_text(n) for n in weights_root.attrs["layer_names"]):
            group = weights_root[layer_name]
            weights = {
                _text(w).split("/")[-1].split(":")[0]: np.asarray(group[_text(w)], dtype=np.float32)
                for w in group.attrs.get("weight_names", [])
            }
            if not weights:
                continue
            if {"gamma", "beta", "moving_mean", "moving_variance"} <= weights.keys():
                kind = "bn"
            elif "kernel" in weights and weights["kernel"].ndim == 4:
                kind = "conv"
            elif "kernel" in weights and weights["kernel"].ndim == 2:
                kind = "dense"
            else:
                raise KerasWeightsError(
                    f"{h5_path}: layer {layer_name!r} has weights {sorted(weights)} that no MesoNet layer has"
                )
            by_kind[kind].append((_creation_index(layer_name, position), weights))
    return {kind: [w for _, w in sorted(layers, key=lambda item: item[0])] for kind, layers in by_kind.items()}


def _conv(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"kernel": weights["kernel"], "bias": weights["bias"]}


def _batch_norm(weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    params = {"scale": weights["gamma"], "bias": weights["beta"]}
    stats = {"mean": weights["moving_mean"], "var": weights["moving_variance"]}
    return params, stats


def _head(dense_layers: list[dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    return {f"Dense_{i}": {"kernel": w["kernel"], "bias": w["bias"]} for i, w in enumerate(dense_layers)}


def _meso4_variables(layers: dict[str, list[dict[str, np.ndarray]]]) -> dict:
    params: dict[str, Any] = {"ClassifierHead_0": _head(layers["dense"])}
    stats: dict[str, Any] = {}
    for block, (conv, bn) in enumerate(zip(layers["conv"], layers["bn"])):
        bn_params, bn_stats = _batch_norm(bn)
        params[f"ConvBlock_{block}"] = {"Conv_0": _conv(conv), "BatchNorm_0": bn_params}
        stats[f"ConvBlock_{block}"] = {"BatchNorm_0": bn_stats}
    return {"params": params, "batch_stats": stats}


def _mesoinception4_variables(layers: dict[str, list[dict[str, np.ndarray]]]) -> dict:
    convs, bns = layers["conv"], layers["bn"]
    params: dict[str, Any] = {"ClassifierHead_0": _head(layers["dense"])}
    stats: dict[str, Any] = {}
    per_block = len(_INCEPTION_CONV_ORDER)
    for block in range(2):
        block_convs = convs[block * per_block:(block + 1) * per_block]
        params[f"InceptionBlock_{block}"] = {name: _conv(w) for name, w in zip(_INCEPTION_CONV_ORDER, block_convs)}
        params[f"BatchNorm_{block}"], stats[f"BatchNorm_{block}"] = _batch_norm(bns[block])
    for block in range(2):
        bn_params, bn_stats = _batch_norm(bns[2 + block])
        params[f"ConvBlock_{block}"] = {"Conv_0": _conv(convs[2 * per_block + block]), "BatchNorm_0": bn_params}
        stats[f"ConvBlock_{block}"] = {"BatchNorm_0": bn_stats}
    return {"params": params, "batch_stats": stats}


_ARCHITECTURES = {
    # (conv layers, batch-norm layers, dense layers) -> (model name, variable builder)
    (4, 4, 2): ("meso4", _meso4_variables),
    (16, 4, 2): ("mesoinception4", _mesoinception4_variables),
}


def _check_shapes(h5_path: str, model_name: str, variables: dict) -> None:
    expected = jax.eval_shape(lambda: models.init_variables(models.get_model(model_name), 0))
    expected_shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    found_shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(variables)}
    for path, shape in expected_shapes.items():
        if found_shapes.get(path) != shape:
            raise KerasWeightsError(
                f"{h5_path}: looks like {model_name} but {path} has shape {found_shapes.get(path)}, expected {shape}"
            )


def load_keras_weights(h5_path: str | os.PathLike) -> tuple[str, dict]:
    """Reads a published MesoNet .h5 weight file; returns (model name, Flax variables)."""
    h5_path = os.fspath(h5_path)
    try:
        layers = _read_layers(h5_path)
    except KerasWeightsError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise KerasWeightsError(f"{h5_path}: cannot read as a Keras HDF5 weight file ({error})") from None
    counts = (len(layers["conv"]), len(layers["bn"]), len(layers["dense"]))
    if counts not in _ARCHITECTURES:
        raise KerasWeightsError(
            f"{h5_path}: not a MesoNet weight file: found {counts[0]} conv, {counts[1]} batch-norm and "
            f"{counts[2]} dense layers; expected Meso-4 (4, 4, 2) or MesoInception-4 (16, 4, 2)"
        )
    model_name, build_variables = _ARCHITECTURES[counts]
    variables = build_variables(layers)
    _check_shapes(h5_path, model_name, variables)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    if not checkpoints.all_finite(variables):
        raise KerasWeightsError(f"{h5_path}: holds NaN or infinite weights")
    return model_name, variables


def convert_keras_weights(h5_path: str | os.PathLike, directory: str | os.PathLike) -> str:
    """Converts a published .h5 file once into an orbax model directory; returns the model name.

    The exported model carries the preprocessing the authors' weights expect (the defaults:
    nearest-neighbour resize to 256x256, Viola-Jones faces) so later runs need no flags.
    """
    from data_pipelines.preprocessing import Preprocessing  # the one definition of preprocessing

    model_name, variables = load_keras_weights(h5_path)
    checkpoints.save_model(directory, model_name, variables, Preprocessing().to_dict(),
                           {"source_weights": os.path.basename(os.fspath(h5_path)),
                            "source": "DariusAf/MesoNet published Keras weights (Apache-2.0)"})
    return model_name
