"""Facing about the vertical: accuracy of a checkpoint on test shapes turned by random yaw.

The recipe's models (``configs/modelnet10.yaml``,
``checkpoints/modelnet10-sinkformer.ckpt``) were trained on upright ModelNet shapes turned
by at most ±15° about the vertical, so a user's mesh that faces another way may be
misclassified (README, "Orientation"). This script measures how much, on the test split of a
dataset in ModelNet layout, and whether averaging the class probabilities over ``K`` views
turned by ``360° / K`` about the vertical (yaw voting) recovers it:

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

import torch
from torchmetrics.classification import MulticlassAccuracy

from pointsink import SetSinkformer
from pointsink.data import build_point_cache, load_point_cache
from pointsink.inference import ShapeClassifier
from pointsink.module import MeanClassAccuracy
from pointsink.transforms import turn_about_vertical, turn_by

REPO = Path(__file__).resolve().parents[1]


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
        turned = turn_by(points, angles, up_axis)
        total = total + probabilities(model, turned, batch_size)
    return total / votes


def accuracy(found: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Overall and mean per-class accuracy (%) of probabilities ``(S, C)`` against ``(S,)``.

    The CLI's ``test/oa`` and ``test/macc`` metrics, so the numbers compare with its.
    """
    overall = MulticlassAccuracy(num_classes, average="micro")(found, labels)
    per_class = MeanClassAccuracy(num_classes)(found, labels)
    return 100.0 * float(overall), 100.0 * float(per_class)


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "checkpoints" / "modelnet10-sinkformer.ckpt"
    )
    parser.add_argument("--votes", type=int, nargs="+", default=[4, 12])
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the test points and of the random angles (default: the checkpoint's "
        "data.sample_seed, as train.py test uses)",
    )
    parser.add_argument(
        "--up-axis", type=int, default=None, help="default: the checkpoint's up axis"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if min(args.votes) < 1:
        parser.error("--votes must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    classifier = ShapeClassifier.from_checkpoint(args.checkpoint, device="cpu")
    class_names, num_points = classifier.class_names, classifier.num_points
    model = classifier.model
    # The checkpoint's seed and axis by default, so that "upright" scores the points
    # `train.py test` scores and "random yaw" the turns of --data.eval_rotation_degrees 180.
    if args.seed is None:
        args.seed = classifier.sample_seed
    if args.up_axis is None:
        args.up_axis = classifier.up_axis
    cache_path = build_point_cache(
        args.data_root,
        class_names,
        "test",
        num_points,
        sample_seed=args.seed,
        cache_dir=args.cache_dir,
    )
    cache = load_point_cache(cache_path)
    if not bool((cache.counts == num_points).all()):
        parser.error("this benchmark takes test sets of num_points real points (no padding)")
    points, labels = cache.points, cache.labels
    # The turns of `train.py test --data.eval_rotation_degrees 180`, which seeds them with
    # data.sample_seed: the same test points, turned the same way.
    turned = turn_about_vertical(points, 180.0, args.up_axis, args.seed)

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
    accuracies = [(name, *accuracy(found, labels, len(class_names))) for name, found in rows]
    print(
        f"checkpoint={args.checkpoint.name} shapes={len(points)} points={num_points} "
        f"seed={args.seed} threads={torch.get_num_threads()} "
        f"time={time.perf_counter() - start:.0f}s"
    )
    print("| input | test OA (%) | test mAcc (%) |")
    print("|---|---:|---:|")
    for name, overall, per_class in accuracies:
        print(f"| {name} | {overall:.2f} | {per_class:.2f} |")
    return accuracies


if __name__ == "__main__":
    main()
