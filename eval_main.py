"""Evaluates a MesoNet model on a labelled folder and writes metrics.json, roc.png and scores.csv.

    python eval_main.py --path=DIR --output_dir=OUT [--checkpoint=DIR | --keras_weights=FILE.h5]

DIR holds real/ and fake/ sub-folders (also original/ and manipulated/) of images or videos.
Files that cannot be scored are listed with their reason and left out of the metrics. Exit status:
0 when metrics were computed, 1 when no file could be scored, 2 for a usage error.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from meso_jax import cli

_PATH = flags.DEFINE_string("path", None, "Folder with real/ and fake/ sub-folders.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where metrics.json, roc.png and scores.csv are written.")

_REPORT = flags.DEFINE_string("report", None, "Also write a visual report to this HTML file: ROC curve, score "
                              "histograms per class and method, the worst misses and false alarms with saliency "
                              "heatmaps, every file (its images go to a sibling folder NAME_files/).")
_SCORING = cli.define_scoring_flags()

PROGRAM = "eval_main"


def _check_output_dir(output_dir: str) -> None:
    """Creates ``output_dir`` and proves a file can be written there (one-line usage error otherwise)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise cli.UsageError(f"--output_dir {output_dir}: cannot create ({error.strerror or error})") from None
    probe = os.path.join(output_dir, f".eval_main_write_test_{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise cli.UsageError(f"--output_dir {output_dir}: cannot write there ({error.strerror or error})") from None


def _run(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected argument {argv[1]!r}; use --path=DIR")
    if not _PATH.value or not _OUTPUT_DIR.value:
        raise cli.UsageError("give --path=DIR (with real/ and fake/ folders) and --output_dir=DIR")
    if not os.path.isdir(_PATH.value):
        raise cli.UsageError(f"{_PATH.value}: no such folder")
    _check_output_dir(_OUTPUT_DIR.value)  # before any slow work: fail now, not after scoring every file
    cli.check_report_path(_REPORT.value)
    # Heavy imports only after the command line is known to be usable: a usage error answers at once.
    from meso_jax import evaluate, scan  # pylint: disable=import-outside-toplevel

    try:
        labelled_files = evaluate.labelled_media(_PATH.value)
    except evaluate.EvaluationError as error:
        raise cli.UsageError(str(error)) from None
    scorer, prep = cli.load_scanner(_SCORING)
    options = scan.ScanOptions(threshold=cli.threshold(_SCORING, scorer), aggregate=_SCORING.aggregate.value,
                               workers=_SCORING.workers.value or scan.DEFAULT_WORKERS)
    try:
        report = evaluate.evaluate(_PATH.value, labelled_files, scorer, prep, options, _OUTPUT_DIR.value,
                                   progress=_SCORING.progress.value and sys.stderr.isatty(), report_path=_REPORT.value)
    except evaluate.EvaluationError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 1
    print(evaluate.format_report(report))
    print(f"wrote metrics.json, roc.png and scores.csv to {_OUTPUT_DIR.value}"
          + (f" and the report {_REPORT.value}" if _REPORT.value else ""))
    return 0


def main(argv: list[str]) -> None:
    cli.run_entry(PROGRAM, _run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
