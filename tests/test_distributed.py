"""Data parallelism: 8 (simulated CPU) devices train exactly like 1 device with the same global batch, and
score exactly like 1 device; so do 2 processes of 4 devices each (multi-host JAX on one machine: each
process feeds its part of every batch, validation results are gathered from both, orbax saves together)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT


def _run_few_steps(tmp_path, device_count: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}",
               PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    output = tmp_path / f"params_{device_count}.npz"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "fit_few_steps.py"), str(tmp_path / f"workdir_{device_count}"),
         str(output)], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"devices: {device_count}" in completed.stdout
    return dict(np.load(output))


def _run_two_processes(tmp_path) -> dict:
    """Two processes with 4 CPU devices each, joined by jax.distributed through a local coordinator."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(REPO_ROOT),
               JAX_PLATFORMS="cpu")
    output = tmp_path / "params_2x4.npz"
    processes = [subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "fit_few_steps.py"), str(tmp_path / "workdir_2x4"), str(output),
         f"localhost:{port}", "2", str(process_id)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for process_id in (0, 1)]
    try:
        results = [process.communicate(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]
    assert "devices: 8 (cpu), hosts: 2" in results[0][0]
    assert "epoch 1" not in results[1][0]  # only process 0 logs
    return dict(np.load(output))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> dict:
    """The reference: the same few steps on one device."""
    return _run_few_steps(tmp_path_factory.mktemp("one_device"), 1)


def test_eight_devices_train_and_predict_like_one(tmp_path, one_device) -> None:
    one = dict(one_device)
    eight = _run_few_steps(tmp_path, 8)
    assert int(one.pop("device_count")) == 1 and int(eight.pop("device_count")) == 8
    # Each device held 1 of the batch's 8 rows in training (8 would be a replicated batch).
    assert int(one.pop("max_rows_per_device")) == 8 and int(eight.pop("max_rows_per_device")) == 1
    for path in ("fast", "plain"):  # prediction batches were split over all 8 devices
        assert int(one.pop(f"scorer_devices_{path}")) == 1 and int(eight.pop(f"scorer_devices_{path}")) == 8
    assert one.keys() == eight.keys()
    for name in one:
        # Restored from the 8-device run's checkpoint: saving and restoring work sharded too. The scores
        # (scores_fast, scores_plain) come from that model scored on 8 devices vs 1.
        np.testing.assert_allclose(eight[name], one[name], rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_two_processes_train_evaluate_and_predict_like_one(tmp_path, one_device) -> None:
    one = dict(one_device)
    two_hosts = _run_two_processes(tmp_path)
    assert int(two_hosts.pop("device_count")) == 8 and int(one.pop("device_count")) == 1
    assert int(two_hosts.pop("max_rows_per_device")) == 1 and int(one.pop("max_rows_per_device")) == 8
    for path in ("fast", "plain"):  # each process scores with its own 4 devices
        assert int(two_hosts.pop(f"scorer_devices_{path}")) == 4 and int(one.pop(f"scorer_devices_{path}")) == 1
    assert one.keys() == two_hosts.keys()
    for name in one:  # parameters, validation loss and AUC over all 11 examples, scores
        np.testing.assert_allclose(two_hosts[name], one[name], rtol=2e-4, atol=2e-5, err_msg=name)
