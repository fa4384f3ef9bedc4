"""One definition of the training configuration: train_main's flags are made from TrainConfig's fields."""

from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from meso_jax import config, models


def test_every_setting_is_a_flag_with_the_dataclass_default_and_back():
    flag_values = flags.FlagValues()
    config.define_flags(flag_values)
    flag_values(["train_main"])
    made = config.from_flags(flag_values, preprocessing={"face_detector": "none"})
    assert made == config.TrainConfig(preprocessing={"face_detector": "none"})
    named = {field.metadata.get("flag") or field.name for field in dataclasses.fields(config.TrainConfig)
             if field.metadata.get("help")}
    assert {"dropout", "progress", "augment", "data_dir", "select_by"} <= named <= set(flag_values)
    flag_values(["train_main", "--dropout=0", "--augment=jpeg", "--noprogress", "--epochs=3", "--decay_epochs=2"])
    made = config.from_flags(flag_values, preprocessing={})
    assert (made.dropout_rate, made.augment, made.progress_bar, made.epochs, made.decay_epochs) == (0.0, "jpeg", False,
                                                                                                    3, 2)
    flag_values(["train_main", "--augment=dfdc=resize,ffpp=light_jpeg"])
    assert config.from_flags(flag_values, preprocessing={}).augment == "dfdc=resize,ffpp=light_jpeg"


def test_a_bad_augmentation_fails_when_the_configuration_is_made():
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        config.TrainConfig(augment="dfdc=blur")


def test_the_trainable_models_are_the_registered_single_networks():
    assert set(config.TRAINABLE_MODELS) == set(models.MODEL_NAMES)
