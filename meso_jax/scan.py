"""Scanning files and folders with a MesoNet model: the library behind predict_main.py.

Decoding, frame sampling and face detection run in a thread pool while the main thread feeds the
model full batches that mix samples of several files. Records come out in the order the files were
given (sorted for a folder), each as soon as that file and every file before it has been scored.
A file that cannot be scored (unreadable, corrupt, no face) yields a record with ``error`` set.
"""

from __future__ import annotations

import collections
import collections.abc
import concurrent.futures
import dataclasses
import os
import sys
from typing import Callable, Iterable, Iterator

import numpy as np
import tqdm

from data_pipelines import faces
from data_pipelines import samples as samples_lib
from data_pipelines import sources
from data_pipelines.preprocessing import MediaError, Preprocessing, media_kind
from meso_jax import scoring
from meso_jax.records import PersonResult, ScanRecord, ScanSummary, ShownFace, certainty, verdict

DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class ScanOptions:
    """How to score and aggregate. A limit of None means no limit; 0 skips that kind of file."""

    threshold: float = 0.5
    aggregate: str = "mean"
    per_frame: bool = False
    image_limit: int | None = None
    video_limit: int | None = None
    workers: int = DEFAULT_WORKERS
    keep_faces: bool = False  # keep each person's most fake and most real face crop (ScanRecord.shown_faces)

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.aggregate not in scoring.AGGREGATIONS:
            raise ValueError(f"unknown aggregate {self.aggregate!r}; choose one of {', '.join(scoring.AGGREGATIONS)}")
        for name in ("image_limit", "video_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def select_media(path: str, image_limit: int | None = None, video_limit: int | None = None) -> Iterator[str]:
    """Media files under ``path`` (a file or folder, recursively, sorted), at most ``image_limit``
    images and ``video_limit`` videos (None: no limit). Stops walking once both limits are reached.
    """
    limits = {"image": image_limit, "video": video_limit}
    kinds = tuple(kind for kind, limit in limits.items() if limit != 0)
    if not kinds:
        return
    taken = {"image": 0, "video": 0}
    for media_path in sources.find_media(path, kinds=kinds):
        kind = media_kind(media_path)
        if kind is None:  # a file named explicitly: reading it reports the unsupported type
            yield media_path
            continue
        limit = limits[kind]
        if limit is not None and taken[kind] >= limit:
            if all(limits[k] is not None and taken[k] >= limits[k] for k in kinds):
                return
            continue
        taken[kind] += 1
        yield media_path


def _error_reason(error: MediaError, path: str) -> str:
    """The error message without the leading "<path>: ", since the record carries the path."""
    message = str(error)
    prefix = " ".join(f"{path}:".split()) + " "  # MediaError puts its message on one line
    return message[len(prefix):] if message.startswith(prefix) else message


@dataclasses.dataclass
class _PreparedFile:
    """A file between extraction and its record: model inputs and the scores filled in so far."""

    record: ScanRecord
    model_inputs: np.ndarray | None = None  # uint8 crops (or clips of them)
    input_frame_indices: list[int] = dataclasses.field(default_factory=list)
    input_person_ids: list[int] = dataclasses.field(default_factory=list)
    person_boxes: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    scores: list[float] = dataclasses.field(default_factory=list)

    @property
    def pending_inputs(self) -> int:
        """Inputs not yet scored."""
        return 0 if self.model_inputs is None else self.model_inputs.shape[0] - len(self.scores)


def _prepare_file(path: str, prep: Preprocessing, clip_frames: int | None) -> _PreparedFile:
    """Worker-thread part: decode, sample, find faces and build the model inputs of one file."""
    record = ScanRecord(path=path, kind=media_kind(path) or "unknown")
    record.error = sources.link_problem(path)
    if record.error is not None:
        return _PreparedFile(record)
    if clip_frames is not None and record.kind == "image":
        record.error = "this model scores videos only (it is a clip model); use an image model for images"
        return _PreparedFile(record)
    try:
        crops = samples_lib.extract_face_crops(path, prep)  # uint8: the Scorer scales on the device
    except MediaError as error:
        record.error = _error_reason(error, path)
        return _PreparedFile(record)
    record.frames = crops.frames_read
    record.faces = len(crops.frame_indices)
    if clip_frames is None:
        return _PreparedFile(record, crops.crops_bhwc, list(crops.frame_indices), list(crops.person_ids),
                             list(crops.person_boxes))
    clips, first_frames, clip_person_ids = [], [], []
    person_ids = np.asarray(crops.person_ids)
    for person_id in range(len(crops.person_boxes)):  # each person's faces make that person's clips
        samples = np.flatnonzero(person_ids == person_id)
        for clip in samples[samples_lib.clip_indices(len(samples), clip_frames)]:
            clips.append(crops.crops_bhwc[clip])
            first_frames.append(crops.frame_indices[clip[0]])
            clip_person_ids.append(person_id)
    return _PreparedFile(record, np.stack(clips), first_frames, clip_person_ids, list(crops.person_boxes))


def _finish(prepared: _PreparedFile, options: ScanOptions) -> ScanRecord:
    """Fills in the record's people (each person's inputs aggregated), its score and verdict (those of
    the most fake person) and its frame scores."""
    record = prepared.record
    if record.error is None:
        input_person_ids = np.asarray(prepared.input_person_ids)
        scores = np.asarray(prepared.scores, dtype=np.float64)
        people = []
        for person_id, box in enumerate(prepared.person_boxes):
            score = scoring.aggregate_scores(scores[input_person_ids == person_id], options.aggregate,
                                             options.threshold)
            frames = int(np.sum(input_person_ids == person_id))
            people.append(PersonResult(score, verdict(score, options.threshold), frames, tuple(box)))
        order = sorted(range(len(people)), key=lambda person_id: people[person_id].score)
        rank_of = {person_id: rank for rank, person_id in enumerate(order)}
        record.people = [people[person_id] for person_id in order]
        record.score = record.people[0].score
        record.label = record.people[0].label
        record.certainty = certainty(record.score, options.threshold)
        record.frame_indices = prepared.input_frame_indices
        record.frame_scores = list(prepared.scores)
        record.frame_people = [rank_of[person_id] for person_id in prepared.input_person_ids]
        if options.keep_faces:
            record.shown_faces = _faces_to_show(prepared, record)
    return record


def _faces_to_show(prepared: _PreparedFile, record: ScanRecord) -> list[ShownFace]:
    """Each person's most fake and most real input (one when they are the same; a clip's first frame)."""
    shown = []
    scores = np.asarray(prepared.scores)
    ranks = np.asarray(record.frame_people)
    for rank in range(len(record.people)):
        inputs = np.flatnonzero(ranks == rank)
        for index in dict.fromkeys([inputs[np.argmin(scores[inputs])], inputs[np.argmax(scores[inputs])]]):
            crop = prepared.model_inputs[index]
            shown.append(ShownFace(rank, prepared.input_frame_indices[index], float(scores[index]),
                                   crop if crop.ndim == 3 else crop[0]))
    return shown


def scan_files(paths: Iterable[str], scorer: scoring.Scorer, prep: Preprocessing, options: ScanOptions,
               on_record: Callable[[ScanRecord], None], progress: bool = False) -> ScanSummary:
    """Scores every file in ``paths``, calling ``on_record`` once per file, in order.

    ``progress`` shows a tqdm bar on stderr. Returns the counts of real, fake and failed files.
    ``paths`` is consumed lazily (at most a few dozen ahead of the records written), so a folder walk
    streams: memory does not grow with the number of files and the first records come at once.
    """
    clip_frames = scorer.input_shape[0] if len(scorer.input_shape) == 4 else None
    summary = ScanSummary()
    waiting: collections.deque[_PreparedFile] = collections.deque()  # in path order
    unscored: collections.deque[_PreparedFile] = collections.deque()  # files with inputs left to score
    total = len(paths) if isinstance(paths, collections.abc.Sized) else None
    bar = tqdm.tqdm(total=total, unit="file", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def emit_finished() -> None:
        while waiting and waiting[0].pending_inputs == 0:
            record = _finish(waiting.popleft(), options)
            summary.add(record)
            with tqdm.tqdm.external_write_mode(file=sys.stdout):
                on_record(record)
            bar.update(1)

    def score_one_batch() -> None:
        parts, owners = [], []
        room = scorer.batch_size
        while unscored and room:
            prepared = unscored[0]
            start = len(prepared.scores)  # a file is split across batches only at a batch's end
            take = min(room, prepared.model_inputs.shape[0] - start)
            parts.append(prepared.model_inputs[start:start + take])
            owners.append(prepared)
            room -= take
            if start + take == prepared.model_inputs.shape[0]:
                unscored.popleft()
        batch_scores = scorer.score_batch(np.concatenate(parts))
        offset = 0
        for owner, part in zip(owners, parts):
            owner.scores.extend(float(s) for s in batch_scores[offset:offset + len(part)])
            offset += len(part)

    def inputs_waiting() -> int:
        return sum(prepared.pending_inputs for prepared in unscored)

    in_flight_limit = 4 * options.workers
    path_iterator = iter(paths)
    pool = concurrent.futures.ThreadPoolExecutor(options.workers, thread_name_prefix="extract")
    futures: collections.deque[concurrent.futures.Future] = collections.deque()

    def refill() -> None:
        while len(futures) < in_flight_limit:
            path = next(path_iterator, None)
            if path is None:
                return
            futures.append(pool.submit(_prepare_file, path, prep, clip_frames))

    try:
        refill()
        while futures:
            prepared = futures.popleft().result()
            refill()
            waiting.append(prepared)
            if prepared.pending_inputs:
                unscored.append(prepared)
            while inputs_waiting() >= scorer.batch_size:
                score_one_batch()
            emit_finished()
        while unscored:
            score_one_batch()
        emit_finished()
    finally:
        # On an interrupt, files not yet started are dropped instead of decoded for nothing.
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return summary


def load_scanner(checkpoint: str | None, keras_weights: str | None, face_detector: str | None,
                 frames_per_video: int | None, batch_size: int,
                 flip_average: bool = False) -> tuple[scoring.Scorer, Preprocessing]:
    """The scorer and preprocessing for a model source (see scoring.load_model_source).

    The model's own preprocessing applies, except ``face_detector`` / ``frames_per_video`` when given.
    ``flip_average``: see scoring.Scorer.
    Raises scoring.ModelSourceError (one line) when the model cannot be loaded.
    """
    loaded_model = scoring.load_model_source(checkpoint, keras_weights)
    overrides = {"face_detector": face_detector, "frames_per_video": frames_per_video}
    prep = dataclasses.replace(Preprocessing.from_dict(loaded_model.preprocessing),
                               **{name: value for name, value in overrides.items() if value is not None})
    try:
        samples_lib.face_detector(prep.face_detector)  # made now, so that a missing detector is one error
    except faces.FaceDetectorUnavailable as error:
        raise scoring.ModelSourceError(str(error)) from None
    scorer = scoring.Scorer(loaded_model, batch_size, flip_average=flip_average)
    if prep.image_size != scorer.input_shape[-2]:
        raise scoring.ModelSourceError(f"{scorer.model_source}: preprocessing image_size {prep.image_size} does not "
                                       f"match the model's input {scorer.input_shape}")
    return scorer, prep
