"""Shared test helpers: where ../shared is, small hand-built PNGs and videos, random model variables."""

from __future__ import annotations

import pathlib
import struct
import zlib

import cv2
import jax
import numpy as np
import pytest

from meso_jax import models

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the tests that read ../shared (they use the shared_dir fixture) as shared_data."""
    for item in items:
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    """The repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The team's read-only ../shared data folder; skips the test when it is absent."""
    if not (SHARED_DIR / "README.md").is_file():
        pytest.skip(f"../shared not present at {SHARED_DIR}: team-only data (published MesoNet weights, "
                    "DFDC faces, dev videos) is needed for this test")
    return SHARED_DIR


def png_declaring(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares width x height (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def write_video(path, frames_bgr, fps: float = 25.0) -> str:
    """Writes BGR frames with OpenCV (MJPG for .avi, mp4v otherwise); returns the path."""
    height, width = frames_bgr[0].shape[:2]
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if str(path).endswith(".avi") else "mp4v"))
    writer = cv2.VideoWriter(str(path), fourcc, fps, (width, height))
    assert writer.isOpened(), f"cannot write {path}"
    for frame in frames_bgr:
        writer.write(frame)
    writer.release()
    return str(path)


def random_model_variables(seed: int, head_gain: float = 1.0, model_name: str = "meso4") -> dict:
    """Random variables built in NumPy (models.init_variables compiles for many seconds on 2 cores);
    the last layer is multiplied by ``head_gain`` so different inputs get clearly different scores."""
    abstract = jax.eval_shape(lambda: models.init_variables(models.get_model(model_name), 0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            gain = head_gain if name.startswith("['params']['ClassifierHead_0']['Dense_1']") else 1.0
            return (rng.normal(0.0, gain / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)).astype(np.float32)
        return (np.ones if name.endswith(("['scale']", "['var']")) else np.zeros)(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)
