"""Facing about the vertical: accuracy of a checkpoint on test shapes turned by random yaw.

The shipped models were trained on upright ModelNet shapes turned by at most ±15° about
the vertical, so a user's mesh that faces another way may be misclassified (README,
"Orientation"). This script measures how much, on the test split of a dataset in ModelNet
layout, and whether averaging the class probabilities over ``K`` views turned by
``360° / K`` about the vertical (yaw voting) recovers it:

* ``upright``: the test points as the training preprocessed them;
* ``random yaw``: each shape turned by its own random angle, one view;
* ``random yaw, K yaw votes``: those shapes, probabilities averaged over ``K`` turns;
* ``upright, K yaw votes``: what the same voting costs on shapes that were upright.

    python benchmarks/facing.py --data-root ../shared/data/ModelNet10
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from pointsink import SetSinkformer
from pointsink.data import build_point_cache, load_point_cache
from pointsink.inference import checkpoint_class_names, checkpoint_hparams, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def yaw_rotations(angles: torch.Tensor, up_axis: int = 2) -> torch.Tensor:
    """Rotations ``(S, 3, 3)`` by ``angles`` ``(S,)`` (radians) about axis ``up_axis``."""
    first, second = (axis for axis in range(3) if axis != up_axis)
    rotations = torch.zeros(len(angles), 3, 3)
    rotations[:, up_axis, up_axis] = 1.0
    rotations[:, first, first] = rotations[:, second, second] = torch.cos(angles)
    rotations[:, first, second] = -torch.sin(angles)
    rotations[:, second, first] = torch.sin(angles)
    return rotations


def probabilities(model: SetSinkformer, points: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Class probabilities ``(S, C)`` of point sets ``(S, N, 3)``, in batches."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(points), batch_size):
            chunks.append(model(points[start : start + batch_size]).float().softmax(dim=-1))
    return torch.cat(chunks)


def yaw_voted(
    model: SetSinkformer, points: torch.Tensor, votes: int, up_axis: int, batch_size: int
) -> torch.Tensor:
    """Probabilities averaged over ``votes`` turns of ``360° / votes`` about the vertical."""
    total = torch.zeros(())
    for view in range(votes):
        angles = torch.full((len(points),), 2.0 * math.pi * view / votes)
        turned = torch.einsum("sij,snj->sni", yaw_rotations(angles, up_axis), points)
        total = total + probabilities(model, turned, batch_size)
    return total / votes


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "checkpoints" / "modelnet10-sinkformer.ckpt"
    )
    parser.add_argument("--votes", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random angles")
    parser.add_argument("--up-axis", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    checkpoint = load_checkpoint(args.checkpoint)
    hparams = checkpoint_hparams(checkpoint, args.checkpoint)
    class_names = checkpoint_class_names(hparams, args.checkpoint)
    num_points = int(hparams["num_points"])
    model = SetSinkformer.from_checkpoint(args.checkpoint)
    cache_path = build_point_cache(
        args.data_root, class_names, "test", num_points, cache_dir=args.cache_dir
    )
    cache = load_point_cache(cache_path)
    if not bool((cache.counts == num_points).all()):
        parser.error("this benchmark takes test sets of num_points real points (no padding)")
    points, labels = cache.points, cache.labels
    generator = np.random.default_rng(args.seed)
    angles = torch.from_numpy(generator.uniform(0.0, 2.0 * math.pi, len(points))).float()
    turned = torch.einsum("sij,snj->sni", yaw_rotations(angles, args.up_axis), points)

    start = time.perf_counter()
    rows = [
        ("upright", probabilities(model, points, args.batch_size)),
        ("random yaw", probabilities(model, turned, args.batch_size)),
    ]
    for votes in args.votes:
        rows.append(
            (f"random yaw, {votes} yaw votes", yaw_voted(model, turned, votes, args.up_axis,
                                                        args.batch_size))
        )  # fmt: skip
        rows.append(
            (f"upright, {votes} yaw votes", yaw_voted(model, points, votes, args.up_axis,
                                                     args.batch_size))
        )  # fmt: skip
    accuracies = [
        (name, 100.0 * float((found.argmax(dim=-1) == labels).float().mean()))
        for name, found in rows
    ]
    print(
        f"checkpoint={args.checkpoint.name} shapes={len(points)} points={num_points} "
        f"seed={args.seed} threads={torch.get_num_threads()} "
        f"time={time.perf_counter() - start:.0f}s"
    )
    print("| input | test OA (%) |")
    print("|---|---:|")
    for name, accuracy in accuracies:
        print(f"| {name} | {accuracy:.2f} |")
    return accuracies


if __name__ == "__main__":
    main()
