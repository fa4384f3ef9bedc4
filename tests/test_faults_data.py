"""Resource bounds on hostile data: folder walks and scans stream (memory does not grow with the number of
files), and image headers over the pixel limit are refused before any decoding."""

from __future__ import annotations

import itertools
import os
import tracemalloc

import cv2
import numpy as np
import pytest

from data_pipelines import preprocessing, sources
from meso_jax import scan
from conftest import png_declaring

FOLDERS, FILES_PER_FOLDER = 20, 1000


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    """20,000 empty .jpg files in 20 folders (created in about a second)."""
    root = tmp_path_factory.mktemp("big_tree")
    for folder in range(FOLDERS):
        directory = root / f"d{folder:02d}"
        directory.mkdir()
        for index in range(FILES_PER_FOLDER):
            os.close(os.open(directory / f"f{index:04d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    return root


def test_find_media_streams_one_folder_at_a_time(big_tree, monkeypatch):
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(path) or real_scandir(path))
    walk = sources.find_media(big_tree)
    first = next(walk)
    assert first.endswith(os.path.join("d00", "f0000.jpg"))
    assert len(listed) == 2  # the root and the first folder: the other 19 are not listed yet
    monkeypatch.setattr(os, "scandir", real_scandir)

    # Walking all 20,000 files holds about one folder's entries, not every path at once.
    tracemalloc.start()
    try:
        count = 1 + sum(1 for _ in walk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == FOLDERS * FILES_PER_FOLDER
    all_paths_size = sum(len(p) + 49 for p in sources.find_media(big_tree)) + 8 * count  # a list of every path
    assert peak < all_paths_size / 2, (peak, all_paths_size)


class _NeverCalledScorer:
    """Every file in these tests fails to decode, so the model is never needed."""

    input_shape = (256, 256, 3)
    batch_size = 4

    def score_batch(self, inputs):
        raise AssertionError("no file here can be scored")


def test_scan_consumes_paths_lazily_and_writes_records_as_it_goes(big_tree):
    pulled = itertools.count()
    pulled_so_far = [0]

    def paths():
        for path in scan.select_media(str(big_tree)):
            pulled_so_far[0] = next(pulled) + 1
            yield path

    options = scan.ScanOptions(workers=2)
    ahead = []

    def on_record(record):
        ahead.append(pulled_so_far[0] - len(ahead) - 1)
        assert record.error == "empty file", record

    summary = scan.scan_files(itertools.islice(paths(), 3000), _NeverCalledScorer(), preprocessing.Preprocessing(
        face_detector="none"), options, on_record)
    assert summary.errors == 3000
    assert max(ahead) <= 4 * options.workers + 1  # only the files in flight are read ahead


def test_huge_image_headers_are_refused_before_decoding(tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image whose header is over the pixel limit")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    monkeypatch.setattr(cv2, "imread", no_decoding)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_declaring(20_000, 20_000))  # 400 megapixels declared in 100 bytes
    with pytest.raises(preprocessing.MediaError, match="megapixel limit"):
        preprocessing.read_image_rgb(huge)  # scanning and on-the-fly training
    with pytest.raises(preprocessing.MediaError, match="megapixel limit"):
        preprocessing.probe_image(huge)  # the training set's up-front check
    assert preprocessing.MAX_IMAGE_PIXELS <= 100_000_000 + 1


def test_a_normal_image_still_decodes(tmp_path):
    path = tmp_path / "ok.png"
    assert cv2.imwrite(str(path), np.full((32, 40, 3), 100, np.uint8))
    assert preprocessing.read_image_rgb(path).shape == (32, 40, 3)


def test_images_too_small_to_judge_are_refused_from_the_header(tmp_path):
    path = tmp_path / "icon.png"
    assert cv2.imwrite(str(path), np.full((16, 300, 3), 100, np.uint8))
    for read in (preprocessing.read_image_rgb, preprocessing.probe_image):  # scanning; the training set's check
        with pytest.raises(preprocessing.MediaError, match="300x16 pixels, too small to judge"):
            read(path)
