"""Data parallelism: 8 (simulated CPU) devices train exactly like 1 device with the same global batch, and
score exactly like 1 device."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

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


def test_eight_devices_train_and_predict_like_one(tmp_path) -> None:
    one = _run_few_steps(tmp_path, 1)
    eight = _run_few_steps(tmp_path, 8)
    assert int(one.pop("device_count")) == 1 and int(eight.pop("device_count")) == 8
    for path in ("fast", "plain"):  # prediction batches were split over all 8 devices
        assert int(one.pop(f"scorer_devices_{path}")) == 1 and int(eight.pop(f"scorer_devices_{path}")) == 8
    assert one.keys() == eight.keys()
    for name in one:
        # Restored from the 8-device run's checkpoint: saving and restoring work sharded too. The scores
        # (scores_fast, scores_plain) come from that model scored on 8 devices vs 1.
        np.testing.assert_allclose(eight[name], one[name], rtol=2e-4, atol=2e-5, err_msg=name)
