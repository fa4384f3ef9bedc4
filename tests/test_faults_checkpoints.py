"""Faults around checkpoints: damaged newest steps fall back to the previous good one, a checkpoint of
another model is one clear error, and nothing is ever unpickled."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest

from meso_jax import checkpoints, models, run_control, train

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _variables(model: str) -> dict:
    """Variables shaped like ``model``'s, without compiling its initialiser (slow on a busy 2-core machine)."""
    spec = models.get_model(model)
    shapes = jax.eval_shape(lambda: models.init_variables(spec, 0))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype), shapes)


def _state(model: str = "meso4") -> train.TrainState:
    config = train.TrainConfig(model=model, schedule="constant")
    return train.create_train_state(models.get_model(model), config, total_steps=10, variables=_variables(model))


def _workdir_with_steps(workdir: pathlib.Path, steps_and_aucs: list[tuple[int, float]],
                        model: str = "meso4") -> train.TrainState:
    """A training workdir holding one checkpoint per (step, val_auc) of meso4 arrays whose metadata names
    ``model``; params differ per step."""
    state = _state()
    manager = checkpoints.open_manager(workdir / checkpoints.WORKDIR_CHECKPOINTS)
    for step, auc in steps_and_aucs:
        stepped = state.replace(step=step, params=jax.tree_util.tree_map(lambda x, s=step: x + s, state.params))
        metadata = checkpoints.model_metadata(model, {"resize": "nearest"}, {"step": step, "metrics": {"val_auc": auc}})
        checkpoints.save_train_state(manager, step, jax.device_get(train.state_to_tree(stepped)), metadata,
                                     metrics={"val_auc": auc})
    manager.close()
    return state


def _truncate_arrays(step_dir: pathlib.Path) -> None:
    """Cuts every array data file of a step to half its length (as a full disk or a crash might)."""
    data_files = [f for f in step_dir.rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data_files
    for data_file in data_files:
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])


def _first_kernel(variables_or_tree) -> float:
    return float(np.asarray(variables_or_tree["params"]["ConvBlock_0"]["Conv_0"]["kernel"]).ravel()[0])


def test_training_restore_skips_a_truncated_newest_checkpoint(tmp_path) -> None:
    state = _workdir_with_steps(tmp_path, [(2, 0.5), (4, 0.6)])
    _truncate_arrays(tmp_path / "checkpoints" / "4")
    manager = checkpoints.open_manager(tmp_path / "checkpoints")
    messages: list[str] = []
    abstract = jax.tree_util.tree_map(np.asarray, train.state_to_tree(state))
    tree, metadata, step = run_control.restore_latest_good(manager, abstract, messages.append, expected_model="meso4")
    assert step == 2 and metadata["step"] == 2 and int(tree["train"]["step"]) == 2
    assert _first_kernel(tree["model"]) == pytest.approx(_first_kernel({"params": state.params}) + 2)
    assert len(messages) == 1 and re.match(r"warning: checkpoint at step 4 is unreadable \(.+\); trying the previous",
                                           messages[0]), messages
    assert "\n" not in messages[0]

    # Every checkpoint damaged: an error, never a silent fresh start over the user's files.
    _truncate_arrays(tmp_path / "checkpoints" / "2")
    with pytest.raises(train.TrainingError, match=r"no readable checkpoint .*\(steps 4, 2 are all damaged\)"):
        run_control.restore_latest_good(manager, abstract, messages.append, expected_model="meso4")
    manager.close()


def test_prediction_falls_back_from_a_damaged_best_checkpoint(tmp_path, caplog) -> None:
    _workdir_with_steps(tmp_path, [(2, 0.5), (4, 0.9), (6, 0.7)])
    assert checkpoints.load_model(tmp_path).source.endswith("(step 4)")

    _truncate_arrays(tmp_path / "checkpoints" / "4")  # the best one: arrays cut short
    loaded = checkpoints.load_model(tmp_path)
    assert loaded.source.endswith("(step 6)") and loaded.model_name == "meso4"
    assert "step 4 is unreadable" in caplog.text

    (tmp_path / "checkpoints" / "6" / "metadata" / "metadata").write_text('{"model": "meso4", "metr')  # cut short
    with checkpoints.open_manager(tmp_path / "checkpoints", create=False) as manager:
        assert checkpoints.best_step(manager) == 4  # metadata still readable there; 6 is skipped
    loaded = checkpoints.load_model(tmp_path)
    assert loaded.source.endswith("(step 2)")

    _truncate_arrays(tmp_path / "checkpoints" / "2")
    with pytest.raises(checkpoints.CheckpointError, match="every step is damaged"):
        checkpoints.load_model(tmp_path)


def test_nan_weights_are_skipped_like_damage_and_never_scored(tmp_path, caplog) -> None:
    poisoned = jax.tree_util.tree_map(np.asarray, _variables("meso4"))
    poisoned["params"]["ConvBlock_0"]["Conv_0"]["kernel"][0, 0, 0, 0] = np.nan
    checkpoints.save_model(tmp_path / "exported", "meso4", poisoned, {"resize": "nearest"})
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_model(tmp_path / "exported")
    assert "\n" not in str(error.value) and "step 0 holds NaN or infinite weights" in str(error.value)

    # In a workdir whose best step holds infinities, the next best step is used instead.
    state = _workdir_with_steps(tmp_path / "run", [(2, 0.5)])
    infinite = state.replace(step=4, params=jax.tree_util.tree_map(lambda x: x + np.inf, state.params))
    with checkpoints.open_manager(tmp_path / "run" / "checkpoints") as manager:
        metadata = checkpoints.model_metadata("meso4", {"resize": "nearest"}, {"step": 4, "metrics": {"val_auc": 0.9}})
        checkpoints.save_train_state(manager, 4, jax.device_get(train.state_to_tree(infinite)), metadata,
                                     metrics={"val_auc": 0.9})
    assert checkpoints.load_model(tmp_path / "run").source.endswith("(step 2)")
    assert "step 4 holds NaN or infinite weights" in caplog.text


def test_a_checkpoint_of_another_model_is_one_clear_error(tmp_path) -> None:
    # A training workdir of MesoInception-4 resumed with --model=meso4.
    _workdir_with_steps(tmp_path / "inception_run", [(2, 0.5)], model="mesoinception4")
    manager = checkpoints.open_manager(tmp_path / "inception_run" / "checkpoints")
    abstract = jax.tree_util.tree_map(np.asarray, train.state_to_tree(_state("meso4")))
    with pytest.raises(train.TrainingError,
                       match=r"holds checkpoints of model mesoinception4, not --model=meso4; use another --workdir"):
        run_control.restore_latest_good(manager, abstract, print, expected_model="meso4")
    manager.close()

    # An exported checkpoint whose metadata names a network this program does not know.
    variables = _variables("meso4")
    foreign = tmp_path / "foreign"
    with checkpoints.open_manager(foreign) as foreign_manager:
        import orbax.checkpoint as ocp
        foreign_manager.save(0, args=ocp.args.Composite(
            model=ocp.args.StandardSave(jax.tree_util.tree_map(np.asarray, variables)),
            metadata=ocp.args.JsonSave({"model": "resnet50", "input_shape": [224, 224, 3]})))
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_model(foreign)
    message = str(error.value)
    assert "\n" not in message and "expected a MesoNet checkpoint (meso4" in message and "'resnet50'" in message

    # Metadata says meso4 but the arrays are another network's (e.g. a modified Meso-4 with 16 first filters):
    # expected-vs-found, not "damaged", for prediction and for resuming training.
    wide = jax.tree_util.tree_map(np.asarray, variables)
    wide["params"]["ConvBlock_0"]["Conv_0"]["kernel"] = np.zeros((3, 3, 3, 16), np.float32)
    mislabelled = tmp_path / "mislabelled"
    with checkpoints.open_manager(mislabelled) as mislabelled_manager:
        mislabelled_manager.save(0, args=ocp.args.Composite(
            model=ocp.args.StandardSave(wide), metadata=ocp.args.JsonSave({"model": "meso4"})))
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"step 0 says it is meso4, but its arrays do not fit meso4: "
                             r"params/ConvBlock_0/Conv_0/kernel has shape \(3, 3, 3, 16\), expected \(3, 3, 3, 8\)$"):
        checkpoints.load_model(mislabelled)
    with checkpoints.open_manager(mislabelled, create=False) as mislabelled_manager:
        with pytest.raises(train.TrainingError, match=r"the checkpoint of step 0 does not fit --model=meso4 "
                                                      r"\(params/ConvBlock_0/Conv_0/kernel has shape"):
            run_control.restore_latest_good(mislabelled_manager, abstract, print, expected_model="meso4")

    # A folder that is not a checkpoint at all.
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="holds no checkpoint"):
        checkpoints.load_model(tmp_path / "empty")


def test_nothing_is_unpickled() -> None:
    """Checkpoints are orbax/tensorstore arrays plus JSON, Keras weights are read with h5py: no pickle."""
    sources = [p for p in REPO_ROOT.rglob("*.py") if ".git" not in p.parts and p.name != pathlib.Path(__file__).name]
    pattern = re.compile(r"\bimport (c?pickle|dill|joblib)\b|allow_pickle\s*=\s*True|torch\.load|pickle\.load")
    offenders = [str(p.relative_to(REPO_ROOT)) for p in sources if pattern.search(p.read_text(errors="replace"))]
    assert not offenders


def test_stop_signals_ask_to_stop_and_a_second_ctrl_c_waits_for_the_save() -> None:
    import os
    import signal
    import time

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    finished = []
    with run_control.StopSignals() as stop:  # pylint: disable=protected-access
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == signal.SIGTERM  # recorded; nothing raised
        with pytest.raises(KeyboardInterrupt):
            with stop.saving():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now: nothing was raised inside the save
                finished.append(True)
        with pytest.raises(KeyboardInterrupt):  # outside a save, a second Ctrl-C interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert finished
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_several_processes_stop_together_at_an_agreed_step(monkeypatch) -> None:
    import signal

    from jax.experimental import multihost_utils
    stop = run_control.StopSignals()  # pylint: disable=protected-access  (no handlers installed: not entered)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    other_process_flag = {"value": 1}
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda flag: np.array([int(flag), other_process_flag["value"]]))
    # Another process got SIGTERM: this one stops too, but only at a step where all of them compare notes.
    assert not run_control.stop_requested_everywhere(stop, step=51, sync_every_steps=50)
    assert run_control.stop_requested_everywhere(stop, step=100, sync_every_steps=50)
    other_process_flag["value"] = 0
    assert not run_control.stop_requested_everywhere(stop, step=100, sync_every_steps=50)
    stop.requested = signal.SIGTERM
    assert run_control.stop_requested_everywhere(stop, step=150, sync_every_steps=50)
    monkeypatch.setattr(jax, "process_count", lambda: 1)  # one process: at once, at any step
    assert run_control.stop_requested_everywhere(stop, step=151, sync_every_steps=50)


def test_a_resumed_run_logs_each_epoch_once(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1, "step": 5}\n{"epoch": 2, "step": 10}\n{"epoch": 3, "st')  # killed mid-line
    run_control.trim_metrics_log(log, last_step=8)  # pylint: disable=protected-access
    assert log.read_text() == '{"epoch": 1, "step": 5}\n'


def test_the_best_checkpoint_survives_a_restart(tmp_path) -> None:
    """A resumed run's saves must not delete the best checkpoint saved before the restart (orbax keeps
    the best only if it can read that step's metrics back)."""
    tree = {"model": {"w": np.zeros(3, np.float32)}, "train": {"step": np.zeros((), np.int32)}}
    with checkpoints.open_manager(tmp_path, keep_last=2) as manager:
        checkpoints.save_train_state(manager, 1, tree, {"step": 1}, metrics={"val_selection": 0.9, "val_auc": 0.9})
        checkpoints.save_train_state(manager, 2, tree, {"step": 2}, metrics={"val_selection": 0.5, "val_auc": 0.5})
    with checkpoints.open_manager(tmp_path, keep_last=2) as manager:  # a new process resumes
        for step in (3, 4, 5):
            checkpoints.save_train_state(manager, step, tree, {"step": step}, metrics=None)
        assert manager.all_steps() == [1, 4, 5]
