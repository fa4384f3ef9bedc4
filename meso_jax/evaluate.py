"""Evaluation of a model on a labelled folder (real/ and fake/ sub-folders): the library behind eval_main.py.

Writes to an output folder: scores.csv (one row per file, written as files are scored), metrics.json
and roc.png. Frame-level metrics treat every scored frame (or clip) as a sample labelled like its
file; video-level metrics use one aggregated score per file (an image counts as a one-frame video).
Files that cannot be scored are listed with their reason and left out of the metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np

from data_pipelines import sources
from data_pipelines.preprocessing import Preprocessing
from meso_jax import metrics, records, scan, scoring

LABEL_WORDS = {1: "real", 0: "fake"}


class EvaluationError(Exception):
    """The folder cannot be evaluated (no labelled files, nothing scorable); one-line message."""


@dataclasses.dataclass
class LabelledRecord:
    """A scan record with the file's true label (1 real, 0 fake)."""

    record: records.ScanRecord
    label: int


def labelled_media(data_dir: str) -> list[tuple[str, int]]:
    """(path, label) of every image and video under data_dir's real/ and fake/ folders.

    Raises EvaluationError when the folder lacks them or has train/val/test splits instead.
    """
    try:
        splits = sources.load_labelled_splits(data_dir, val_fraction=0.0, allow_one_class=True)
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    if splits.val or splits.test:
        raise EvaluationError(f"{data_dir} holds train/val/test folders; point --path at the split to evaluate, "
                              f"e.g. {os.path.join(data_dir, 'test' if splits.test else 'val')}")
    return [(labelled.path, int(labelled.label)) for labelled in splits.train]


def fake_methods(data_dir: str, files: list[tuple[str, int]]) -> dict[str, str]:
    """path -> manipulation method of each fake file, from a ``method`` column of a metadata.csv in
    ``data_dir`` or its parent (FaceForensics++ style: split, file, label, method); {} when there is none."""
    for folder in (data_dir, os.path.dirname(os.path.abspath(data_dir))):
        metadata_path = os.path.join(folder, "metadata.csv")
        if not os.path.isfile(metadata_path):
            continue
        methods_by_file: dict[str, str] = {}
        try:
            with open(metadata_path, encoding="utf-8", newline="") as handle:
                for row in sources.normalised_csv_rows(handle):
                    if row.get("method") and row.get("file"):
                        split_dir = os.path.join(folder, row["split"]) if row.get("split") else folder
                        methods_by_file[os.path.normpath(os.path.join(split_dir, row["file"]))] = row["method"]
        except (OSError, UnicodeDecodeError, csv.Error):
            return {}
        found = {path: methods_by_file[os.path.normpath(os.path.abspath(path))]
                 for path, label in files if label == 0 and os.path.normpath(os.path.abspath(path)) in methods_by_file}
        if found:
            return found
    return {}


def _sample_scores(scored: list[LabelledRecord]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, scores) per level: "frames" (every scored frame or clip) and "videos" (one per file)."""
    return {
        "frames": (np.concatenate([np.full(len(item.record.frame_scores), item.label) for item in scored]),
                   np.concatenate([item.record.frame_scores for item in scored])),
        "videos": (np.array([item.label for item in scored]), np.array([item.record.score for item in scored])),
    }


def evaluation_report(labelled_records: list[LabelledRecord], threshold: float,
                      methods: dict[str, str] | None = None) -> tuple[dict, dict]:
    """metrics.json's numbers (counts, frame- and video-level metrics, the files left out) and the
    (labels, scores) per level they were computed from. Raises EvaluationError when no file was scored.
    ``methods`` (fake path -> manipulation method) adds ``by_method``: every real file against the fakes
    of one method, frame and video level.
    """
    scored = [item for item in labelled_records if item.record.error is None]
    unscored = [item for item in labelled_records if item.record.error is not None]
    if not scored:
        raise EvaluationError(f"none of the {len(labelled_records)} files could be scored")
    scores_by_level = _sample_scores(scored)
    frame_labels, frame_scores = scores_by_level["frames"]
    video_labels, video_scores = scores_by_level["videos"]
    one_class = len({item.label for item in scored}) == 1
    report = {
        "undefined": ("AUC, EER, average precision and the best thresholds need real and fake files; the scored "
                      f"files are all {LABEL_WORDS[scored[0].label]}") if one_class else None,
        "counts": {
            "files": len(labelled_records),
            "scored_files": len(scored),
            "unscored_files": len(unscored),
            "real_files": sum(item.label == 1 for item in scored),
            "fake_files": sum(item.label == 0 for item in scored),
            "images": sum(item.record.kind == "image" for item in scored),
            "videos": sum(item.record.kind == "video" for item in scored),
            "frames": int(frame_labels.size),
        },
        "frame_level": metrics.binary_metrics(frame_labels, frame_scores, threshold),
        "video_level": metrics.binary_metrics(video_labels, video_scores, threshold),
        "unscored": [{"path": item.record.path, "label": LABEL_WORDS[item.label], "error": item.record.error}
                     for item in unscored],
    }
    if methods:
        report["by_method"] = {}
        for method in sorted(set(methods.values())):
            chosen = [item for item in scored if item.label == 1 or methods.get(item.record.path) == method]
            chosen_scores = _sample_scores(chosen)
            report["by_method"][method] = {level: metrics.binary_metrics(*chosen_scores[level], threshold)
                                           for level in ("frames", "videos")}
    return report, scores_by_level


def evaluate(data_dir: str, files: list[tuple[str, int]], scorer: scoring.Scorer, prep: Preprocessing,
             options: scan.ScanOptions, output_dir: str, progress: bool = False, report_path: str | None = None
             ) -> dict:
    """Scores ``files`` (labelled_media(data_dir)) and writes scores.csv, metrics.json and roc.png
    into ``output_dir``, and with ``report_path`` the visual report (meso_jax.report: ROC, histograms
    per class and per manipulation method, the worst errors with their heatmaps, every file). Returns the
    metrics.json content.
    """
    labels_by_path = dict(files)
    os.makedirs(output_dir, exist_ok=True)
    labelled_records: list[LabelledRecord] = []
    methods = fake_methods(data_dir, files)
    html_report = None
    if report_path is not None:
        from meso_jax import report as report_lib  # pylint: disable=import-outside-toplevel

        html_report = report_lib.HtmlReport(report_path, scorer, options.threshold,
                                            f"Evaluation on {os.path.abspath(data_dir)}")
        options = dataclasses.replace(options, keep_faces=True)
    with open(os.path.join(output_dir, "scores.csv"), "w", encoding="utf-8", errors="backslashreplace",
              newline="") as scores_file:
        writer = records.CsvRecordWriter(scores_file, per_frame=True,
                                      true_labels={path: LABEL_WORDS[label] for path, label in files})

        def collect(record: records.ScanRecord) -> None:
            writer.write(record)
            label = labels_by_path[record.path]
            labelled_records.append(LabelledRecord(record, label))
            if html_report is not None:
                html_report.add(record, LABEL_WORDS[label])

        scan.scan_files([path for path, _ in files], scorer, prep, options, collect, progress)

    numbers, scores_by_level = evaluation_report(labelled_records, options.threshold, methods)
    model_description = {"name": scorer.spec.name, "source": scorer.model_source,
                         "flip_average": scorer.flip_average}
    report = {"data_dir": os.path.abspath(data_dir), "model": model_description, "preprocessing": prep.to_dict(),
              "aggregate": options.aggregate, "threshold": options.threshold, **numbers}
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as metrics_file:
        json.dump(report, metrics_file, indent=1, allow_nan=False)
        metrics_file.write("\n")
    curves = {"frames": scores_by_level["frames"], "videos (one score per file)": scores_by_level["videos"]}
    metrics.plot_roc_curves(curves, os.path.join(output_dir, "roc.png"),
                            f"{model_description['name']} on {os.path.basename(os.path.abspath(data_dir))}")
    if html_report is not None:
        scored = [item for item in labelled_records if item.record.error is None]
        video = numbers["video_level"]
        rows = [("files scored", f"{len(scored)} of {len(labelled_records)}"),
                ("real / fake", f"{video['n_real']} / {video['n_fake']}"),
                ("AUC (one score per file)", _number(video["auc"])),
                (f"accuracy at {options.threshold:.3f}", _number(video["accuracy"])),
                ("balanced accuracy", _number(video["balanced_accuracy"])), ("EER", _number(video["eer"]))]
        rows += [(f"AUC, real vs {method}", _number(by_level["videos"]["auc"]))
                 for method, by_level in numbers.get("by_method", {}).items()]
        html_report.add_evaluation(np.array([1 - item.label for item in scored]),
                                   np.array([item.record.score for item in scored]),
                                   [methods.get(item.record.path, "") for item in scored], rows)
        html_report.write()
    return report


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_report(report: dict) -> str:
    """A short table of the main numbers, then the files left out, for the terminal."""
    counts = report["counts"]
    frame, video = report["frame_level"], report["video_level"]
    rows = [
        ("samples", str(frame["n"]), str(video["n"])),
        ("real / fake", f"{frame['n_real']} / {frame['n_fake']}", f"{video['n_real']} / {video['n_fake']}"),
        ("AUC", _number(frame["auc"]), _number(video["auc"])),
        (f"accuracy @{report['threshold']:g}", _number(frame["accuracy"]), _number(video["accuracy"])),
        ("balanced accuracy", _number(frame["balanced_accuracy"]), _number(video["balanced_accuracy"])),
        ("EER", _number(frame["eer"]), _number(video["eer"])),
        ("EER threshold", _number(frame["eer_threshold"]), _number(video["eer_threshold"])),
        ("average precision", _number(frame["average_precision"]), _number(video["average_precision"])),
        ("best bal. acc. threshold", _number(frame["best_balanced_accuracy_threshold"]),
         _number(video["best_balanced_accuracy_threshold"])),
    ]
    lines = [f"{'':<26}{'frames':>12}{'videos':>12}"]
    lines += [f"{name:<26}{frame_value:>12}{video_value:>12}" for name, frame_value, video_value in rows]
    for method, by_level in report.get("by_method", {}).items():
        lines.append(f"{'AUC, real vs ' + method:<26}{_number(by_level['frames']['auc']):>12}"
                     f"{_number(by_level['videos']['auc']):>12}")
    if report.get("undefined"):
        lines.append(f"undefined ('-'): {report['undefined']}")
    lines.append(f"{counts['scored_files']} of {counts['files']} files scored "
                 f"({counts['images']} images, {counts['videos']} videos, {counts['frames']} frames)")
    if report["unscored"]:
        lines.append(f"{counts['unscored_files']} file{'s' if counts['unscored_files'] != 1 else ''} "
                     "left out of the metrics:")
        lines += [f"  {item['path']}  ({item['error']})" for item in report["unscored"]]
    return "\n".join(lines)
