"""Evaluates a MesoNet model on a labelled folder and writes metrics.json, roc.png and scores.csv.

    python eval_main.py --path=DIR --output_dir=OUT [--checkpoint=DIR | --keras_weights=FILE.h5]

DIR holds real/ and fake/ sub-folders (also original/ and manipulated/) of images or videos.
Files that cannot be scored are listed with their reason and left out of the metrics. Exit status:
0 when metrics were computed, 1 when no file could be scored, 2 for a usage error.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

_PATH = flags.DEFINE_string("path", None, "Folder with real/ and fake/ sub-folders.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where metrics.json, roc.png and scores.csv are written.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "An exported model or a training --workdir (its best checkpoint).")
_KERAS_WEIGHTS = flags.DEFINE_string("keras_weights", None, "The authors' published MesoNet .h5 weights.")
_FACE_DETECTOR = flags.DEFINE_enum("face_detector", None, ["haar", "none"],
                                   "Face detector; default: the model's own setting. none: files are face crops.")
_FRAMES = flags.DEFINE_integer("frames", None, "Frames sampled per video; default: the model's setting.", lower_bound=1)
_AGGREGATE = flags.DEFINE_enum("aggregate", "mean", ["mean", "vote"],
                               "Video score: mean frame score, or vote = share of frames judged real (MesoNet).")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "A score >= threshold is judged real.",
                                lower_bound=0.0, upper_bound=1.0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Model batch size.", lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", None, "Threads decoding files and finding faces; default: CPU count, max 8.",
                                lower_bound=1)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on standard error (only on a terminal).")

PROGRAM = "eval_main"


class UsageError(Exception):
    """A mistake in the command line; reported in one line with exit status 2."""


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        sys.exit(2)


def _check_output_dir(output_dir: str) -> None:
    """Creates ``output_dir`` and proves a file can be written there (one-line usage error otherwise)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir}: cannot create ({error.strerror or error})") from None
    probe = os.path.join(output_dir, f".eval_main_write_test_{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir}: cannot write there ({error.strerror or error})") from None


def _run(argv: list[str]) -> int:
    if len(argv) > 1:
        raise UsageError(f"unexpected argument {argv[1]!r}; use --path=DIR")
    if not _PATH.value or not _OUTPUT_DIR.value:
        raise UsageError("give --path=DIR (with real/ and fake/ folders) and --output_dir=DIR")
    if not os.path.isdir(_PATH.value):
        raise UsageError(f"{_PATH.value}: no such folder")
    _check_output_dir(_OUTPUT_DIR.value)  # before any slow work: fail now, not after scoring every file
    # Heavy imports only after the command line is known to be usable: a usage error answers at once.
    from meso_jax import evaluate, scan, scoring  # pylint: disable=import-outside-toplevel

    options = scan.ScanOptions(threshold=_THRESHOLD.value, aggregate=_AGGREGATE.value,
                               workers=_WORKERS.value or scan.DEFAULT_WORKERS)
    try:
        labelled_files = evaluate.labelled_media(_PATH.value)
    except evaluate.EvaluationError as error:
        raise UsageError(str(error)) from None
    scoring.enable_compilation_cache()
    try:
        scorer, prep = scan.load_scanner(_CHECKPOINT.value, _KERAS_WEIGHTS.value, _FACE_DETECTOR.value,
                                         _FRAMES.value, _BATCH_SIZE.value)
    except scoring.ModelSourceError as error:
        raise UsageError(str(error)) from None
    try:
        report = evaluate.evaluate(_PATH.value, labelled_files, scorer, prep, options, _OUTPUT_DIR.value,
                                   progress=_PROGRESS.value and sys.stderr.isatty())
    except evaluate.EvaluationError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 1
    print(evaluate.format_report(report))
    print(f"wrote metrics.json, roc.png and scores.csv to {_OUTPUT_DIR.value}")
    return 0


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    # OpenCV and FFmpeg would print their own warnings about broken files; the records say it in one line.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    sys.stdout.reconfigure(errors="backslashreplace")  # file names that are not valid UTF-8
    try:
        sys.exit(_run(argv))
    except UsageError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
