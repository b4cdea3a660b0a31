"""A callback for tests/test_ddp.py: records, per rank, what each process was fed.

It runs inside the ``python train.py`` subprocesses of the DDP tests (added with
``--trainer.callbacks+=ddp_probe.SampleProbe``; ``tests/`` is put on ``PYTHONPATH``), and
writes ``<output_dir>/<stage>-rank<global rank>.json`` at teardown:

``{"train": [[epoch, [sample indices...], [sx, sy, sz]], ...], "train_loss": [[epoch,
batch size, loss], ...], "torch_rng": [fingerprint, ...], "val": [...], "test": [...]}``

where ``[sx, sy, sz]`` is the per-axis augmentation scale of the batch's first sample,
recovered as augmented / cached points. That recovery is exact only when rotation, jitter
and point shuffling are off, which the fit test configures. The fingerprint is a hash of
torch's global generator (what dropout and region mixing draw from) at the batch's start.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


class SampleProbe(pl.Callback):
    """Records the sample indices of every batch and the first sample's augmentation scale.

    Args:
        output_dir: Folder of the per-rank JSON files.
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.records: dict[str, list[Any]] = {
            "train": [], "train_loss": [], "torch_rng": [], "val": [], "test": []
        }  # fmt: skip

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        index, points = batch["index"], batch["points"]
        clean = trainer.datamodule.train_dataset.points[int(index[0])].to(points.device)
        scale = (points[0] / clean).median(dim=0).values
        self.records["train"].append([trainer.current_epoch, index.tolist(), scale.tolist()])
        state = torch.get_rng_state().numpy().tobytes()
        self.records["torch_rng"].append(hashlib.sha256(state).hexdigest())

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        size = len(batch["index"])
        self.records["train_loss"].append([trainer.current_epoch, size, float(loss)])

    def _record_eval(self, stage: str, trainer: pl.Trainer, batch: Any) -> None:
        if not trainer.sanity_checking:
            self.records[stage].append([trainer.current_epoch, batch["index"].tolist(), None])

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._record_eval("val", trainer, batch)

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._record_eval("test", trainer, batch)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes a str enum
        path = Path(self.output_dir) / f"{stage}-rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.records))
