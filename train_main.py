"""Trains a MesoNet detector on a folder of real/fake images or videos.

  python train_main.py --dataset=image --data_dir=DATA --workdir=runs/meso4

DATA holds real/ and fake/ folders (or train/ and val/ splits holding them). Checkpoints,
metrics.jsonl and TensorBoard events go to --workdir; running the same command again resumes.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from data_pipelines.augment import AUGMENTATIONS
from data_pipelines.faces import FACE_DETECTORS
from meso_jax.engine import ENGINES, ENVIRONMENT_VARIABLE as ENGINE_VARIABLE


flags.DEFINE_enum("dataset", "image", ["image", "video"], "Train on images or on faces sampled from videos.")
flags.DEFINE_string("data_dir", None, "Folder with real/ and fake/ (or train/ val/ splits holding them), or several "
                    "named sources with their share of every batch: name=folder[:weight],... (e.g. "
                    "dfdc=data/dfdc:0.5,ffpp=data/ffpp:0.5).")
flags.DEFINE_bool("paired_batches", False, "Balance every batch by class and put in it the originals of its "
                  "fakes (a fake and its source video, or a FaceForensics++ group), so real and fake differ "
                  "only where the face was changed.")
flags.DEFINE_enum("select_by", "worst", ["worst", "mean"], "With several sources, the best checkpoint is the one "
                  "with the best worst (or mean) per-source validation AUC.")
flags.DEFINE_string("workdir", None, "Where checkpoints and logs go; an existing run there is resumed.")
flags.DEFINE_enum("model", "meso4", ["meso4", "mesoinception4", "meso4_video"], "Network to train.")
flags.DEFINE_integer("epochs", 10, "Passes over the training split (0 with --export_checkpoint just exports).")
flags.DEFINE_integer("batch_size", 32, "Global batch size (split over all devices).")
flags.DEFINE_float("learning_rate", 1e-3, "Peak Adam learning rate.")
flags.DEFINE_enum("schedule", "constant", ["constant", "paper", "cosine"],
                  "constant (the shipped model's); paper: ÷10 every 1,000 steps down to 1e-6; "
                  "cosine: warm-up then cosine decay.")
flags.DEFINE_integer("warmup_steps", 500, "Warm-up steps for --schedule=cosine.")
flags.DEFINE_integer("decay_epochs", 0, "With --schedule=constant: over the last N epochs the rate falls to 0 "
                     "along a cosine (the epochs before are the plain constant schedule's).")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (AdamW) when > 0.")
flags.DEFINE_enum("loss", "bce", ["bce", "mse"], "bce: cross-entropy on logits; mse: the paper's squared error.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation, data order, augmentation and dropout.")
flags.DEFINE_enum("kernel_init", "flax", ["flax", "keras"],
                  "Initial kernels: flax (LeCun-normal, the shipped model's) or keras (Glorot-uniform, as Keras).")
flags.DEFINE_string("keras_weights", None, "Initialise from the authors' published .h5 weights.")
flags.DEFINE_string("init_checkpoint", None, "Initialise from an exported model or a workdir's best checkpoint "
                    "(fine-tuning; the optimizer starts afresh).")
flags.DEFINE_string("teacher", None, "Distillation: a model (e.g. checkpoints/ensemble) whose score of each "
                    "training image softens its target; needs --input_pipeline=memory.")
flags.DEFINE_float("teacher_weight", 0.5, "With --teacher: target = (1 - w) * label + w * teacher score, w in (0, 0.5].")
flags.DEFINE_float("ema_decay", 0.0, "When > 0 (e.g. 0.999): keep an exponential moving average of the weights "
                   "(Polyak averaging), validate, checkpoint and export it; the trained weights' validation is "
                   "logged as raw_val_*.")
flags.DEFINE_float("dropout", 0.5, "Dropout rate in the classifier head during training (the paper's 0.5).")
flags.DEFINE_float("val_fraction", 0.1, "Validation share, split by source video, when DATA has no val/ split.")
flags.DEFINE_enum("augment", "flip", list(AUGMENTATIONS),
                  "Training augmentation: none; flip (horizontal, the shipped model's); seed (rotation ±20°, "
                  "shifts 0.2, flip); full (seed + brightness/contrast + JPEG re-compression).")
flags.DEFINE_enum("input_pipeline", "tfdata", ["tfdata", "memory"],
                  "tfdata: decode the files every epoch; memory: pre-cropped images (--face_detector=none) "
                  "decoded once into RAM, same batches, no TensorFlow needed (for fast accelerators).")
flags.DEFINE_string("cache_dir", None, "Where extracted video faces are cached (default: <workdir>/face_cache).")
flags.DEFINE_enum("synthesize_fakes", None, ["sbi"], "Add self-blended fakes made from the real faces.")
flags.DEFINE_enum("resize", "nearest", ["nearest", "area", "bilinear"], "Resize rule to 256x256 (nearest = Keras).")
flags.DEFINE_enum("face_detector", "blazeface", list(FACE_DETECTORS),
                  "Face detector for videos and uncropped images (none: whole frames or pre-cropped faces).")
flags.DEFINE_integer("frames_per_video", 32, "Frames sampled evenly from each video.")
flags.DEFINE_integer("checkpoint_every_steps", 500, "Save a checkpoint every N steps (and at every epoch end).")
flags.DEFINE_integer("keep_checkpoints", 3, "How many of the latest checkpoints to keep (the best is kept too).")
flags.DEFINE_string("export_checkpoint", None, "After training, export the best model to this new directory.")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.DEFINE_enum("engine", os.environ.get(ENGINE_VARIABLE, "auto"), list(ENGINES),
                  "Implementation of the models: xla (the plain Flax modules), native (the CPU's fused blocks, "
                  "native kernels and oneDNN convolutions; an error where they cannot run), auto (native where "
                  f"it runs). Default from ${ENGINE_VARIABLE} when set.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: address of process 0 (host:port).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}", exitcode=2)
    exporting_only = FLAGS.epochs == 0 and FLAGS.export_checkpoint
    if not exporting_only and not (FLAGS.data_dir and FLAGS.workdir):
        raise app.UsageError("--data_dir and --workdir are required to train", exitcode=2)

    # A normal run prints progress and results: library INFO lines (orbax's saves) only with an explicit
    # --verbosity.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    from meso_jax import host_memory
    host_memory.reuse_freed_memory()  # before the first large allocation
    # After flag parsing, so --help stays fast.
    from meso_jax import checkpoints, engine, scoring, train
    from meso_jax.keras_import import KerasWeightsError
    from data_pipelines.preprocessing import MediaError, Preprocessing

    scoring.enable_compilation_cache()  # a resumed or repeated run skips the XLA compile

    train.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        engine.select(FLAGS.engine)
    except engine.EngineUnavailable as error:
        print(f"train_main: error: {error}", file=sys.stderr, flush=True)
        return 2
    try:
        preprocessing = Preprocessing(resize=FLAGS.resize, face_detector=FLAGS.face_detector,
                                      frames_per_video=FLAGS.frames_per_video)
        config = train.TrainConfig(
            model=FLAGS.model, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
            learning_rate=FLAGS.learning_rate, schedule=FLAGS.schedule, warmup_steps=FLAGS.warmup_steps,
            decay_epochs=FLAGS.decay_epochs,
            weight_decay=FLAGS.weight_decay, loss=FLAGS.loss, seed=FLAGS.seed, keras_weights=FLAGS.keras_weights,
            init_checkpoint=FLAGS.init_checkpoint, teacher=FLAGS.teacher, teacher_weight=FLAGS.teacher_weight,
            kernel_init=FLAGS.kernel_init, dropout_rate=FLAGS.dropout, ema_decay=FLAGS.ema_decay,
            checkpoint_every_steps=FLAGS.checkpoint_every_steps, keep_checkpoints=FLAGS.keep_checkpoints,
            progress_bar=FLAGS.progress, data_dir=FLAGS.data_dir or "", dataset=FLAGS.dataset,
            val_fraction=FLAGS.val_fraction, augment=FLAGS.augment, input_pipeline=FLAGS.input_pipeline,
            cache_dir=FLAGS.cache_dir, select_by=FLAGS.select_by,
            paired_batches=FLAGS.paired_batches,
            synthesize_fakes=FLAGS.synthesize_fakes, preprocessing=preprocessing.to_dict())
        train.train_and_evaluate(config, FLAGS.workdir, export_dir=FLAGS.export_checkpoint)
    except train.TrainingInterrupted as error:
        print(f"train_main: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except (train.TrainingError, checkpoints.CheckpointError, KerasWeightsError, MediaError, ValueError,
            OSError) as error:
        # One line, no traceback. The epoch's input iterator is already released (train.fit), so the
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
