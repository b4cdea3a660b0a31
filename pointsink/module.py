"""LightningModule that trains and evaluates a :class:`~pointsink.model.SetSinkformer`."""

from __future__ import annotations

import inspect
import math
import os
from collections import Counter
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch
import torch.nn.functional as F  # noqa: N812
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from pointsink.attention import AttentionKind, LogitScale, SinkhornMarginals
from pointsink.inference import (
    CheckpointError,
    checkpoint_model_weights,
    load_checkpoint,
    state_dict_differences,
)
from pointsink.model import DEFAULT_N_ITER, SetSinkformer, unused_settings
from pointsink.transforms import mix_point_regions
from pointsink.validation import check_int, check_real, plain_value

__all__ = ["MeanClassAccuracy", "MeanLoss", "SinkformerClassifier"]

Batch = dict[str, Tensor]
OptimizerName = Literal["adamw", "adam"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SchedulerName = Literal["cosine", "step", "none"]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)


class MeanLoss(Metric):
    """Sample-weighted mean of batch losses, added across ranks when computed.

    Unlike :class:`torchmetrics.MeanMetric` it does not drop NaN values: that check reads a
    value back from the device at every update (a host sync in each training step), and a
    diverged loss should show in the log rather than vanish from it.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, loss: Tensor, weight: int) -> None:
        """Adds a batch.

        Args:
            loss: The batch's mean loss, a scalar.
            weight: The batch's sample count.
        """
        self.loss_sum += loss.detach().to(self.loss_sum.dtype) * weight
        self.weight += weight

    def compute(self) -> Tensor:
        """The mean loss per sample."""
        return self.loss_sum / self.weight


class MeanClassAccuracy(Metric):
    """Mean per-class accuracy (recall) over the classes that have samples.

    The ``macro`` average of :class:`~torchmetrics.classification.MulticlassAccuracy` also
    counts, at 0 %, a class without samples that was predicted; mean per-class accuracy is
    the mean over the classes present, as :func:`pointsink.callbacks.confusion_report`
    (``test_report.json``) computes it. It differs when the split lacks a class (few-shot
    data, whose single-shape classes stay out of validation). Per-class counts are
    added across ranks before the mean.

    Counted by comparing the targets with every class index, without ``torch.bincount``
    (which torchmetrics' macro average uses): on CUDA, bincount reads the largest target
    back to the host to size its output, a sync in every training step.

    Args:
        num_classes: Number of classes ``C`` (>= 1).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes)
        zeros = torch.zeros(self.num_classes, dtype=torch.long)
        self.add_state("correct", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("support", zeros.clone(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Counts one batch.

        Args:
            preds: ``(B, C)`` logits or probabilities, or ``(B,)`` predicted labels.
            target: ``(B,)`` labels in ``[0, C)``.
        """
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=-1)
        target = target.reshape(-1)
        # (B, C): row b is one-hot at target b; labels outside [0, C) match no class.
        is_class = target.unsqueeze(-1) == torch.arange(self.num_classes, device=target.device)
        hit = (preds.reshape(-1) == target).unsqueeze(-1)
        self.support += is_class.sum(dim=0)
        self.correct += (is_class & hit).sum(dim=0)

    def compute(self) -> Tensor:
        """The mean, over the classes with samples, of their share classified correctly."""
        present = self.support > 0
        recall = self.correct / self.support.clamp(min=1)
        return (recall * present).sum() / present.sum().clamp(min=1)


class SinkformerClassifier(pl.LightningModule):
    """Shape classifier: cross-entropy training, overall and mean per-class accuracy.

    Every argument is a plain value and is saved with ``save_hyperparameters()``, so
    ``SinkformerClassifier.load_from_checkpoint(path)`` rebuilds the model, class names
    included, from the checkpoint alone.

    Metrics are logged as ``{train,val,test}/oa`` (overall accuracy) and
    ``{train,val,test}/macc`` (mean of per-class accuracies), plus ``{stage}/loss`` (the
    training loss, label smoothing included, so losses compare only between runs with the
    same ``label_smoothing``).

    Args:
        class_names: Class names in label order (linked from the data module by the CLI).
        num_classes: Used only when ``class_names`` is not given.
        num_points: Points per shape the model is trained on (linked from the data module
            by the CLI); stored so that inference samples shapes the same way.
        channels, num_heads, num_blocks, encoder, num_inducing_points, num_seeds,
            attention, n_iter, layer_norm, pooling_attention, dropout, local_neighbors,
            local_channels, num_groups, group_size, normalize_offsets,
            group_hidden_layers, logit_scale, sinkhorn_marginals, pooling_projection: see
            :class:`~pointsink.model.SetSinkformer`.
        optimizer: ``"adamw"`` or ``"adam"``.
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (AdamW) or L2 (Adam).
        scheduler: ``"cosine"`` (linear warm-up, then cosine decay towards
            ``lr * min_lr_ratio`` over the trainer's ``max_epochs``, or the fewer epochs
            ``max_steps`` leaves; the cosine ends at that floor after the last epoch, so
            the last epoch trains just above it), ``"step"`` (divide by 10 at 75 % of
            training, as in the paper's code) or ``"none"``.
        warmup_epochs: Linear warm-up length for ``"cosine"``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for ``"cosine"``.
        label_smoothing: Cross-entropy label smoothing.
        logit_adjustment: Strength ``tau`` of the logit-adjusted loss (Menon et al.,
            "Long-tail learning via logit adjustment", ICLR 2021): the training loss is
            ``cross_entropy(logits + tau * log(prior), target)`` with the class prior
            counted on the training split at the start of fitting, so that the raw logits
            aim at balanced (mean per-class) accuracy rather than the training split's class
            mix. ``0`` turns it off; ``1`` is the value the theory gives. Predictions,
            metrics and evaluation losses always use the raw logits.
        mix_probability: Chance that a training batch is mixed by region
            (:func:`~pointsink.transforms.mix_point_regions`, PointCutMix-K/RSMix style):
            each shape swaps the ``K`` points nearest one of its points for the same region
            of a partner shape from the batch, ``K / N ~ Beta(mix_alpha, mix_alpha)`` per
            batch, and the loss weighs the two labels by ``1 - K/N`` and ``K/N``. ``0``
            turns it off. Training metrics on a mixed batch count the first label. A batch
            with padded point clouds (a ``"mask"``) is not mixed (warned once).
        mix_alpha: Both parameters of the Beta distribution of the mixing ratio (> 0).
        augmentation: Settings of the training augmentation
            (:meth:`~pointsink.transforms.PointCloudAugmentation.settings`, linked from the
            data module by the CLI). Not used by the model; stored so that test-time
            voting at inference augments its views the way training did.
        sample_seed: The data module's ``sample_seed`` (linked by the CLI). Not used by the
            model; stored so that inference samples a file as the training cache did.
        weights: A pointsink checkpoint (``.ckpt``) to fine-tune from: its weights replace
            the initial ones when fitting starts (:meth:`load_pretrained`). Not read when
            resuming with ``ckpt_path`` (the resumed weights win) nor when loading a
            checkpoint, so a fine-tuned checkpoint does not need this file.
        freeze_backbone: Train only the classification head (a linear probe), e.g. on top
            of ``weights``. The frozen body stays in training mode, so its dropout still
            applies while training.
    """

    def __init__(
        self,
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        num_points: int | None = None,
        channels: int = 256,
        num_heads: int = 4,
        num_blocks: int = 2,
        encoder: Literal["isab", "sab"] = "isab",
        num_inducing_points: int = 16,
        num_seeds: int = 1,
        attention: AttentionKind = "sinkhorn",
        n_iter: int = DEFAULT_N_ITER,
        layer_norm: bool = False,
        pooling_attention: AttentionKind | None = None,
        dropout: float = 0.5,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: int = 1,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.0,
        logit_adjustment: float = 0.0,
        mix_probability: float = 0.0,
        mix_alpha: float = 1.0,
        local_neighbors: int = 0,
        local_channels: int = 64,
        num_groups: int = 0,
        group_size: int = 32,
        normalize_offsets: bool = False,
        group_hidden_layers: int = 1,
        logit_scale: LogitScale = "head",
        sinkhorn_marginals: SinkhornMarginals = "attention",
        pooling_projection: bool = True,
        augmentation: dict[str, Any] | None = None,
        sample_seed: int = 0,
        weights: str | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if num_classes is not None and num_classes != len(class_names):
                raise ValueError(
                    f"num_classes={num_classes} disagrees with the {len(class_names)} "
                    "class_names given."
                )
            num_classes = len(class_names)
        if num_classes is None:
            raise ValueError("give class_names (preferred) or num_classes.")
        # Checked here, not when configure_optimizers reads them: an unknown name would
        # otherwise fall through to Adam or the cosine schedule unnoticed.
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}.")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}; got {scheduler!r}.")
        check_int("warmup_epochs", warmup_epochs, minimum=0)
        # Here rather than where they are used: a negative learning rate would fail only when
        # the optimizer is built, a label smoothing above 1 only in the first training step.
        check_real("lr", lr, 0.0)  # 0 freezes the weights (torch allows it; a test uses it)
        check_real("weight_decay", weight_decay, 0.0)
        check_real("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        check_real("label_smoothing", label_smoothing, 0.0, 1.0)
        check_real("logit_adjustment", logit_adjustment, 0.0)
        check_real("mix_probability", mix_probability, 0.0, 1.0)
        check_real("mix_alpha", mix_alpha, 0.0, low_open=True)
        # Saved as plain Python values (no NumPy scalars or paths), so that every checkpoint
        # loads with torch.load(weights_only=True).
        arguments = locals()
        self.save_hyperparameters(
            {
                name: plain_value(arguments[name])
                for name in inspect.signature(SinkformerClassifier.__init__).parameters
                if name != "self"
            }
        )
        self.class_names = class_names or [str(index) for index in range(num_classes)]
        self.num_classes = num_classes
        self._warned_unmixed = False  # said once that padded batches are not region-mixed
        self.model = SetSinkformer(
            num_classes=num_classes,
            channels=channels,
            num_heads=num_heads,
            num_blocks=num_blocks,
            encoder=encoder,
            num_inducing_points=num_inducing_points,
            num_seeds=num_seeds,
            attention=attention,
            n_iter=n_iter,
            layer_norm=layer_norm,
            pooling_attention=pooling_attention,
            dropout=dropout,
            local_neighbors=local_neighbors,
            local_channels=local_channels,
            num_groups=num_groups,
            group_size=group_size,
            normalize_offsets=normalize_offsets,
            group_hidden_layers=group_hidden_layers,
            logit_scale=logit_scale,
            sinkhorn_marginals=sinkhorn_marginals,
            pooling_projection=pooling_projection,
        )
        if freeze_backbone:
            self.model.requires_grad_(False)
            self.model.head.requires_grad_(True)
        metrics = MetricCollection(
            {
                # validate_args=False: the checks call torch.unique on the targets, a host
                # sync in every training step; the labels come from the data module's folders.
                "oa": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                "macc": MeanClassAccuracy(num_classes),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # Epoch-mean losses as metrics: their sums and weights are added across ranks, which
        # stays exact when ranks evaluate different numbers of samples (the unpadded DDP eval
        # sampler) and costs no collective per step. self.log(..., sync_dist=True) would
        # reduce every training step, and truncate the integer sample count of uneven
        # evaluation shards, inflating the loss (Lightning issue #21859).
        self.train_loss, self.val_loss, self.test_loss = MeanLoss(), MeanLoss(), MeanLoss()
        # Synchronized across ranks like the other metrics; read by callbacks (e.g.
        # ConfusionMatrixReport) after testing through `test_confusion_matrix`.
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion_matrix: Tensor | None = None
        # Counted from the training data in on_fit_start; not saved, since only the
        # training loss uses it.
        self.register_buffer("log_class_prior", torch.zeros(num_classes), persistent=False)

    @property
    def min_points(self) -> int:
        """The fewest points per shape the model takes (:attr:`SetSinkformer.min_points`)."""
        return self.model.min_points

    def forward(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, N, 3)`` points -> ``(B, C)`` logits.

        ``mask``: ``(B, N)`` bool, True for the real points of padded sets (see
        :meth:`~pointsink.model.SetSinkformer.forward_features`), or None.
        """
        return self.model(points, mask)

    def _shared_step(
        self, batch: Batch, stage: str, metrics: MetricCollection
    ) -> tuple[Tensor, Tensor]:
        """Loss and logits of one batch; updates and logs the stage's metrics."""
        points, target = batch["points"], batch["label"]
        # A data module of padded sets of different sizes adds "mask" (B, N) to its batches.
        mask = batch.get("mask")
        mixable = mask is None
        if not mixable and stage == "train" and self.hparams.mix_probability > 0.0:
            if not self._warned_unmixed:
                self._warned_unmixed = True
                rank_zero_warn(
                    "region mixing (mix_probability > 0) takes fixed-size sets: batches with "
                    "padded point clouds (smaller than num_points) are not mixed."
                )
        partner_target, partner_weight = None, 0.0
        if stage == "train" and mixable and self._mix_this_batch():
            points, partner_target, partner_weight = self._mix_regions(points, target)
        logits = self(points, mask)
        loss_logits = logits
        if stage == "train" and self.hparams.logit_adjustment:
            loss_logits = logits + self.hparams.logit_adjustment * self.log_class_prior
        smoothing = self.hparams.label_smoothing
        loss = F.cross_entropy(loss_logits, target, label_smoothing=smoothing)
        if partner_target is not None:
            partner_loss = F.cross_entropy(loss_logits, partner_target, label_smoothing=smoothing)
            loss = (1.0 - partner_weight) * loss + partner_weight * partner_loss
        batch_size = target.shape[0]
        metrics.update(logits, target)
        mean_loss = getattr(self, f"{stage}_loss")
        training = stage == "train"
        if training:
            # Called, not updated: the call also gives the batch's value for train/loss_step.
            mean_loss(loss, batch_size)
        else:
            mean_loss.update(loss, batch_size)
        self.log(f"{stage}/loss", mean_loss, on_step=training, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, batch_size=batch_size, on_step=False, on_epoch=True, prog_bar=True)
        return loss, logits

    def _mix_this_batch(self) -> bool:
        # Drawn on the CPU from torch's seeded global RNG: no device sync.
        probability = self.hparams.mix_probability
        return probability > 0.0 and bool(torch.rand(()) < probability)

    def _mix_regions(self, points: Tensor, target: Tensor) -> tuple[Tensor, Tensor, float]:
        """Region-mixed points ``(B, N, 3)``, the partners' labels ``(B,)`` and their weight."""
        batch_size, num_points, _ = points.shape
        # float32 parameters: under bf16-true / 16-true precision the default dtype is a
        # half type, for which torch has no Beta (Dirichlet) sampler. The draws are the
        # same as with float arguments under the usual float32 default.
        alpha = torch.tensor(self.hparams.mix_alpha, dtype=torch.float32)
        ratio = float(torch.distributions.Beta(alpha, alpha).sample())
        num_replaced = round(ratio * num_points)
        # Drawn on the points' device: copying CPU-drawn indices to a GPU waits for it.
        partner = torch.randperm(batch_size, device=points.device)
        center_index = torch.randint(num_points, (batch_size,), device=points.device)
        centers = points[torch.arange(batch_size, device=points.device), center_index]
        mixed = mix_point_regions(points, points[partner], num_replaced, centers)
        return mixed, target[partner], num_replaced / num_points

    def on_fit_start(self) -> None:
        """Loads ``weights`` to fine-tune from; counts the class prior for logit adjustment."""
        # trainer.ckpt_path is set when resuming: the restored weights must stay.
        if self.hparams.get("weights") and self.trainer.ckpt_path is None:
            carried = self.load_pretrained(self.hparams.weights)
            rank_zero_info(
                f"Fine-tuning from {self.hparams.weights}: head rows carried over for "
                f"{len(carried)} of {self.num_classes} classes"
                + (f" ({', '.join(carried)})." if carried else "; the head starts fresh.")
            )
        if self.hparams.logit_adjustment:
            self._count_class_prior()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        class_names: list[str],
        **overrides: Any,
    ) -> SinkformerClassifier:
        """A classifier of new classes built like a checkpoint's model, from its weights.

        Python's counterpart of ``train.py fit --model.weights CKPT`` with the config that
        trained the checkpoint: every hyperparameter (architecture, optimizer, schedule, point
        count, augmentation) is the checkpoint's unless given in ``overrides``, the classes
        are ``class_names``, and :meth:`load_pretrained` then copies the body's weights and
        the head rows of the classes both know, by name. ``weights`` records ``path``.

        Args:
            path: A ``.ckpt`` written by ``train.py fit``.
            class_names: The new classifier's classes, in label order.
            **overrides: Other :class:`SinkformerClassifier` arguments, e.g. ``lr=3e-4``,
                ``freeze_backbone=True`` or ``num_points`` (match your data module's).

        Returns:
            The classifier, ready for ``Trainer.fit``.

        Raises:
            CheckpointError: As :meth:`load_pretrained`; also when an override changes the
                architecture.
            TypeError: An override that is not an argument of this class.
        """
        arguments = set(default_hparams())
        unknown = sorted(set(overrides) - arguments)
        if unknown:
            raise TypeError(f"{unknown} are not arguments of {cls.__name__}.")
        checkpoint = load_checkpoint(path)
        saved = checkpoint.get("hyper_parameters")
        saved = saved if isinstance(saved, dict) else {}
        settings = {name: value for name, value in saved.items() if name in arguments}
        for name in ("class_names", "num_classes", "weights"):  # this model's own
            settings.pop(name, None)
        settings["freeze_backbone"] = False  # a frozen base is not a reason to freeze anew
        settings.update(overrides)
        module = cls(class_names=list(class_names), **{**settings, "weights": str(path)})
        module._load_pretrained_checkpoint(checkpoint, path)  # the file is read once
        return module

    def load_pretrained(self, path: str | os.PathLike[str]) -> list[str]:
        """Starts from another pointsink checkpoint's weights (fine-tuning).

        Every weight but the classification head must fit this model, and the checkpoint
        must have the same architecture hyperparameters (``channels``, ``num_groups``,
        ``normalize_offsets``, ...); ``attention``, ``pooling_attention``, ``n_iter``,
        ``logit_scale``, ``sinkhorn_marginals`` and ``dropout`` may differ, and so may
        settings that build nothing in either model (:func:`pointsink.model.unused_settings`,
        e.g. ``group_size`` without groups).
        The head's rows are carried over by class name for the classes both know; the others
        keep their fresh initialization, so a model trained on ModelNet10 can start a
        classifier of other classes. Read with a weights-only ``torch.load``.

        Args:
            path: A ``.ckpt`` written by ``train.py fit``.

        Returns:
            The class names whose head rows came from the checkpoint, in label order.

        Raises:
            CheckpointError: The file is unreadable, has no weights, or its weights or
                architecture hyperparameters differ from this model's (the message names the
                differing hyperparameters).
        """
        return self._load_pretrained_checkpoint(load_checkpoint(path), path)

    def _load_pretrained_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str]
    ) -> list[str]:
        """:meth:`load_pretrained` on a checkpoint already read from ``path`` (for messages)."""
        found = checkpoint_model_weights(checkpoint, path)
        own = self.model.state_dict()
        weights = _without_head(found)
        problems = state_dict_differences(_without_head(own), weights)
        saved = checkpoint.get("hyper_parameters")
        saved = saved if isinstance(saved, dict) else {}
        if saved:
            # A checkpoint saved before a setting existed was trained with its default.
            saved = {**default_hparams(), **saved}
        architecture = inspect.signature(SetSinkformer.__init__).parameters
        # Settings without weights still shape what the weights see (the grouping of the
        # points, the offsets' scale), so they must match too; these may differ.
        free = {"num_classes", "attention", "pooling_attention", "n_iter", "dropout"}
        free |= {"logit_scale", "sinkhorn_marginals"}
        free |= unused_settings(saved) & unused_settings(self.hparams)
        differing = [
            f"{key}={saved[key]!r} there, {self.hparams.get(key)!r} here"
            for key in architecture
            if key in saved and key not in free and saved[key] != self.hparams.get(key)
        ]
        if problems or differing:
            raise CheckpointError(
                f"{path}: "
                + (
                    f"its weights do not fit this model ({'; '.join(problems)})"
                    if problems
                    else "it was trained with other model settings"
                )
                + "; give the model the checkpoint's architecture, e.g. with the config it "
                "was trained with (in Python, SinkformerClassifier.from_pretrained builds it); "
                "only attention, pooling_attention, n_iter, logit_scale, sinkhorn_marginals "
                "and dropout may differ"
                + (f". Model settings that differ: {'; '.join(differing)}." if differing else ".")
            )
        head_weight = own["head.weight"].clone()
        head_bias = own["head.bias"].clone()
        old_names = saved.get("class_names")
        old_weight, old_bias = found.get("head.weight"), found.get("head.bias")
        carried = []
        if (
            isinstance(old_names, (list, tuple))
            and isinstance(old_weight, Tensor)
            and isinstance(old_bias, Tensor)
            and old_weight.shape == (len(old_names), head_weight.shape[1])
        ):
            old_rows = {str(name): row for row, name in enumerate(old_names)}
            for row, name in enumerate(self.class_names):
                if name in old_rows:
                    head_weight[row] = old_weight[old_rows[name]]
                    head_bias[row] = old_bias[old_rows[name]]
                    carried.append(name)
        weights.update({"head.weight": head_weight, "head.bias": head_bias})
        self.model.load_state_dict(weights, strict=True)
        return carried

    def _count_class_prior(self) -> None:
        """Counts the training split's class prior for the logit-adjusted loss."""
        datamodule = getattr(self.trainer, "datamodule", None)
        labels = getattr(getattr(datamodule, "train_dataset", None), "labels", None)
        if labels is None:
            raise ValueError(
                "logit_adjustment needs the class prior of the training data: fit with a "
                "data module whose train_dataset has a `labels` tensor."
            )
        labels = torch.as_tensor(labels).long()
        counts = torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        if bool((counts == 0).any()):
            missing = [self.class_names[i] for i in range(self.num_classes) if counts[i] == 0]
            raise ValueError(
                f"logit_adjustment needs every class in the training data; none of: {missing}."
            )
        prior = counts.double() / counts.sum()
        self.log_class_prior.copy_(prior.log().to(self.log_class_prior))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """One optimization step's loss."""
        return self._shared_step(batch, "train", self.train_metrics)[0]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulates validation metrics."""
        self._shared_step(batch, "val", self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulates test metrics."""
        _, logits = self._shared_step(batch, "test", self.test_metrics)
        self.test_confusion.update(logits, batch["label"])

    def on_test_epoch_start(self) -> None:
        """Starts a fresh confusion matrix."""
        self.test_confusion.reset()
        self.test_confusion_matrix = None

    def on_test_epoch_end(self) -> None:
        """Keeps the synchronized confusion matrix ``(C, C)`` (rows: true, columns: predicted)."""
        self.test_confusion_matrix = self.test_confusion.compute().cpu()

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Class probabilities ``(B, C)`` with the batch's ``index`` for mapping to files."""
        # float32 before the softmax: under bf16 autocast it would round to steps of 2**-8.
        probabilities = self(batch["points"], batch.get("mask")).float().softmax(dim=-1)
        return {"index": batch["index"], "probabilities": probabilities}

    def configure_optimizers(self) -> Any:
        """Adam/AdamW with a warm-up + cosine or a step schedule, stepped per epoch."""
        hparams = self.hparams
        optimizer_class = torch.optim.AdamW if hparams.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(
            self.parameters(), lr=hparams.lr, weight_decay=hparams.weight_decay
        )
        if hparams.scheduler == "none":
            return optimizer
        if hparams.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=[self._step_milestone()], gamma=0.1
            )
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._cosine_factor())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def _schedule_epochs(self) -> int:
        """The epochs the per-epoch schedules span: the epochs the run will train.

        That is the trainer's ``max_epochs``, or fewer when ``max_steps`` ends the run
        first (then the epochs its steps take, the last one counted even if cut short).
        """
        trainer = self.trainer
        max_epochs = None if trainer.max_epochs in (None, -1) else trainer.max_epochs
        if trainer.max_steps not in (None, -1):
            if trainer.train_dataloader is None:
                trainer.fit_loop.setup_data()  # as trainer.estimated_stepping_batches does
            batches = trainer.num_training_batches
            if batches != float("inf") and batches > 0:
                steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
                step_epochs = max(1, math.ceil(trainer.max_steps / steps_per_epoch))
                return step_epochs if max_epochs is None else min(step_epochs, max_epochs)
        if max_epochs is None:
            rank_zero_warn(
                "Neither trainer.max_epochs nor a max_steps with a sized training loader is "
                "set: the learning-rate schedule, which is per epoch, assumes 100 epochs. "
                "Set --trainer.max_epochs."
            )
            return 100
        return max_epochs

    def _step_milestone(self) -> int:
        return max(1, int(0.75 * self._schedule_epochs()))

    def _cosine_factor(self) -> _WarmupCosine:
        hparams = self.hparams
        return _WarmupCosine(hparams.warmup_epochs, self._schedule_epochs(), hparams.min_lr_ratio)

    def on_train_start(self) -> None:
        """Fits a restored schedule to this run's ``max_epochs``.

        Resuming restores the scheduler's state, which holds the epoch count it was built
        for; a run extended with a larger ``--trainer.max_epochs`` would otherwise stay on
        the old schedule (e.g. at the cosine's floor for every added epoch). Nothing changes
        when the count is the same.
        """
        if self.trainer.max_epochs in (None, -1) and self.trainer.max_steps in (None, -1):
            return  # no length to fit to (configure_optimizers warned)
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                factor = self._cosine_factor()
                if not isinstance(scheduler.lr_lambdas[0], _WarmupCosine) or (
                    vars(scheduler.lr_lambdas[0]) == vars(factor)
                ):
                    continue
                scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
                values = [base * factor(scheduler.last_epoch) for base in scheduler.base_lrs]
            elif isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR):
                milestone = self._step_milestone()
                if list(scheduler.milestones) == [milestone]:
                    continue
                scheduler.milestones = Counter([milestone])
                decays = int(scheduler.last_epoch >= milestone)
                values = [base * scheduler.gamma**decays for base in scheduler.base_lrs]
            else:
                continue
            for group, value in zip(scheduler.optimizer.param_groups, values, strict=True):
                group["lr"] = value
            rank_zero_info(
                f"Learning-rate schedule refitted to max_epochs={self._schedule_epochs()} "
                f"(the restored one was built for another count)."
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checks a restored checkpoint's class names (and order) against the model's.

        Under ``train.py test/validate/fit --ckpt_path`` the model is built from the data's
        class names and only the weights come from the checkpoint: a reordered or renamed
        class list would silently score head row ``i`` as the data's class ``i``. Under
        ``predict`` there are no labels to score: the model takes the checkpoint's class
        names (with a warning), so that predictions are named as the weights were trained.
        """
        saved = (checkpoint.get("hyper_parameters") or {}).get("class_names")
        if saved is None:
            return
        saved = [str(name) for name in saved]
        if saved == self.class_names:
            return
        trainer = self._trainer  # None when loaded outside a trainer (load_from_checkpoint)
        if trainer is not None and trainer.predicting:
            rank_zero_warn(
                f"The checkpoint was trained with the classes {saved}, but the model was "
                f"built with {self.class_names}; predictions are named after the checkpoint's "
                "classes."
            )
            self.class_names = saved
            return
        if sorted(saved) == sorted(self.class_names):
            advice = "Give --data.class_names in the checkpoint's order."
        else:
            advice = (
                "It cannot score these classes: use the checkpoint trained on them (e.g. the "
                "one fine-tuned on this data), or the data it was trained on."
            )
        raise CheckpointError(
            f"The checkpoint was trained on the classes {saved} (in this label "
            f"order), but the model was built for {self.class_names} from the data. {advice}"
        )


def default_hparams() -> dict[str, Any]:
    """:class:`SinkformerClassifier`'s arguments and their defaults.

    A checkpoint saved before an argument existed was trained with its default, so this
    fills the gaps of older checkpoints' hyperparameters.
    """
    parameters = inspect.signature(SinkformerClassifier.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _without_head(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A :class:`~pointsink.model.SetSinkformer` state dict without the classification head."""
    return {key: value for key, value in state_dict.items() if not key.startswith("head.")}


class _WarmupCosine:
    """Learning-rate factor: linear warm-up, then cosine decay to ``min_ratio``.

    A picklable callable (not a lambda) so the scheduler state can be checkpointed.
    """

    def __init__(self, warmup_epochs: int, max_epochs: int, min_ratio: float) -> None:
        self.warmup_epochs = warmup_epochs
        self.max_epochs = max(1, max_epochs)
        self.min_ratio = min_ratio

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        span = max(1, self.max_epochs - self.warmup_epochs)
        progress = min(1.0, (epoch - self.warmup_epochs) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine
