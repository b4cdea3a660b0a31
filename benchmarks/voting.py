"""Test-time voting: accuracy of a checkpoint with 1, 2, 4, ... views per shape.

Every shape goes through :func:`pointsink.inference.preprocess_views`, the function
``pointsink-predict --votes V`` uses: view 0 is the training preprocessing (with the
checkpoint's ``data.sample_seed``, unless ``--seed``), views 1.. are resampled and augmented
as in training. ``--split test`` scores the shapes ``train.py test`` scores: those of the
test cache, without the files that could not be read. The probabilities of the first ``V`` views are
averaged for each ``V`` in ``--votes``, so one pass over the largest ``V`` serves all rows.
The model runs in float32 (as ``pointsink-predict`` does), so the one-view row can differ
slightly from ``train.py test`` under a bf16 config.

``--split val`` scores the validation shapes carved out of the training split (the data
module's stratified split, with the ``val_fraction`` and ``split_seed`` the checkpoint
records; ``--val-fraction`` and ``--split-seed`` for older checkpoints), so choices about
voting can be made without the test split.

Example::

    python benchmarks/voting.py --ckpt checkpoints/modelnet10-sinkformer.ckpt \\
        --data-root ../shared/data/ModelNet10 --votes 1 2 4 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from pointsink.callbacks import confusion_report
from pointsink.data import (
    DatasetLayoutError,
    ShapeFolderDataModule,
    recorded_split,
    recorded_validation_files,
    validation_files_changes,
)
from pointsink.embedding import leading_mask
from pointsink.inference import ShapeClassifier, load_checkpoint, preprocess_views


def test_files(
    root: Path,
    class_names: list[str],
    num_points: int,
    sample_seed: int,
    cache_dir: Path | None = None,
) -> list[tuple[str, int]]:
    """``(path, label)`` of the shapes ``train.py test`` scores, in its order.

    The data module's test cache lists them (files unreadable when it was built are left
    out, as in testing); with the checkpoint's ``num_points`` and ``sample_seed`` it is the
    cache ``train.py test`` builds and reuses (in ``cache_dir``, as its
    ``--data.cache_dir``; None: the data module's default).
    """
    for name in class_names:
        folder = root / name / "test"
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} does not exist; is --data-root the dataset?")
    data = ShapeFolderDataModule(
        str(root),
        class_names=class_names,
        num_points=num_points,
        sample_seed=sample_seed,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    data.setup("test")
    assert data.test_dataset is not None
    return list(zip(data.test_dataset.paths, data.test_dataset.labels.tolist(), strict=True))


def validation_files(
    root: Path,
    class_names: list[str],
    val_fraction: float,
    split_seed: int,
    num_points: int = 1024,
    sample_seed: int = 0,
    cache_dir: Path | None = None,
) -> list[tuple[str, int]]:
    """``(path, label)`` of the validation shapes that training carves out of ``train/``.

    The split is the data module's own (stratified, seeded), from its preprocessing cache
    (in ``cache_dir``; None: the data module's default).
    """
    data = ShapeFolderDataModule(
        str(root),
        class_names=class_names,
        val_fraction=val_fraction,
        split_seed=split_seed,
        num_points=num_points,
        sample_seed=sample_seed,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    data.setup("fit")
    assert data.val_dataset is not None
    labels = data.val_dataset.labels.tolist()
    return list(zip(data.val_dataset.paths, labels, strict=True))


def training_split(
    ckpt: str, checkpoint: dict, val_fraction: float | None, split_seed: int | None
) -> tuple[float, int]:
    """The validation split of the run that wrote ``checkpoint`` (read from ``ckpt``).

    Given values must agree with it.
    """
    recorded = recorded_split(checkpoint)
    if recorded is None:
        print(f"note: {ckpt} does not record its validation split; using the given or default")
        return (
            0.1 if val_fraction is None else val_fraction,
            0 if split_seed is None else split_seed,
        )
    given = (
        recorded[0] if val_fraction is None else val_fraction,
        recorded[1] if split_seed is None else split_seed,
    )
    if given != recorded:
        raise SystemExit(
            f"error: {ckpt} was trained with val_fraction={recorded[0]} and "
            f"split_seed={recorded[1]}; --split val with {given} would score training shapes."
        )
    return recorded


def check_recorded_files(
    ckpt: str, checkpoint: dict, root: Path, files: list[tuple[str, int]]
) -> None:
    """Stops unless ``files`` are the validation files the checkpoint's run recorded.

    The split picks files by position: on a copy of the dataset with other training files
    the same settings select other shapes, some of which the model has trained on.
    """
    recorded = recorded_validation_files(checkpoint)
    if recorded is None:
        return  # written before the files were recorded
    rebuilt = [Path(path).relative_to(root).as_posix() for path, _ in files]
    gone, new = validation_files_changes(recorded, rebuilt)
    if gone or new:
        raise SystemExit(
            f"error: {ckpt} was validated on {len(recorded)} files of which {len(gone)} are "
            f"not in this split of {root} (rebuilt from the same settings, with other training "
            "files present): it would score training shapes."
        )


def view_probabilities(
    classifier: ShapeClassifier, paths: list[str], seed: int, views: int, batch_size: int
) -> torch.Tensor:
    """Class probabilities ``(S, V, C)`` of each file's ``V`` views, in file order."""
    num_points, augmentation = classifier.num_points, classifier.augmentation
    probabilities = []
    for first in range(0, len(paths), batch_size):
        chunk = paths[first : first + batch_size]
        prepared = [preprocess_views(path, num_points, seed, views, augmentation) for path in chunk]
        mask = leading_mask(torch.tensor([count for _, count, _ in prepared]), num_points)
        sets = np.stack([points for points, _, _ in prepared])
        probabilities.append(classifier.view_probabilities(sets, mask))
    return torch.cat(probabilities)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py fit")
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="the training run's data.cache_dir, if it gave one (default: the data "
        "module's, root/processed or a user cache folder for a read-only root)",
    )  # fmt: skip
    parser.add_argument(
        "--split",
        default="test",
        choices=("test", "val"),
        help="test, or val: the training's validation shapes (choose voting settings on val)",
    )
    # Checkpoints record their split; older ones do not, and then these must repeat the
    # training run's data.val_fraction and data.split_seed, or "val" holds training shapes.
    parser.add_argument(
        "--val-fraction", type=float, default=None,
        help="with --split val: the training run's data.val_fraction (default: the "
        "checkpoint's, else 0.1)",
    )  # fmt: skip
    parser.add_argument(
        "--split-seed", type=int, default=None,
        help="with --split val: the training run's data.split_seed (default: the "
        "checkpoint's, else 0)",
    )  # fmt: skip
    parser.add_argument("--votes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--seed", type=int, default=None,
        help="sampling seed (default: the checkpoint's data.sample_seed, as train.py test)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--limit", type=int, default=None, help="first N shapes (for tests)")
    args = parser.parse_args(argv)
    if min(args.votes) < 1:
        parser.error("--votes must be >= 1")
    if args.split == "test" and (args.val_fraction, args.split_seed) != (None, None):
        parser.error("--val-fraction and --split-seed apply to --split val only")
    if args.threads:
        torch.set_num_threads(args.threads)

    classifier = ShapeClassifier.from_checkpoint(args.ckpt, device="cpu")
    names, num_points = classifier.class_names, classifier.num_points
    seed = classifier.sample_seed if args.seed is None else args.seed
    try:
        if args.split == "val":
            checkpoint = load_checkpoint(args.ckpt)
            val_fraction, split_seed = training_split(
                args.ckpt, checkpoint, args.val_fraction, args.split_seed
            )
            files = validation_files(
                args.data_root,
                names,
                val_fraction,
                split_seed,
                num_points,
                classifier.sample_seed,
                args.cache_dir,
            )
            check_recorded_files(args.ckpt, checkpoint, args.data_root, files)
        else:
            files = test_files(
                args.data_root, names, num_points, classifier.sample_seed, args.cache_dir
            )
    except DatasetLayoutError as error:  # no shapes, as train.py would say in one line
        raise SystemExit(f"error: {error}") from None
    files = files[: args.limit]
    most = max(args.votes)
    start = time.perf_counter()
    views_probabilities = view_probabilities(
        classifier, [path for path, _ in files], seed, most, args.batch_size
    )
    seconds = time.perf_counter() - start
    labels = torch.tensor([label for _, label in files])

    lines = [
        f"{args.ckpt} on {len(files)} {args.split} shapes of {args.data_root}, seed "
        f"{seed}, {classifier.num_points} points, float32 on the CPU, "
        f"{seconds:.0f} s for {most} view(s) per shape",
        "| views | OA (%) | mAcc (%) |",
        "|---:|---:|---:|",
    ]
    for votes in sorted(set(args.votes)):
        predicted = views_probabilities[:, :votes].mean(dim=1)
        matrix = MulticlassConfusionMatrix(num_classes=len(names))(predicted, labels)
        # The numbers of train.py test's test_report.json (mean over the classes present).
        report = confusion_report(matrix, names)
        overall, mean_class = report["overall_accuracy"], report["mean_class_accuracy"]
        lines.append(f"| {votes} | {100 * overall:.2f} | {100 * mean_class:.2f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
