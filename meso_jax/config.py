"""A training run's configuration, defined once: every setting with its default, its choices and its help.

``TrainConfig`` is what meso_jax.train reads; train_main.py makes its command-line flags from these
fields (``define_flags``) and fills the dataclass from them (``from_flags``), so a default lives here and
nowhere else. Light on purpose (no JAX): the entry script imports it before parsing flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from data_pipelines.augment import parse_augmentations

DROPOUT_RATE = 0.5  # the classifier head's dropout in training (the paper's)
TRAINABLE_MODELS = ("meso4", "mesoinception4", "meso4_video")
INPUT_PIPELINES = ("tfdata", "memory")
SELECTION_RULES = ("worst", "mean")


def _setting(default: Any, help_text: str, choices: tuple[str, ...] | None = None, flag: str | None = None,
             factory: Any = None) -> Any:
    """A field with its command-line flag: ``help_text``, ``choices`` (an enum flag), ``flag`` (the flag's
    name when it differs from the field's)."""
    metadata = {"help": help_text, "choices": choices, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Fields without help (preprocessing, log_every_steps) are
    not flags of their own: train_main.py builds the preprocessing from its data flags."""

    model: str = _setting("meso4", "Network to train.", TRAINABLE_MODELS)
    epochs: int = _setting(10, "Passes over the training split (0 with --export_checkpoint just exports).")
    batch_size: int = _setting(32, "Global batch size (split over all devices).")
    learning_rate: float = _setting(1e-3, "Peak Adam learning rate.")
    schedule: str = _setting("constant", "constant (the shipped models'); paper: ÷10 every 1,000 steps down to "
                             "1e-6; cosine: warm-up then cosine decay.", ("constant", "paper", "cosine"))
    warmup_steps: int = _setting(500, "Warm-up steps for --schedule=cosine.")
    decay_epochs: int = _setting(0, "With --schedule=constant: over the last N epochs the rate falls to 0 along a "
                                 "cosine (the epochs before are the plain constant schedule's).")
    weight_decay: float = _setting(0.0, "Decoupled weight decay (AdamW) when > 0.")
    loss: str = _setting("bce", "bce: cross-entropy on logits; mse: the paper's squared error.", ("bce", "mse"))
    seed: int = _setting(0, "Seed for initialisation, data order, augmentation and dropout.")
    keras_weights: str | None = _setting(None, "Initialise from the authors' published .h5 weights.")
    init_checkpoint: str | None = _setting(None, "Initialise from an exported model or a workdir's best checkpoint "
                                           "(fine-tuning; the optimizer starts afresh).")
    teacher: str | None = _setting(None, "Distillation: a model (e.g. checkpoints/ensemble) whose score of each "
                                   "training image softens its target; needs --input_pipeline=memory.")
    teacher_weight: float = _setting(0.5, "With --teacher: target = (1 - w) * label + w * teacher score, "
                                     "w in (0, 0.5].")
    kernel_init: str = _setting("flax", "Initial kernels: flax (LeCun-normal, the shipped models') or keras "
                                "(Glorot-uniform, as Keras).", ("flax", "keras"))
    dropout_rate: float = _setting(DROPOUT_RATE, "Dropout rate in the classifier head during training (the "
                                   "paper's 0.5).", flag="dropout")
    ema_decay: float = _setting(0.0, "When > 0 (e.g. 0.999): keep an exponential moving average of the weights "
                                "(Polyak averaging), validate, checkpoint and export it; the trained weights' "
                                "validation is logged as raw_val_*.")
    # Data.
    data_dir: str = _setting("", "Folder with real/ and fake/ (or train/ val/ splits holding them), or several "
                             "named sources with their share of every batch: name=folder[:weight],... (e.g. "
                             "dfdc=data/dfdc:0.5,ffpp=data/ffpp:0.5).")
    dataset: str = _setting("image", "Train on images or on faces sampled from videos.", ("image", "video"))
    val_fraction: float = _setting(0.1, "Validation share, split by source video, when the data has no val/ "
                                   "split.")
    augment: str = _setting("flip", "Training augmentation, one preset for every source or one per source of "
                            "--data_dir (e.g. dfdc=resize,ffpp=light_jpeg): none; flip (horizontal, the shipped "
                            "models'); jpeg (flip + JPEG re-compression, quality 60-95); light_jpeg (quality "
                            "80-95); resize (jpeg + a round trip through 35-100% of the size); seed (rotation "
                            "±20°, shifts 0.2, flip); full (seed + brightness/contrast + JPEG re-compression).")
    input_pipeline: str = _setting("tfdata", "tfdata: decode the files every epoch; memory: pre-cropped images "
                                   "(--face_detector=none) decoded once into RAM, same batches, no TensorFlow "
                                   "needed (for fast accelerators).", INPUT_PIPELINES)
    cache_dir: str | None = _setting(None, "Where extracted video faces are cached (default: "
                                     "<workdir>/face_cache).")
    synthesize_fakes: str | None = _setting(None, "Add self-blended fakes made from the real faces.", ("sbi",))
    preprocessing: dict = dataclasses.field(default_factory=dict)  # data_pipelines Preprocessing.to_dict()
    select_by: str = _setting("worst", "With several sources, the best checkpoint is the one with the best worst "
                              "(or mean) per-source validation AUC.", SELECTION_RULES)
    paired_batches: bool = _setting(False, "Balance every batch by class and put in it the originals of its fakes "
                                    "(a fake and its source video, or a FaceForensics++ group), so real and fake "
                                    "differ only where the face was changed.")
    checkpoint_every_steps: int = _setting(500, "Save a checkpoint every N steps (and at every epoch end).")
    keep_checkpoints: int = _setting(3, "How many of the latest checkpoints to keep (the best is kept too).")
    log_every_steps: int = 50
    progress_bar: bool = _setting(True, "Show a progress bar on stderr.", flag="progress")

    def __post_init__(self):
        # Checked here, before any data is read, so a bad combination fails at once with one line.
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1) (0: no weight averaging)")
        if self.decay_epochs and self.schedule != "constant":
            raise ValueError(f"decay_epochs applies to the constant schedule, not to {self.schedule!r}")
        if not 0 <= self.decay_epochs <= self.epochs:
            raise ValueError(f"decay_epochs={self.decay_epochs} must be between 0 and epochs={self.epochs}")
        if self.select_by not in SELECTION_RULES:
            raise ValueError(f"unknown select_by {self.select_by!r}; choose {' or '.join(SELECTION_RULES)}")
        if self.input_pipeline not in INPUT_PIPELINES:
            raise ValueError(f"unknown input_pipeline {self.input_pipeline!r}; choose one of "
                             f"{', '.join(INPUT_PIPELINES)}")
        parse_augmentations(self.augment)  # the sources it names are checked against --data_dir's
        if self.keras_weights and self.init_checkpoint:
            raise ValueError("give either --keras_weights or --init_checkpoint, not both")
        if self.teacher:
            # The teacher scores every training image once, in memory; the hard label keeps at least
            # half the weight, so each target stays on its label's side of 0.5 (class weights, accuracy).
            if self.input_pipeline != "memory" or self.synthesize_fakes:
                raise ValueError("--teacher needs --input_pipeline=memory and no --synthesize_fakes "
                                 "(it scores each training image once, before training)")
            if not 0 < self.teacher_weight <= 0.5:
                raise ValueError(f"teacher_weight={self.teacher_weight} must be in (0, 0.5]")


def _flag_fields() -> list[tuple[str, dataclasses.Field]]:
    """(flag name, field) of every TrainConfig field that is a flag."""
    return [(field.metadata.get("flag") or field.name, field) for field in dataclasses.fields(TrainConfig)
            if field.metadata.get("help")]


def define_flags(flag_values) -> None:
    """Defines one absl flag per TrainConfig setting on ``flag_values`` (absl.flags.FLAGS), with the
    field's default, choices and help."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    for name, field in _flag_fields():
        default, help_text, choices = field.default, field.metadata["help"], field.metadata["choices"]
        if choices is not None:
            flags.DEFINE_enum(name, default, list(choices), help_text, flag_values=flag_values)
        elif field.type == "bool":
            flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
        elif field.type == "int":
            flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
        elif field.type == "float":
            flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def from_flags(flag_values, preprocessing: dict) -> TrainConfig:
    """The TrainConfig of parsed flags (``define_flags``) and the run's preprocessing settings."""
    values = {field.name: getattr(flag_values, name) for name, field in _flag_fields()}
    return TrainConfig(**values, preprocessing=preprocessing)
