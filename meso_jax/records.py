"""Scan records (one per file: score, verdict, people) and the writers that print them: text, JSON lines,
CSV. Score = the probability the content is REAL; the verdict word is always printed beside it."""

from __future__ import annotations

import csv
import dataclasses
import json
from typing import Protocol, TextIO

import numpy as np

OUTPUT_FORMATS = ("text", "json", "csv")

# Certainty bands: how far the score lies from the threshold, as a share of the way from the
# threshold to 0 (fake) or 1 (real). At threshold 0.5 the bands are |score - 0.5| >= 0.4, >= 0.25, >= 0.1.
CERTAINTY_BANDS = ((0.8, "very confident"), (0.5, "confident"), (0.2, "fairly confident"), (0.0, "uncertain"))


def count_of(number: int, noun: str) -> str:
    """"1 file", "2 files": ``number`` and ``noun``, plural unless it is one."""
    return f"{number} {noun}" + ("" if number == 1 else "s")


def verdict(score: float, threshold: float) -> str:
    """"real" when ``score`` (probability real) >= ``threshold``, else "fake"."""
    return "real" if score >= threshold else "fake"


def certainty(score: float, threshold: float) -> str:
    """The certainty band of ``score``: very confident, confident, fairly confident or uncertain."""
    if score >= threshold:
        distance = (score - threshold) / (1.0 - threshold) if threshold < 1.0 else 1.0
    else:
        distance = (threshold - score) / threshold
    # Rounding keeps band edges exact in decimal (0.9 - 0.5 is 0.4 to the user, not 0.3999...).
    distance = round(distance, 9)
    return next(word for bound, word in CERTAINTY_BANDS if distance >= bound)


@dataclasses.dataclass
class PersonResult:
    """One person of a file (a face of an image, a track of a video): their score (the file's aggregate
    over their faces), verdict, the number of frames they were judged on, and where they were first seen
    (x, y, w, h in pixels of the original frame)."""

    score: float
    label: str
    frames: int
    box: tuple[int, int, int, int]

    def to_json_dict(self) -> dict:
        """The person as a JSON-ready dict."""
        return {"score": self.score, "label": self.label, "frames": self.frames, "box": list(self.box)}


@dataclasses.dataclass
class ShownFace:
    """A face crop kept for a visual report: the most fake and the most real face of each person
    (``person``: position in the record's ``people``); ``crop``: uint8 RGB, the model's input size."""

    person: int
    frame: int
    score: float
    crop: np.ndarray


@dataclasses.dataclass
class ScanRecord:
    """The result for one file. ``score`` is the probability the content is real (None on error): that
    of the most fake person (``people[0]``), who decides the verdict. Each person's score aggregates their
    own faces (mean probability, or with the vote aggregate the share of their frames judged real).
    kind: image | video ("unknown" for a file named explicitly whose extension is neither).

    frames: frames read (1 for an image); faces: samples the model scored (face crops, or whole
    frames with face_detector=none). people: most fake first. frame_indices/frame_scores/frame_people:
    per sample (per clip for a clip model, indexed by the clip's first frame), frame_people[i] the
    position in ``people`` (0 = the deciding person) of the person sample i shows.
    """

    path: str
    kind: str
    score: float | None = None
    label: str | None = None
    certainty: str | None = None
    frames: int = 0
    faces: int = 0
    error: str | None = None
    frame_indices: list[int] = dataclasses.field(default_factory=list)
    frame_scores: list[float] = dataclasses.field(default_factory=list)
    people: list[PersonResult] = dataclasses.field(default_factory=list)
    frame_people: list[int] = dataclasses.field(default_factory=list)
    shown_faces: list[ShownFace] = dataclasses.field(default_factory=list)  # with ScanOptions.keep_faces

    def to_json_dict(self, per_frame: bool) -> dict:
        """The record as a JSON-ready dict; frame scores (with the person, 1 = the deciding one) only when
        ``per_frame``."""
        result = {"path": self.path, "kind": self.kind, "score": self.score, "label": self.label,
                  "certainty": self.certainty, "frames": self.frames, "faces": self.faces,
                  "people": [person.to_json_dict() for person in self.people], "error": self.error}
        if per_frame:
            result["frame_scores"] = [{"frame": index, "person": person + 1, "score": score} for index, person, score
                                      in zip(self.frame_indices, self.frame_people, self.frame_scores)]
        return result

    def describe_people(self) -> str:
        """The people in a few words, most fake first, e.g. "2 people: #1 fake 0.08 (30 frames), #2 real
        0.93 (32 frames)"; empty for one person."""
        if len(self.people) < 2:
            return ""
        noun = "faces" if self.kind == "image" else "people"
        parts = [f"#{rank} {person.label} {person.score:.2f}" + ("" if self.kind == "image" else
                                                                f" ({person.frames} frames)")
                 for rank, person in enumerate(self.people, start=1)]
        return f"{len(self.people)} {noun}: " + ", ".join(parts)


@dataclasses.dataclass
class ScanSummary:
    """Counts over a scan."""

    real: int = 0
    fake: int = 0
    errors: int = 0

    @property
    def files(self) -> int:
        """Number of files the scan produced a record for."""
        return self.real + self.fake + self.errors

    def add(self, record: ScanRecord) -> None:
        """Counts one record."""
        if record.error is not None:
            self.errors += 1
        elif record.label == "real":
            self.real += 1
        else:
            self.fake += 1

    def describe(self) -> str:
        """One line for the user, e.g. "scanned 5 files: 2 real, 2 fake, 1 error"."""
        return (f"scanned {count_of(self.files, 'file')}: {self.real} real, {self.fake} fake, "
                f"{count_of(self.errors, 'error')}")


class RecordWriter(Protocol):
    """Writes scan records somewhere as they arrive."""

    def write(self, record: ScanRecord) -> None:
        """Writes one record and flushes it."""


def printable_path(path: str) -> str:
    """``path`` on one line: control characters (a newline in a file name) shown as escapes."""
    return "".join(char if char.isprintable() or char == " " else repr(char)[1:-1] for char in path)


class TextRecordWriter:
    """Aligned lines for people: score, verdict with certainty, kind, faces/frames, path."""

    def __init__(self, stream: TextIO, per_frame: bool, threshold: float):
        self._stream = stream
        self._per_frame = per_frame
        self._threshold = threshold
        self._line("score", "verdict", "kind", "faces", "file")

    def _line(self, score: str, verdict: str, kind: str, faces: str, path: str) -> None:
        self._stream.write(f"{score:>6}  {verdict:<23}  {kind:<7}  {faces:>7}  {path}\n")

    def write(self, record: ScanRecord) -> None:
        """Writes one record (and its frame scores when asked) and flushes."""
        path = printable_path(record.path)
        if record.error is not None:
            self._line("-", "error", record.kind, "-", f"{path}  ({record.error})")
        else:
            people = record.describe_people()
            self._line(f"{record.score:.4f}", f"{record.label} ({record.certainty})", record.kind,
                       f"{record.faces}/{record.frames}", path + (f"  {people}" if people else ""))
            if self._per_frame and record.kind == "video":
                for index, person, score in zip(record.frame_indices, record.frame_people, record.frame_scores):
                    who = f" person #{person + 1}" if len(record.people) > 1 else ""
                    self._stream.write(f"{'':>6}    frame {index:>6}{who}: {score:.4f} "
                                       f"{verdict(score, self._threshold)}\n")
        self._stream.flush()


class JsonLinesRecordWriter:
    """One JSON object per line and file."""

    def __init__(self, stream: TextIO, per_frame: bool):
        self._stream = stream
        self._per_frame = per_frame

    def write(self, record: ScanRecord) -> None:
        """Writes one record as a JSON line and flushes."""
        self._stream.write(json.dumps(record.to_json_dict(self._per_frame), ensure_ascii=False) + "\n")
        self._stream.flush()


class CsvRecordWriter:
    """CSV with a header; people: how many were judged, box: where the deciding one was first seen
    ("x y w h"); frame scores (when asked) as "frame:score" pairs (or "frame:person:score" when there
    are several people) joined by ";".

    With ``true_labels`` (path -> "real" | "fake", for evaluation) a true_label column follows the path.
    """

    COLUMNS = ("path", "kind", "score", "label", "certainty", "frames", "faces", "people", "box", "error")

    def __init__(self, stream: TextIO, per_frame: bool, true_labels: dict[str, str] | None = None):
        self._stream = stream
        self._per_frame = per_frame
        self._true_labels = true_labels
        self._writer = csv.writer(stream, lineterminator="\n")
        header = list(self.COLUMNS)
        if true_labels is not None:
            header.insert(1, "true_label")
        self._writer.writerow(header + (["frame_scores"] if per_frame else []))
        stream.flush()

    def write(self, record: ScanRecord) -> None:
        """Writes one CSV row and flushes."""
        values = record.to_json_dict(per_frame=False)
        values["people"] = len(record.people) if record.error is None else None
        values["box"] = " ".join(map(str, record.people[0].box)) if record.people else None
        row = ["" if values[column] is None else values[column] for column in self.COLUMNS]
        if self._true_labels is not None:
            row.insert(1, self._true_labels[record.path])
        if self._per_frame:
            several = len(record.people) > 1
            row.append(";".join(f"{index}:{person + 1}:{score:.6f}" if several else f"{index}:{score:.6f}"
                                for index, person, score
                                in zip(record.frame_indices, record.frame_people, record.frame_scores)))
        self._writer.writerow(row)
        self._stream.flush()


def make_writer(output_format: str, stream: TextIO, per_frame: bool, threshold: float) -> RecordWriter:
    """The record writer for ``output_format`` (text | json | csv)."""
    if output_format == "text":
        return TextRecordWriter(stream, per_frame, threshold)
    if output_format == "json":
        return JsonLinesRecordWriter(stream, per_frame)
    if output_format == "csv":
        return CsvRecordWriter(stream, per_frame)
    raise ValueError(f"unknown format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
