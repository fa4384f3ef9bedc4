"""The model card's cross-dataset table: eval_main.py on each validation set for each model.

    python3 scripts/cross_dataset_table.py --models=checkpoints/meso4,keras:../shared/mesonet/Meso4_DF.h5 \
        --output=benchmarks/results/cross_dataset.json

Sets (from ../shared): DFDC val face crops, FaceForensics++ c23 val face crops (overall and per method),
the dev videos (one score per video). Crops are scored as crops (--face_detector=none), videos with the
model's own face detector; flip averaging and thresholds are eval_main's defaults. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
SETS = {
    "dfdc_val": (SHARED / "dfdc_faces" / "val", ["--face_detector=none"]),
    "ffpp_val": (SHARED / "ffpp_faces" / "val", ["--face_detector=none"]),
    "dev_videos": (SHARED / "dev_videos", []),
}
METHODS = ("deepfakes", "face2face", "faceswap", "neuraltextures")


def evaluate(model: str, set_name: str, output_dir: str) -> dict:
    """metrics.json of eval_main.py for ``model`` (a checkpoint folder, or keras:FILE.h5) on one set."""
    path, extra = SETS[set_name]
    source = f"--keras_weights={model[6:]}" if model.startswith("keras:") else f"--checkpoint={model}"
    result = subprocess.run([sys.executable, "eval_main.py", f"--path={path}", f"--output_dir={output_dir}", source,
                             "--noprogress", *extra], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"eval_main failed for {model} on {set_name}: {result.stderr.strip()[-500:]}")
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def row(model: str, reports: dict) -> dict:
    """The table's numbers for one model (None for a set not evaluated)."""
    dfdc, ffpp, videos = (reports.get(name) for name in ("dfdc_val", "ffpp_val", "dev_videos"))
    return {
        "model": model,
        "dfdc_val_auc": dfdc and dfdc["frame_level"]["auc"],
        "ffpp_val_auc": ffpp and ffpp["frame_level"]["auc"],
        **{f"ffpp_{method}_auc": ffpp and ffpp["by_method"][method]["frames"]["auc"] for method in METHODS},
        "dev_videos_video_auc": videos and videos["video_level"]["auc"],
        "dev_videos_frame_auc": videos and videos["frame_level"]["auc"],
        "threshold": next(report["threshold"] for report in reports.values()),
    }


def markdown(rows: list[dict]) -> str:
    header = ("| model | DFDC val | FF++ val | DF | F2F | FS | NT | dev videos (video) | dev videos (frame) | "
              "threshold |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for item in rows:
        numbers = [item["dfdc_val_auc"], item["ffpp_val_auc"], *(item[f"ffpp_{m}_auc"] for m in METHODS),
                   item["dev_videos_video_auc"], item["dev_videos_frame_auc"], item["threshold"]]
        cells = ("–" if value is None else f"{value:.3f}" for value in numbers)
        lines.append(f"| {item['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated checkpoint folders or keras:FILE.h5")
    parser.add_argument("--output", help="JSON file for the rows (and eval_main's reports)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    args = parser.parse_args()
    sets = args.sets.split(",")
    if not set(sets) <= set(SETS):
        parser.error(f"--sets: choose from {', '.join(SETS)}")
    rows, everything = [], {}
    with tempfile.TemporaryDirectory() as temporary:
        for model in args.models.split(","):
            reports = {name: evaluate(model, name, os.path.join(temporary, f"{len(rows)}_{name}")) for name in sets}
            rows.append(row(model, reports))
            everything[model] = reports
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "reports": everything}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
