"""Training callbacks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from pointsink.attention import MultiheadAttention
from pointsink.data import derive_seed
from pointsink.inference import Prediction, format_predictions, make_prediction
from pointsink.validation import check_int

__all__ = [
    "ConfusionMatrixReport",
    "DoublyStochasticMonitor",
    "PredictionWriter",
    "RandomStateCheckpoint",
    "ResumableModelCheckpoint",
    "doubly_stochastic_deviation",
    "run_directory",
]


def run_directory(trainer: pl.Trainer) -> Path:
    """The run's log folder (``trainer.log_dir``, else ``default_root_dir``).

    Under DDP ``trainer.log_dir`` is a collective (a broadcast from rank 0): every rank must
    call this, before any rank-dependent early return, or rank 0 waits forever (or fails
    once the others have exited).
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


class ResumableModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps its best score when a resumed fit logs elsewhere.

    ``fit --ckpt_path last.ckpt`` writes to a new logger version (``version_1``, …), so the
    checkpoint folder changes. Lightning then restores only ``best_model_path`` and forgets
    the best score and the top-k record: the first validation after resuming becomes the
    new "best" even when it is worse than an earlier epoch. This class restores them as if
    the folder had not changed, so selection covers the whole run: ``best_model_path`` stays
    in the earlier version's folder until a better epoch is saved in the new one (Lightning
    deletes old checkpoints only inside the current folder, so the earlier file stays).
    """

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key, so checkpoints written by either class resume with either."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state saved in a checkpoint, whatever folder it was written to."""
        if self.dirpath is not None:
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)


class RandomStateCheckpoint(pl.Callback):
    """Gives each DDP rank its own random stream; saves them in checkpoints for resuming.

    ``seed_everything`` seeds every rank alike, so under DDP all ranks would draw the same
    dropout masks and region-mixing choices (on different samples). When a fit starts with
    more than one rank, and not from restored generators, this callback reseeds torch's
    generators (CPU and CUDA) of each rank with a seed mixed from ``torch.initial_seed()``
    and the global rank (:func:`pointsink.data.derive_seed`), as Lightning's documentation
    advises for per-process randomness. It runs after the model is built and broadcast, so
    the ranks' weights stay equal; a single-process fit is left as it is.

    Lightning restores the weights, optimizer, schedule and loops, but not the generators:
    after ``fit --ckpt_path`` the random stream starts again from ``seed_everything``, so
    the first resumed epoch shuffles and augments as epoch 0 did. This callback saves, per
    rank, torch's CPU generator, the current CUDA device's generator (when CUDA is in use)
    and the training dataset's augmentation stream (see
    :meth:`pointsink.data.PointCloudDataset.augmentation_state`), and puts them back when a
    fit resumes from the checkpoint. Resuming from an end-of-epoch checkpoint (``last.ckpt``,
    ``best.ckpt``) then continues as the uninterrupted run would have, to the bit on one
    machine, when the data are loaded in the main process (``num_workers: 0``, as in
    ``modelnet10.yaml``, ``modelnet10-anyfacing.yaml``, ``modelnet10-cpu.yaml`` and
    ``synthetic.yaml``): DataLoader
    workers (the GPU-sized configs use 4) keep augmentation streams of their own, which a
    checkpoint cannot hold.

    Saving gathers the states of all ranks (a collective under DDP: every rank saves, as
    Lightning's checkpointing does). A checkpoint from another number of ranks is resumed
    without them, with a warning.
    """

    key = "random_states"

    def __init__(self) -> None:
        super().__init__()
        self._restored = False
        self._cuda_state: torch.Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forgets an earlier fit's restore (called before this fit's checkpoint is read)."""
        self._restored = False
        self._cuda_state = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reseeds each rank's torch generators under DDP, unless a checkpoint restored them.

        Before the training data loader is made: its augmentation seed is mixed from
        ``torch.initial_seed()``, which a resumed fit gets back from the saved state.
        """
        if self._cuda_state is not None:
            # Restored here, not on load: Lightning reads the checkpoint before it moves
            # the model to its GPU, so only now is the device known.
            device = trainer.strategy.root_device
            if device.type == "cuda":
                torch.cuda.set_rng_state(self._cuda_state, device)
            self._cuda_state = None
        if trainer.world_size > 1 and not self._restored:
            torch.manual_seed(derive_seed(torch.initial_seed(), trainer.global_rank))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Adds ``checkpoint["random_states"]``: tensors with one row per rank."""
        states = {"torch": torch.get_rng_state()}
        device = pl_module.device
        if device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(device)
        augmentation = _augmentation_state(trainer)
        if augmentation is not None:
            seed, generator_state = augmentation
            # Seeds are unsigned 64-bit (data.derive_seed): stored as 8 bytes.
            states["augmentation_seed"] = torch.tensor(
                list(seed.to_bytes(8, "little")), dtype=torch.uint8
            )
            states["augmentation"] = generator_state
        gathered = {}
        for name, state in states.items():
            rows = trainer.strategy.all_gather(state.to(device))  # (world, bytes) under DDP
            gathered[name] = rows.reshape(trainer.world_size, -1).cpu()
        checkpoint[self.key] = gathered

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restores this rank's generators when a fit resumes from ``checkpoint``.

        Lightning calls this for ``validate``, ``test`` and ``predict`` with a checkpoint as
        well; they draw nothing random, so their random state is left as it is.
        """
        states = checkpoint.get(self.key)
        if not states or trainer.state.fn != TrainerFn.FITTING:
            return
        if len(states["torch"]) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the random generators of {len(states['torch'])} "
                f"rank(s); this fit runs {trainer.world_size}: they are not restored, so the "
                "resumed epochs draw other shuffles, augmentations and dropout masks."
            )
            return
        rank = trainer.global_rank
        torch.set_rng_state(states["torch"][rank].clone())
        self._restored = True
        if "cuda" in states:
            self._cuda_state = states["cuda"][rank].clone()  # set in on_fit_start
        dataset = _training_dataset(trainer)
        if "augmentation" in states and dataset is not None:
            seed = int.from_bytes(bytes(states["augmentation_seed"][rank].tolist()), "little")
            dataset.restore_augmentation_state(seed, states["augmentation"][rank].clone())


def _training_dataset(trainer: pl.Trainer) -> Any:
    """The data module's training dataset, if it keeps an augmentation stream; else None."""
    dataset = getattr(trainer.datamodule, "train_dataset", None)
    return dataset if hasattr(dataset, "augmentation_state") else None


def _augmentation_state(trainer: pl.Trainer) -> tuple[int, torch.Tensor] | None:
    dataset = _training_dataset(trainer)
    return None if dataset is None else dataset.augmentation_state()


def doubly_stochastic_deviation(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far attention matrices are from doubly stochastic.

    Args:
        weights: Attention weights ``(..., n, m)``.

    Returns:
        ``(column_deviation, row_deviation)``, scalars: the mean absolute deviation of the
        column sums from ``n / m``, relative to ``n / m``, and of the row sums from 1. Both are
        0 for a doubly stochastic matrix (with these marginals).
    """
    return marginal_deviation(weights.sum(dim=-1), weights.sum(dim=-2))


def marginal_deviation(
    row_sums: torch.Tensor,
    column_sums: torch.Tensor,
    *,
    query_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`doubly_stochastic_deviation` from the marginals of ``(..., n, m)`` weights.

    Args:
        row_sums: ``(..., n)``.
        column_sums: ``(..., m)``.
        query_mask: For padded sets, ``(..., n)`` bool (broadcasting to ``row_sums``), True
            for real queries: only real rows and columns count, and the column target is
            each set's ``n' / m'``; the means are over all real rows (columns) of the
            batch, not per set. None: every query is real.
        key_mask: Likewise ``(..., m)`` for the keys.

    Returns:
        ``(column_deviation, row_deviation)``, scalars.
    """
    if query_mask is None and key_mask is None:
        target = row_sums.shape[-1] / column_sums.shape[-1]
        return (column_sums - target).abs().mean() / target, (row_sums - 1.0).abs().mean()
    real_rows = torch.ones_like(row_sums, dtype=torch.bool) if query_mask is None else query_mask
    real_columns = torch.ones_like(column_sums, dtype=torch.bool) if key_mask is None else key_mask
    real_rows = real_rows.expand_as(row_sums)
    real_columns = real_columns.expand_as(column_sums)
    real_queries = real_rows.sum(-1, keepdim=True)
    real_keys = real_columns.sum(-1, keepdim=True)
    # Sets without a real query or key have no target (n' / m' = 0 or undefined): left out.
    counted_columns = real_columns & (real_queries > 0) & (real_keys > 0)
    counted_rows = real_rows & (real_keys > 0)
    target = real_queries / real_keys.clamp_min(1)
    column_error = (column_sums - target).abs() / target.clamp_min(1e-12)
    # Sums over the counted elements instead of boolean indexing, which syncs with the host.
    # where, not a product: a NaN in a left-out position must not reach the sums (0 * nan).
    column_deviation = torch.where(counted_columns, column_error, 0.0).sum() / counted_columns.sum()
    row_error = torch.where(counted_rows, (row_sums - 1.0).abs(), 0.0)
    row_deviation = row_error.sum() / counted_rows.sum()
    return column_deviation, row_deviation


class DoublyStochasticMonitor(pl.Callback):
    """Logs, per attention layer, the distance of its weights to doubly stochastic.

    On the first ``num_batches`` validation batches of every validation epoch the
    attention layers keep the row and column sums of their weights (computed one shape at a
    time, so a shape's ``H x n x m`` weights are the extra memory), and the callback logs
    ``ds/<layer>/col_dev`` (relative mean absolute deviation of column sums from
    ``n / m``) and ``ds/<layer>/row_dev``. At the end of training it draws
    ``doubly_stochastic.png`` (column deviation per layer against epochs) in the logger's
    directory. The Sinkformers paper reports that softmax attention drifts towards doubly
    stochastic during training; this callback measures whether it does. Under
    ``sinkhorn_marginals="uniform"`` the sums are those of the weights before their
    division by ``n``: the relative deviations are the same. The sums are of the weights
    the layers use, so under ``bf16-mixed`` they carry bf16's rounding: a layer whose
    columns are exact in float32 reads about ``2e-4``, not 0.

    Args:
        num_batches: Validation batches measured per epoch (>= 1).
        plot: Whether to write the plot at the end of training.
    """

    def __init__(self, num_batches: int = 1, plot: bool = True) -> None:
        super().__init__()
        # 0 would keep the layers recording all epoch while logging nothing.
        self.num_batches = check_int("num_batches", num_batches)
        self.plot = plot
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._sums: dict[str, list[torch.Tensor]] = {}

    @staticmethod
    def _layers(pl_module: pl.LightningModule) -> dict[str, MultiheadAttention]:
        return {
            name.removeprefix("model.").replace(".attn", ""): module
            for name, module in pl_module.named_modules()
            if isinstance(module, MultiheadAttention)
        }

    def _set_recording(self, pl_module: pl.LightningModule, enabled: bool) -> None:
        for layer in self._layers(pl_module).values():
            layer.record_marginals = enabled
            if not enabled:
                layer.last_marginals = None
                layer.last_masks = (None, None)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Starts recording attention weights."""
        self._sums = {}
        self._set_recording(pl_module, True)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Measures the recorded weights of the first batches."""
        if batch_idx >= self.num_batches:
            return
        for name, layer in self._layers(pl_module).items():
            if layer.last_marginals is None:
                continue
            query_mask, key_mask = layer.last_masks
            col_dev, row_dev = marginal_deviation(
                *layer.last_marginals, query_mask=query_mask, key_mask=key_mask
            )
            self._sums.setdefault(name, []).append(torch.stack([col_dev, row_dev]))
        if batch_idx == self.num_batches - 1:
            self._set_recording(pl_module, False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Logs the deviations (averaged over the ranks) and stops recording."""
        self._set_recording(pl_module, False)
        for name, values in self._sums.items():
            col_dev, row_dev = torch.stack(values).mean(dim=0)
            pl_module.log(f"ds/{name}/col_dev", col_dev, sync_dist=True)
            pl_module.log(f"ds/{name}/row_dev", row_dev, sync_dist=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Adds the epoch's logged column deviations, synchronized by now, to the history."""
        if not trainer.sanity_checking:
            for name in self._sums:
                value = trainer.callback_metrics[f"ds/{name}/col_dev"]
                # Once per epoch, off the hot path.
                self.history.setdefault(name, []).append((trainer.current_epoch, float(value)))
        self._sums = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Writes the plot (rank 0 only)."""
        directory = run_directory(trainer)  # on every rank: not @rank_zero_only
        if self.plot and self.history and trainer.is_global_zero:
            plot_doubly_stochastic_history(self.history, directory / "doubly_stochastic.png")

    def state_dict(self) -> dict[str, Any]:
        """History, so a resumed run keeps its curve."""
        return {"history": {name: list(points) for name, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the history."""
        self.history = {
            name: [tuple(point) for point in points]
            for name, points in state_dict.get("history", {}).items()
        }


def plot_doubly_stochastic_history(
    history: dict[str, list[tuple[int, float]]], path: str | Path
) -> Path:
    """Plots column-sum deviation against epochs, one line per attention layer.

    Args:
        history: ``{layer: [(epoch, column_deviation), ...]}``.
        path: PNG file to write.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, points in sorted(history.items()):
        epochs, values = zip(*points, strict=True)
        axis.plot(epochs, values, marker="o", markersize=3, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("mean |column sum - n/m| / (n/m)")
    # symlog: a Sinkhorn layer can sit at exactly 0, which a log scale would drop.
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.set_title("Distance of attention to doubly stochastic")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class ConfusionMatrixReport(pl.Callback):
    """After ``test``, writes the confusion matrix as a PNG and per-class accuracies as JSON.

    Files (in ``output_dir``, default the logger's directory): ``confusion_matrix.png``
    (rows: true class, columns: predicted, row-normalized colours with counts) and
    ``test_report.json`` (``overall_accuracy``, ``mean_class_accuracy``, ``per_class``
    accuracies and the ``confusion_matrix`` counts). Reads the matrix that
    :class:`~pointsink.module.SinkformerClassifier` accumulates across ranks; rank 0 writes.

    Args:
        output_dir: Folder for the files; None: ``trainer.log_dir`` (or ``default_root_dir``).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.report: dict[str, Any] | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Writes the report files."""
        directory = Path(self.output_dir) if self.output_dir else run_directory(trainer)
        matrix = getattr(pl_module, "test_confusion_matrix", None)
        if matrix is None or not trainer.is_global_zero:
            return
        class_names = list(getattr(pl_module, "class_names", range(matrix.shape[0])))
        self.report = confusion_report(matrix, class_names)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "test_report.json").write_text(json.dumps(self.report, indent=2))
        plot_confusion_matrix(matrix, class_names, directory / "confusion_matrix.png")
        lines = [
            f"{name:>14s} {100 * acc:6.2f} %"
            if acc is not None
            else f"{name:>14s}    n/a (no test shapes)"
            for name, acc in self.report["per_class"].items()
        ]
        rank_zero_info(
            "Per-class test accuracy:\n" + "\n".join(lines) + f"\nReport and confusion matrix "
            f"written to {directory}"
        )


def confusion_report(matrix: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Overall, mean per-class and per-class accuracy from a confusion matrix.

    Args:
        matrix: Counts ``(C, C)``, rows true classes, columns predictions.
        class_names: ``C`` names.

    Returns:
        A JSON-ready dict. A class without test samples has no accuracy (None, JSON null)
        and is left out of the mean; with no samples at all the accuracies are None.
    """
    counts = matrix.double()
    support = counts.sum(dim=1)
    per_class = counts.diagonal() / support.clamp(min=1)
    present = support > 0
    total = counts.sum()
    return {
        "overall_accuracy": float(counts.diagonal().sum() / total) if total > 0 else None,
        "mean_class_accuracy": float(per_class[present].mean()) if present.any() else None,
        "per_class": {
            name: float(acc) if has_samples else None
            for name, acc, has_samples in zip(class_names, per_class, present, strict=True)
        },
        "support": {name: int(n) for name, n in zip(class_names, support, strict=True)},
        "confusion_matrix": counts.long().tolist(),
    }


def plot_confusion_matrix(
    matrix: torch.Tensor, class_names: Sequence[str], path: str | Path
) -> Path:
    """Draws a confusion matrix ``(C, C)`` (rows true, columns predicted) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.double()
    normalized = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(normalized.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(ticks, class_names, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(class_names) <= 20:
        for row in ticks:
            for col in ticks:
                count = int(counts[row, col])
                if count:
                    color = "white" if normalized[row, col] > 0.5 else "black"
                    axis.text(col, row, count, ha="center", va="center", fontsize=7, color=color)
    figure.colorbar(image, fraction=0.046, pad=0.04, label="fraction of the true class")
    oa = float(counts.diagonal().sum() / counts.sum().clamp(min=1))
    axis.set_title(f"Test confusion matrix (overall accuracy {100 * oa:.2f} %)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class PredictionWriter(BasePredictionWriter):
    """Writes one record per predicted file at the end of ``Trainer.predict``.

    The records are those of :class:`pointsink.inference.Prediction` (and of the
    ``pointsink-predict`` command): ``path, label, probability, topk, error, warning``. They
    are built from each batch's ``path``/``error``/``warning`` entries (see
    :class:`pointsink.inference.ShapePredictionDataset`) and the ``{"index",
    "probabilities"}`` that ``SinkformerClassifier.predict_step`` returns; a file whose
    batch entry has an ``error`` gets an error record instead of a class. Under DDP the
    records of all ranks are gathered, and only rank 0 writes them, sorted by dataset
    index and without duplicates.

    The class names are the model's; when ``Trainer.predict`` restores a checkpoint whose
    class names differ (e.g. a data module that discovered other class folders), the
    :class:`~pointsink.module.SinkformerClassifier` has taken the checkpoint's names, with a
    warning, before the first batch.

    Args:
        output: File to write; None: ``<trainer.log_dir or default_root_dir>/predictions.<ext>``
            (``json``, ``csv`` or ``txt`` for the table).
        format: ``"json"`` (a list of records), ``"csv"`` or ``"table"``.
        top_k: Classes listed per record.
    """

    def __init__(
        self,
        output: str | None = None,
        format: Literal["json", "csv", "table"] = "json",
        top_k: int = 5,
    ) -> None:
        super().__init__(write_interval="batch_and_epoch")
        if format not in ("json", "csv", "table"):
            raise ValueError(f"format must be 'json', 'csv' or 'table'; got {format!r}.")
        check_int("top_k", top_k)
        self.output = output
        self.format = format
        self.top_k = top_k
        #: Where the last run wrote its records (rank 0 only; None before).
        self.last_output: Path | None = None
        #: Records of the last run, and those of files that could not be classified.
        self.last_count = 0
        self.last_failed = 0
        self._records: list[tuple[int, dict[str, Any]]] = []
        self._class_names: list[str] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resets the records and counts and settles the class names."""
        self._records = []
        self.last_count = self.last_failed = 0
        self._class_names = self._resolve_class_names(pl_module)

    @staticmethod
    def _resolve_class_names(pl_module: pl.LightningModule) -> list[str]:
        # A restored checkpoint's names are the module's by now: its on_load_checkpoint
        # adopts them (and warns) before predict starts.
        names = [str(name) for name in getattr(pl_module, "class_names", None) or []]
        if not names:
            num_classes = getattr(pl_module, "num_classes", 0)
            names = [str(index) for index in range(num_classes)]
        return names

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Turns one batch's probabilities into records (kept until the epoch ends)."""
        probabilities = prediction["probabilities"].detach().float().cpu()
        indices = torch.as_tensor(prediction["index"]).reshape(-1).tolist()
        paths = _batch_strings(batch, "path", len(indices))
        errors = _batch_strings(batch, "error", len(indices))
        notes = _batch_strings(batch, "warning", len(indices))
        for row, index in enumerate(indices):
            if errors[row]:
                record = Prediction(path=paths[row], error=errors[row], warning=notes[row])
            else:
                record = make_prediction(
                    paths[row], probabilities[row], self._class_names, self.top_k, notes[row]
                )
            self._records.append((int(index), record.to_dict()))

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Gathers the records of all ranks; rank 0 writes them."""
        records = self._records
        self._records = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        path = self._output_path(trainer)  # on every rank (see run_directory)
        if not trainer.is_global_zero:
            return
        unique = dict(sorted(records, key=lambda pair: pair[0]))  # one per dataset index
        ordered = [Prediction.from_dict(record) for record in unique.values()]
        path.parent.mkdir(parents=True, exist_ok=True)
        # errors: file names not valid in the file system's encoding keep their bytes.
        text = format_predictions(ordered, self.format)
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        self.last_output = path
        self.last_count = len(ordered)
        self.last_failed = sum(1 for record in ordered if record.error is not None)
        rank_zero_info(
            f"Wrote {len(ordered)} prediction(s) ({self.last_failed} could not be classified) "
            f"to {path}"
        )

    def _output_path(self, trainer: pl.Trainer) -> Path:
        if self.output is not None:
            return Path(self.output)
        extension = {"json": "json", "csv": "csv", "table": "txt"}[self.format]
        return run_directory(trainer) / f"predictions.{extension}"


def _batch_strings(batch: Any, key: str, size: int) -> list[str | None]:
    """The batch's list of strings under ``key`` (None for empty strings or a missing key)."""
    values = batch.get(key) if isinstance(batch, dict) else None
    if values is None:
        return [None] * size
    if isinstance(values, str):
        values = [values]
    return [str(value) if value else None for value in values]
