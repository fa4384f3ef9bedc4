"""Where Meso-4's CPU inference time goes: each conv block alone, in every formulation we have.

    python3 benchmarks/layer_breakdown.py [--batch=32] [--rounds=3] [--output=FILE.json]

For each of the four "conv (SAME) + bias -> ReLU -> BatchNorm -> max-pool" blocks at its Meso-4
shape, times (interleaved, one process) the pool-phase formulation of fast_inference, XLA's
convolution + reduce_window, the same with oneDNN's convolution (meso_jax.cpu.onednn, when it builds
here), and the block in TensorFlow (oneDNN on unless TF_ENABLE_ONEDNN_OPTS=0 is set), and reports
ms per batch and GFLOP/s of the convolution.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As in model_throughput.py: compare against TensorFlow's fastest CPU path.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.model_throughput import MESO4_CONVS  # noqa: E402
from meso_jax.cpu.fast_inference import MESO4_POOLS  # noqa: E402


def block_contenders(size: int, kernel_size: int, in_channels: int, out_channels: int, pool: int,
                     batch: int) -> dict:
    """name -> blocking callable computing one block on a fixed random batch."""
    import jax
    import tensorflow as tf

    from meso_jax import engine
    from meso_jax.cpu import fast_inference, onednn

    rng = np.random.default_rng(size)
    images = rng.random((batch, size, size, in_channels), dtype=np.float32)
    kernel = (rng.standard_normal((kernel_size, kernel_size, in_channels, out_channels)) * 0.1).astype(np.float32)
    bias, scale, shift = (rng.standard_normal(out_channels).astype(np.float32) for _ in range(3))
    images_jax = jax.device_put(images)
    phased = jax.jit(lambda x: fast_inference._phased_block(x, kernel, bias, scale, shift, pool))

    def conv_block(use_onednn: bool):
        # Compiled now, from a fresh function (JAX reuses traces).
        with engine.selecting("native" if use_onednn else "xla"):
            return jax.jit(lambda x: fast_inference._conv_block(x, kernel, bias, scale, shift, pool)).lower(
                images_jax).compile()

    xla_conv = conv_block(False)
    images_tf = tf.constant(images)

    @tf.function
    def tf_block(x):
        z = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME") + bias) * scale + shift
        return tf.nn.max_pool2d(z, pool, pool, "VALID")

    contenders = {"jax_phased": lambda: phased(images_jax).block_until_ready(),
                  "jax_xla_conv": lambda: xla_conv(images_jax).block_until_ready(),
                  "tf": lambda: tf_block(images_tf).numpy()}
    checks = {"jax_phased": np.asarray(phased(images_jax)), "tf": tf_block(images_tf).numpy()}
    if onednn.available():
        onednn_conv = conv_block(True)
        contenders["jax_onednn_conv"] = lambda: onednn_conv(images_jax).block_until_ready()
        checks["jax_onednn_conv"] = np.asarray(onednn_conv(images_jax))
    reference = np.asarray(xla_conv(images_jax))
    for name, check in checks.items():
        if not np.allclose(check, reference, atol=1e-3):
            raise AssertionError(f"{name} disagrees with XLA's convolution on block {size}x{size}")
    return contenders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    info = common.machine_info()
    info["busy_processes_at_start"] = common.other_busy_processes()
    info["tf_onednn"] = os.environ["TF_ENABLE_ONEDNN_OPTS"]
    rows = []
    print(f"| block | contender | ms/batch {args.batch} (median) | conv GFLOP/s |")
    print("|---|---|---|---|")
    for (size, kernel_size, in_channels, out_channels), pool in zip(MESO4_CONVS, MESO4_POOLS):
        contenders = block_contenders(size, kernel_size, in_channels, out_channels, pool, args.batch)
        timed = common.interleaved(contenders, args.rounds, args.seconds)
        flop = 2 * size * size * kernel_size * kernel_size * in_channels * out_channels * args.batch
        label = f"{size}², {in_channels}→{out_channels}, {kernel_size}×{kernel_size}, pool {pool}"
        for name, t in timed.items():
            rows.append({"block": label, "contender": name, "median_ms": t["median_s"] * 1e3,
                         "gflops": flop / t["median_s"] / 1e9})
            print(f"| {label} | {name} | {t['median_s'] * 1e3:.1f} | {flop / t['median_s'] / 1e9:.0f} |", flush=True)
    info["load_average_at_end"] = list(os.getloadavg())
    output = common.write_json(args.output or common.default_output("layer_breakdown"),
                               {"machine": info, "batch": args.batch, "rows": rows,
                                "total_s": time.perf_counter() - started})
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
