"""Command-line interface: ``python train.py {fit,validate,test,predict}``.

A thin wrapper around Lightning's :class:`~pytorch_lightning.cli.LightningCLI`, callable
from tests as ``main([...])``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import torch.distributed
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from pointsink.callbacks import (
    ConfusionMatrixReport,
    PredictionWriter,
    RandomStateCheckpoint,
    ResumableModelCheckpoint,
)
from pointsink.data import (
    DatasetLayoutError,
    DatasetNotFoundError,
    ShapeFolderDataModule,
    discover_class_names,
)
from pointsink.inference import CheckpointError, load_checkpoint
from pointsink.module import SinkformerClassifier, default_hparams

__all__ = ["BatchLimitTrainer", "SinkformerCLI", "find_checkpoint", "main", "run"]

# Subcommands that only evaluate weights: without --ckpt_path they would use untrained ones.
EVALUATING_SUBCOMMANDS = ("validate", "test", "predict")
# Model hyperparameters the data module sets (linked arguments) or that follow from them.
# A checkpoint's values of these are checked against the data (the class names, in
# SinkformerClassifier.on_load_checkpoint) or reported (the sampling), and imposed only
# under predict (the class names and the sampling, see _parse_ckpt_path).
LINKED_FROM_DATA = ("class_names", "num_classes", "num_points", "augmentation", "sample_seed")
# Every parser's usage line (argparse's default lists every option, before every error).
SHORT_USAGE = "%(prog)s [options]"


class ArgumentValueError(ValueError):
    """A model, data or trainer argument's value refused by its class (e.g. ``n_iter 0``)."""


# Mistakes in what the user gave (data, checkpoint, argument values): one line and exit
# status 2, no traceback.
USER_ERRORS = (CheckpointError, DatasetLayoutError, DatasetNotFoundError, ArgumentValueError)


# An int counts batches, a float is a fraction, "all" (or null) all batches. The Literal
# also keeps the Union distinct from Lightning's `float | int | None`: once that was parsed
# in the process, jsonargparse read a plain `int | float | None` as it, "1" as 1.0 again.
BatchLimit = Union[int, float, Literal["all"], None]  # noqa: UP007


class BatchLimitTrainer(Trainer):
    """Lightning's :class:`~pytorch_lightning.Trainer`, whose batch limits read ``1`` as one batch.

    Lightning annotates the limits ``float | int | None``, float first, so jsonargparse
    parses ``--trainer.limit_train_batches 1`` (or ``1`` in a YAML file) as ``1.0``: all
    batches, where Lightning documents ``1`` as one batch. Here ``1`` stays an int and
    ``1.0`` a float. Its default logger (``logger`` unset or True) is always a
    :class:`~pytorch_lightning.loggers.CSVLogger` in ``default_root_dir``, where Lightning
    would switch to TensorBoard's whenever ``tensorboard`` happens to be installed: the
    README and ``benchmarks/reproduce.py`` read ``metrics.csv``. Every other argument is the
    Trainer's.

    Args:
        limit_train_batches: Training batches per epoch: an int counts batches, a float is
            a fraction of them; ``"all"`` or ``None``: all.
        limit_val_batches: The same for validation.
        limit_test_batches: The same for testing.
        limit_predict_batches: The same for prediction.
        **kwargs: The Trainer's other arguments.
    """

    def __init__(
        self,
        *,
        limit_train_batches: BatchLimit = None,
        limit_val_batches: BatchLimit = None,
        limit_test_batches: BatchLimit = None,
        limit_predict_batches: BatchLimit = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("logger") in (None, True) and not kwargs.get("barebones", False):
            kwargs["logger"] = CSVLogger(save_dir=kwargs.get("default_root_dir") or os.getcwd())
        super().__init__(
            limit_train_batches=_batch_limit(limit_train_batches),
            limit_val_batches=_batch_limit(limit_val_batches),
            limit_test_batches=_batch_limit(limit_test_batches),
            limit_predict_batches=_batch_limit(limit_predict_batches),
            **kwargs,
        )


def _batch_limit(limit: int | float | str | None) -> int | float | None:
    """``limit`` as Lightning takes it: ``"all"`` (the only string allowed) is None."""
    return None if isinstance(limit, str) else limit


def find_checkpoint(
    root: str | Path, filename: str, option: str = "--trainer.default_root_dir"
) -> Path:
    """The most recently written ``<filename>.ckpt`` below ``root`` (any logger version).

    Args:
        root: A run's ``default_root_dir``, or the checkpoint callback's ``dirpath``.
        filename: Checkpoint name without ``.ckpt`` (``"last"``, ``"best"``).
        option: The command-line option that gave ``root``, named in the error.

    Returns:
        The path of the newest such file.

    Raises:
        CheckpointError: There is none.
    """
    found = sorted(Path(root).rglob(f"{filename}.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise CheckpointError(
            f"--ckpt_path {filename}: no {filename}.ckpt below {root} (the run's "
            f"{option}); give the checkpoint's path."
        )
    return found[-1]


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

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """Sets up the parsers as LightningCLI does, each with a one-line usage.

        argparse prints the usage before every parse error; listing every option made a
        mistyped option or value a ~120-line message. ``--help`` still lists them all.
        """
        if add_subcommands:
            for name in self.subcommands():
                subparser_kwargs[name] = {"usage": SHORT_USAGE, **subparser_kwargs.get(name, {})}
        else:
            main_kwargs = {"usage": SHORT_USAGE, **main_kwargs}
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Adds the checkpoint, prediction and report callbacks and the data → model links."""
        # Resumable: `fit --ckpt_path` logs to a new version folder and keeps the best val/oa.
        parser.add_lightning_class_args(ResumableModelCheckpoint, "checkpoint")
        # last.ckpt after every epoch, for resuming. A second callback because Lightning 2.6's
        # `save_last` only rewrites last.ckpt when a best checkpoint is saved at the same step.
        parser.add_lightning_class_args(ResumableModelCheckpoint, "last_checkpoint")
        # Random generators in every checkpoint, so a resumed fit draws what the whole run would.
        parser.add_lightning_class_args(RandomStateCheckpoint, "random_state")
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
                # After every training epoch, also when validation runs less often
                # (check_val_every_n_epoch > 1 would save it only at validated epochs).
                "last_checkpoint.save_on_train_epoch_end": True,
                "data": {"class_path": "pointsink.data.SyntheticShapesDataModule"},
            }
        )
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.num_points", "model.num_points", apply_on="instantiate")
        parser.link_arguments(
            "data.augmentation_settings", "model.augmentation", apply_on="instantiate"
        )
        # Recorded so that ShapeClassifier samples a file as the training cache did.
        parser.link_arguments("data.sample_seed", "model.sample_seed", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Resolves ``--ckpt_path`` and rebuilds the model from its hyperparameters.

        LightningCLI replaces every model argument by the checkpoint's without a word, and
        its ``last``/``best`` look only in the new run's (empty) version folder, so ``fit
        --ckpt_path last`` would start from scratch. Here ``last`` and ``best`` name the
        newest such file below ``default_root_dir``; model arguments that the checkpoint
        overrides are named in a warning; the data-linked ones (:data:`LINKED_FROM_DATA`)
        stay the data's: the class names are checked against the checkpoint's when it is
        loaded, and under ``predict`` they are the checkpoint's, so no class folders are
        needed.

        Raises:
            CheckpointError: ``validate``, ``test`` or ``predict`` without ``--ckpt_path``
                (the model would be untrained), a checkpoint that is missing or cannot
                be read, or ``fit`` from one without optimizer state (weights only).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            if subcommand in EVALUATING_SUBCOMMANDS:
                raise CheckpointError(
                    f"{subcommand} needs the weights to use: pass --ckpt_path CHECKPOINT "
                    "(or --ckpt_path best / last for this --trainer.default_root_dir's newest)."
                )
            return
        if ckpt_path in ("best", "last"):
            name = {"best": "checkpoint", "last": "last_checkpoint"}[ckpt_path]
            callback = config[name]
            # The callback writes into its dirpath when one is given, not below the root.
            root, option = callback.dirpath, f"--{name}.dirpath"
            if root is None:
                root, option = config.trainer.default_root_dir or ".", "--trainer.default_root_dir"
            config.ckpt_path = ckpt_path = str(find_checkpoint(root, callback.filename, option))
        if "://" in str(ckpt_path) or ckpt_path == "hpc":
            return  # remote or SLURM checkpoints: Lightning reads them
        checkpoint = load_checkpoint(ckpt_path)
        if subcommand == "fit" and "optimizer_states" not in checkpoint:
            # Lightning would stop mid-restore with a KeyError (shipped checkpoints and
            # save_weights_only ones hold no optimizer state).
            raise CheckpointError(
                f"--ckpt_path {ckpt_path} holds weights without the optimizer's state, so it "
                f"cannot resume a fit; to train from its weights, pass --model.weights "
                f"{ckpt_path} instead."
            )
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        saved_class_names = hparams.get("class_names")
        saved_points = hparams.get("num_points")
        saved_seed = hparams.get("sample_seed")
        saved_augmentation = hparams.get("augmentation")
        saved_up_axis = (
            saved_augmentation.get("up_axis") if isinstance(saved_augmentation, dict) else None
        )
        for name in LINKED_FROM_DATA:
            hparams.pop(name, None)
        if not hparams:
            return
        # A checkpoint saved before a setting existed was trained with its default: rebuild
        # that model, as SinkformerClassifier.load_from_checkpoint does, not the config's.
        for name, default in default_hparams().items():
            if name not in LINKED_FROM_DATA:
                hparams.setdefault(name, default)
        given = config.model
        # `weights` only records where a fine-tuned run started; with --ckpt_path it is never
        # read again, so a config without it (the usual case) overrides nothing.
        overridden = [
            f"{name}={given[name]!r} (checkpoint: {value!r})"
            for name, value in hparams.items()
            if name in given and given[name] != value and name != "weights"
        ]
        if overridden:
            rank_zero_warn(
                f"--ckpt_path {ckpt_path}: the model is rebuilt with the checkpoint's "
                "hyperparameters, so these given model arguments are not used: "
                + ", ".join(overridden)
                + ". To train with other values from these weights, fit with --model.weights."
            )
        data = config.data.get("init_args", config.data)
        for name, saved in (("num_points", saved_points), ("sample_seed", saved_seed)):
            current = data.get(name)
            if saved is None or current in (None, saved):
                continue
            if subcommand == "predict":
                # A file is sampled as the checkpoint's training files were, as by
                # ShapeClassifier and pointsink-predict: the same file, the same prediction.
                setattr(data, name, saved)
                rank_zero_warn(
                    f"--ckpt_path {ckpt_path}: predict samples the files as the checkpoint's "
                    f"training did ({name}={saved}); --data.{name} {current} is not used."
                )
            else:
                # Testing at another density or sample is an experiment of its own.
                rank_zero_warn(
                    f"--ckpt_path {ckpt_path} was trained with {name}={saved}; this run uses "
                    f"{current} (--data.{name} {saved} to match)."
                )
        if (
            subcommand == "predict"
            and "up_axis" in data
            and saved_up_axis not in (None, data.up_axis)
        ):
            # --data.predict_up_axis turns the files to the vertical the model was trained on.
            rank_zero_warn(
                f"--ckpt_path {ckpt_path} was trained with up_axis={saved_up_axis}; predict "
                f"uses it (--data.up_axis {data.get('up_axis')} is not used)."
            )
            data.up_axis = saved_up_axis
        if subcommand == "predict" and saved_class_names is not None and "class_names" in data:
            data.class_names = [str(name) for name in saved_class_names]
            if "class_path" in config.data:
                config.data = _plain_folder_for_prediction(config.data)
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """Checks ``--model.weights`` and a plain shape folder before anything is built.

        Raised while jsonargparse builds the data module, a :class:`DatasetLayoutError`
        would reach the user buried in a dump of every data argument. Data modules that
        provide their own files (downloads, generated shapes) are checked after they have.
        """
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        weights = (config.get("model") or {}).get("weights")
        resuming = config.get("ckpt_path") is not None  # then the weights are not read
        if subcommand == "fit" and weights and not resuming and "://" not in str(weights):
            # Read when fitting starts, after the data caches are built: a typo would
            # surface only minutes later.
            load_checkpoint(weights)
        data = config.get("data")
        if data is None or "class_path" not in data:
            return
        module_name, _, class_name = str(data.class_path).rpartition(".")
        data_class = getattr(importlib.import_module(module_name), class_name, None)
        init_args = data.get("init_args") or {}
        plain_folder = (
            isinstance(data_class, type)
            and issubclass(data_class, ShapeFolderDataModule)
            and data_class._provide_source is ShapeFolderDataModule._provide_source
        )
        if plain_folder and init_args.get("class_names") is None and "root" in init_args:
            discover_class_names(init_args["root"])

    def instantiate_classes(self) -> None:
        """Builds the model, data module and trainer; a value they refuse is a user error.

        The constructors check their arguments with ``ValueError``s that name the argument
        and the accepted values; here that sentence is all the user needs, not a traceback.
        """
        try:
            super().instantiate_classes()
        except USER_ERRORS:
            raise
        except ValueError as error:
            # jsonargparse wraps a data module's error in its own, with a dump of every
            # argument; the constructor's sentence is at the end of the chain.
            cause: BaseException = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ArgumentValueError(str(cause)) from error

    def _run_subcommand(self, subcommand: str) -> None:
        """Runs ``subcommand``; a run refused at set-up leaves no version folder behind.

        Lightning writes ``config.yaml`` into a new ``version_N`` folder when the run sets
        up, before the checkpoint's classes and validation split are checked against the
        data; a refused run would leave that folder holding nothing else. A folder that
        existed before the run (a logger version given by the user) is left alone.
        """
        log_dir = self._file_logger_dir()
        if log_dir is not None and log_dir.exists():
            log_dir = None  # not this run's to remove
        try:
            super()._run_subcommand(subcommand)
        except USER_ERRORS:
            if log_dir is not None and self.trainer.is_global_zero:
                config_name = self.save_config_kwargs.get("config_filename", "config.yaml")
                written_at_setup = {config_name, "hparams.yaml"}
                if log_dir.is_dir() and all(
                    child.is_file() and child.name in written_at_setup
                    for child in log_dir.iterdir()
                ):
                    shutil.rmtree(log_dir)
            raise

    def _file_logger_dir(self) -> Path | None:
        """The version folder of a CSV or TensorBoard logger (others: None).

        The logger's own path, not ``trainer.log_dir``: that one is a collective call under
        DDP, and a refused rank cannot count on the others joining it.
        """
        logger = self.trainer.logger
        if isinstance(logger, (CSVLogger, TensorBoardLogger)):
            return Path(logger.log_dir)
        return None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Leaves out the checkpoint callbacks under ``--trainer.enable_checkpointing false``.

        Lightning refuses a ``ModelCheckpoint`` among the callbacks then.
        """
        if config.get("enable_checkpointing") is False:
            callbacks = [
                callback for callback in callbacks if not isinstance(callback, ModelCheckpoint)
            ]
        return super()._instantiate_trainer(config, callbacks)


def _plain_folder_for_prediction(data: Any) -> Any:
    """A data config for ``predict``: :class:`ShapeFolderDataModule` with ``data``'s settings.

    ``predict`` reads only ``predict_files``, and subclasses that download or generate
    their shapes do nothing more then, but they accept only their own class names, which
    would refuse a checkpoint of other classes (the shipped ModelNet10 model under
    ``configs/synthetic.yaml``).
    """
    init_args = data.get("init_args") or {}
    shared = inspect.signature(ShapeFolderDataModule.__init__).parameters
    kept = {name: value for name, value in dict(init_args).items() if name in shared}
    kept["root"] = kept.get("root") or "."
    return type(data)(
        class_path="pointsink.data.ShapeFolderDataModule", init_args=type(data)(**kept)
    )


def main(args: Sequence[str] | None = None, run: bool = True) -> SinkformerCLI | None:
    """Runs the CLI.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
        run: Whether to run a subcommand; ``False`` only builds the trainer, model and
            data module from ``args`` (which then name no subcommand).

    Returns:
        The CLI object (its ``trainer``, ``model`` and ``datamodule`` hold the run's state).

    Raises:
        SystemExit: Code 2, after printing one line, when the data are missing, a class
            refuses an argument's value (e.g. ``--model.n_iter 0``), the
            checkpoint given to fine-tune from (``--model.weights``) is unusable, or the
            one given as ``--ckpt_path`` was trained on other classes than the data's (or,
            when resuming a fit, with another validation split). Code 1 after ``predict``
            from the command line (``args`` None) when a file could not be classified.
    """
    distributed_before = _distributed_initialized()
    try:
        cli = SinkformerCLI(
            SinkformerClassifier,
            ShapeFolderDataModule,
            trainer_class=BatchLimitTrainer,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": "checkpoints"},
            args=None if args is None else list(args),
            run=run,
        )
    except USER_ERRORS as error:
        # One sentence, not a traceback: the user has to fetch or place the data, or give
        # a checkpoint that fits the model and the data's classes.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    else:
        if args is None:
            _exit_if_files_failed(cli)
        return cli
    finally:
        # Lightning destroys only NCCL process groups at exit. A gloo group (DDP on CPUs)
        # left to interpreter finalization can abort the process ("terminate called
        # without an active exception"), which Lightning's launcher answers by killing
        # every rank. A group the caller set up before is the caller's to destroy.
        if not distributed_before and _distributed_initialized():
            torch.distributed.destroy_process_group()


def _exit_if_files_failed(cli: SinkformerCLI) -> None:
    """Exits with status 1 after ``predict`` if a file could not be classified.

    As ``pointsink-predict`` does, so that a script sees the failure; the records, written
    already, say why for each file. Only on the command line (``main()`` reading
    ``sys.argv``): callers of ``main(args)`` get the CLI object and its writer's counts.
    """
    if cli.subcommand != "predict":
        return
    for callback in cli.trainer.callbacks:
        if isinstance(callback, PredictionWriter) and callback.last_failed:
            print(
                f"error: {callback.last_failed} of {callback.last_count} file(s) could not be "
                f"classified; their records in {callback.last_output} say why.",
                file=sys.stderr,
            )
            raise SystemExit(1)


def _distributed_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def run() -> None:
    """The ``pointsink-train`` command: :func:`main` on ``sys.argv``, exit status 0 on success.

    A console script hands its function's return value to ``sys.exit``, which would print
    the CLI object that :func:`main` returns and exit with status 1.
    """
    main()
