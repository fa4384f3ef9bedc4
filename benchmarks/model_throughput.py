"""Meso-4 throughput on this machine: plain Flax vs the fast inference path vs Keras/TensorFlow vs
PyTorch (when installed: channels-last, its own CPU kernels), inference at several batch sizes and
one training step. Our contenders run with XLA's convolutions and, suffixed "_onednn", with
meso_jax.cpu.onednn's (the default on CPU where that backend builds). The process uses
meso_jax.host_memory's malloc settings, as the entry scripts do (--malloc_defaults: glibc's).

    python3 benchmarks/model_throughput.py [--output=FILE.json] [--rounds=3] [--seconds=1.5]

All contenders run in ONE process and are timed interleaved (A B C A B C ...), so background load
affects them alike; the load average and the busiest other processes are recorded. Also measures
the float32 matmul rate (numpy and JAX) as the machine's ceiling and reports each throughput as a
fraction of it (Meso-4 forward = 120.1 MFLOP per 256x256 image, training step ~3x that).
Scores are checked against the plain Flax module (the float32 reference).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by default only on Intel CPUs with AVX-512 VNNI/BF16/AMX;
# elsewhere (e.g. AMD Zen) it runs 3x slower without them. Compare against its fastest CPU path
# unless told otherwise (TF_ENABLE_ONEDNN_OPTS=0 for what a plain install does on such CPUs).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from meso_jax import host_memory  # noqa: E402

IMAGE = 256
# 2 * H * W * k * k * Cin * Cout for the four convolutions, plus the two dense layers.
MESO4_CONVS = ((256, 3, 3, 8), (128, 5, 8, 8), (64, 5, 8, 16), (32, 5, 16, 16))
MESO4_FORWARD_FLOP = sum(2 * s * s * k * k * ci * co for s, k, ci, co in MESO4_CONVS) + 2 * (1024 * 16 + 16)
TRAIN_FLOP_FACTOR = 3  # forward + backward (input and weight gradients)


def matmul_peak(seconds: float) -> dict:
    """float32 GFLOP/s of a large square matmul with numpy (BLAS) and with JAX (XLA:CPU)."""
    import jax
    import jax.numpy as jnp
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a_j, b_j = jnp.asarray(a), jnp.asarray(b)
    jax_matmul = jax.jit(jnp.matmul)
    jax_matmul(a_j, b_j).block_until_ready()
    np.matmul(a, b)
    timed = common.interleaved({"numpy": lambda: np.matmul(a, b),
                                "jax": lambda: jax_matmul(a_j, b_j).block_until_ready()}, rounds=2,
                               min_seconds=seconds)
    return {name: 2 * n ** 3 / t["min_s"] / 1e9 for name, t in timed.items()}


def flax_contenders(variables: dict, batches: list[int], train_batch: int):
    """Plain Flax and fast-path inference functions, and Flax train steps (Adam, BCE, BN train), each
    compiled with XLA's convolutions and, where meso_jax.cpu.onednn is available, with oneDNN's."""
    import jax
    import optax
    from meso_jax import engine, models
    from meso_jax.cpu import fast_inference, onednn

    backends = {"": False, **({"_onednn": True} if onednn.available() else {})}

    def compiled(fn, use_onednn: bool, *args):
        # A fresh function: JAX would reuse an earlier trace of ``fn``.
        with engine.selecting("native" if use_onednn else "xla"):
            return jax.jit(lambda *a: fn(*a)).lower(*args).compile()

    module = models.get_model("meso4").module
    device = jax.devices()[0]
    v_dev = jax.device_put(variables, device)
    devices = jax.devices()
    if len(devices) > 1:  # --host_devices: the batch split over several XLA:CPU devices (one thread each)
        mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        v_rep = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    infer = {}
    for batch in batches:
        x_host = np.random.default_rng(batch).random((batch, IMAGE, IMAGE, 3), dtype=np.float32)
        x = jax.device_put(x_host, device)
        infer[batch] = {}
        for suffix, use_onednn in backends.items():
            plain = compiled(lambda v, x: module.apply(v, x, train=False), use_onednn, v_dev, x)
            fast = compiled(fast_inference.meso4_forward, use_onednn, v_dev, x)
            infer[batch][f"flax_plain{suffix}"] = (lambda f=plain, x=x: f(v_dev, x).block_until_ready(),
                                                   lambda f=plain, x=x: np.asarray(f(v_dev, x)))
            infer[batch][f"jax_fast{suffix}"] = (lambda f=fast, x=x: f(v_dev, x).block_until_ready(),
                                                 lambda f=fast, x=x: np.asarray(f(v_dev, x)))
            if len(devices) > 1 and batch % len(devices) == 0:
                xs = jax.device_put(x_host, batch_sharding)
                sharded = compiled(fast_inference.meso4_forward, use_onednn, v_rep, xs)
                infer[batch][f"jax_fast_{len(devices)}dev{suffix}"] = (
                    lambda f=sharded, xs=xs: f(v_rep, xs).block_until_ready(),
                    lambda f=sharded, xs=xs: np.asarray(f(v_rep, xs)))
    optimizer = optax.adam(1e-3)
    rng = np.random.default_rng(7)
    images = jax.device_put(rng.random((train_batch, IMAGE, IMAGE, 3), dtype=np.float32), device)
    labels = jax.device_put(rng.integers(0, 2, train_batch).astype(np.float32), device)

    def make_train(train_module, use_onednn: bool):
        """A compiled Adam/BCE step of ``train_module`` on a fixed batch, as a no-argument callable."""
        def train_step(params, batch_stats, opt_state, images, labels, key):
            def loss_fn(p):
                logits, updates = train_module.apply({"params": p, "batch_stats": batch_stats}, images,
                                                     train=True, mutable=["batch_stats"], rngs={"dropout": key})
                return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), updates["batch_stats"]
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_stats, opt_state, loss

        state = {"params": v_dev["params"], "batch_stats": v_dev["batch_stats"],
                 "opt": optimizer.init(v_dev["params"]), "key": jax.random.key(0)}
        step_fn = compiled(train_step, use_onednn, state["params"], state["batch_stats"], state["opt"], images,
                           labels, state["key"])

        def step():
            state["key"], key = jax.random.split(state["key"])
            state["params"], state["batch_stats"], state["opt"], loss = step_fn(
                state["params"], state["batch_stats"], state["opt"], images, labels, key)
            loss.block_until_ready()
        return step

    # flax_plain: the Flax module as is (--engine=xla: XLA's convolutions); "_onednn": the native engine, where
    # flax_plain_onednn has oneDNN's convolutions, jax_fused_onednn its first block trained with
    # meso_jax.cpu.fast_training too and jax_fused_all_onednn all four blocks (the default on CPU where the
    # native library builds). The fused blocks exist only in the native engine (engine.fused_training_block).
    train = {}
    for suffix, use_onednn in backends.items():
        train[f"flax_plain{suffix}"] = make_train(module, use_onednn)
        if use_onednn:
            train[f"jax_fused{suffix}"] = make_train(module.clone(fused_first_block=True), use_onednn)
            train[f"jax_fused_all{suffix}"] = make_train(
                module.clone(fused_first_block=True, fused_later_blocks=True), use_onednn)
    return infer, train


def keras_model(variables: dict):
    """The same Meso-4 in Keras (logits output), with the Flax variables copied in."""
    import keras
    from keras import layers
    inputs = keras.Input((IMAGE, IMAGE, 3))
    x = inputs
    for features, kernel, pool in ((8, 3, 2), (8, 5, 2), (16, 5, 2), (16, 5, 4)):
        x = layers.Conv2D(features, kernel, padding="same", activation="relu")(x)
        x = layers.BatchNormalization(epsilon=1e-3, momentum=0.99)(x)
        x = layers.MaxPooling2D(pool, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.LeakyReLU(negative_slope=0.1)(layers.Dense(16)(x))
    x = layers.Dropout(0.5)(x)
    model = keras.Model(inputs, layers.Dense(1)(x))
    params, stats = variables["params"], variables["batch_stats"]
    convs = [l for l in model.layers if isinstance(l, layers.Conv2D)]
    bns = [l for l in model.layers if isinstance(l, layers.BatchNormalization)]
    denses = [l for l in model.layers if isinstance(l, layers.Dense)]
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        block = params[f"ConvBlock_{i}"]
        conv.set_weights([np.asarray(block["Conv_0"]["kernel"]), np.asarray(block["Conv_0"]["bias"])])
        bstats = stats[f"ConvBlock_{i}"]["BatchNorm_0"]
        bn.set_weights([np.asarray(block["BatchNorm_0"]["scale"]), np.asarray(block["BatchNorm_0"]["bias"]),
                        np.asarray(bstats["mean"]), np.asarray(bstats["var"])])
    for i, dense in enumerate(denses):
        head = params["ClassifierHead_0"][f"Dense_{i}"]
        dense.set_weights([np.asarray(head["kernel"]), np.asarray(head["bias"])])
    return model


def keras_contenders(variables: dict, batches: list[int], train_batch: int):
    import keras
    import tensorflow as tf
    model = keras_model(variables)
    predict = tf.function(lambda x: model(x, training=False))
    infer = {}
    for batch in batches:
        x = tf.constant(np.random.default_rng(batch).random((batch, IMAGE, IMAGE, 3), dtype=np.float32))
        infer[batch] = {"keras_tf": (lambda x=x: predict(x).numpy(), lambda x=x: predict(x).numpy()[:, 0])}
    train_model = keras_model(variables)
    train_model.compile(optimizer=keras.optimizers.Adam(1e-3),
                        loss=keras.losses.BinaryCrossentropy(from_logits=True))
    rng = np.random.default_rng(7)
    images = rng.random((train_batch, IMAGE, IMAGE, 3), dtype=np.float32)
    labels = rng.integers(0, 2, (train_batch, 1)).astype(np.float32)
    return infer, lambda: train_model.train_on_batch(images, labels)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        return True
    except ImportError:
        return False


def torch_model(variables: dict):
    """The same Meso-4 in PyTorch (logits output, NHWC input), with the Flax variables copied in."""
    import torch
    from torch import nn

    from meso_jax.cpu import fast_inference

    class Meso4(nn.Module):
        def __init__(self):
            super().__init__()
            layers = []
            for (_, kernel, in_channels, out_channels), pool in zip(MESO4_CONVS, fast_inference.MESO4_POOLS):
                layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.ReLU(),
                           nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01), nn.MaxPool2d(pool)]
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(1024, 16), nn.LeakyReLU(0.1), nn.Dropout(0.5),
                                      nn.Linear(16, 1))

        def forward(self, images_bhwc):
            # NHWC memory seen as NCHW: PyTorch's channels-last convolutions, no copy.
            features = self.features(images_bhwc.permute(0, 3, 1, 2))
            return self.head(features.permute(0, 2, 3, 1).flatten(1))[:, 0]  # Keras' (H, W, C) flatten order

    model = Meso4()
    params, stats = variables["params"], variables["batch_stats"]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for i, (conv, norm) in enumerate(zip(convs, norms)):
            block, block_stats = params[f"ConvBlock_{i}"], stats[f"ConvBlock_{i}"]["BatchNorm_0"]
            conv.weight.copy_(torch.from_numpy(np.transpose(np.asarray(block["Conv_0"]["kernel"]), (3, 2, 0, 1))))
            conv.bias.copy_(torch.from_numpy(np.asarray(block["Conv_0"]["bias"])))
            norm.weight.copy_(torch.from_numpy(np.asarray(block["BatchNorm_0"]["scale"])))
            norm.bias.copy_(torch.from_numpy(np.asarray(block["BatchNorm_0"]["bias"])))
            norm.running_mean.copy_(torch.from_numpy(np.asarray(block_stats["mean"])))
            norm.running_var.copy_(torch.from_numpy(np.asarray(block_stats["var"])))
        for i, dense in enumerate(m for m in model.head if isinstance(m, nn.Linear)):
            head = params["ClassifierHead_0"][f"Dense_{i}"]
            dense.weight.copy_(torch.from_numpy(np.asarray(head["kernel"]).T.copy()))
            dense.bias.copy_(torch.from_numpy(np.asarray(head["bias"])))
    return model.to(memory_format=torch.channels_last)


def torch_contenders(variables: dict, batches: list[int], train_batch: int):
    """PyTorch CPU inference functions per batch and an Adam/BCE train step, or ({}, None) without torch."""
    if not torch_available():
        return {batch: {} for batch in batches}, None
    import torch
    model = torch_model(variables).eval()

    def predict(x):
        with torch.inference_mode():
            return model(x).numpy()
    infer = {}
    for batch in batches:
        x = torch.from_numpy(np.random.default_rng(batch).random((batch, IMAGE, IMAGE, 3), dtype=np.float32))
        infer[batch] = {"torch_cpu": (lambda x=x: predict(x), lambda x=x: predict(x))}
    train_model = torch_model(variables).train()
    optimizer = torch.optim.Adam(train_model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(7)
    images = torch.from_numpy(rng.random((train_batch, IMAGE, IMAGE, 3), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 2, train_batch).astype(np.float32))

    def step():
        optimizer.zero_grad()
        loss_fn(train_model(images), labels).backward()
        optimizer.step()
    return infer, step


def load_variables(weights: str | None) -> tuple[dict, str]:
    import jax
    from meso_jax import models
    if weights and os.path.isfile(weights):
        from meso_jax.keras_import import load_keras_weights
        _, variables = load_keras_weights(weights)
        return variables, os.path.basename(weights)
    shapes = jax.eval_shape(lambda: models.init_variables(models.get_model("meso4"), 0))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    variables["batch_stats"] = jax.tree_util.tree_map(np.abs, variables["batch_stats"])  # var >= 0
    return variables, "random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="JSON result file (default benchmarks/results/...)")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--train_batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per contender per round")
    parser.add_argument("--weights", default=str(REPO_ROOT.parent / "shared" / "mesonet" / "Meso4_DF.h5"),
                        help="Meso-4 Keras .h5 weights (random variables when missing)")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--malloc_defaults", action="store_true",
                        help="keep glibc's malloc defaults instead of meso_jax.host_memory's settings, which the "
                             "entry scripts apply (they apply to the whole process, Keras included)")
    parser.add_argument("--host_devices", type=int, default=1,
                        help="split XLA:CPU into N devices and add a fast-path contender sharding the batch")
    args = parser.parse_args()
    if args.host_devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.host_devices}")
    batches = [int(b) for b in args.batches.split(",")]
    started = time.perf_counter()
    reuses_freed_memory = not args.malloc_defaults and host_memory.reuse_freed_memory()
    info = common.machine_info()
    info["reuse_freed_memory"] = reuses_freed_memory
    info["busy_processes_at_start"] = common.other_busy_processes()

    import jax
    import keras
    import tensorflow as tf
    import flax
    info["versions"] = {"jax": jax.__version__, "flax": flax.__version__, "tensorflow": tf.__version__,
                        "keras": keras.__version__, "numpy": np.__version__,
                        "torch": "not installed" if not torch_available() else __import__("torch").__version__,
                        "onednn": common.package_version("onednn-cpu-gomp")}
    info["tf_onednn"] = os.environ["TF_ENABLE_ONEDNN_OPTS"]
    info["tf_threads"] = {"intra": tf.config.threading.get_intra_op_parallelism_threads(),
                          "inter": tf.config.threading.get_inter_op_parallelism_threads()}
    variables, source = load_variables(args.weights)
    info["weights"] = source

    peak = matmul_peak(args.seconds)
    peak_gflops = max(peak.values())
    print("float32 matmul 2048^3: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items()), flush=True)

    compile_start = time.perf_counter()
    flax_infer, flax_train = flax_contenders(variables, batches, args.train_batch)
    keras_infer, keras_train = keras_contenders(variables, batches, args.train_batch)
    torch_infer, torch_train = torch_contenders(variables, batches, args.train_batch)
    other_train = {"keras_tf": keras_train, **({"torch_cpu": torch_train} if torch_train else {})}
    contenders = {b: {**flax_infer[b], **keras_infer[b], **torch_infer[b]} for b in batches}
    outputs = {}
    for batch, by_name in contenders.items():  # warm-up (compiles) and parity check
        outputs[batch] = {name: np.asarray(score_fn(), np.float64).reshape(batch) for name, (_, score_fn) in
                          by_name.items()}
    if not args.skip_training:
        for step in (*flax_train.values(), *other_train.values()):
            step()
    compile_s = time.perf_counter() - compile_start

    def sig(z):
        return 1 / (1 + np.exp(-z))

    parity = {}
    for batch, by_name in outputs.items():
        ref = by_name["flax_plain"]
        parity[batch] = {name: {"max_abs_logit_diff": float(np.max(np.abs(out - ref))),
                                "max_abs_prob_diff": float(np.max(np.abs(sig(out) - sig(ref))))}
                         for name, out in by_name.items() if name != "flax_plain"}

    results = {"inference": {}, "training": {}}
    for batch in batches:
        timed = common.interleaved({name: fns[0] for name, fns in contenders[batch].items()}, args.rounds,
                                   args.seconds)
        results["inference"][batch] = timed
        print(f"inference batch {batch}: " + ", ".join(
            f"{name} {batch / t['median_s']:.0f} img/s" for name, t in timed.items()), flush=True)
    if not args.skip_training:
        timed = common.interleaved({**flax_train, **other_train}, args.rounds, args.seconds)
        results["training"][args.train_batch] = timed
        print(f"training batch {args.train_batch}: " + ", ".join(
            f"{name} {args.train_batch / t['median_s']:.0f} img/s" for name, t in timed.items()), flush=True)

    table = ["| mode | batch | contender | img/s (median) | img/s (best) | ms/batch (median) | x Keras | % of matmul peak |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, by_batch in results.items():
        flop = MESO4_FORWARD_FLOP * (TRAIN_FLOP_FACTOR if mode == "training" else 1)
        for batch, timed in by_batch.items():
            keras_rate = batch / timed["keras_tf"]["median_s"]
            for name, t in timed.items():
                rate = batch / t["median_s"]
                t.update(images_per_s=rate, best_images_per_s=batch / t["min_s"], ratio_to_keras=rate / keras_rate,
                         fraction_of_peak=rate * flop / (peak_gflops * 1e9))
                table.append(f"| {mode} | {batch} | {name} | {rate:.0f} | {batch / t['min_s']:.0f} | "
                             f"{t['median_s'] * 1e3:.1f} | {rate / keras_rate:.2f} | "
                             f"{100 * t['fraction_of_peak']:.1f}% |")
    info["load_average_at_end"] = list(os.getloadavg())
    info["busy_processes_at_end"] = common.other_busy_processes()
    payload = {"machine": info, "matmul_gflops": peak, "meso4_forward_flop": MESO4_FORWARD_FLOP,
               "parity_vs_flax_plain": parity, "results": results, "compile_and_warmup_s": compile_s,
               "total_s": time.perf_counter() - started,
               "notes": "torch not installed: skipped" if not torch_available() else ""}
    out = common.write_json(args.output or common.default_output("model_throughput"), payload)
    print("\n".join(table))
    print(f"parity vs flax_plain: {parity}")
    print(f"load average start {info['load_average_at_start']} end {info['load_average_at_end']}; "
          f"busy: {info['busy_processes_at_start']}")
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
