"""Test the averaged and the raw weights of checkpoints written with weight averaging.

A checkpoint written with Lightning's ``EMAWeightAveraging`` holds the averaged weights in
``state_dict`` and the raw training weights in ``current_model_state``. This script runs
``train.py test`` on both, same epoch, same data, and prints one row per checkpoint, so the
effect of the averaging itself is measured without retraining::

    python benchmarks/averaged_vs_raw.py --config configs/modelnet10.yaml \
        --data-root ../shared/data/ModelNet10 \
        outputs/ema40/runs/*/lightning_logs/version_0/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from reproduce import mean_std  # run as a script, benchmarks/ is on the path

from pointsink.cli import main as cli_main


def evaluate(
    config: str, data_root: str, checkpoint: dict[str, object], workdir: Path
) -> tuple[float, float]:
    """Runs ``test`` on one checkpoint dictionary; returns (overall, mean per-class) accuracy."""
    path = workdir / "weights.ckpt"
    torch.save(checkpoint, path)
    cli = cli_main([
        "test", "--config", config, "--data.root", data_root, "--ckpt_path", str(path),
        "--trainer.default_root_dir", str(workdir), "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    return float(metrics["test/oa"]), float(metrics["test/macc"])


def main() -> None:
    """Prints a Markdown table: checkpoint, epoch, test OA/mAcc averaged and raw."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for path in args.checkpoints:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if "current_model_state" not in checkpoint:
                raise SystemExit(f"{path}: not written with weight averaging (no raw weights)")
            raw = dict(checkpoint, state_dict=checkpoint["current_model_state"])
            scores = [
                evaluate(args.config, args.data_root, weights, Path(workdir))
                for weights in (checkpoint, raw)
            ]
            rows.append((path, checkpoint["epoch"], *scores[0], *scores[1]))

    lines = [
        "| checkpoint | epoch | averaged: test OA / mAcc (%) | raw: test OA / mAcc (%) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {p} | {e} | {100 * a:.2f} / {100 * b:.2f} | {100 * c:.2f} / {100 * d:.2f} |"
        for p, e, a, b, c, d in rows
    ]
    if len(rows) > 1:
        averaged, raw = (mean_std([row[i] for row in rows]) for i in (2, 4))
        lines.append(f"| mean ± std OA | | {averaged} | {raw} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
