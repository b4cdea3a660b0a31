"""Sparse point clouds: padding masks against filling up with repeated points.

A point cloud with fewer points than a model takes can be filled up by repeating random
points (``pointsink.transforms.preprocess_shape``; the data modules and ``pointsink-predict``
did so until 2026-12-06), or its real points can be padded and masked (README, "Sets of
different sizes"; ``pointsink.transforms.preprocess_set``, what they do now); with a set
abstraction the model then makes one token per real point up to its ``num_groups``. This
script scores both on the ModelNet10 test split, with clouds cut down to ``k`` real points:

* ``repeat``: the ``k`` points filled up to the model's ``num_points`` by repetition and
  normalized, exactly as ``preprocess_shape`` does for such a cloud;
* ``mask``: the ``k`` points normalized, padded to ``num_points`` and masked, as
  ``preprocess_set`` gives them: the model sees the set of ``k`` points itself;
* ``full``: the usual input (``num_points`` of the file's points), for reference.

The ``k`` points of a file are the same for both methods (drawn with the file's sampling
seed, :func:`pointsink.transforms.file_sample_seed`). No test-time voting. The test files
must be point clouds of at least ``num_points`` points (``../shared/data/ModelNet10`` holds
1024 per shape), so that ``full`` subsamples real points only; meshes are refused.

    python benchmarks/partial_clouds.py --data-root ../shared/data/ModelNet10
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pointsink import ShapeClassifier
from pointsink.data import find_shape_files
from pointsink.io import ShapeLoadError, load_shape
from pointsink.transforms import file_sample_seed, preprocess_set, preprocess_shape

REPO = Path(__file__).resolve().parents[1]


def test_files(root: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """``(path, label)`` of every test file of the checkpoint's classes.

    Raises:
        SystemExit: A class has no ``test`` folder under ``root``.
    """
    for name in class_names:
        folder = root / name / "test"
        if not folder.is_dir():  # find_shape_files would pass over it
            raise SystemExit(f"error: {folder} is not a folder; --data-root must hold "
                             "<class>/test/ for each of the checkpoint's classes")  # fmt: skip
    return find_shape_files(root, class_names, "test")


def inputs(
    points: np.ndarray, k: int | None, num_points: int, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The model inputs ``(points (N, 3), mask (N,))`` of one cloud for each method."""
    everything = np.ones(num_points, dtype=bool)
    if k is None:
        return {"full": (preprocess_shape(points, num_points, seed), everything)}
    rng = np.random.default_rng(seed)
    subset = points[rng.choice(len(points), size=k, replace=False)]
    with warnings.catch_warnings():  # "only k points": the point of the benchmark
        warnings.simplefilter("ignore", UserWarning)
        padded, count = preprocess_set(subset, num_points, seed)
        repeated = preprocess_shape(subset, num_points, seed)
    return {"repeat": (repeated, everything), "mask": (padded, np.arange(num_points) < count)}


def accuracies(
    predictions: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[float, float]:
    """Overall and mean per-class accuracy, in percent."""
    correct = predictions == labels
    per_class = [correct[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
    return 100.0 * correct.mean(), 100.0 * float(np.mean(per_class))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "checkpoints" / "modelnet10-cpu-sinkformer.ckpt"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed (default: the checkpoint's data.sample_seed, as train.py test)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    classifier = ShapeClassifier.from_checkpoint(args.checkpoint, device="cpu")
    model, class_names, num_points = classifier.model, classifier.class_names, classifier.num_points
    # The checkpoint's seed by default, so that "full" scores the points train.py test does.
    if args.seed is None:
        args.seed = classifier.sample_seed
    if any(k < 1 or k > num_points for k in args.sizes):
        parser.error(f"--sizes must be from 1 to the model's num_points ({num_points})")
    args.sizes = list(dict.fromkeys(args.sizes))  # a repeated size is one row
    files = test_files(args.data_root, class_names)

    start = time.perf_counter()
    batches: dict[tuple[str, int | None], list[tuple[np.ndarray, np.ndarray]]] = {}
    labels_read = []
    for path, label in files:
        try:
            shape = load_shape(path)
        except ShapeLoadError as error:  # skipped, as train.py test skips it
            warnings.warn(f"skipped {path}: {error}", UserWarning, stacklevel=1)
            continue
        if not isinstance(shape, np.ndarray) or len(shape) < num_points:
            raise SystemExit(
                f"error: {path} is not a point cloud of at least {num_points} points; this "
                "benchmark needs point-cloud files (e.g. ../shared/data/ModelNet10)"
            )
        points = shape.astype(np.float64)
        seed = file_sample_seed(path, args.seed)
        for k in [None, *args.sizes]:
            for method, pair in inputs(points, k, num_points, seed).items():
                batches.setdefault((method, k), []).append(pair)
        labels_read.append(label)
    labels = np.array(labels_read)

    rows = []
    with torch.no_grad():
        for (method, k), pairs in batches.items():
            predictions = []
            for begin in range(0, len(pairs), args.batch_size):
                chunk = pairs[begin : begin + args.batch_size]
                points = torch.from_numpy(np.stack([p for p, _ in chunk]))
                mask = torch.from_numpy(np.stack([m for _, m in chunk]))
                logits = model(points, None if method != "mask" else mask)
                predictions.append(logits.argmax(-1).numpy())
            oa, macc = accuracies(np.concatenate(predictions), labels, len(class_names))
            rows.append((k, method, oa, macc))
    elapsed = time.perf_counter() - start

    print(
        f"checkpoint={args.checkpoint.name} num_points={num_points} shapes={len(labels)} "
        f"seed={args.seed} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"time={elapsed:.0f}s"
    )
    print("| real points k | method | test OA (%) | test mAcc (%) |")
    print("|---:|---|---:|---:|")
    for k, method, oa, macc in sorted(rows, key=lambda r: (r[0] or 10**9, r[1])):
        print(f"| {num_points if k is None else k} | {method} | {oa:.2f} | {macc:.2f} |")


if __name__ == "__main__":
    main()
