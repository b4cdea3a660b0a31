import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix

from pointsink.attention import MultiheadAttention
from pointsink.callbacks import (
    DoublyStochasticMonitor,
    confusion_report,
    doubly_stochastic_deviation,
    marginal_deviation,
)
from pointsink.inference import CheckpointError
from pointsink.module import MeanClassAccuracy, MeanLoss, SinkformerClassifier
from pointsink.transforms import mix_point_regions

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cone", "cube", "sphere"]


def _loader(
    num_samples: int = 24, num_points: int = 16, labels: torch.Tensor | None = None
) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    if labels is None:
        labels = torch.arange(num_samples) % len(CLASSES)
    num_samples = len(labels)
    # Class-dependent scale makes the toy problem learnable.
    points = torch.randn(num_samples, num_points, 3, generator=generator) * (labels + 1).view(
        -1, 1, 1
    )
    samples = [{"points": points[i], "label": labels[i], "index": i} for i in range(num_samples)]
    return DataLoader(samples, batch_size=8)


def _quiet_trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    """A trainer without logger, progress bar or model summary, writing under ``tmp_path``."""
    quiet = {
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**quiet, **kwargs})


def _without_logging(module: SinkformerClassifier) -> SinkformerClassifier:
    """Lets ``_shared_step`` run outside a trainer: ``self.log`` would need one."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    return module


def _module(**kwargs: object) -> SinkformerClassifier:
    defaults = {"class_names": CLASSES, "channels": 16, "num_heads": 2, "num_inducing_points": 4}
    return SinkformerClassifier(**{**defaults, **kwargs})


def test_hyperparameters_are_plain_values() -> None:
    module = _module()
    for value in module.hparams.values():
        assert value is None or isinstance(value, (int, float, str, bool, list))
    assert module.hparams.class_names == CLASSES
    assert module.num_classes == 3


def test_numpy_and_path_arguments_are_saved_as_plain_values(tmp_path: Path) -> None:
    # As a sweep or a script passes them: NumPy scalars and a path.
    module = _module(lr=np.float64(3e-4), num_points=np.int64(64), weights=tmp_path / "w.ckpt")
    assert type(module.hparams.lr) is float and module.hparams.lr == 3e-4
    assert type(module.hparams.num_points) is int
    assert module.hparams.weights == str(tmp_path / "w.ckpt")
    path = tmp_path / "hparams.pt"
    torch.save({"hyper_parameters": dict(module.hparams)}, path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["lr"] == 3e-4


def test_checkpoint_of_other_classes_is_refused(tmp_path: Path) -> None:
    module = _module()
    trainer = _quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, _loader(), _loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    # What `train.py test --ckpt_path` builds when the data lists the classes in another order.
    reordered = _module(class_names=list(reversed(CLASSES)))
    with pytest.raises(CheckpointError, match=r"trained on the classes \['cone', 'cube'") as info:
        _quiet_trainer(tmp_path).test(reordered, _loader(), ckpt_path=path)
    assert "in the checkpoint's order" in str(info.value)
    # Other classes altogether (e.g. the base model tested on fine-tuning data): no reordering
    # helps, so the message says which checkpoint to use instead.
    renamed = _module(class_names=[f"{name}2" for name in CLASSES])
    with pytest.raises(CheckpointError, match="cannot score these classes") as info:
        _quiet_trainer(tmp_path).test(renamed, _loader(), ckpt_path=path)
    assert "order" not in str(info.value).split("data. ")[-1]
    _quiet_trainer(tmp_path).test(_module(), _loader(), ckpt_path=path)  # same classes: fine
    # predict scores nothing: the model takes the checkpoint's names, so outputs carry them.
    with pytest.warns(UserWarning, match="named after the checkpoint's classes"):
        predicted = _quiet_trainer(tmp_path).predict(reordered, _loader(), ckpt_path=path)
    assert len(predicted) == len(_loader())
    assert reordered.class_names == CLASSES


class _LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.by_epoch: dict[int, float] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.by_epoch[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("scheduler", ["cosine", "step"])
def test_resumed_fit_follows_a_larger_max_epochs(tmp_path: Path, scheduler: str) -> None:
    settings = {"scheduler": scheduler, "warmup_epochs": 0, "lr": 1e-2}
    short = _quiet_trainer(tmp_path, max_epochs=2, enable_checkpointing=False)
    short.fit(_module(**settings), _loader(num_samples=8))
    path = tmp_path / "short.ckpt"
    short.save_checkpoint(path)

    resumed_rates, fresh_rates = _LearningRates(), _LearningRates()
    resumed = _quiet_trainer(tmp_path, max_epochs=8, callbacks=[resumed_rates])
    resumed.fit(_module(**settings), _loader(num_samples=8), ckpt_path=path)
    fresh = _quiet_trainer(tmp_path, max_epochs=8, callbacks=[fresh_rates])
    fresh.fit(_module(**settings), _loader(num_samples=8))
    # The extended run's learning rates are those of a run planned for 8 epochs from the start.
    assert sorted(resumed_rates.by_epoch) == list(range(2, 8))
    for epoch, rate in resumed_rates.by_epoch.items():
        assert rate == pytest.approx(fresh_rates.by_epoch[epoch], rel=1e-9), epoch
    # The old schedule (2 epochs) is at its end by epoch 2, which the check above would catch.
    assert resumed_rates.by_epoch[2] > 0.2 * 1e-2


@pytest.mark.parametrize(
    ("max_steps", "accumulate"),
    [(6, 1), (5, 1), (2, 3)],  # whole epochs; the second cut short; one step per epoch
)
def test_schedule_spans_the_epochs_that_max_steps_leaves(
    tmp_path: Path, max_steps: int, accumulate: int
) -> None:
    # 3 batches per epoch: these max_steps end the run after 2 of the 100 max_epochs, so the
    # cosine must decay over those 2 epochs (over 100 it would stay near its peak, over 1
    # it would reach its floor of 0 in the second).
    rates = _LearningRates()
    trainer = _quiet_trainer(
        tmp_path,
        max_epochs=100,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=False,
        callbacks=[rates],
    )
    settings = {"scheduler": "cosine", "warmup_epochs": 0, "lr": 1e-2, "min_lr_ratio": 0.0}
    trainer.fit(_module(**settings), _loader(num_samples=24))
    assert trainer.current_epoch == 2
    assert rates.by_epoch == pytest.approx({0: 1e-2, 1: 0.5e-2})


def test_predicted_probabilities_are_float32_under_bf16_autocast() -> None:
    module = _module().eval()
    batch = next(iter(_loader()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probabilities = module.predict_step(batch, 0)["probabilities"]
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(probabilities)))


def test_class_names_and_num_classes_must_agree() -> None:
    with pytest.raises(ValueError, match="disagrees"):
        SinkformerClassifier(class_names=CLASSES, num_classes=4)
    with pytest.raises(ValueError, match="class_names"):
        SinkformerClassifier()


def test_fit_checkpoint_reload_weights_only(tmp_path) -> None:
    module = _module(
        attention="sinkhorn",
        n_iter=3,
        scheduler="step",
        local_neighbors=4,
        num_groups=8,
        group_size=4,
    )
    trainer = _quiet_trainer(
        tmp_path, max_epochs=2, callbacks=[DoublyStochasticMonitor(plot=False)]
    )
    trainer.fit(module, _loader(), _loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == CLASSES
    restored = SinkformerClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    assert restored.class_names == CLASSES
    assert restored.hparams.n_iter == 3
    assert restored.hparams.local_neighbors == 4
    assert restored.hparams.num_groups == 8
    points = next(iter(_loader()))["points"]
    module.eval()
    torch.testing.assert_close(restored(points), module(points))
    # The monitor logged one value per attention layer: 2 ISAB x 2 MAB + PMA.
    logged = [key for key in trainer.callback_metrics if key.startswith("ds/")]
    assert len(logged) == 2 * 5


def test_metrics_are_overall_and_mean_per_class(tmp_path) -> None:
    torch.manual_seed(0)  # an untrained model whose errors make the two accuracies differ
    module = _module()
    trainer = _quiet_trainer(tmp_path)
    # 12, 8 and 4 shapes: with unequal classes the two accuracies differ.
    labels = torch.tensor([0, 1, 0, 2, 0, 1] * 4)
    (result,) = trainer.test(module, _loader(labels=labels))
    assert set(result) >= {"test/oa", "test/macc", "test/loss"}
    # Recompute both accuracies by hand from the predictions.
    module.eval()
    batches = list(_loader(labels=labels))
    with torch.no_grad():
        preds = torch.cat([module(b["points"]).argmax(-1) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    overall = (preds == labels).float().mean().item()
    per_class = [(preds[labels == c] == c).float().mean().item() for c in range(3)]
    assert result["test/oa"] == pytest.approx(overall, abs=1e-6)
    assert result["test/macc"] == pytest.approx(sum(per_class) / 3, abs=1e-6)
    assert overall != pytest.approx(sum(per_class) / 3, abs=1e-3)


def test_mean_class_accuracy_averages_the_classes_with_samples() -> None:
    # Class 2 has no samples but is predicted once: torchmetrics' macro average would
    # count it at 0 % (0.5); mean per-class accuracy is (1/2 + 2/2) / 2, as the test report's.
    predictions, targets = torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 1, 1])
    metric = MeanClassAccuracy(3)
    assert metric(predictions, targets).item() == pytest.approx(0.75)
    report = confusion_report(MulticlassConfusionMatrix(3)(predictions, targets), "abc")
    assert report["mean_class_accuracy"] == pytest.approx(0.75)
    # Accumulated over batches (and ranks: per-class counts are summed before the mean),
    # logits as input.
    metric = MeanClassAccuracy(3)
    logits = torch.nn.functional.one_hot(predictions, 3).float()
    metric.update(logits[:2], targets[:2])
    metric.update(logits[2:], targets[2:])
    assert metric.compute().item() == pytest.approx(0.75)


# Calls that read a device tensor back to the host (on CUDA a sync that stalls the
# training loop): Python conversions, and ops whose output size depends on the data.
HOST_SYNCS = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__",
              "__int__", "__index__", "nonzero", "cpu", "numpy")] + [
              (torch, name) for name in ("nonzero", "unique", "bincount", "masked_select",
              "argwhere")]  # fmt: skip


# The same inside torch's C++ (x[mask] runs nonzero there, out of the patches' reach): the
# operators that read data back or size their output by it, and indexing by a bool tensor.
HOST_SYNC_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select",
                 "aten::unique_dim", "aten::_unique2", "aten::unique_consecutive",
                 "aten::bincount", "aten::repeat_interleave", "aten::is_nonzero"}  # fmt: skip
INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class _RefuseHostSyncOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name in INDEX_OPS and len(args) > 1 else ()
        bool_index = any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices
        )
        if name in HOST_SYNC_OPS or bool_index:
            raise AssertionError(f"host-syncing operator {name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _refuse_host_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(name: str):
        def call(*args, **kwargs):
            raise AssertionError(f"host-syncing call {name}")

        return call

    for owner, name in HOST_SYNCS:
        monkeypatch.setattr(owner, name, refuse(name))
    try:
        with _RefuseHostSyncOps():
            yield
    finally:
        monkeypatch.undo()


def test_host_sync_guard_sees_syncs_inside_torch(monkeypatch) -> None:
    # Bool-mask indexing calls no patched Python function; the dispatch mode still sees it.
    values, mask = torch.arange(4.0), torch.tensor([True, False, True, False])
    for sync in (lambda: values[mask], lambda: values.masked_fill(mask, 0).sum().item()):
        with pytest.raises(AssertionError, match="host-syncing"), _refuse_host_syncs(monkeypatch):
            sync()
    with _refuse_host_syncs(monkeypatch):
        values.masked_fill(mask, 0.0).sum()  # a sync-free op passes


def test_mean_class_accuracy_needs_no_host_sync(monkeypatch) -> None:
    # On CUDA, torch.bincount (torchmetrics' macro average) and torch.unique read values
    # back to the host: a sync in every training step. The counts must not use them.
    generator = torch.Generator().manual_seed(0)
    metric = MeanClassAccuracy(5)
    batches = []
    for batch_size in (1, 7, 16):
        logits = torch.randn(batch_size, 5, generator=generator)
        # Class 4 never occurs, and class 3 only in some batches.
        batches.append((logits, torch.randint(0, 4, (batch_size,), generator=generator)))
    with _refuse_host_syncs(monkeypatch):
        for batch in batches:
            metric.update(*batch)
        value = metric.compute()
    expected = MulticlassConfusionMatrix(5)
    for batch in batches:
        expected.update(*batch)
    report = confusion_report(expected.compute(), "abcde")
    assert value.item() == pytest.approx(report["mean_class_accuracy"])


@pytest.mark.parametrize("padded", [False, True])
def test_training_step_and_backward_need_no_host_sync(monkeypatch, padded: bool) -> None:
    # The recipe's model (narrower), logit adjustment on; padded sets take the masked paths.
    recipe = yaml.safe_load((REPO / "configs" / "modelnet10.yaml").read_text())["model"]
    recipe.update(channels=32, num_heads=2, num_groups=16, group_size=8, logit_adjustment=1.0,
                  mix_probability=0.0)  # fmt: skip
    module = SinkformerClassifier(class_names=CLASSES, num_points=64, **recipe).train()
    module.log = module.log_dict = lambda *args, **kwargs: None  # no trainer attached
    batch = {"points": torch.randn(3, 64, 3), "label": torch.tensor([0, 1, 2])}
    if padded:
        batch["mask"] = torch.arange(64) < torch.tensor([[64], [40], [30]])
    with _refuse_host_syncs(monkeypatch):
        module.training_step(batch, 0).backward()
        # Region mixing draws its ratio on the CPU on purpose; the mixing itself runs on the
        # points' device.
        points = batch["points"]
        mixed = mix_point_regions(points, points.flip(0), 20, points[:, 0])
    assert module.model.head.weight.grad.abs().sum() > 0 and mixed.shape == (3, 64, 3)


def test_mean_loss_weights_batches_by_size_and_keeps_nan() -> None:
    mean_loss = MeanLoss()
    # The call returns the batch's own value (train/loss_step) and accumulates it.
    assert mean_loss(torch.tensor(1.0), 8) == 1.0
    mean_loss.update(torch.tensor(4.0, dtype=torch.bfloat16), 2)
    assert mean_loss.compute() == pytest.approx((8 * 1.0 + 2 * 4.0) / 10)
    mean_loss.update(torch.tensor(float("nan")), 1)  # a diverged step shows
    assert mean_loss.compute().isnan()


def test_doubly_stochastic_deviation() -> None:
    uniform = torch.full((2, 4, 8), 1 / 8)
    col_dev, row_dev = doubly_stochastic_deviation(uniform)
    assert col_dev == pytest.approx(0.0) and row_dev == pytest.approx(0.0)
    peaked = torch.zeros(4, 8)
    peaked[:, 0] = 1.0
    col_dev, row_dev = doubly_stochastic_deviation(peaked)
    # Column sums: 4 then zeros, target 0.5: mean |dev| = (3.5 + 7 * 0.5) / 8 = 0.875.
    assert col_dev == pytest.approx(0.875 / 0.5) and row_dev == pytest.approx(0.0)
    # Rows off by +0.5 and -0.5, columns exact: the deviations are absolute, not signed.
    columns_only = torch.tensor([[0.75, 0.75], [0.25, 0.25]])
    col_dev, row_dev = doubly_stochastic_deviation(columns_only)
    assert col_dev == pytest.approx(0.0) and row_dev == pytest.approx(0.5)
    # The same with a padded query and key (their sums, 9 and 7, are left out).
    real = torch.tensor([[True, True, False]])
    col_dev, row_dev = marginal_deviation(
        torch.tensor([[1.5, 0.5, 9.0]]), torch.tensor([[1.0, 1.0, 7.0]]),
        query_mask=real, key_mask=real,
    )  # fmt: skip
    assert col_dev == pytest.approx(0.0) and row_dev == pytest.approx(0.5)


def test_masked_marginal_deviation_counts_only_sets_with_a_target() -> None:
    # Relative to each set's n' / m', like the unmasked deviation: 4 real queries, 2 real keys.
    rows, columns = torch.ones(1, 4), torch.tensor([[2.5, 1.5]])
    real_rows, real_columns = torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    masked = marginal_deviation(rows, columns, query_mask=real_rows, key_mask=real_columns)
    assert [float(d) for d in masked] == [float(d) for d in marginal_deviation(rows, columns)]
    assert [float(d) for d in masked] == [0.25, 0.0]
    # A set without real queries has no column target; one without real keys no row target.
    rows = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    columns = torch.tensor([[1.5, 0.5], [0.0, 0.0], [0.0, 0.0]])
    query_mask = torch.tensor([[True, True], [False, False], [True, True]])
    key_mask = torch.tensor([[True, True], [True, True], [False, False]])
    col_dev, row_dev = marginal_deviation(rows, columns, query_mask=query_mask, key_mask=key_mask)
    assert float(col_dev) == pytest.approx(0.5) and float(row_dev) == 0.0


def _monitored(monitor: DoublyStochasticMonitor, module: SinkformerClassifier, batches) -> dict:
    """What ``monitor`` logs for one validation epoch over ``batches``, hooks called by hand."""
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    monitor.on_validation_epoch_start(None, module)
    with torch.no_grad():
        for index, points in enumerate(batches):
            module(points)
            monitor.on_validation_batch_end(None, module, None, None, index)
    monitor.on_validation_epoch_end(None, module)
    return logged


def test_doubly_stochastic_monitor_averages_its_first_num_batches() -> None:
    module = _module(attention="softmax").eval()
    batches = [torch.randn(4, 16, 3) * scale for scale in (1.0, 3.0, 9.0)]
    alone = [_monitored(DoublyStochasticMonitor(plot=False), module, [b]) for b in batches]
    two = _monitored(DoublyStochasticMonitor(num_batches=2, plot=False), module, batches)
    assert two.keys() == alone[0].keys() and any("col_dev" in key for key in two)
    for key, value in two.items():
        assert value == pytest.approx((alone[0][key] + alone[1][key]) / 2, rel=1e-6)
    assert any(alone[0][key] != pytest.approx(alone[1][key]) for key in two)
    # The layers stop keeping marginals after the measured batches and at the epoch's end,
    # also when the epoch has fewer batches than num_batches.
    layers = [m for m in module.modules() if isinstance(m, MultiheadAttention)]
    assert layers and not any(layer.record_marginals for layer in layers)
    monitor = DoublyStochasticMonitor(num_batches=2, plot=False)
    monitor.on_validation_epoch_start(None, module)
    with torch.no_grad():
        for index, points in enumerate(batches):
            module(points)
            monitor.on_validation_batch_end(None, module, None, None, index)
            recording = [layer.record_marginals for layer in layers]
            assert recording == [index == 0] * len(layers)
    monitor.on_validation_epoch_start(None, module)
    monitor.on_validation_epoch_end(None, module)
    assert not any(layer.record_marginals or layer.last_marginals for layer in layers)
    # Measuring no batch would record all epoch and log nothing: refused.
    for count in (0, -3):
        with pytest.raises(ValueError, match="num_batches"):
            DoublyStochasticMonitor(num_batches=count)


def test_confusion_report_accuracies() -> None:
    from pointsink.callbacks import confusion_report

    matrix = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    report = confusion_report(matrix, CLASSES)
    assert report["overall_accuracy"] == pytest.approx(11 / 14)
    # The class without test samples has no accuracy (not 0 %) and does not drag the mean down.
    assert report["per_class"]["sphere"] is None
    assert report["per_class"]["cone"] == pytest.approx(0.8)
    assert report["per_class"]["cube"] == pytest.approx(0.75)
    assert report["mean_class_accuracy"] == pytest.approx((0.8 + 0.75) / 2)
    assert report["support"] == {"cone": 10, "cube": 4, "sphere": 0}
    empty = confusion_report(torch.zeros(3, 3, dtype=torch.long), CLASSES)
    assert empty["overall_accuracy"] is None and empty["mean_class_accuracy"] is None
    assert set(empty["per_class"].values()) == {None}


class _LabelledData(pl.LightningDataModule):
    """Training data with a known class mix: 6 cones, 3 cubes, 1 sphere."""

    def __init__(self, counts: tuple[int, ...] = (6, 3, 1)) -> None:
        super().__init__()
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        points = torch.randn(len(labels), 16, 3, generator=torch.Generator().manual_seed(0))
        self.train_dataset = SimpleNamespace(labels=labels)
        self.samples = [
            {"points": p, "label": y, "index": i}
            for i, (p, y) in enumerate(zip(points, labels, strict=True))
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=5)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def _fit_one_step(
    module: SinkformerClassifier, datamodule: pl.LightningDataModule, tmp_path: Path
) -> pl.Trainer:
    trainer = _quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_logit_adjustment_uses_the_training_prior(tmp_path) -> None:
    module = _module(logit_adjustment=0.5)
    _fit_one_step(module, _LabelledData(), tmp_path)
    expected = torch.tensor([0.6, 0.3, 0.1]).log()
    torch.testing.assert_close(module.log_class_prior, expected)

    # Only the training loss sees the shift: tau * log(prior) added to the logits.
    batch = {"points": torch.randn(4, 16, 3), "label": torch.tensor([0, 1, 2, 2])}
    module.eval()
    logits = module(batch["points"])
    _without_logging(module)
    train_loss, _ = module._shared_step(batch, "train", module.train_metrics)
    val_loss, _ = module._shared_step(batch, "val", module.val_metrics)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(train_loss, ce(logits + 0.5 * expected, batch["label"]))
    torch.testing.assert_close(val_loss, ce(logits, batch["label"]))
    assert not torch.allclose(train_loss, val_loss)
    # The prior is not part of the checkpoint: inference never uses it.
    assert "log_class_prior" not in module.state_dict()


def test_logit_adjustment_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        _module(logit_adjustment=-1.0)
    with pytest.raises(ValueError, match=r"every class.*sphere"):
        _fit_one_step(_module(logit_adjustment=1.0), _LabelledData((6, 3, 0)), tmp_path)
    plain = _LabelledData()
    plain.train_dataset = None
    with pytest.raises(ValueError, match="class prior"):
        _fit_one_step(_module(logit_adjustment=1.0), plain, tmp_path)
    # Off by default: nothing is counted and the data module needs no labels.
    module = _module()
    _fit_one_step(module, plain, tmp_path)
    assert torch.equal(module.log_class_prior, torch.zeros(3))


def test_region_mixing_trains_in_true_half_precision(tmp_path) -> None:
    # bf16-true makes bfloat16 the default dtype, which has no Beta sampler.
    module = _module(mix_probability=1.0)
    trainer = _quiet_trainer(
        tmp_path, max_steps=2, enable_checkpointing=False, precision="bf16-true"
    )
    trainer.fit(module, datamodule=_LabelledData())
    assert trainer.global_step == 2
    # The draws are float32's, whatever the default dtype.
    points, labels = torch.randn(2, 16, 3), torch.tensor([0, 1])
    torch.manual_seed(0)
    expected = torch.distributions.Beta(1.0, 1.0).sample()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        _, _, weight = module._mix_regions(points, labels)
    finally:
        torch.set_default_dtype(torch.float32)
    assert weight == round(float(expected) * 16) / 16


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_region_mixing_weighs_both_labels_in_the_training_loss(smoothing: float) -> None:
    settings = {"mix_probability": 1.0, "label_smoothing": smoothing}
    module = _without_logging(_module(**settings, num_groups=8, group_size=4).eval())
    points = torch.randn(6, 16, 3, generator=torch.Generator().manual_seed(1))
    batch = {"points": points, "label": torch.tensor([0, 1, 2, 0, 1, 2])}

    def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)

    counted_targets: list[torch.Tensor] = []
    module.train_metrics.update = lambda logits, target: counted_targets.append(target)
    torch.manual_seed(3)
    train_loss, _ = module._shared_step(batch, "train", module.train_metrics)
    torch.manual_seed(3)
    torch.rand(())  # the draw that decides to mix (always, at probability 1)
    mixed, partner_label, weight = module._mix_regions(points, batch["label"])
    assert 0.0 < weight < 1.0 and not torch.equal(partner_label, batch["label"])
    # The partner's weight is its share of the points, and its label is the one of the
    # shape the new points came from.
    for index in range(6):
        new = [p for p in mixed[index] if not (p == points[index]).all(-1).any()]
        if not new:  # partnered with itself
            assert partner_label[index] == batch["label"][index]
            continue
        assert len(new) == round(weight * 16)
        (source,) = {j for p in new for j in range(6) if (p == points[j]).all(-1).any()}
        assert batch["label"][source] == partner_label[index]
    logits = module(mixed)
    expected = (1 - weight) * ce(logits, batch["label"]) + weight * ce(logits, partner_label)
    torch.testing.assert_close(train_loss, expected)
    assert not torch.allclose(train_loss, ce(logits, batch["label"]))
    # The training metrics count each shape's own label, not its partner's.
    (counted,) = counted_targets
    assert torch.equal(counted, batch["label"])

    # Evaluation never mixes, and neither does training with the default probability 0.
    val_loss, _ = module._shared_step(batch, "val", module.val_metrics)
    torch.testing.assert_close(val_loss, ce(module(points), batch["label"]))
    plain = _without_logging(_module(label_smoothing=smoothing, num_groups=8, group_size=4).eval())
    plain.load_state_dict(module.state_dict())
    plain_loss, _ = plain._shared_step(batch, "train", plain.train_metrics)
    torch.testing.assert_close(plain_loss, ce(module(points), batch["label"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mix_probability": 1.5}, "mix_probability"), ({"mix_alpha": 0.0}, "mix_alpha")],
)
def test_region_mixing_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _module(**kwargs)


# -- optimization settings (found unchecked by a mutation run) -----------------------------


def _configured(max_epochs: int = 10, **kwargs: object) -> object:
    module = _module(**kwargs)
    module.trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=-1)
    return module.configure_optimizers()


@pytest.mark.parametrize(
    ("name", "optimizer_class"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)]
)
def test_optimizer_gets_its_class_lr_and_weight_decay(name: str, optimizer_class: type) -> None:
    optimizer = _configured(optimizer=name, lr=3e-3, weight_decay=0.05, scheduler="none")
    assert type(optimizer) is optimizer_class
    (group,) = optimizer.param_groups
    assert group["lr"] == 3e-3 and group["weight_decay"] == 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "AdamW"}, r"optimizer must be one of \('adamw', 'adam'\); got 'AdamW'"),
        ({"optimizer": "sgd"}, "optimizer must be"),
        ({"scheduler": "linear"}, r"scheduler must be one of \('cosine', 'step', 'none'\)"),
        ({"warmup_epochs": -1}, "warmup_epochs must be at least 0"),
        ({"min_lr_ratio": -0.1}, r"min_lr_ratio must be a number in \[0, 1\]"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"lr": -1e-3}, r"lr must be a number >= 0; got -0\.001"),
        ({"weight_decay": -0.05}, r"weight_decay must be a number >= 0"),
        ({"label_smoothing": 1.5}, r"label_smoothing must be a number in \[0, 1\]"),
        ({"label_smoothing": float("nan")}, "label_smoothing must be"),
        ({"logit_adjustment": -1.0}, "logit_adjustment must be a number >= 0"),
    ],
)
def test_unknown_optimization_settings_are_refused(kwargs: dict, message: str) -> None:
    # From Python (the CLI checks the names itself) they used to fall through to Adam or
    # the cosine schedule, and a negative floor gave negative learning rates.
    with pytest.raises(ValueError, match=message):
        _module(**kwargs)


def test_step_schedule_divides_by_ten_at_three_quarters() -> None:
    scheduler = _configured(scheduler="step")["lr_scheduler"]["scheduler"]
    assert dict(scheduler.milestones) == {7: 1} and scheduler.gamma == 0.1


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    scheduler = _configured(scheduler="cosine", warmup_epochs=3, min_lr_ratio=0.1)
    factor = scheduler["lr_scheduler"]["scheduler"].lr_lambdas[0]
    # Linear warm-up to 1 over 3 epochs, then cosine over the 7 others down to 0.1.
    assert [factor(epoch) for epoch in range(4)] == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1.0])
    halfway = 3 + 7 / 2
    assert factor(halfway) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(10) == pytest.approx(0.1)


@pytest.mark.parametrize("stage", ["train", "val", "test"])
def test_every_stage_s_loss_is_label_smoothed(stage: str) -> None:
    # The same loss in every stage, so that train/loss and val/loss compare.
    module = _module(label_smoothing=0.2).eval()
    module.log = module.log_dict = lambda *args, **kwargs: None  # no trainer attached
    batch = {"points": torch.randn(4, 16, 3), "label": torch.tensor([0, 1, 2, 0])}
    metrics = {"train": module.train_metrics, "val": module.val_metrics}.get(stage)
    loss, logits = module._shared_step(batch, stage, metrics or module.test_metrics)
    expected = torch.nn.functional.cross_entropy(logits, batch["label"], label_smoothing=0.2)
    torch.testing.assert_close(loss, expected)


def test_every_stage_s_mean_class_accuracy_leaves_out_classes_without_samples() -> None:
    # As in the unit test of MeanClassAccuracy: class 2 is predicted once but has no sample.
    predictions, targets = torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 1, 1])
    logits = torch.nn.functional.one_hot(predictions, 3).float()
    module = _module()
    for metrics in (module.train_metrics, module.val_metrics, module.test_metrics):
        values = {key.split("/")[-1]: value for key, value in metrics(logits, targets).items()}
        assert values["macc"].item() == pytest.approx(0.75)
        assert values["oa"].item() == pytest.approx(0.75)


def test_region_mixing_weight_is_the_share_of_replaced_points() -> None:
    module = _module(mix_probability=1.0)
    points = torch.randn(6, 16, 3)
    weights = []
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, _, weight = module._mix_regions(points, torch.arange(6) % 3)
        weights.append(weight)
        # Exactly the weight's share of each shape's points comes from its partner.
        replaced = {
            int((~(mixed[index].unsqueeze(1) == points[index]).all(-1).any(1)).sum())
            for index in range(6)
        }
        assert replaced <= {0, round(weight * 16)}  # 0: partnered with itself
        # Six shapes are never all partnered with themselves: some points were replaced.
        assert weight == 0 or round(weight * 16) in replaced
        assert weight * 16 == pytest.approx(round(weight * 16), abs=1e-9)
    assert len(set(weights)) > 1 and max(weights) > 0


def test_region_mixing_draws_its_share_from_beta_of_mix_alpha() -> None:
    # Beta(10, 10) keeps the share near one half; Beta(0.1, 0.1) pushes it to 0 or 1.
    points = torch.randn(6, 64, 3)
    shares = {}
    for alpha in (10.0, 0.1):
        module = _module(mix_probability=1.0, mix_alpha=alpha)
        torch.manual_seed(0)
        shares[alpha] = torch.tensor(
            [module._mix_regions(points, torch.arange(6) % 3)[2] for _ in range(40)]
        )
    assert abs(shares[10.0].mean().item() - 0.5) < 0.08 and shares[10.0].std() < 0.15
    assert ((shares[0.1] < 0.1) | (shares[0.1] > 0.9)).float().mean() > 0.6


def test_a_second_test_run_counts_only_its_own_samples(tmp_path) -> None:
    module = _module()
    trainer = _quiet_trainer(tmp_path)
    for _ in range(2):
        trainer.test(module, _loader(num_samples=9), verbose=False)
        assert int(module.test_confusion_matrix.sum()) == 9
