"""Trains a MesoNet detector on a folder of real/fake images or videos.

  python train_main.py --dataset=image --data_dir=DATA --workdir=runs/meso4

DATA holds real/ and fake/ folders (or train/ and val/ splits holding them). Checkpoints,
metrics.jsonl and TensorBoard events go to --workdir; running the same command again resumes.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from data_pipelines.faces import FACE_DETECTORS
from data_pipelines.preprocessing import RESIZE_INTERPOLATIONS, Preprocessing
from meso_jax import config as config_lib
from meso_jax.engine import ENGINES, ENVIRONMENT_VARIABLE as ENGINE_VARIABLE


FLAGS = flags.FLAGS
config_lib.define_flags(FLAGS)  # every TrainConfig setting, its default and help (meso_jax/config.py)
flags.DEFINE_string("workdir", None, "Where checkpoints and logs go; an existing run there is resumed.")
flags.DEFINE_string("export_checkpoint", None, "After training, export the best model to this new directory.")
flags.DEFINE_enum("resize", Preprocessing.resize, list(RESIZE_INTERPOLATIONS),
                  "Resize rule to 256x256 (nearest = Keras).")
flags.DEFINE_enum("face_detector", Preprocessing.face_detector, list(FACE_DETECTORS),
                  "Face detector for videos and uncropped images (none: whole frames or pre-cropped faces).")
flags.DEFINE_integer("frames_per_video", Preprocessing.frames_per_video, "Frames sampled evenly from each video.")
flags.DEFINE_enum("engine", os.environ.get(ENGINE_VARIABLE, "auto"), list(ENGINES),
                  "Implementation of the models: xla (the plain Flax modules), native (the CPU's fused blocks, "
                  "native kernels and oneDNN convolutions; an error where they cannot run), auto (native where "
                  f"it runs). Default from ${ENGINE_VARIABLE} when set.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: address of process 0 (host:port).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}", exitcode=2)
    exporting_only = FLAGS.epochs == 0 and FLAGS.export_checkpoint
    if not exporting_only and not (FLAGS.data_dir and FLAGS.workdir):
        raise app.UsageError("--data_dir and --workdir are required to train", exitcode=2)

    # A normal run prints progress and results: library INFO lines (orbax's saves) and TensorFlow's start-up
    # notices only with an explicit --verbosity. TensorFlow runs tf.data here, none of the model's math, so
    # its oneDNN kernels (whose notice ignores TF_CPP_MIN_LOG_LEVEL) are off unless the environment says.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

    from meso_jax import host_memory
    host_memory.reuse_freed_memory()  # before the first large allocation
    # After flag parsing, so --help stays fast.
    from meso_jax import checkpoints, engine, experiment, run_control, scoring, train
    from meso_jax.keras_import import KerasWeightsError
    from data_pipelines.preprocessing import MediaError

    scoring.enable_compilation_cache()  # a resumed or repeated run skips the XLA compile

    experiment.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        engine.select(FLAGS.engine)
    except engine.EngineUnavailable as error:
        print(f"train_main: error: {error}", file=sys.stderr, flush=True)
        return 2
    try:
        preprocessing = Preprocessing(resize=FLAGS.resize, face_detector=FLAGS.face_detector,
                                      frames_per_video=FLAGS.frames_per_video)
        config = config_lib.from_flags(FLAGS, preprocessing.to_dict())
        experiment.train_and_evaluate(config, FLAGS.workdir, export_dir=FLAGS.export_checkpoint)
    except run_control.TrainingInterrupted as error:
        print(f"train_main: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except (train.TrainingError, checkpoints.CheckpointError, KerasWeightsError, MediaError, ValueError,
            OSError) as error:
        # One line, no traceback. The epoch's input iterator is already released (training_loop.fit), so the
        # interpreter exits at once.
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"train_main: error: {message}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # outside the training loop (data scan, export): no checkpoint was being written
        print("train_main: interrupted; no checkpoint was being written; run the same command again to resume",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    app.run(main)
