"""Extract-once face cache: one TFRecord of PNG face crops per media file, reused across epochs and runs.

An entry is keyed by the file's absolute path, size, mtime and the preprocessing settings, so a
changed file or setting is extracted again. A file that failed (unreadable, no face) is cached as a
failure with its message, so it is reported without being retried.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile

import cv2
import numpy as np
import tensorflow as tf
import tqdm

from data_pipelines.preprocessing import MediaError, Preprocessing
from data_pipelines.samples import extract_face_crops
from data_pipelines.sources import LabelledFile

CACHE_FORMAT_VERSION = 3  # 2: videos sampled with non-reference frames skipped; 3: every person of a video
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "meso_jax", "faces")
RECORD_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),  # PNG, RGB, (S, S, 3)
    "frame_index": tf.io.FixedLenFeature([], tf.int64),
}


@dataclasses.dataclass(frozen=True)
class CachedFile:
    """A media file whose face crops are in ``record_path`` (``num_samples`` records, person after person,
    each person's in frame order; ``person_samples``: how many records each person has)."""

    path: str
    label: float
    source: str
    record_path: str
    num_samples: int
    source_name: str = ""
    person_samples: tuple[int, ...] = ()

    def people(self) -> list[tuple[int, int]]:
        """(first record, number of records) of each person."""
        counts = self.person_samples or (self.num_samples,)
        starts = np.cumsum((0,) + tuple(counts[:-1]))
        return [(int(start), int(count)) for start, count in zip(starts, counts)]


def cache_key(path: str, prep: Preprocessing) -> str:
    """Hex digest of the file identity (absolute path, size, mtime) and the preprocessing settings."""
    stat = os.stat(path)
    identity = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "prep": prep.to_dict(), "version": CACHE_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _entry_paths(cache_dir: str, key: str) -> tuple[str, str]:
    folder = os.path.join(cache_dir, key[:2])
    return os.path.join(folder, key + ".tfrecord"), os.path.join(folder, key + ".json")


def _write_atomically(path: str, write) -> None:
    """Calls write(temporary_path) then renames it to ``path``, so readers never see partial files."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _encode_example(crop_rgb: np.ndarray, frame_index: int) -> bytes:
    ok, png = cv2.imencode(".png", cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding of a face crop failed")
    features = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png.tobytes()])),
                "frame_index": tf.train.Feature(int64_list=tf.train.Int64List(value=[frame_index]))}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _cache_one(path: str, prep: Preprocessing, cache_dir: str) -> tuple[str, dict, bool]:
    """(record path, manifest, extracted now?) for one file, extracting it unless already cached."""
    try:
        key = cache_key(path, prep)
    except OSError as err:
        return "", {"path": path, "error": f"{path}: cannot read file ({err.strerror or err})"}, False
    record_path, manifest_path = _entry_paths(cache_dir, key)
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("error") or os.path.exists(record_path):
            return record_path, manifest, False
    try:
        crops = extract_face_crops(path, prep)
    except MediaError as err:
        manifest = {"path": path, "error": str(err)}
    else:
        def write_records(temporary: str) -> None:
            with tf.io.TFRecordWriter(temporary) as writer:
                for crop, frame_index in zip(crops.crops_bhwc, crops.frame_indices):
                    writer.write(_encode_example(crop, frame_index))

        _write_atomically(record_path, write_records)
        manifest = {"path": path, "num_samples": len(crops.frame_indices), "frame_indices": crops.frame_indices,
                    "person_samples": np.bincount(crops.person_ids).tolist(), "frames_read": crops.frames_read,
                    "prep": prep.to_dict()}

    def write_manifest(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(manifest, f)

    _write_atomically(manifest_path, write_manifest)
    return record_path, manifest, True


def build_face_cache(files: list[LabelledFile], prep: Preprocessing, cache_dir: str | None = None,
                     workers: int | None = None,
                     progress: bool = True) -> tuple[list[CachedFile], list[tuple[str, str]], int]:
    """Extracts the face crops of every file not yet cached, in parallel threads with a progress bar.

    Returns (cached files in input order, skipped (path, reason) pairs, number extracted now).
    """
    cache_dir = os.fspath(cache_dir or DEFAULT_CACHE_DIR)
    os.makedirs(cache_dir, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    results: list[tuple[str, dict, bool] | None] = [None] * len(files)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_cache_one, f.path, prep, cache_dir): i for i, f in enumerate(files)}
        for future in tqdm.tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                                desc=f"faces -> {cache_dir}", unit="file", disable=not progress):
            results[futures[future]] = future.result()
    cached, skipped, extracted = [], [], 0
    for labelled, (record_path, manifest, extracted_now) in zip(files, results):
        extracted += extracted_now
        if manifest.get("error"):
            skipped.append((labelled.path, manifest["error"]))
        else:
            cached.append(CachedFile(labelled.path, labelled.label, labelled.source, record_path,
                                     int(manifest["num_samples"]), labelled.source_name,
                                     tuple(manifest.get("person_samples", ()))))
    return cached, skipped, extracted


def parse_record(serialized: tf.Tensor) -> dict:
    """TFRecord example -> {"image": uint8 (S, S, 3), "frame_index": int64}."""
    example = tf.io.parse_single_example(serialized, RECORD_FEATURES)
    return {"image": tf.io.decode_png(example["image"], channels=3), "frame_index": example["frame_index"]}
