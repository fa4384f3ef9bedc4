"""Scores images and videos with MesoNet: probability that each file is REAL, and the word real/fake.

    python predict_main.py --path=FILE_OR_DIR [--format=text|json|csv] [--output=FILE]
    python predict_main.py photos/            (a bare path works too)

Records (one per file, each written as soon as it is scored): score = probability the content is
REAL (with --aggregate=vote, a video's share of frames judged real), label real/fake, frames read,
faces scored, error (one line, or null). JSON lines and CSV carry the same fields, plus frame scores
with --per_frame.

Folders are scanned recursively in sorted order. Exit status: 0 when every file was scored, 1 when
some file could not be (its record says why) or nothing was found, 2 for a usage error.
Text output certainty bands (distance of the score from --threshold, as a share of the way to 0 or
1; at threshold 0.5: |score - 0.5| >= 0.4 very confident, >= 0.25 confident, >= 0.1 fairly
confident, else uncertain).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TextIO

from absl import app, flags

from meso_jax import cli, records

_PATH = flags.DEFINE_string("path", None, "Image, video or folder to scan (folders: recursively, sorted).")
_PER_FRAME = flags.DEFINE_bool("per_frame", False, "Also output the score of every frame of a video.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json", "csv"], "text: aligned lines; json: JSON lines; csv.")
_OUTPUT = flags.DEFINE_string("output", None, "Write records to this file instead of standard output.")
_LIMIT = flags.DEFINE_integer("limit", None, "Scan at most N images and at most N videos.", lower_bound=0)
_ILIMIT = flags.DEFINE_integer("ilimit", None, "Scan at most N images (overrides --limit for images).", lower_bound=0)
_VLIMIT = flags.DEFINE_integer("vlimit", None, "Scan at most N videos (overrides --limit for videos).", lower_bound=0)
_REPORT = flags.DEFINE_string("report", None, "Also write a visual report to this HTML file (most suspicious first: "
                              "the faces that decided, saliency heatmaps, per-frame charts; its images go to a "
                              "sibling folder NAME_files/).")

_SCORING = cli.define_scoring_flags()

PROGRAM = "predict_main"



def _scan_path(argv: list[str]) -> str:
    positional = argv[1:]
    if len(positional) > 1 or (positional and _PATH.value and positional[0] != _PATH.value):
        raise cli.UsageError("give one file or folder to scan (--path=FILE_OR_DIR or a bare path)")
    path = _PATH.value or (positional[0] if positional else None)
    if not path:
        raise cli.UsageError("nothing to scan: give --path=FILE_OR_DIR")
    if not os.path.lexists(path):  # a broken link is scanned: its record says it is broken
        raise cli.UsageError(f"{path}: no such file or folder")
    return path


def _open_output() -> TextIO:
    """The record stream: --output opened now, before any slow work, so an unwritable place fails at once."""
    if not _OUTPUT.value:
        return sys.stdout
    if os.path.isdir(_OUTPUT.value):
        raise cli.UsageError(f"--output {_OUTPUT.value}: is a folder; give a file name")
    try:
        # pylint: disable-next=consider-using-with  (closed by _run)
        return open(_OUTPUT.value, "w", encoding="utf-8", errors="backslashreplace")
    except OSError as error:
        raise cli.UsageError(f"--output {_OUTPUT.value}: cannot write ({error.strerror or error})") from None


def _run(argv: list[str]) -> int:
    path = _scan_path(argv)
    cli.check_report_path(_REPORT.value)
    stream = _open_output()
    try:
        return _scan(path, stream)
    finally:
        if stream is not sys.stdout:
            stream.close()


def _scan(path: str, stream: TextIO) -> int:
    # Heavy imports only after the command line is known to be usable: a usage error answers at once.
    from meso_jax import scan  # pylint: disable=import-outside-toplevel

    image_limit = _ILIMIT.value if _ILIMIT.value is not None else _LIMIT.value
    video_limit = _VLIMIT.value if _VLIMIT.value is not None else _LIMIT.value
    detector = cli.load_detector(_SCORING)
    options = scan.ScanOptions(threshold=cli.threshold(_SCORING, detector.scorer), aggregate=_SCORING.aggregate.value,
                               per_frame=_PER_FRAME.value, image_limit=image_limit, video_limit=video_limit,
                               workers=_SCORING.workers.value or scan.DEFAULT_WORKERS)

    writer = records.make_writer(_FORMAT.value, stream, options.per_frame, options.threshold)
    show_progress = _SCORING.progress.value and sys.stderr.isatty()
    if _REPORT.value is None:
        summary = detector.scan_records(path, options, writer.write, progress=show_progress)
    else:
        from meso_jax import report as report_lib  # pylint: disable=import-outside-toplevel

        report = report_lib.HtmlReport(_REPORT.value, detector.scorer, options.threshold, f"Scan of {path}")

        def write_and_report(record: records.ScanRecord) -> None:
            writer.write(record)
            report.add(record)

        try:
            summary = detector.scan_records(path, dataclasses.replace(options, keep_faces=True), write_and_report,
                                            progress=show_progress)
        finally:  # an interrupted scan still gets the report of the files done
            print(f"{PROGRAM}: wrote the report {report.write()}", file=sys.stderr)
    if summary.files == 0:
        print(f"{PROGRAM}: no images or videos found in {path}", file=sys.stderr)
        return 1
    print(f"{summary.describe()} (real when score >= {options.threshold:.3g})", file=sys.stderr)
    return 0 if summary.errors == 0 else 1


def main(argv: list[str]) -> None:
    cli.run_entry(PROGRAM, _run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
