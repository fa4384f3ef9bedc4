"""Ensembles of exported image models: mean of the members' logits, one ordinary checkpoint, clear errors."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
import sklearn.metrics

from data_pipelines import samples
from data_pipelines.preprocessing import Preprocessing
from meso_jax import checkpoints, ensemble, models, scoring

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MEMBERS = ("meso4", "mesoinception4")


def _variables(model: str, seed: int) -> dict:
    """Random variables shaped like ``model``'s (without compiling its initialiser); BatchNorm variances
    positive."""
    shapes = jax.eval_shape(lambda: models.init_variables(models.get_model(model), 0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.uniform(0.5, 1.5, x.shape) if path[-1].key == "var" else rng.normal(0, 0.1, x.shape)
                         ).astype(x.dtype), shapes)


def _export_member(directory: pathlib.Path, model: str, seed: int, resize: str = "nearest") -> str:
    prep = dataclasses.replace(Preprocessing(), face_detector="none", resize=resize)
    checkpoints.save_model(directory, model, _variables(model, seed), prep.to_dict(), {"dataset": "image"})
    return str(directory)


def _member_logits(member_dirs: list[str], images_bhwc: np.ndarray) -> np.ndarray:
    logits = []
    for member_dir in member_dirs:
        loaded = checkpoints.load_model(member_dir)
        logits.append(models.get_model(loaded.model_name).module.apply(loaded.variables, images_bhwc, train=False))
    return np.stack(logits)


def _face_folder(root: pathlib.Path, per_class: int) -> pathlib.Path:
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            cv2.imwrite(str(root / label / f"{index}.png"), rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    return root


def test_ensemble_logit_is_the_mean_of_its_members() -> None:
    spec = models.get_model(models.ensemble_name(MEMBERS))
    member_variables = [_variables(name, seed) for seed, name in enumerate(MEMBERS)]
    variables = {collection: {f"member_{index}": member[collection] for index, member in enumerate(member_variables)}
                 for collection in ("params", "batch_stats")}
    images = np.random.default_rng(1).uniform(0, 1, (3, 256, 256, 3)).astype(np.float32)
    want = np.mean([models.get_model(name).module.apply(member, images, train=False)
                    for name, member in zip(MEMBERS, member_variables)], axis=0)
    np.testing.assert_allclose(spec.module.apply(variables, images, train=False), want, rtol=0, atol=1e-6)
    assert models.count_params(variables["params"]) == 27_977 + 28_615


@pytest.mark.parametrize("members", [("meso4",), ("meso4", "meso4_video"), ("meso4", "resnet50")])
def test_ensembles_of_fewer_than_two_or_non_image_models_are_refused(members: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="ensemble needs at least 2|image models|unknown model"):
        models.get_model(models.ensemble_name(members))


def test_exported_ensemble_scores_as_the_mean_of_its_members_and_records_them(tmp_path: pathlib.Path) -> None:
    member_dirs = [_export_member(tmp_path / name, name, seed) for seed, name in enumerate(MEMBERS)]
    val_dir = _face_folder(tmp_path / "val", per_class=4)
    ensemble.export(member_dirs, str(tmp_path / "ensemble"), val_dir=str(val_dir))

    loaded = checkpoints.load_model(tmp_path / "ensemble")
    assert loaded.model_name == "ensemble:meso4,mesoinception4"
    assert loaded.preprocessing["face_detector"] == "blazeface"  # members trained on crops: scans find faces
    assert [member["model"] for member in loaded.metadata["members"]] == list(MEMBERS)
    assert all(member["source"].startswith(member_dir) for member, member_dir in
               zip(loaded.metadata["members"], member_dirs))

    images = np.random.default_rng(2).uniform(0, 1, (2, 256, 256, 3)).astype(np.float32)
    want = jax.nn.sigmoid(_member_logits(member_dirs, images).mean(axis=0))
    np.testing.assert_allclose(scoring.Scorer(loaded, batch_size=2).score(images), want, rtol=0, atol=1e-6)

    # The recorded validation AUC is the one its scores give on that folder.
    prep = dataclasses.replace(Preprocessing.from_dict(loaded.preprocessing), face_detector="none")
    crops = [samples.extract_face_crops(path, prep).crops_bhwc
             for label in ("real", "fake") for path in sorted((val_dir / label).iterdir())]
    scores = scoring.Scorer(loaded, batch_size=8).score(np.concatenate(crops))
    metrics = loaded.metadata["metrics"]
    assert metrics["val_count"] == 8
    assert metrics["val_auc"] == pytest.approx(sklearn.metrics.roc_auc_score([1] * 4 + [0] * 4, scores), abs=1e-9)

    with pytest.raises(checkpoints.CheckpointError, match="already exists and is not empty"):
        ensemble.export(member_dirs, str(tmp_path / "ensemble"))


def test_members_that_scan_differently_are_refused(tmp_path: pathlib.Path) -> None:
    member_dirs = [_export_member(tmp_path / "nearest", "meso4", 0),
                   _export_member(tmp_path / "area", "meso4", 1, resize="area")]
    with pytest.raises(ensemble.EnsembleError, match="members must share their preprocessing") as error:
        ensemble.export(member_dirs, str(tmp_path / "ensemble"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "ensemble").exists()


def test_ensemble_main_reports_bad_members_in_one_line(tmp_path: pathlib.Path) -> None:
    member = _export_member(tmp_path / "meso4", "meso4", 0)
    for members, message in ((member, "needs at least 2 members"),
                             (f"{member},{tmp_path / 'missing'}", "no such checkpoint directory")):
        result = subprocess.run([sys.executable, "ensemble_main.py", f"--members={members}",
                                 f"--export_checkpoint={tmp_path / 'out'}"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
