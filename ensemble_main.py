"""Exports an ensemble of trained image models as one checkpoint (score = sigmoid of their mean logit).

    python ensemble_main.py --members=DIR,DIR[,...] --export_checkpoint=NEW_DIR [--val_path=FACES_DIR]

Each member is an exported model or a training --workdir (its best checkpoint); all must scan with
the same preprocessing. With --val_path (real/ and fake/ face crops) the ensemble is scored there and
its validation metrics are stored in the checkpoint's metadata. predict_main and eval_main take the
result with --checkpoint=NEW_DIR. Exit status: 0 when exported, 2 for a usage error.
"""

from __future__ import annotations

from absl import app, flags

from meso_jax import cli

_MEMBERS = flags.DEFINE_list("members", None, "Checkpoint directories of the members, comma-separated.")
_EXPORT = flags.DEFINE_string("export_checkpoint", None, "New directory to export the ensemble to.")
_VAL_PATH = flags.DEFINE_string("val_path", None, "Folder of labelled face crops (real/, fake/) to measure it on, "
                                "or named folders name=folder,... (metrics of the first; the verdict threshold "
                                "is chosen on all, each source weighted equally).")

PROGRAM = "ensemble_main"


def _run(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected argument {argv[1]!r}; use --members=DIR,DIR")
    if not _MEMBERS.value or not _EXPORT.value:
        raise cli.UsageError("give --members=DIR,DIR[,...] and --export_checkpoint=NEW_DIR")
    # Heavy imports only after the command line is known to be usable.
    from meso_jax import checkpoints, ensemble, evaluate  # pylint: disable=import-outside-toplevel

    try:
        exported = ensemble.export(_MEMBERS.value, _EXPORT.value, _VAL_PATH.value)
    except (ensemble.EnsembleError, checkpoints.CheckpointError, evaluate.EvaluationError) as error:
        raise cli.UsageError(str(error)) from None
    metrics = exported.metadata.get("metrics")
    measured = f"; val AUC {metrics['val_auc']:.4f} on {metrics['val_count']} crops" if metrics else ""
    if "threshold" in exported.metadata:
        measured += f"; verdict threshold {exported.metadata['threshold']:.4f}"
    print(f"exported {exported.model_name} to {_EXPORT.value}{measured}")
    return 0


def main(argv: list[str]) -> None:
    cli.run_entry(PROGRAM, _run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
