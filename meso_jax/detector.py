"""The public Python API: a loaded detector that scores face crops and scans files, as predict_main does.

    from meso_jax import load_detector
    detector = load_detector()                      # the shipped default (checkpoints/meso4x4)
    scores = detector.score_faces(faces)            # RGB uint8 crops, any size -> probability REAL
    for record in detector.scan(["clip.mp4", "photos/"], face_detector="haar", frames=32):
        print(record["score"], record["label"], record["path"])

predict_main.py is a thin command line over this module: its JSON records are ``scan``'s dicts.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from data_pipelines.preprocessing import Preprocessing, resize_image
from meso_jax import records, scan as scan_lib
from meso_jax import scoring


@dataclasses.dataclass
class Detector:
    """A model ready to score: its scorer, the preprocessing it was trained with and its verdict threshold."""

    scorer: scoring.Scorer
    preprocessing: Preprocessing

    @property
    def threshold(self) -> float:
        """A score >= threshold is judged real: the model's own, chosen on its validation data (else 0.5)."""
        return self.scorer.threshold

    @property
    def model_name(self) -> str:
        return self.scorer.spec.name

    def score_faces(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        """Probability REAL of each RGB uint8 face crop (H, W, 3), any size: resized by the model's own rule
        and scored as predict_main scores crops with --face_detector=none. Returns float64 (N,)."""
        if len(faces) == 0:
            return np.zeros(0)
        for face in faces:
            if not (isinstance(face, np.ndarray) and face.dtype == np.uint8 and face.ndim == 3 and face.shape[2] == 3):
                raise ValueError("score_faces takes RGB uint8 arrays of shape (H, W, 3)")
        if len(self.scorer.input_shape) != 3:
            raise ValueError(f"{self.model_name} scores video clips, not single faces; use scan()")
        return self.scorer.score(np.stack([resize_image(face, self.preprocessing) for face in faces]))

    def scan_records(self, paths: str | os.PathLike | Iterable[str], options: scan_lib.ScanOptions,
                     on_record: Callable[[records.ScanRecord], None], face_detector: str | None = None,
                     frames: int | None = None, progress: bool = False) -> records.ScanSummary:
        """Scans files and folders (recursively, sorted, within the options' limits), calling ``on_record`` with
        each file's ScanRecord as soon as it is scored. ``face_detector`` / ``frames`` override the model's."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [os.fspath(paths)]
        overrides = {"face_detector": face_detector, "frames_per_video": frames}
        prep = dataclasses.replace(self.preprocessing, **{k: v for k, v in overrides.items() if v is not None})
        media = itertools.chain.from_iterable(
            scan_lib.select_media(path, options.image_limit, options.video_limit) for path in paths)
        return scan_lib.scan_files(media, self.scorer, prep, options, on_record, progress)

    def scan(self, paths: str | os.PathLike | Iterable[str], *, face_detector: str | None = None,
             frames: int | None = None, aggregate: str = "mean", threshold: float | None = None,
             per_frame: bool = False, limit: int | None = None, ilimit: int | None = None,
             vlimit: int | None = None, workers: int | None = None) -> Iterator[dict]:
        """Yields predict_main's JSON record of each file of ``paths`` (options as its flags), in order, each
        as soon as it is scored. A file that cannot be scored has ``error`` set; a missing top-level path
        raises MediaError. Leaving the loop early stops the scan."""
        options = scan_lib.ScanOptions(
            threshold=self.threshold if threshold is None else threshold, aggregate=aggregate, per_frame=per_frame,
            image_limit=ilimit if ilimit is not None else limit, video_limit=vlimit if vlimit is not None else limit,
            workers=workers or scan_lib.DEFAULT_WORKERS)
        record_queue: queue.Queue = queue.Queue(maxsize=_QUEUED_RECORDS)
        stop = threading.Event()

        def put(item) -> None:
            while True:
                try:
                    record_queue.put(item, timeout=0.1)
                    return
                except queue.Full:
                    if stop.is_set():
                        raise _ScanStopped from None

        def run() -> None:
            try:
                try:
                    self.scan_records(paths, options, lambda record: put(record.to_json_dict(per_frame)),
                                      face_detector, frames)
                    put(_END)
                except _ScanStopped:
                    raise
                except BaseException as error:  # pylint: disable=broad-except  (re-raised in the caller's thread)
                    put(error)
            except _ScanStopped:
                return

        thread = threading.Thread(target=run, name="meso_jax-scan", daemon=True)
        thread.start()
        try:
            while (item := record_queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


class _ScanStopped(Exception):
    """The consumer of Detector.scan left its loop."""


_END = object()
_QUEUED_RECORDS = 64


def load_detector(checkpoint: str | os.PathLike | None = None, *, keras_weights: str | None = None,
                  batch_size: int = 32, flip_average: bool = True) -> Detector:
    """The detector of an exported model or training workdir (``checkpoint``), of the authors' published
    Keras weights (``keras_weights``), or, with neither, the model shipped in checkpoints/.
    ``flip_average`` (on, as predict_main): each face scored as the mean logit of it and its mirror image.
    Raises scoring.ModelSourceError (one line) when the model cannot be loaded."""
    scorer, prep = scan_lib.load_scanner(None if checkpoint is None else os.fspath(checkpoint), keras_weights,
                                         None, None, batch_size, flip_average)
    return Detector(scorer, prep)
