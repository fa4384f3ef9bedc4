"""Import of the authors' published Keras weights: parity with the float64 reference scores."""

from __future__ import annotations

import json

import cv2
import h5py
import jax
import numpy as np
import pytest

from meso_jax import checkpoints, keras_import, models

WEIGHT_FILES = ("Meso4_DF.h5", "Meso4_F2F.h5", "MesoInception_DF.h5", "MesoInception_F2F.h5")


def _reference_input(path) -> np.ndarray:
    """As described in reference_scores.json: OpenCV decode, BGR->RGB, INTER_NEAREST_EXACT to 256, /255."""
    image_rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return cv2.resize(image_rgb, (256, 256), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.float32) / 255.0


@pytest.mark.parametrize("weight_file", WEIGHT_FILES)
def test_published_weights_match_reference_scores(shared_dir, weight_file: str) -> None:
    mesonet_dir = shared_dir / "mesonet"
    reference = json.loads((mesonet_dir / "reference_scores.json").read_text())[weight_file]
    model_name, variables = keras_import.load_keras_weights(mesonet_dir / weight_file)
    assert model_name == ("meso4" if weight_file.startswith("Meso4") else "mesoinception4")
    images = np.stack([_reference_input(mesonet_dir / image) for image in reference])
    scores = jax.nn.sigmoid(models.get_model(model_name).module.apply(variables, images, train=False))
    np.testing.assert_allclose(np.asarray(scores), list(reference.values()), atol=1e-4, rtol=0)


def test_converted_weights_export_as_orbax_checkpoint(shared_dir, tmp_path) -> None:
    h5_path = shared_dir / "mesonet" / "Meso4_DF.h5"
    model_name, variables = keras_import.load_keras_weights(h5_path)
    keras_import.convert_keras_weights(h5_path, tmp_path / "meso4_df")
    loaded = checkpoints.load_model(tmp_path / "meso4_df")
    assert loaded.model_name == model_name
    assert loaded.metadata["source_weights"] == "Meso4_DF.h5"
    assert loaded.preprocessing["resize"] == "nearest"
    for expected, found in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(loaded.variables)):
        np.testing.assert_array_equal(expected, found)


def test_a_file_that_is_not_mesonet_is_a_clear_error(tmp_path) -> None:
    not_hdf5 = tmp_path / "weights.h5"
    not_hdf5.write_bytes(b"this is not an HDF5 file")
    with pytest.raises(keras_import.KerasWeightsError, match="cannot read as a Keras HDF5 weight file"):
        keras_import.load_keras_weights(not_hdf5)

    other_network = tmp_path / "other.h5"
    with h5py.File(other_network, "w") as h5:
        h5.attrs["layer_names"] = [b"dense_1"]
        group = h5.create_group("dense_1")
        group.attrs["weight_names"] = [b"dense_1/kernel:0", b"dense_1/bias:0"]
        group["dense_1/kernel:0"] = np.zeros((10, 2), np.float32)
        group["dense_1/bias:0"] = np.zeros((2,), np.float32)
    with pytest.raises(keras_import.KerasWeightsError, match=r"not a MesoNet weight file: found 0 conv"):
        keras_import.load_keras_weights(other_network)


def test_weights_with_nan_are_a_clear_error(shared_dir, tmp_path) -> None:
    poisoned = tmp_path / "Meso4_DF.h5"
    poisoned.write_bytes((shared_dir / "mesonet" / "Meso4_DF.h5").read_bytes())
    with h5py.File(poisoned, "r+") as h5:
        kernels = []
        h5.visititems(lambda name, item: kernels.append(name) if isinstance(item, h5py.Dataset) and "kernel" in name
                      else None)
        h5[kernels[0]][(0,) * h5[kernels[0]].ndim] = np.nan
    with pytest.raises(keras_import.KerasWeightsError, match="holds NaN or infinite weights"):
        keras_import.load_keras_weights(poisoned)
