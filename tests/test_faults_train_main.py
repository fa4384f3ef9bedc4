"""train_main.py under faults, end to end in subprocesses on a tiny synthetic image folder:
kill -9 and resume (deterministic), NaN loss, Ctrl-C and SIGTERM, a disk filling up, unreadable files, an empty class, unwritable places.

Slow work is kept small: 48 images of 32x32, batch 8, 2 epochs of 5 steps, and a shared persistent
compilation cache so that only the first run compiles. The NaN and signal runs replace the train step
by a trivial one (no compile) through a small launcher, so they exercise train_main's handling only.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 5  # 42 readable training images (48 + 3 unreadable, 6 to validation) // batch 8
TRAIN_FLAGS = ("--dataset=image", "--face_detector=none", "--batch_size=8", "--checkpoint_every_steps=2",
               "--epochs=2", "--noprogress")

# Runs train_main with the train step replaced by a trivial one (loss NaN at 0-based step NAN_AT, if >= 0)
# and every batch slowed by SLOW seconds: train_main's fault handling without the cost of compiling Meso-4.
# With FULL_DISK_AT=N in the environment, saving a checkpoint of step >= N fails as on a full disk.
LAUNCHER = """
import errno, os, runpy, sys, time
import jax.numpy as jnp
from meso_jax import checkpoints, train
NAN_AT, SLOW = int(sys.argv[1]), float(sys.argv[2])
FULL_DISK_AT = int(os.environ.get("FULL_DISK_AT", "-1"))
original_save = checkpoints.save_train_state
def save_until_the_disk_is_full(manager, step, *args, **kwargs):
    if 0 <= FULL_DISK_AT <= step:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original_save(manager, step, *args, **kwargs)
checkpoints.save_train_state = save_until_the_disk_is_full

def trivial_step(state, batch, loss="bce", ema_decay=0.0):
    value = jnp.where(state.step == NAN_AT, jnp.nan, 0.5).astype(jnp.float32)
    return state.replace(step=state.step + 1), {"loss": value, "accuracy": jnp.float32(0.5)}

original_shard = train.DataParallel.shard_batch
def slow_shard(self, batch):
    time.sleep(SLOW)
    return original_shard(self, batch)

train.train_step = trivial_step
train.DataParallel.shard_batch = slow_shard
sys.argv = ["train_main.py"] + sys.argv[3:]
runpy.run_path("train_main.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """24 real and 24 fake JPEG crops (real ones redder), plus an empty file, a corrupt one and a broken link."""
    root = tmp_path_factory.mktemp("faults_data")
    rng = np.random.default_rng(0)
    for name, shift in (("real", 60), ("fake", 0)):
        (root / name).mkdir()
        for index in range(24):
            image = rng.integers(0, 180, (32, 32, 3), dtype=np.uint8)
            image[..., 2] = np.clip(image[..., 2].astype(int) + shift, 0, 255)
            assert cv2.imwrite(str(root / name / f"{name}{index:02d}.jpg"), image)
    (root / "fake" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    (root / "real" / "empty.jpg").write_bytes(b"")
    (root / "fake" / "gone.jpg").symlink_to(root / "deleted.jpg")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A private XDG cache: the runs share one persistent compilation cache, and nothing leaks to ~/.cache."""
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg_cache")), PYTHONUNBUFFERED="1")


def _train_main(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_main.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _launch(nan_at: int, slow: float, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(nan_at), str(slow), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _wait_for_checkpoint(process: subprocess.Popen, workdir: pathlib.Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not _steps(workdir):
        assert process.poll() is None, f"ended before its first checkpoint: {process.communicate()}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def _final_params(workdir: pathlib.Path, step: int) -> dict:
    import jax
    import orbax.checkpoint as ocp

    from meso_jax import checkpoints
    with checkpoints.open_manager(workdir / "checkpoints", create=False) as manager:
        model = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))["model"]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(model)}


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, env) -> pathlib.Path:
    """The workdir of an uninterrupted run (it also fills the compilation cache for the runs after it)."""
    workdir = tmp_path_factory.mktemp("reference")
    result = _train_main(f"--data_dir={data_dir}", f"--workdir={workdir}", *TRAIN_FLAGS, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 files skipped" in result.stdout  # trained on the rest
    return workdir


def _assert_ends_like_the_reference(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    final_step = 2 * STEPS_PER_EPOCH
    assert _steps(workdir)[-1] == final_step == _steps(reference)[-1]
    # The data order and augmentation continue where they stopped: the result is the uninterrupted one's.
    expected, found = _final_params(reference, final_step), _final_params(workdir, final_step)
    assert expected.keys() == found.keys()
    for key in expected:
        np.testing.assert_array_equal(found[key], expected[key], err_msg=key)
    epochs = [json.loads(line)["epoch"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # an epoch redone after the kill is logged once
    assert not list((workdir / "checkpoints").glob("*tmp*"))  # a save cut short leaves nothing behind


@pytest.mark.slow
def test_kill_9_resumes_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path, data_dir, env,
                                                                                     reference):
    skipped = (reference / "skipped_files.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in skipped) == ["corrupt.jpg", "empty.jpg",
                                                                                  "gone.jpg"]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in skipped)

    workdir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "train_main.py", f"--data_dir={data_dir}", f"--workdir={workdir}",
                                *TRAIN_FLAGS], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(process, workdir)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    complete_steps = _steps(workdir)
    assert complete_steps and max(complete_steps) < 2 * STEPS_PER_EPOCH

    resumed = _train_main(f"--data_dir={data_dir}", f"--workdir={workdir}", *TRAIN_FLAGS, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {max(complete_steps)}" in resumed.stdout  # at most one interval lost
    _assert_ends_like_the_reference(workdir, reference)


# Runs train_main and SIGKILLs it at the Nth time it reaches a moment (argv[1] = "moment:N"):
# finalize: a checkpoint's files are written but not finalised (orbax's rename of the temporary folder);
# saved: a checkpoint is complete, the epoch's metrics not yet logged. (A kill mid-epoch: the test above.)
KILL_LAUNCHER = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
from meso_jax import checkpoints
moment, count = sys.argv[1].split(":")
calls = {"n": 0}
def kill_on_the_nth_call():
    calls["n"] += 1
    if calls["n"] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
def wrap(owner, name, before):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        if before:
            kill_on_the_nth_call()
        result = original(*args, **kwargs)
        if not before:
            kill_on_the_nth_call()
        return result
    setattr(owner, name, wrapped)
if moment == "finalize":
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
        if os.path.basename(str(self._final_path)).isdigit():  # a step's folder (not one of its items)
            kill_on_the_nth_call()
        return await original_finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
elif moment == "saved":
    wrap(checkpoints, "save_train_state", before=False)
sys.argv = ["train_main.py"] + sys.argv[2:]
runpy.run_path("train_main.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["finalize:3", "saved:3"])
def test_a_kill_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path, data_dir, env, reference, moment):
    # Saves: steps 2, 4, 5 (epoch 1's end, after its validation), 6, 8, 10; the 3rd is epoch 1's last.
    killed = subprocess.run([sys.executable, "-c", KILL_LAUNCHER, moment, f"--data_dir={data_dir}",
                             f"--workdir={tmp_path}", *TRAIN_FLAGS], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _steps(tmp_path) == [2, 4] or moment != "finalize:3"  # the 3rd save's files were never finalised
    resumed = _train_main(f"--data_dir={data_dir}", f"--workdir={tmp_path}", *TRAIN_FLAGS, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    _assert_ends_like_the_reference(tmp_path, reference)


def test_nan_loss_is_one_line_with_the_step_and_the_last_good_checkpoint(tmp_path, data_dir, env):
    process = _launch(2, 0.0, f"--data_dir={data_dir}", f"--workdir={tmp_path}", *TRAIN_FLAGS, env=env)
    # It exits (no tf.data iterator left to hang the interpreter): communicate() raises if it does not.
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert re.fullmatch(r"train_main: error: loss became nan at step 3; stopped; the last good checkpoint "
                        r"\(step 2\) is kept in .*checkpoints", _last_line(stderr)), _last_line(stderr)
    assert _steps(tmp_path) == [2]


def test_a_disk_filling_up_mid_training_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, env):
    process = _launch(-1, 0.0, f"--data_dir={data_dir}", f"--workdir={tmp_path}", *TRAIN_FLAGS,
                      env=dict(env, FULL_DISK_AT="4"))
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert re.fullmatch(r"train_main: error: cannot save the checkpoint of step 4 in \S+checkpoints \(No space left "
                        r"on device\); the last good checkpoint \(step 2\) is kept in \S+checkpoints",
                        _last_line(stderr)), _last_line(stderr)
    assert _steps(tmp_path) == [2]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_after_the_step_with_a_checkpoint_there(tmp_path, data_dir, env, signal_number):
    process = _launch(-1, 0.3, f"--data_dir={data_dir}", f"--workdir={tmp_path}", *TRAIN_FLAGS, env=env)
    try:
        _wait_for_checkpoint(process, tmp_path)
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal_number, stderr[-3000:]
    assert "Traceback" not in stderr
    name = signal.Signals(signal_number).name
    match = re.fullmatch(rf"train_main: stopped by {name} at step (\d+); checkpoint of step (\d+) saved in "
                         r".*checkpoints; run the same command again to resume", _last_line(stderr))
    assert match and match[1] == match[2], _last_line(stderr)
    assert _steps(tmp_path)[-1] == int(match[1])  # nothing lost: the step it stopped at is on disk
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))


def _main_in_process(monkeypatch, *args: str) -> int:
    """train_main.main in this process (its modules are already imported here: fast); flags reset first."""
    import train_main
    from meso_jax import host_memory, scoring
    # Keep this process's configuration (compilation cache, malloc settings).
    monkeypatch.setattr(scoring, "enable_compilation_cache", lambda: None)
    monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: False)
    train_main.FLAGS.unparse_flags()
    remaining = train_main.FLAGS(["train_main.py", *args])
    try:
        return train_main.main(remaining)
    finally:
        train_main.FLAGS.unparse_flags()


def test_setup_errors_are_one_line_before_any_training(tmp_path, data_dir, monkeypatch, capsys):
    no_fakes = tmp_path / "no_fakes"
    (no_fakes / "fake").mkdir(parents=True)
    (no_fakes / "real").symlink_to(data_dir / "real", target_is_directory=True)
    assert _main_in_process(monkeypatch, f"--data_dir={no_fakes}", f"--workdir={tmp_path / 'w1'}", *TRAIN_FLAGS) == 1
    stderr = capsys.readouterr().err
    assert re.fullmatch(r"train_main: error: no image files in a fake \(or manipulated\) folder under \S+; "
                        r"expected .*/real/\.\.\. and .*/fake/\.\.\.", _last_line(stderr)), stderr[-2000:]

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _main_in_process(monkeypatch, f"--data_dir={data_dir}", f"--workdir={blocker / 'workdir'}",
                            *TRAIN_FLAGS) == 1
    assert re.fullmatch(r"train_main: error: --workdir \S+/a_file/workdir is not writable: Not a directory",
                        _last_line(capsys.readouterr().err))

    # The export place is checked before training too, not after hours of it.
    assert _main_in_process(monkeypatch, f"--data_dir={data_dir}", f"--workdir={tmp_path / 'w2'}",
                            f"--export_checkpoint={blocker / 'model'}", *TRAIN_FLAGS) == 1
    assert re.fullmatch(r"train_main: error: --export_checkpoint \S+/a_file/model is not writable: Not a directory",
                        _last_line(capsys.readouterr().err))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "other_model").write_text("x")
    assert _main_in_process(monkeypatch, f"--data_dir={data_dir}", f"--workdir={tmp_path / 'w3'}",
                            f"--export_checkpoint={taken}", *TRAIN_FLAGS) == 1
    assert re.fullmatch(r"train_main: error: --export_checkpoint \S+/taken: already exists and is not empty; "
                        r"choose a new directory", _last_line(capsys.readouterr().err))


@pytest.mark.parametrize("script, flag", [("predict_main.py", "--output=a_file/records.jsonl"),
                                          ("eval_main.py", "--output_dir=a_file/evaluation")])
def test_unwritable_output_is_one_line_exit_2_before_loading_anything(tmp_path, data_dir, script, flag):
    (tmp_path / "a_file").write_text("x")
    path_flag = f"--path={data_dir}"
    # Answered before JAX (or a model) is even imported: here importing it fails.
    poisoned = tmp_path / "poisoned_imports" / "jax"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('jax was imported before the output was checked')\n")
    env = dict(os.environ, PYTHONPATH=str(poisoned.parent))
    result = subprocess.run([sys.executable, str(REPO_ROOT / script), path_flag, flag], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Not a directory" in result.stderr, result.stderr
    assert result.stderr.startswith(f"{script[:-3]}: {flag.split('=')[0]} a_file/")
    assert result.stdout == ""
