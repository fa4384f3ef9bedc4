"""A minimal Keras/TensorFlow scanner doing predict_main's work on face crops, for comparison.

    python3 benchmarks/keras_scanner.py --path=DIR --limit=2048 --weights=Meso4_DF.h5 --output=scores.csv

Same file list (meso_jax.scan.select_media), same decoder and preprocessing
(data_pipelines.samples.extract_face_crops with --face_detector=none), same thread count and batch
size as predict_main, uint8 crops scaled to [0, 1] inside the compiled model as predict_main does;
only the model runs in Keras (Meso-4 built in Keras, weights from the .h5).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by default only on Intel CPUs with AVX-512 VNNI/BF16/AMX;
# elsewhere (e.g. AMD Zen) it runs 3x slower without them. Compare against its fastest CPU path
# unless told otherwise (TF_ENABLE_ONEDNN_OPTS=0 for what a plain install does on such CPUs).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from benchmarks.model_throughput import keras_model
    from data_pipelines.preprocessing import MediaError, Preprocessing
    from data_pipelines.samples import extract_face_crops
    from meso_jax.keras_import import load_keras_weights
    from meso_jax.scan import select_media

    _, variables = load_keras_weights(args.weights)
    model = keras_model(variables)
    predict = tf.function(lambda x: tf.sigmoid(model(tf.cast(x, tf.float32) / 255.0, training=False)[:, 0]))
    prep = Preprocessing(face_detector="none")
    paths = list(select_media(args.path, image_limit=args.limit, video_limit=0))

    def load(path):
        try:
            return path, extract_face_crops(path, prep).crops_bhwc[0]
        except MediaError as error:
            return path, str(error)

    with open(args.output, "w", encoding="utf-8") as out, \
            concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        out.write("path,score\n")
        pending: list[tuple[str, np.ndarray]] = []
        padded = np.zeros((args.batch_size, 256, 256, 3), np.uint8)

        def flush():
            padded[:len(pending)] = np.stack([x for _, x in pending])
            scores = predict(tf.constant(padded)).numpy()
            for (path, _), score in zip(pending, scores):
                out.write(f"{path},{score:.6f}\n")
            out.flush()
            pending.clear()

        for path, item in pool.map(load, paths):
            if isinstance(item, str):
                out.write(f"{path},error\n")
                continue
            pending.append((path, item))
            if len(pending) == args.batch_size:
                flush()
        if pending:
            flush()


if __name__ == "__main__":
    main()
