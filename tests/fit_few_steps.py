"""Subprocess helper for test_distributed.py: a few training steps on fixed data, then scoring with the
trained model (fast and plain inference paths); params and scores saved as .npz.

Run as ``python tests/fit_few_steps.py WORKDIR OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]`` with
XLA_FLAGS choosing the device count per process. With several processes (multi-host JAX on one
machine) each feeds its own part of every batch, as hosts do, and process 0 writes OUT.npz.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from meso_jax import checkpoints, experiment, scoring, train, training_loop

BATCH = 8
STEPS = 3
VAL_IMAGES = 11  # not a multiple of the batch: the last validation batch is partial


def main(workdir: str, output_path: str, coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> None:
    experiment.initialize_distributed(coordinator, num_processes, process_id)
    processes, index = jax.process_count(), jax.process_index()
    local = BATCH // processes
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH * STEPS, 256, 256, 3), dtype=np.uint8)
    labels = (rng.uniform(size=BATCH * STEPS) > 0.5).astype(np.float32)

    def epoch_batches(epoch: int, skip_steps: int):
        for step in range(skip_steps, STEPS):
            part = slice(step * BATCH + index * local, step * BATCH + (index + 1) * local)  # this process's rows
            yield {"image": images[part], "label": labels[part], "weight": np.ones(local, np.float32)}

    def val_batches():  # this process's share of the validation images, in local batches
        mine = np.arange(VAL_IMAGES)[index::processes]
        for start in range(0, len(mine), local):
            rows = mine[start:start + local]
            yield {"image": images[rows], "label": labels[rows]}

    # The rows of a training batch each device holds, as the train step receives them (all 8 would mean the
    # batch is replicated, not split).
    rows_per_device: list[int] = []
    shard_batch = train.DataParallel.shard_batch

    def recording_shard_batch(self, local_batch: dict) -> dict:
        sharded = shard_batch(self, local_batch)
        rows_per_device.extend(shard.data.shape[0] for shard in sharded["image"].addressable_shards)
        return sharded

    train.DataParallel.shard_batch = recording_shard_batch
    config = train.TrainConfig(epochs=1, batch_size=BATCH, schedule="constant", progress_bar=False,
                               checkpoint_every_steps=2)
    result = training_loop.fit(config, workdir, STEPS, {"preprocessing": {}}, epoch_batches, val_batches)
    train.DataParallel.shard_batch = shard_batch
    restored = checkpoints.load_model(workdir)
    leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(restored.variables)}
    scores = {}
    for name, fast_path in (("fast", True), ("plain", False)):
        scorer = scoring.Scorer(restored, batch_size=BATCH, fast_path=fast_path)
        scores[f"scores_{name}"] = scorer.score(images)
        scores[f"scorer_devices_{name}"] = scorer.device_count
    if index == 0:
        np.savez(output_path, device_count=jax.device_count(), max_rows_per_device=max(rows_per_device),
                 val_loss=result["val_loss"],
                 val_auc=result["val_auc"], **scores, **leaves)


if __name__ == "__main__":
    extra = sys.argv[3:]
    main(sys.argv[1], sys.argv[2], *(extra[:1] + [int(v) for v in extra[1:]]))
