"""Where meso_jax keeps what it builds for a user: compiled XLA programs and the oneDNN library."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$XDG_CACHE_HOME (or ~/.cache)/meso_jax."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meso_jax"
