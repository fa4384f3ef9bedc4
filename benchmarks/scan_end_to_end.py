"""End-to-end scans as a user runs them (separate processes, wall time including start-up).

    python3 benchmarks/scan_end_to_end.py [--images=2048] [--rounds=1] [--output=FILE.json]

* predict_main.py on N face crops (--face_detector=none, Meso4_DF.h5 weights) with the default engine
  (native on a CPU where it builds) and with --engine=xla (the plain Flax modules), vs
  benchmarks/keras_scanner.py doing the same work with the same decoder in Keras/TensorFlow; with
  --shipped_models also the two shipped checkpoints, each with both engines. Runs alternate, and the scores are compared. predict_main runs with
  --noflip_average: each face once, the same work as the Keras scanner (its default scores each face and
  its mirror image: twice the model's work).
* predict_main.py on one image: with cold JAX caches (fresh XDG_CACHE_HOME) and warm (median of 3),
  with the Keras weights and with the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"


def run(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall


def read_scores(path: str) -> dict[str, float]:
    scores = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            value = row.get("score")
            try:
                scores[os.path.abspath(row["path"])] = float(value)
            except (TypeError, ValueError):
                pass
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--image_dir", default=str(SHARED / "dfdc_faces" / "val"))
    parser.add_argument("--weights", default=str(SHARED / "mesonet" / "Meso4_DF.h5"))
    parser.add_argument("--single_image", default=str(SHARED / "mesonet" / "test_images" / "real" / "real00240.jpg"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip_plain", action="store_true", help="leave out the plain-Flax predict_main run")
    parser.add_argument("--shipped_models", action="store_true",
                        help="also scan with the shipped checkpoints/mesoinception4 and checkpoints/meso4 (the default)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    info = common.machine_info()
    info["busy_processes_at_start"] = common.other_busy_processes()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="meso_e2e_"))
    py = sys.executable
    predict = [py, "predict_main.py", f"--path={args.image_dir}", f"--limit={args.images}", "--face_detector=none",
               f"--keras_weights={args.weights}", "--format=csv", "--progress=false", "--batch_size=32",
               "--noflip_average"]
    contenders = {
        "predict_main_fast": (predict + [f"--output={tmp}/fast.csv"], {}, tmp / "fast.csv"),
        "keras_scanner": ([py, "benchmarks/keras_scanner.py", f"--path={args.image_dir}", f"--limit={args.images}",
                           f"--weights={args.weights}", f"--output={tmp}/keras.csv"], {}, tmp / "keras.csv"),
    }
    if not args.skip_plain:
        contenders["predict_main_plain"] = (predict + [f"--output={tmp}/plain.csv", "--engine=xla"], {},
                                            tmp / "plain.csv")
    shipped = {}  # checkpoint contenders, compared with their own plain-Flax run
    if args.shipped_models:
        for model in ("mesoinception4", "meso4"):
            cmd = [arg for arg in predict if not arg.startswith("--keras_weights")] + [
                f"--checkpoint={REPO_ROOT / 'checkpoints' / model}"]
            for suffix, engine_flags in (("", []), ("_xla", ["--engine=xla"])):
                name = f"shipped_{model}{suffix}"
                contenders[name] = (cmd + [f"--output={tmp}/{name}.csv", *engine_flags], {}, tmp / f"{name}.csv")
                shipped[name] = f"shipped_{model}_xla"
    # Warm the persistent JAX compilation caches once (as any second scan of a user would find them).
    for name, (cmd, env, _) in contenders.items():
        if name != "keras_scanner":
            run([arg for arg in cmd if not arg.startswith(("--limit", "--output"))] + ["--limit=32"], env)
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (cmd, env, _) in contenders.items():
            walls[name].append(run(cmd, env))
            print(f"{name}: {walls[name][-1]:.1f} s", flush=True)
    scores = {name: read_scores(str(out)) for name, (_, _, out) in contenders.items()}
    reference = scores.get("predict_main_plain") or scores["keras_scanner"]
    parity = {name: max((abs(s[p] - scores[shipped.get(name)][p] if name in shipped else s[p] - reference[p])
                         for p in s if p in reference), default=float("nan"))
              for name, s in scores.items()}
    single = [py, "predict_main.py", f"--path={args.single_image}", "--face_detector=none",
              f"--keras_weights={args.weights}"]
    cold_cache = tmp / "cold_cache"
    shipped_model = single[:2] + [f"--path={args.single_image}", "--face_detector=none"]
    run(shipped_model)  # warms the caches for the shipped checkpoint
    one_image = {"cold_compile_cache_s": run(single, {"XDG_CACHE_HOME": str(cold_cache)}),
                 "warm_compile_cache_s": float(np.median([run(single) for _ in range(3)])),
                 "warm_shipped_model_s": float(np.median([run(shipped_model) for _ in range(3)]))}
    result = {"machine": info, "images": args.images,
              "wall_s": {k: min(v) for k, v in walls.items()},  # best of the rounds
              "wall_s_every_round": walls,
              "images_per_s_incl_startup": {k: args.images / min(v) for k, v in walls.items()},
              "scored": {k: len(v) for k, v in scores.items()},
              "max_abs_score_diff_vs_reference": parity,
              "single_image_wall_s": one_image}
    result["ratio_fast_to_keras"] = result["wall_s"]["keras_scanner"] / result["wall_s"]["predict_main_fast"]
    info["load_average_at_end"] = list(os.getloadavg())
    out = common.write_json(args.output or common.default_output("scan_end_to_end"), result)
    for key in ("wall_s", "images_per_s_incl_startup", "scored", "max_abs_score_diff_vs_reference",
                "single_image_wall_s", "ratio_fast_to_keras"):
        print(f"{key}: {result[key]}")
    print(f"load average start {info['load_average_at_start']} end {info['load_average_at_end']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
