"""Every training folder a user can hand train_main.py trains, or stops before training with one line
that says what to fix (non-zero exit status), never a traceback: fixed cases, then random folders
(tests/fuzz_training.py; run a larger sweep with ``python3 -m tests.fuzz_training --cases=N``)."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from tests import fuzz_training
from tests.fuzz_training import Case, problem, run_case
from tests.test_faults_train_main import _main_in_process


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """One private compilation cache for the module's runs (only the first run compiles)."""
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg_cache")), PYTHONUNBUFFERED="1")


def _images(folder: pathlib.Path, count: int, seed: int, reddish: bool) -> None:
    rng = np.random.default_rng(seed)
    for index in range(count):
        fuzz_training._write_image(folder / f"s{seed}i{index:02d}.jpg", rng, reddish)  # each its own source


def _train(data: pathlib.Path, workdir: pathlib.Path, env: dict, *extra: str):
    argv = [f"--data_dir={data}", f"--workdir={workdir}", "--epochs=2", "--batch_size=8", "--noprogress",
            "--face_detector=none", *extra]
    return run_case(Case("", argv), env)


def _one_line_error(monkeypatch, capsys, data: pathlib.Path, workdir: pathlib.Path, *phrases: str) -> str:
    """train_main.main in this process (no training starts in these cases: fast) must return non-zero with
    one train_main line naming ``phrases``."""
    status = _main_in_process(monkeypatch, f"--data_dir={data}", f"--workdir={workdir}", "--epochs=2",
                              "--batch_size=8", "--noprogress", "--face_detector=none")
    own_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train_main")]
    assert status != 0 and len(own_lines) == 1, own_lines
    for phrase in phrases:
        assert phrase in own_lines[0], own_lines[0]
    return own_lines[0]


@pytest.mark.slow
def test_a_validation_split_of_one_class_trains_by_loss_and_resumes(tmp_path, env):
    # 42 crops with train/val folders whose val holds real faces only: validation AUC is undefined.
    _images(tmp_path / "data" / "train" / "real", 18, 1, True)
    _images(tmp_path / "data" / "train" / "fake", 18, 2, False)
    _images(tmp_path / "data" / "val" / "real", 6, 3, True)
    (tmp_path / "data" / "val" / "fake").mkdir()
    result = _train(tmp_path / "data", tmp_path / "work", env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "chosen by validation loss" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_auc"] for r in records] == [None, None]
    assert all(r["val_selection"] == -r["val_loss"] for r in records)
    # Running it again (as after a kill) finds the finished run and exits cleanly; so does exporting it.
    again = _train(tmp_path / "data", tmp_path / "work", env, f"--export_checkpoint={tmp_path / 'model'}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stdout and (tmp_path / "model").is_dir()


def test_one_real_and_one_fake_file_says_where_the_real_one_went(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "data" / "real", 1, 1, True)
    _images(tmp_path / "data" / "fake", 1, 2, False)
    line = _one_line_error(monkeypatch, capsys, tmp_path / "data", tmp_path / "work", "training files",
                           "went to validation")
    assert ("no real" in line) != ("no fake" in line)
    word = "real" if "no real" in line else "fake"
    assert f"its 1 {word} file went to validation" in line


def test_a_class_whose_files_are_all_corrupt_names_that_class(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "data" / "train" / "real", 10, 1, True)
    (tmp_path / "data" / "train" / "fake").mkdir(parents=True)
    for index in range(3):
        (tmp_path / "data" / "train" / "fake" / f"broken{index}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    _images(tmp_path / "data" / "val" / "real", 2, 3, True)
    _images(tmp_path / "data" / "val" / "fake", 2, 4, False)
    line = _one_line_error(monkeypatch, capsys, tmp_path / "data", tmp_path / "work",
                           "no usable fake training samples", "all 3 fake files were skipped", "broken0.jpg")
    assert "/real/" not in line


def test_an_unusable_validation_split_stops_before_training(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "data" / "train" / "real", 10, 1, True)
    _images(tmp_path / "data" / "train" / "fake", 10, 2, False)
    for label in ("real", "fake"):
        (tmp_path / "data" / "val" / label).mkdir(parents=True)
        (tmp_path / "data" / "val" / label / "empty.jpg").write_bytes(b"")
    _one_line_error(monkeypatch, capsys, tmp_path / "data", tmp_path / "work", "no usable validation samples", "val/")
    assert not (tmp_path / "work" / "checkpoints").exists() or not any((tmp_path / "work" / "checkpoints").iterdir())


@pytest.mark.parametrize("setup, phrases", [
    ("file", ("is a file",)),
    ("missing", ("does not exist",)),
    ("few", ("--batch_size=8 is larger than the", "use --batch_size=")),
])
def test_data_dir_mistakes_are_one_line(tmp_path, monkeypatch, capsys, setup, phrases):
    data = tmp_path / "data"
    if setup == "file":
        data.write_bytes(b"x")
    elif setup == "few":
        _images(data / "real", 4, 1, True)
        _images(data / "fake", 4, 2, False)
    _one_line_error(monkeypatch, capsys, data, tmp_path / "work", *phrases)


@pytest.mark.slow
def test_random_training_folders(tmp_path, env):
    rng = np.random.default_rng(2026)
    outcomes = []
    for index in range(3):
        case = fuzz_training.random_case(rng, tmp_path / f"case{index}")
        result = run_case(case, env)
        assert problem(result) is None, (case.description, result.stderr[-3000:])
        outcomes.append(result.returncode)
    assert len(outcomes) == 3
