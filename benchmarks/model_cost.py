"""Time per face of the shipped models as the scanner scores crops (flip averaging on), interleaved.

    python3 benchmarks/model_cost.py [--models=checkpoints/meso4,checkpoints/meso4x4] [--batch_size=32] \
        [--rounds=3] [--output=FILE.json]

Each model scores the same batch of face crops through ``load_detector(...).score_faces``: resizing, both
flipped views and every member of an ensemble, as ``predict_main.py --face_detector=none`` does per batch.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # noqa: E402
from meso_jax import load_detector  # noqa: E402

DEFAULT_MODELS = ("checkpoints/meso4", "checkpoints/meso4x2", "checkpoints/meso4x4", "checkpoints/mesoinception4",
                  "checkpoints/ensemble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated checkpoint folders")
    parser.add_argument("--batch_size", type=int, default=32, help="faces per call (the scanner's batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min_seconds", type=float, default=2.0, help="per contender and round")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    faces = list(np.random.default_rng(0).integers(0, 256, (args.batch_size, 224, 224, 3), dtype=np.uint8))
    contenders = {}
    for model in args.models.split(","):
        detector = load_detector(REPO_ROOT / model, batch_size=args.batch_size)
        detector.score_faces(faces)  # compiled before timing
        contenders[model] = lambda detector=detector: detector.score_faces(faces)
    timings = common.interleaved(contenders, args.rounds, args.min_seconds)
    result = {"machine": common.machine_info(), "busy_processes": common.other_busy_processes(),
              "batch_size": args.batch_size, "models": {}}
    for model, timing in timings.items():
        per_face_ms = 1000 * timing["median_s"] / args.batch_size
        result["models"][model] = {**timing, "ms_per_face": per_face_ms}
        print(f"{model}: {per_face_ms:.2f} ms per face ({args.batch_size / timing['median_s']:.0f} faces/s)")
    print("wrote", common.write_json(args.output or common.default_output("model_cost"), result))


if __name__ == "__main__":
    main()
