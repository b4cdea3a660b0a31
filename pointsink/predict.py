"""``pointsink-predict``: classify mesh and point-cloud files with a trained checkpoint.

Examples::

    pointsink-predict best.ckpt chair.obj scans/ "parts/**/*.stl"
    pointsink-predict best.ckpt shapes/ --top-k 3 --votes 4 --format json --output out.json
    python -m pointsink.predict best.ckpt shape.ply --device cpu

Exit status: 0 when every file was classified, 1 when at least one could not be (its record
says why; the others are still classified), 2 for usage errors, including a checkpoint that
cannot be used.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from pointsink.inference import (
    OUTPUT_FORMATS,
    CheckpointError,
    ShapeClassifier,
    format_predictions,
)
from pointsink.transforms import AXIS_NAMES

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _device_name(text: str) -> str:
    # Only the name's form here; whether the device exists is checked with the checkpoint.
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"use auto, cpu, cuda or cuda:I; got {text!r}")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pointsink-predict``."""
    parser = argparse.ArgumentParser(
        prog="pointsink-predict",
        description=(
            "Classify 3D shapes (OFF, OBJ, STL, PLY, GLB/GLTF, 3MF meshes; PLY, XYZ, PTS, "
            "TXT, NPY point clouds) with a checkpoint written by `train.py fit`. Each file "
            "is sampled and normalized exactly like the training data."
        ),
        epilog=(
            "Exit status: 0 if every file was classified, 1 if some could not be (the "
            "others are still reported), 2 for usage errors or an unusable checkpoint."
        ),
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint (.ckpt) to load")
    parser.add_argument(
        "paths",
        metavar="PATH",
        nargs="+",
        help="shape file, folder (searched recursively) or glob pattern (quote it)",
    )
    parser.add_argument(
        "--top-k", type=_positive_int, default=5, metavar="K", help="classes listed per file"
    )
    parser.add_argument(
        "--points",
        type=_positive_int,
        default=None,
        metavar="N",
        help="points sampled per shape (default: the number used in training, else 1024)",
    )
    parser.add_argument(
        "--votes",
        type=_positive_int,
        default=1,
        metavar="V",
        help="average V views: the plain one plus V-1 resampled (point clouds smaller than "
        "the model's number of points keep all their points) and augmented (default: 1)",
    )
    parser.add_argument(
        "--format", choices=OUTPUT_FORMATS, default="table", help="output format (default: table)"
    )
    parser.add_argument(
        "--output", metavar="FILE", default=None, help="write the output here instead of stdout"
    )
    parser.add_argument(
        "--device",
        type=_device_name,
        default="auto",
        metavar="DEVICE",
        help="where to run the model: auto, cpu, cuda or cuda:I (default: auto, CUDA when "
        "available)",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=None,
        metavar="S",
        help="sampling seed (default: the checkpoint's data.sample_seed, 0 for older "
        "checkpoints); a file gets the points that a training cache built with "
        "data.sample_seed S holds for it",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="B", help="shapes per batch"
    )
    parser.add_argument(
        "--up-axis",
        choices=AXIS_NAMES,
        default=None,
        help="the files' vertical axis, turned to the model's before classifying (e.g. y for "
        "glTF/GLB; default: the files stand like the training shapes, z-up for ModelNet). "
        "The model knows shapes upright and facing roughly as in training: it was trained "
        "turned by at most its augmentation's angle about the vertical (for shapes facing "
        "any way, use a model trained on every facing, such as "
        "checkpoints/modelnet10-anyfacing-sinkformer.ckpt)",
    )
    return parser


def _unwritable(output: Path) -> str | None:
    """Why ``output`` cannot be written, or None; creates nothing.

    Missing folders on the way are created only when the records are written, so that a run
    refused later (an unusable checkpoint) leaves none behind.
    """
    if output.is_dir():
        return "is a folder; give a file name"
    existing = output.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK) or (
        output.exists() and not os.access(output, os.W_OK)
    ):
        return "not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``pointsink-predict``.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit status: 0 when every file was classified, 1 otherwise, 2 when the
        checkpoint or device cannot be used. Argument errors exit with status 2 through
        :class:`SystemExit`, as usual with argparse.
    """
    args = build_parser().parse_args(None if argv is None else list(argv))
    output = None if args.output is None else Path(args.output)
    # Checked before any file is classified, so that a long run is not thrown away.
    problem = None if output is None else _unwritable(output)
    if problem is not None:
        print(f"pointsink-predict: error: --output {output}: {problem}", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            classifier = ShapeClassifier.from_checkpoint(
                args.checkpoint, device=args.device, num_points=args.points
            )
        except (CheckpointError, ValueError) as exc:
            print(f"pointsink-predict: error: {exc}", file=sys.stderr)
            return 2
    for caught_warning in caught:
        if issubclass(caught_warning.category, UserWarning):
            print(f"pointsink-predict: warning: {caught_warning.message}", file=sys.stderr)

    predictions = classifier.predict(
        args.paths,
        top_k=args.top_k,
        votes=args.votes,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
        up_axis=args.up_axis,
        # A table written into a folder it classifies would be read back as a .txt cloud.
        exclude=() if output is None else [output],
    )
    text = format_predictions(predictions, args.format)
    if output is None:
        # A file name that is not valid in the file system's encoding holds surrogates
        # (os.fsdecode); the terminal shows them escaped instead of failing.
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        sys.stdout.write(text.encode(encoding, "backslashreplace").decode(encoding))
        sys.stdout.flush()
    else:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            # Table and CSV files keep such names' original bytes (JSON writes \udcXX).
            output.write_text(text, encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            print(f"pointsink-predict: error: --output {output}: {exc}", file=sys.stderr)
            return 2

    failed = [p for p in predictions if p.error is not None]
    if args.format != "table" or args.output is not None:
        # The table already shows errors and warnings; other formats get them on stderr.
        for p in predictions:
            if p.error is not None:
                print(f"pointsink-predict: error: {p.error}", file=sys.stderr)
            elif p.warning:
                print(f"pointsink-predict: warning: {p.path}: {p.warning}", file=sys.stderr)
    where = f" (written to {args.output})" if args.output is not None else ""
    print(
        f"pointsink-predict: {len(predictions) - len(failed)} of {len(predictions)} file(s) "
        f"classified with {classifier.num_points} points on {classifier.device}{where}.",
        file=sys.stderr,
    )
    return 1 if failed or not predictions else 0


if __name__ == "__main__":
    raise SystemExit(main())
