"""Subprocess helper for test_distributed.py: a few training steps on fixed data, then scoring with the
trained model (fast and plain inference paths); params and scores saved as .npz.

Run as ``python tests/fit_few_steps.py WORKDIR OUT.npz`` with XLA_FLAGS choosing the device count.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from meso_jax import checkpoints, scoring, train

BATCH = 8
STEPS = 3


def main(workdir: str, output_path: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (BATCH * STEPS, 256, 256, 3)).astype(np.float32)
    labels = (rng.uniform(size=BATCH * STEPS) > 0.5).astype(np.float32)

    def epoch_batches(epoch: int, skip_steps: int):
        for step in range(skip_steps, STEPS):
            part = slice(step * BATCH, (step + 1) * BATCH)
            yield {"image": images[part], "label": labels[part], "weight": np.ones(BATCH, np.float32)}

    def val_batches():
        yield {"image": images[:BATCH], "label": labels[:BATCH]}

    config = train.TrainConfig(epochs=1, batch_size=BATCH, schedule="constant", progress_bar=False,
                               checkpoint_every_steps=2)
    result = train.fit(config, workdir, STEPS, {"preprocessing": {}}, epoch_batches, val_batches)
    restored = checkpoints.load_model(workdir)
    leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(restored.variables)}
    scores = {}
    for name, fast_path in (("fast", True), ("plain", False)):
        scorer = scoring.Scorer(restored, batch_size=BATCH, fast_path=fast_path)
        scores[f"scores_{name}"] = scorer.score(images)
        scores[f"scorer_devices_{name}"] = scorer.device_count
    np.savez(output_path, device_count=jax.device_count(), val_loss=result["val_loss"], **scores, **leaves)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
