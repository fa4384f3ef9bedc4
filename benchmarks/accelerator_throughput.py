"""Training and inference throughput of the real train/eval steps on JAX's default device (a GPU or TPU
when there is one, else the CPU), for every image model, and whether the in-memory input pipeline
keeps up with them.

    python3 benchmarks/accelerator_throughput.py [--batches=32,128,512] [--seconds=2] \
        [--data_dir=FOLDER] [--output=FILE.json]

Training runs meso_jax.train.train_step (Adam, BCE, BatchNorm in train mode) exactly as train_main
jits it, fed a new host batch every step (so the host-to-device copy is counted, as in training);
inference runs eval_step. With --data_dir (pre-cropped faces), it also decodes that folder with
data_pipelines.in_memory and times how fast the host assembles flip-augmented training batches, to
compare with the training rate. Needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from meso_jax import models, train  # noqa: E402

IMAGE_MODELS = ("meso4", "mesoinception4")


def step_rates(model_name: str, batch_size: int, seconds: float) -> dict:
    """img/s of one training step and of one inference step at ``batch_size`` (compile time apart)."""
    spec = models.get_model(model_name)
    config = train.TrainConfig(model=model_name, batch_size=batch_size)
    state = train.create_train_state(spec, config, total_steps=1_000_000)
    rng = np.random.default_rng(0)
    host_batches = [{"image": rng.integers(0, 256, (batch_size, *spec.input_shape), dtype=np.uint8),
                     "label": (rng.random(batch_size) < 0.5).astype(np.float32),
                     "weight": np.ones(batch_size, np.float32)} for _ in range(2)]
    train_fn = jax.jit(lambda s, b: train.train_step(s, b), donate_argnums=0)
    eval_fn = jax.jit(lambda s, b: train.eval_step(s, b))

    started = time.perf_counter()
    state, metrics = train_fn(state, host_batches[0])
    jax.block_until_ready(metrics)
    train_compile_s = time.perf_counter() - started
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or steps < 3:
        state, metrics = train_fn(state, host_batches[steps % 2])
        steps += 1
    jax.block_until_ready((state, metrics))
    train_s = (time.perf_counter() - started) / steps

    jax.block_until_ready(eval_fn(state, host_batches[0]))
    on_device = jax.device_put(host_batches[0])
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or calls < 3:
        output = eval_fn(state, on_device)
        calls += 1
    jax.block_until_ready(output)
    eval_s = (time.perf_counter() - started) / calls
    return {"model": model_name, "batch": batch_size, "train_img_per_s": batch_size / train_s,
            "train_step_ms": 1e3 * train_s, "train_compile_s": train_compile_s,
            "inference_img_per_s": batch_size / eval_s, "inference_step_ms": 1e3 * eval_s}


def pipeline_rates(data_dir: str, batch_size: int, seconds: float) -> dict:
    """Decode rate of data_pipelines.in_memory over ``data_dir`` and its rate of flip-augmented batches."""
    from data_pipelines import in_memory
    from data_pipelines.preprocessing import Preprocessing

    started = time.perf_counter()
    data = in_memory.create_datasets(data_dir, "image", Preprocessing(face_detector="none"), batch_size, seed=0,
                                     augment="flip")
    decoded = data.train_count + data.val_count
    decode_s = time.perf_counter() - started
    count, started = 0, time.perf_counter()
    for _ in data.train_batches(epoch=0):
        count += 1
        if time.perf_counter() - started > seconds:
            break
    return {"images_decoded": decoded, "decode_img_per_s": decoded / decode_s, "batch": batch_size,
            "batch_img_per_s": count * batch_size / (time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="32,128,512")
    parser.add_argument("--models", default=",".join(IMAGE_MODELS))
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--data_dir", default=None, help="pre-cropped faces for the input pipeline rate")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batches.split(",")]
    device = jax.devices()[0]
    info = {**common.machine_info(), "device": f"{device.platform}: {device.device_kind}",
            "device_count": jax.device_count(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": []}
    print(f"# {info['date_utc']}  {info['device']} x{info['device_count']}  host {info['cpu_model']} "
          f"({info['cpu_count']} cores)  jax {jax.__version__}")
    print(f"{'model':<16}{'batch':>6}{'train img/s':>13}{'step ms':>9}{'compile s':>11}{'infer img/s':>13}")
    for model_name in args.models.split(","):
        for batch_size in batch_sizes:
            row = step_rates(model_name, batch_size, args.seconds)
            info["rows"].append(row)
            print(f"{model_name:<16}{batch_size:>6}{row['train_img_per_s']:>13.0f}{row['train_step_ms']:>9.2f}"
                  f"{row['train_compile_s']:>11.1f}{row['inference_img_per_s']:>13.0f}", flush=True)
    if args.data_dir:
        pipeline = pipeline_rates(args.data_dir, batch_sizes[0], args.seconds)
        info["in_memory_pipeline"] = pipeline
        print(f"in-memory pipeline: decoded {pipeline['images_decoded']} images at "
              f"{pipeline['decode_img_per_s']:.0f} img/s (once per run); flip-augmented batches of "
              f"{pipeline['batch']}: {pipeline['batch_img_per_s']:.0f} img/s")
    if args.output:
        print(f"wrote {common.write_json(args.output, info)}")


if __name__ == "__main__":
    main()
