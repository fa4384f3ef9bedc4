"""Command-line pieces shared by predict_main.py and eval_main.py (entry scripts only; the library
never reads flags): the model-source and scoring flags, one-line usage errors, and the run wrapper.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import cv2
from absl import flags, logging

from data_pipelines.faces import FACE_DETECTORS
from meso_jax import engine as engine_lib
from meso_jax import host_memory


class UsageError(Exception):
    """A mistake in the command line; reported in one line with exit status 2."""


@dataclasses.dataclass(frozen=True)
class ScoringFlags:
    """The flags that choose the model and how files are turned into scores."""

    checkpoint: flags.FlagHolder
    keras_weights: flags.FlagHolder
    face_detector: flags.FlagHolder
    frames: flags.FlagHolder
    aggregate: flags.FlagHolder
    threshold: flags.FlagHolder
    batch_size: flags.FlagHolder
    flip_average: flags.FlagHolder
    workers: flags.FlagHolder
    progress: flags.FlagHolder
    engine: flags.FlagHolder


def define_scoring_flags() -> ScoringFlags:
    """Defines the model-source and scoring flags (call once, at import of an entry script)."""
    return ScoringFlags(
        checkpoint=flags.DEFINE_string("checkpoint", None,
                                       "An exported model or a training --workdir (its best checkpoint); "
                                       "default: the model shipped in checkpoints/."),
        keras_weights=flags.DEFINE_string("keras_weights", None, "The authors' published MesoNet .h5 weights."),
        face_detector=flags.DEFINE_enum("face_detector", None, list(FACE_DETECTORS),
                                        "Face detector (blazeface: MediaPipe's neural detector; haar: Viola-Jones); "
                                        "default: the model's own setting. none: files are face crops."),
        frames=flags.DEFINE_integer("frames", None, "Frames sampled per video; default: the model's setting.",
                                    lower_bound=1),
        aggregate=flags.DEFINE_enum("aggregate", "mean", ["mean", "vote"],
                                    "Video score: mean frame score, or vote = share of frames judged real (MesoNet)."),
        threshold=flags.DEFINE_float("threshold", None, "A score >= threshold is judged real; default: the "
                                     "model's own threshold, chosen on its validation data (0.5 for the "
                                     "published weights).", lower_bound=0.0, upper_bound=1.0),
        batch_size=flags.DEFINE_integer("batch_size", 32,
                                        "Model batch size (frames of several files share a batch).", lower_bound=1),
        flip_average=flags.DEFINE_bool("flip_average", True,
                                       "Score each face as the mean of the model's logits for it and its mirror "
                                       "image (twice the model's work; --noflip_average: the face alone)."),
        workers=flags.DEFINE_integer("workers", None,
                                     "Threads decoding files and finding faces; default: CPU count, max 8.",
                                     lower_bound=1),
        progress=flags.DEFINE_bool("progress", True, "Show a progress bar on standard error (only on a terminal)."),
        engine=flags.DEFINE_enum("engine", os.environ.get(engine_lib.ENVIRONMENT_VARIABLE, "auto"),
                                 list(engine_lib.ENGINES),
                                 "Implementation of the models: xla (the plain Flax modules), native (the CPU's fused "
                                 "paths, native kernels and oneDNN; an error where they cannot run), auto (native "
                                 f"where it runs). Default from ${engine_lib.ENVIRONMENT_VARIABLE} when set."),
    )


def check_report_path(path: str | None) -> None:
    """A UsageError unless ``path`` (a --report file) is None or an .html file that can be written."""
    if path is None:
        return
    if not path.lower().endswith((".html", ".htm")):
        raise UsageError(f"--report {path}: give an .html file name")
    if os.path.isdir(path):
        raise UsageError(f"--report {path}: is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--report {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--report {path}: cannot write in {folder}")


def load_scanner(scoring_flags: ScoringFlags):
    """(Scorer, Preprocessing) for the chosen model; a missing or unusable model is a UsageError."""
    from meso_jax import scan, scoring  # pylint: disable=import-outside-toplevel  (slow imports, after parsing)

    scoring.enable_compilation_cache()
    try:
        engine_lib.select(scoring_flags.engine.value)
    except engine_lib.EngineUnavailable as error:
        raise UsageError(str(error)) from None
    logging.info("engine %s", engine_lib.describe())
    try:
        return scan.load_scanner(scoring_flags.checkpoint.value, scoring_flags.keras_weights.value,
                                 scoring_flags.face_detector.value, scoring_flags.frames.value,
                                 scoring_flags.batch_size.value, scoring_flags.flip_average.value)
    except scoring.ModelSourceError as error:
        raise UsageError(str(error)) from None


def load_detector(scoring_flags: ScoringFlags):
    """The meso_jax.detector.Detector the flags choose (their face detector and frame count applied)."""
    from meso_jax import detector  # pylint: disable=import-outside-toplevel  (slow imports, after parsing)

    return detector.Detector(*load_scanner(scoring_flags))


def threshold(scoring_flags: ScoringFlags, scorer) -> float:
    """--threshold when given, else the model's own (scoring.Scorer.threshold)."""
    return scoring_flags.threshold.value if scoring_flags.threshold.value is not None else scorer.threshold


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
    """An absl flags parser that reports a bad flag in one line with exit status 2."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            print(f"{program}: {error}", file=sys.stderr)
            sys.exit(2)

    return parse


def run_entry(program: str, run: Callable[[list[str]], int], argv: list[str]) -> None:
    """Runs ``run(argv)`` and exits with its status: usage errors 2, Ctrl-C 130, one line each."""
    host_memory.reuse_freed_memory()
    logging.set_verbosity(logging.WARNING)
    # OpenCV and FFmpeg would print their own warnings about broken files; the records say it in one line.
    # (OpenCV is imported already, for the face detector names: its level is set directly unless the
    # user's environment chose one.)
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    sys.stdout.reconfigure(errors="backslashreplace")  # file names that are not valid UTF-8
    try:
        sys.exit(run(argv))
    except UsageError as error:
        print(f"{program}: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; everything written so far is complete", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of standard output went away (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
