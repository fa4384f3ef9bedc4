"""Shared test fixtures: where ../shared is, and a small JAX setup for 2-core CI machines."""

from __future__ import annotations

import pathlib
import struct
import zlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


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
