"""meso_jax.host_memory: glibc's malloc settings applied on Linux, and not when turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

_APPLY = "from meso_jax import host_memory; print(host_memory.reuse_freed_memory())"


def _apply_in_a_fresh_process(**environment: str) -> str:
    """The result of reuse_freed_memory() in a new interpreter (the settings last for the process)."""
    done = subprocess.run([sys.executable, "-c", _APPLY], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, **environment}, check=True, timeout=60)
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_settings_apply_on_linux_unless_turned_off():
    assert _apply_in_a_fresh_process() == "True"
    assert _apply_in_a_fresh_process(MESO_JAX_REUSE_FREED_MEMORY="0") == "False"
