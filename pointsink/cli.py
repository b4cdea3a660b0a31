"""Command-line interface: ``python train.py {fit,validate,test,predict}``.

A thin wrapper around Lightning's :class:`~pytorch_lightning.cli.LightningCLI`, callable
from tests as ``main([...])``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from pointsink.callbacks import ConfusionMatrixReport, PredictionWriter, ResumableModelCheckpoint
from pointsink.data import DatasetNotFoundError, ShapeFolderDataModule
from pointsink.inference import CheckpointError
from pointsink.module import SinkformerClassifier

__all__ = ["SinkformerCLI", "main", "run"]


class SinkformerCLI(LightningCLI):
    """LightningCLI with best and last checkpoints and data → model links.

    The data module's class names, point count and augmentation settings are linked to the
    model's hyperparameters, so every checkpoint records them.
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parses ``args`` (or ``sys.argv``) into ``self.config``, as LightningCLI does."""
        with warnings.catch_warnings():
            # `main(args)` is how tests and benchmarks/reproduce.py run the CLI while their own
            # options fill sys.argv; Lightning's warning against mixing the two does not apply.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Adds the checkpoint, prediction and report callbacks and the data → model links."""
        # Resumable: `fit --ckpt_path` logs to a new version folder and keeps the best val/oa.
        parser.add_lightning_class_args(ResumableModelCheckpoint, "checkpoint")
        # last.ckpt after every epoch, for resuming. A second callback because Lightning 2.6's
        # `save_last` only rewrites last.ckpt when a best checkpoint is saved at the same step.
        parser.add_lightning_class_args(ResumableModelCheckpoint, "last_checkpoint")
        # Writes the records of `predict` (a no-op in the other subcommands).
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        # Writes confusion_matrix.png and test_report.json after `test`.
        parser.add_lightning_class_args(ConfusionMatrixReport, "confusion_report")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/oa",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
                "data": {"class_path": "pointsink.data.SyntheticShapesDataModule"},
            }
        )
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.num_points", "model.num_points", apply_on="instantiate")
        parser.link_arguments(
            "data.augmentation_settings", "model.augmentation", apply_on="instantiate"
        )


def main(args: Sequence[str] | None = None) -> SinkformerCLI | None:
    """Runs the CLI.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        The CLI object (its ``trainer``, ``model`` and ``datamodule`` hold the run's state).

    Raises:
        SystemExit: Code 2, after printing one line, when the data are missing, the
            checkpoint given to fine-tune from (``--model.weights``) is unusable, or the
            one given as ``--ckpt_path`` was trained on other classes than the data's (or,
            when resuming a fit, with another validation split).
    """
    try:
        return SinkformerCLI(
            SinkformerClassifier,
            ShapeFolderDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": "checkpoints"},
            args=None if args is None else list(args),
        )
    except (DatasetNotFoundError, CheckpointError) as error:
        # One sentence, not a traceback: the user has to fetch or place the data, or give
        # a checkpoint that fits the model and the data's classes.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run() -> None:
    """The ``pointsink-train`` command: :func:`main` on ``sys.argv``, exit status 0 on success.

    A console script hands its function's return value to ``sys.exit``, which would print
    the CLI object that :func:`main` returns and exit with status 1.
    """
    main()
