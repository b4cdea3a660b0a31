"""Classifying shapes with a trained checkpoint.

The usual entry point is :class:`ShapeClassifier`::

    from pointsink import ShapeClassifier

    classifier = ShapeClassifier.from_checkpoint("best.ckpt")  # CPU or GPU, eval mode
    for prediction in classifier.predict(["chair.obj", "scans/", "parts/*.stl"], top_k=3):
        print(prediction.path, prediction.label, prediction.probability, prediction.error)

Every input goes through :func:`pointsink.transforms.preprocess_set`, the function that
built the training data, with the number of points used in training (a point cloud with
fewer points is padded and masked, not filled up with repeated points). A bad input (missing
or corrupt file, empty or degenerate mesh, NaN coordinates, ...) gives a
:class:`Prediction` whose ``error`` says what is wrong; the other inputs are still
classified.

The same records are produced by the ``pointsink-predict`` console command
(:mod:`pointsink.predict`) and, through Lightning, by ``python train.py predict`` with
:class:`pointsink.callbacks.PredictionWriter`, whose data comes from
:class:`ShapePredictionDataset`.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import inspect
import io
import json
import numbers
import os
import pickle
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
import torch
import trimesh
from torch import Tensor, nn
from torch.utils.data import Dataset

from pointsink.embedding import leading_mask
from pointsink.io import SUPPORTED_EXTENSIONS, ShapeLoadError, is_shape_file
from pointsink.transforms import (
    MIN_NUM_POINTS,
    PointCloudAugmentation,
    load_for_sampling,
    preprocess_set,
    preprocess_shape,
    up_axis_rotation,
)
from pointsink.validation import check_int

__all__ = [
    "DEFAULT_NUM_POINTS",
    "CheckpointError",
    "PathEntry",
    "Prediction",
    "ShapeClassifier",
    "ShapePredictionDataset",
    "checkpoint_state_dict",
    "expand_paths",
    "format_predictions",
    "load_checkpoint",
    "make_prediction",
    "preprocess_views",
    "resolve_device",
    "state_dict_differences",
]

#: Points per shape when the checkpoint does not record the training's ``num_points``.
DEFAULT_NUM_POINTS = 1024

OutputFormat = Literal["table", "csv", "json"]
#: Output formats of :func:`format_predictions`.
OUTPUT_FORMATS: tuple[str, ...] = ("table", "csv", "json")

# Data-module hyperparameters that configure the training augmentation, mapped to the
# arguments of PointCloudAugmentation (used for the extra views of test-time voting).
_AUGMENTATION_HPARAMS = {
    "scale_low": "scale_low",
    "scale_high": "scale_high",
    "max_rotation_degrees": "max_rotation_degrees",
    "up_axis": "up_axis",
    "jitter_sigma": "jitter_sigma",
    "jitter_clip": "jitter_clip",
    "shuffle_points": "shuffle",
    "max_translation": "max_translation",
}


_Built = TypeVar("_Built")


class CheckpointError(ValueError):
    """A checkpoint cannot be used (for inference or fine-tuning); the message says why."""


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The classification of one input shape.

    Attributes:
        path: The input file, or None for an in-memory input (array, tensor, mesh).
        label: Most probable class name (None when ``error`` is set).
        probability: Probability of ``label`` (None when ``error`` is set).
        topk: ``(class name, probability)`` pairs, most probable first.
        error: None, or one sentence saying why this input could not be classified.
        warning: None, or a note about the input that did not stop its classification
            (e.g. a point cloud with fewer points than requested, padded and masked).
    """

    path: str | None
    label: str | None = None
    probability: float | None = None
    topk: tuple[tuple[str, float], ...] = ()
    error: str | None = None
    warning: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the input was classified."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict.

        Keys: ``path, label, probability, topk`` (``[[name, p], ...]``), ``error, warning``.
        """
        return {
            "path": self.path,
            "label": self.label,
            "probability": self.probability,
            "topk": [[name, probability] for name, probability in self.topk],
            "error": self.error,
            "warning": self.warning,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Prediction:
        """Inverse of :meth:`to_dict`."""
        return cls(
            path=record.get("path"),
            label=record.get("label"),
            probability=record.get("probability"),
            topk=tuple((str(name), float(p)) for name, p in record.get("topk") or ()),
            error=record.get("error"),
            warning=record.get("warning"),
        )


def make_prediction(
    path: str | None,
    probabilities: Tensor,
    class_names: Sequence[str],
    top_k: int,
    warning: str | None = None,
) -> Prediction:
    """Builds the record of one classified input.

    Args:
        path: Input file (None for in-memory inputs).
        probabilities: Class probabilities ``(C,)``.
        class_names: ``C`` class names.
        top_k: Number of classes listed in ``topk`` (capped at ``C``).
        warning: Optional note to attach.

    Returns:
        The prediction; ties are broken in favour of the lower class index.
    """
    probabilities = probabilities.detach().float().cpu().reshape(-1)
    if len(probabilities) != len(class_names):
        raise ValueError(
            f"got {len(probabilities)} probabilities for {len(class_names)} class names."
        )
    order = torch.sort(probabilities, descending=True, stable=True).indices[: max(1, top_k)]
    topk = tuple((class_names[i], float(probabilities[i])) for i in order.tolist())
    return Prediction(
        path=path, label=topk[0][0], probability=topk[0][1], topk=topk, warning=warning
    )


# --------------------------------------------------------------------------------------
# Inputs: paths and preprocessing
# --------------------------------------------------------------------------------------


class PathEntry(NamedTuple):
    """One input file found by :func:`expand_paths`, or why an argument gave none."""

    path: str
    error: str | None = None


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[PathEntry]:
    """Expands files, folders and glob patterns into the list of files to classify.

    * An existing file is kept as given (its format is checked when it is loaded).
    * A folder is searched recursively for files with an extension in
      :data:`pointsink.io.SUPPORTED_EXTENSIONS` (case-insensitive), in sorted order;
      hidden files and folders (names starting with ``.``) are skipped.
    * A pattern with ``*``, ``?`` or ``[...]`` (``**`` included) is expanded like a
      folder's content: matching supported files, and the files of matching folders.
    * ``~`` is expanded. Linked folders are followed. A file reached twice (also
      through a linked folder) is listed once.

    An argument that gives no file yields one entry with an ``error`` (a missing path,
    a folder without shape files, a pattern that matches none), so that the caller can
    report it next to the results of the other arguments.

    Args:
        paths: File, folder or pattern strings (or path objects).

    Returns:
        Entries in argument order.
    """
    entries: list[PathEntry] = []
    seen: set[str] = set()
    for raw in paths:
        entries.extend(_expand_one(raw, seen))
    return entries


def _expand_one(raw: str | os.PathLike[str], seen: set[str]) -> list[PathEntry]:
    """Expands one argument of :func:`expand_paths`, skipping (and adding to) ``seen`` files."""
    given = os.fspath(raw)
    path = os.path.expanduser(given)
    if os.path.isdir(path):
        found = _shape_files_in(path)
        if not found:
            return [PathEntry(given, _no_files_error(given, "folder"))]
    elif os.path.lexists(path):
        found = [path]
    elif glob.has_magic(path):
        found = []
        for match in sorted(_glob(path)):
            if os.path.isdir(match):
                found.extend(_shape_files_in(match))
            elif is_shape_file(match):
                found.append(match)
        if not found:
            return [PathEntry(given, _no_files_error(given, "pattern"))]
    else:
        return [PathEntry(given, f"{given}: no such file or folder.")]
    entries = []
    for file in found:
        key = _file_key(file)
        if key not in seen:
            seen.add(key)
            entries.append(PathEntry(file))
    return entries


def _file_key(path: str | os.PathLike[str]) -> str:
    """The identity of a file for :func:`expand_paths`'s "listed once".

    The real folder and the name: a file reached through a linked folder is the same file,
    but two names linking to one stored file (git-annex, DVC) stay two shapes.
    """
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.normcase(os.path.join(os.path.realpath(folder), name))


def _no_files_error(given: str, kind: str) -> str:
    extensions = ", ".join(sorted(SUPPORTED_EXTENSIONS))
    where = "contains" if kind == "folder" else "matches"
    return f"{given}: this {kind} {where} no shape files (supported extensions: {extensions})."


def _shape_files_in(folder: str) -> list[str]:
    """Supported, non-hidden files under ``folder``, recursively, in sorted order.

    Linked folders are followed, each real folder once (see :func:`_walk_once`).
    """
    found = []
    for directory, _, files in _walk_once(folder, skip_hidden=True):
        found.extend(
            os.path.join(directory, name)
            for name in files
            if is_shape_file(os.path.join(directory, name))
        )
    return found


def _walk_once(folder: str, skip_hidden: bool) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(folder)`` top-down, following linked folders, each real folder once.

    A link to an ancestor would loop. Yields ``(folder, subfolders, files)`` with both
    lists sorted; ``skip_hidden`` leaves out subfolders whose names start with ``.``.
    """
    visited = {os.path.realpath(folder)}
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(subdirectories):
            real = os.path.realpath(os.path.join(directory, name))
            if not (skip_hidden and name.startswith(".")) and real not in visited:
                visited.add(real)
                kept.append(name)
        subdirectories[:] = kept
        yield directory, kept, sorted(files)


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` searches each real folder once.

    Python's ``**`` follows linked folders without a loop guard: two links to an ancestor
    double the search at every level, up to the system's limit of about 40 links in a
    path (some 2**40 paths). Here ``**`` walks with :func:`_walk_once`; as in ``glob``, it
    matches zero or more folders and wildcards do not match hidden names (``.`` first).
    """
    parts = (pattern.replace(os.altsep, os.sep) if os.altsep else pattern).split(os.sep)
    while parts and not parts[-1]:  # "folder/**/": the files of the folders, as for "**"
        parts.pop()
    if "**" not in parts:
        return glob.glob(pattern, recursive=True)
    first = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    base = os.sep.join(parts[:first]) or (os.sep if first else "")
    rest = parts[first:]
    skip_hidden = not any(part.startswith(".") for part in rest)
    found = []
    for directory, subdirectories, files in _walk_once(base or os.curdir, skip_hidden):
        relative = os.path.relpath(directory, base or os.curdir)
        folders = [] if relative == os.curdir else relative.split(os.sep)
        for name in [*subdirectories, *files]:
            if _matches([*folders, name], rest):
                found.append(os.path.join(base, *folders, name))
    return found


def _matches(names: list[str], pattern: list[str]) -> bool:
    """Whether the path components ``names`` match the glob components ``pattern``."""
    if not pattern:
        return not names
    head, tail = pattern[0], pattern[1:]
    if head == "**":  # zero or more non-hidden components
        for count in range(len(names) + 1):
            if count and names[count - 1].startswith("."):
                return False
            if _matches(names[count:], tail):
                return True
        return False
    if not names or (names[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatch(names[0], head) and _matches(names[1:], tail)


def _view_seed(seed: int, view: int) -> int:
    """Independent 32-bit seed of voting view ``view`` (>= 1) for base seed ``seed``."""
    return int(np.random.SeedSequence([seed, view]).generate_state(1)[0])


def preprocess_views(
    source: str | os.PathLike[str] | Any,
    num_points: int,
    seed: int = 0,
    votes: int = 1,
    augmentation: PointCloudAugmentation | None = None,
    orientation: np.ndarray | None = None,
    pad_small_clouds: bool = True,
) -> tuple[np.ndarray, int, list[str]]:
    """Loads a shape once and makes the point sets that the classifier averages over.

    View 0 is the training pipeline's sampling and normalization,
    ``preprocess_set(shape, num_points, s)``, where ``s`` is ``seed`` for an in-memory
    shape and :func:`pointsink.transforms.file_sample_seed` of ``(source, seed)`` for a
    file: a file's view 0 is the sample the training cache holds for it with
    ``sample_seed = seed``. Each further view ``v`` is sampled with its own seed derived
    from ``(s, v)`` and, if ``augmentation`` is given, augmented with a generator seeded
    the same way, so the result depends only on the arguments and the file's contents.
    ``orientation`` turns every view before it is augmented (sampling and normalization
    commute with a rotation, so this is the shape turned first). A point cloud of fewer
    than ``num_points`` points gives its points first in every view and zeros after them
    (``count`` says how many are real), and the augmentation moves only the real ones.

    Args:
        source: A file path or an in-memory shape (see :func:`pointsink.io.as_shape`).
        num_points: Points per view ``N``.
        seed: Base seed (>= 0).
        votes: Number of views ``V`` (>= 1).
        augmentation: Augmentation of views 1 to ``V - 1``.
        orientation: Rotation ``(3, 3)`` applied to every view as ``points @ R.T``, e.g.
            :func:`pointsink.transforms.up_axis_rotation` for a file that is not z-up;
            None: the shape as it is.
        pad_small_clouds: False fills a small point cloud up with repeated points
            (:func:`pointsink.transforms.preprocess_shape`, ``count`` then ``N``), for a
            model that takes no padding mask.

    Returns:
        ``(views, count, warnings)``: float32 array ``(V, N, 3)``, the real points of each
        view (its first ``count`` rows; ``N`` but for a smaller point cloud), and the
        distinct messages of the warnings raised while loading and sampling.

    Raises:
        pointsink.io.ShapeLoadError: The source is not a usable shape.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shape, seed = load_for_sampling(source, seed)

        def sample(view_seed: int) -> tuple[np.ndarray, int]:
            if pad_small_clouds:
                return preprocess_set(shape, num_points, view_seed)
            return preprocess_shape(shape, num_points, view_seed), num_points

        first, count = sample(seed)
        views = [_turn(first, orientation)]
        for view in range(1, votes):
            view_seed = _view_seed(seed, view)
            points = _turn(sample(view_seed)[0], orientation)
            if augmentation is not None:
                generator = torch.Generator().manual_seed(view_seed)
                with torch.no_grad():
                    real = torch.from_numpy(points[:count])
                    real = augmentation(real, generator=generator).numpy()
                points = real if count == num_points else np.concatenate([real, points[count:]])
            views.append(points)
    messages: list[str] = []
    for caught_warning in caught:
        message = str(caught_warning.message)
        if issubclass(caught_warning.category, UserWarning) and message not in messages:
            messages.append(message)
    return np.stack(views).astype(np.float32, copy=False), count, messages


def _turn(points: np.ndarray, orientation: np.ndarray | None) -> np.ndarray:
    """``points (N, 3) @ orientation.T`` in float32, or the points as they are for None."""
    if orientation is None:
        return points
    return (points @ orientation.T).astype(np.float32, copy=False)


def _safe_preprocess(
    source: Any,
    num_points: int,
    seed: int,
    votes: int,
    augmentation: PointCloudAugmentation | None,
    orientation: np.ndarray | None = None,
    pad_small_clouds: bool = True,
) -> tuple[tuple[np.ndarray, int] | None, str | None, str | None]:
    """:func:`preprocess_views` that returns ``((views, count) or None, error, warning)``."""
    try:
        views, count, messages = preprocess_views(
            source, num_points, seed, votes, augmentation, orientation, pad_small_clouds
        )
    except ShapeLoadError as exc:
        return None, str(exc), None
    except Exception as exc:  # one odd input must never stop the others
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "input"
        return None, f"{name}: preprocessing failed ({type(exc).__name__}: {exc}).", None
    return (views, count), None, " ".join(messages) or None


class ShapePredictionDataset(Dataset):
    """Shape files preprocessed on the fly for ``Trainer.predict``, errors included.

    Folders and glob patterns are expanded with :func:`expand_paths`. Each item is one
    file, sampled and normalized with :func:`pointsink.transforms.preprocess_set` (one
    view, the file's :func:`pointsink.transforms.file_sample_seed` of ``seed``, as in the
    training cache), like :meth:`ShapeClassifier.predict` with ``votes=1``. A file that
    cannot be used (or an argument that matched no file) is an item too: its points are
    zeros and its ``error`` says what is wrong, so one bad file never stops the run.

    Args:
        paths: Files, folders or glob patterns.
        num_points: Points per shape ``N``.
        seed: Sampling seed (>= 0).
        orientation: Rotation ``(3, 3)`` of every shape (see :func:`preprocess_views`);
            None: as they are.

    Items are dicts ``{"points": (N, 3) float32, "mask": (N,) bool, "index": int, "path":
    str, "error": str, "warning": str}``, where an empty ``error``/``warning`` string means
    none (the default collate function cannot batch None) and ``mask`` marks the real
    points (a point cloud of fewer than ``N`` points is padded). :meth:`collate`
    (:func:`pointsink.data.collate_point_sets`) batches them and leaves out a mask that is
    True everywhere, so that full batches take the model's unmasked path.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        num_points: int,
        seed: int = 0,
        orientation: np.ndarray | None = None,
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        check_int("num_points", num_points, minimum=MIN_NUM_POINTS)
        check_int("seed", seed, minimum=0)
        self.entries: list[PathEntry] = expand_paths(paths)
        self.num_points = num_points
        self.seed = seed
        self.orientation = orientation

    @property
    def paths(self) -> list[str]:
        """The path of every item, in item order."""
        return [entry.path for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns ``{"points": (N, 3), "mask": (N,), "index", "path", "error", "warning"}``."""
        entry = self.entries[index]
        error, warning, points, count = entry.error, None, None, self.num_points
        if error is None:
            prepared, error, warning = _safe_preprocess(
                entry.path, self.num_points, self.seed, 1, None, self.orientation
            )
            if prepared is not None:
                points, count = torch.from_numpy(prepared[0][0]), prepared[1]
        if points is None:
            points = torch.zeros(self.num_points, 3)
        return {
            "points": points,
            "mask": torch.arange(self.num_points) < count,
            "index": int(index),
            "path": entry.path,
            "error": error or "",
            "warning": warning or "",
        }

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """:func:`pointsink.data.collate_point_sets`: without ``"mask"`` if all is real."""
        from pointsink.data import collate_point_sets  # pointsink.data imports this module

        return collate_point_sets(items)


# --------------------------------------------------------------------------------------
# Checkpoints and the classifier
# --------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a checkpoint with ``torch.load(..., weights_only=True)``: no code is executed.

    Args:
        path: A ``.ckpt`` file written by Lightning (``python train.py fit`` or
            ``Trainer.save_checkpoint``).

    Returns:
        The checkpoint dict, tensors on the CPU.

    Raises:
        CheckpointError: The file is missing, is not a PyTorch checkpoint, holds Python
            objects that a weights-only load refuses, or is not a dict.
    """
    path = Path(path).expanduser()  # as expand_paths does for the inputs
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"))[:3]
        hint = f" (it holds e.g. {', '.join(map(str, found))})" if found else ""
        raise CheckpointError(
            f"{path}: a folder, not a checkpoint file; give a .ckpt file{hint}. With "
            "pointsink-predict the checkpoint comes first, then the files to classify."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refusing to load this checkpoint: it holds Python objects that a "
                f"safe (weights-only) load does not allow, since loading them could run code "
                f"({reason})."
            ) from exc
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt, truncated or another kind "
            f"of file: {reason})."
        ) from exc
    except Exception as exc:  # zip errors, EOF on a truncated file, ...
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})."
        ) from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: expected a Lightning checkpoint (a dict), got {type(checkpoint).__name__}."
        )
    return checkpoint


def checkpoint_hparams(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> dict:
    """The hyperparameters of a checkpoint read by :func:`load_checkpoint`.

    Raises:
        CheckpointError: The checkpoint records none (not saved from a pointsink module).
    """
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(
            f"{path}: the checkpoint has no 'hyper_parameters'; it was not saved from a "
            "pointsink SinkformerClassifier (use a .ckpt written by `train.py fit`)."
        )
    return hparams


def checkpoint_class_names(hparams: dict[str, Any], path: str | os.PathLike[str]) -> list[str]:
    """The class names, in label order, that a checkpoint's hyperparameters record.

    Raises:
        CheckpointError: They are missing or not a list of at least two names.
    """
    class_names = hparams.get("class_names")
    if (
        not isinstance(class_names, (list, tuple))
        or len(class_names) < 2
        or not all(isinstance(name, str) for name in class_names)
    ):
        raise CheckpointError(
            f"{path}: the checkpoint does not record the class names "
            "(hyper_parameters['class_names'] is missing or not a list of names), so "
            "predictions could not be named."
        )
    return list(class_names)


def build_from_hparams(
    cls: type[_Built], hparams: dict[str, Any], path: str | os.PathLike[str], **fixed: Any
) -> _Built:
    """Builds ``cls`` from the checkpoint hyperparameters that its constructor takes.

    Args:
        cls: The class to build, e.g. :class:`~pointsink.model.SetSinkformer`.
        hparams: The checkpoint's hyperparameters; those ``cls`` does not take are left out,
            and those it takes but the checkpoint lacks keep their defaults.
        path: The checkpoint, named in errors.
        **fixed: Arguments that override the hyperparameters.

    Raises:
        CheckpointError: The hyperparameters do not build ``cls`` in this version.
    """
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {key: value for key, value in hparams.items() if key in accepted}
    try:
        return cls(**{**kwargs, **fixed})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: the checkpoint's hyperparameters do not fit this version of "
            f"pointsink ({type(exc).__name__}: {_first_line(exc)})."
        ) from exc


def checkpoint_state_dict(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> dict:
    """The model weights of a checkpoint read by :func:`load_checkpoint`.

    Raises:
        CheckpointError: The checkpoint holds no (or an empty) ``state_dict``.
    """
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path}: the checkpoint has no model weights ('state_dict').")
    return state_dict


def _unpickler_reason(exc: BaseException) -> str:
    """The useful part of torch's long weights-only error message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not detail and index + 1 < len(lines):
                detail = lines[index + 1]
            detail = detail.split(" was not an allowed global", 1)[0]
            return detail[:200] or "no details"
    return _first_line(exc)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else "no details"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turns ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda[:i]"`` into a device.

    Raises:
        ValueError: Unknown device name, CUDA requested but not available, or a CUDA
            index this machine does not have.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but CUDA is not available here; use 'cpu' or 'auto'."
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} was requested but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s), numbered from 0."
        )
    return resolved


class ShapeClassifier:
    """A trained classifier ready for inference on files, arrays and meshes.

    Build it with :meth:`from_checkpoint`. The model is in eval mode (no dropout) and
    predictions run under ``torch.inference_mode``.

    Args:
        model: Module mapping points ``(B, N, 3)`` to logits ``(B, C)``, e.g. a
            :class:`~pointsink.module.SinkformerClassifier`. If its ``forward`` takes
            ``mask`` (``(B, N)`` bool, True for real points), point clouds smaller than
            ``num_points`` are padded and masked; otherwise they are filled up with
            repeated points (:attr:`takes_mask`).
        class_names: The ``C`` class names in label order.
        num_points: Points sampled per shape (use the training's number); at least the
            model's ``min_points`` when it has one.
        augmentation: Augmentation of the extra views when ``votes > 1``; None: the
            default :class:`~pointsink.transforms.PointCloudAugmentation`.
        sample_seed: Default seed of :meth:`predict` (use the training's
            ``data.sample_seed``, so that a file gets the points the training cache holds).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a torch device.

    Raises:
        ValueError: Bad ``num_points`` (too few for the model), ``class_names`` or
            ``device``.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        num_points: int = DEFAULT_NUM_POINTS,
        augmentation: PointCloudAugmentation | None = None,
        device: str | torch.device = "auto",
        sample_seed: int = 0,
    ) -> None:
        num_points = check_int("num_points", num_points, minimum=MIN_NUM_POINTS)
        self.sample_seed = check_int("sample_seed", sample_seed, minimum=0)
        fewest = getattr(model, "min_points", 1)
        if num_points < fewest:
            raise ValueError(
                f"num_points={num_points} is too few for this model: it needs at least "
                f"{fewest} points per shape (its neighbourhoods and groups)."
            )
        names = [str(name) for name in class_names]
        if len(names) < 2:
            raise ValueError(f"need at least two class names; got {names}.")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self._class_names = names
        self.num_points = num_points
        self.augmentation = augmentation if augmentation is not None else PointCloudAugmentation()
        #: Whether ``model`` takes a padding mask (a ``mask`` argument of its ``forward``):
        #: point clouds smaller than ``num_points`` are then padded and masked, otherwise
        #: filled up with repeated points.
        self.takes_mask = "mask" in inspect.signature(model.forward).parameters

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (a copy)."""
        return list(self._class_names)

    @property
    def up_axis(self) -> int:
        """Index of the vertical axis of the training shapes (the augmentation's; 2 is z)."""
        return self.augmentation.up_axis

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "auto",
        num_points: int | None = None,
    ) -> ShapeClassifier:
        """Loads a Lightning checkpoint of :class:`~pointsink.module.SinkformerClassifier`.

        Only the checkpoint is needed (no training config or data): the model is rebuilt
        from its saved hyperparameters, class names included, and the weights are read
        with a weights-only ``torch.load`` (no code execution). The number of points
        defaults to the one used in training when the checkpoint records it (the model's
        ``num_points`` hyperparameter, or the data module's in
        ``datamodule_hyper_parameters``), else to :data:`DEFAULT_NUM_POINTS` with a
        warning. The augmentation of voting's extra views is the training's, which
        checkpoints written by ``train.py fit`` record, else the default one; so is the
        default sampling seed (``data.sample_seed``; 0 for checkpoints that predate it).

        Args:
            path: The ``.ckpt`` file.
            device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ...
            num_points: Override of the number of points per shape.

        Returns:
            The classifier, in eval mode on ``device``.

        Raises:
            CheckpointError: The file is not a usable pointsink checkpoint (missing
                class names or weights, weights that do not fit the model, unsafe content).
            ValueError: Bad ``device`` or ``num_points``.
        """
        from pointsink.module import SinkformerClassifier  # Lightning import kept lazy

        checkpoint = load_checkpoint(path)
        hparams = checkpoint_hparams(checkpoint, path)
        class_names = checkpoint_class_names(hparams, path)
        state_dict = checkpoint_state_dict(checkpoint, path)

        module = build_from_hparams(SinkformerClassifier, hparams, path)
        check_state_dict(path, module.state_dict(), state_dict)
        module.load_state_dict(state_dict, strict=True)

        data_hparams = checkpoint.get("datamodule_hyper_parameters")
        data_hparams = data_hparams if isinstance(data_hparams, dict) else {}
        if num_points is None:
            recorded = [hparams.get("num_points"), data_hparams.get("num_points")]
            valid = [
                n for n in recorded if isinstance(n, int) and not isinstance(n, bool) and n > 0
            ]
            if valid:
                num_points = valid[0]
            else:
                warnings.warn(
                    f"{path}: the checkpoint does not record the number of points used in "
                    f"training; using {DEFAULT_NUM_POINTS} (pass num_points / --points to "
                    "change it).",
                    UserWarning,
                    stacklevel=2,
                )
                num_points = DEFAULT_NUM_POINTS
        return cls(
            module,
            class_names,
            num_points=num_points,
            augmentation=_augmentation_from_hparams(hparams, data_hparams),
            device=device,
            # The data module's first: it sampled the training cache, and the model records
            # its default 0 even where nothing links the two (training from Python).
            sample_seed=data_hparams.get("sample_seed", hparams.get("sample_seed", 0)),
        )

    # -- prediction ---------------------------------------------------------------------

    def predict(
        self,
        inputs: Any,
        top_k: int = 5,
        votes: int = 1,
        seed: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
        up_axis: int | str | None = None,
        exclude: Iterable[str | os.PathLike[str]] = (),
    ) -> list[Prediction]:
        """Classifies shapes.

        Args:
            inputs: One input or a list of inputs. An input is a file path (str or path
                object; a folder or glob pattern expands to its shape files, see
                :func:`expand_paths`), a point array or tensor ``(P, 3)`` (or nested
                lists of numbers, as ``points.tolist()`` gives), a batch of point sets
                ``(B, P, 3)`` (one prediction each), or a
                :class:`trimesh.Trimesh` / :class:`trimesh.Scene` /
                :class:`trimesh.PointCloud`. Points are resampled and normalized like
                files, so raw coordinates are fine.
            top_k: Classes listed per prediction (capped at the number of classes).
            votes: Views averaged per shape: view 0 is the plain training preprocessing;
                views 1.. use other sampling seeds and the training augmentation.
            seed: Seed of sampling and augmentation (>= 0); same seed, same result. None:
                :attr:`sample_seed` (the training's, for :meth:`from_checkpoint`), with
                which view 0 of a file is the point set ``train.py test`` scores.
            batch_size: Shapes per forward pass.
            progress: Show a progress bar on stderr.
            up_axis: The inputs' vertical axis, ``"x"``, ``"y"`` or ``"z"`` (e.g. ``"y"``
                for glTF files); they are turned upright along :attr:`up_axis` first (see
                :func:`pointsink.transforms.up_axis_rotation`). None: the inputs stand like
                the training shapes.
            exclude: Files never classified, wherever a folder, pattern or path reaches
                them: e.g. the file the predictions are written to, which a later run
                over the same folder would otherwise read as a point cloud (``.txt``).

        Returns:
            One :class:`Prediction` per input (per file of a folder or pattern, per item
            of a batch array), in input order, except that a file reached more than once
            (listed twice, or through two paths, folders or patterns) is classified once,
            at its first place: match files by :attr:`Prediction.path`, not by position.
            Inputs that cannot be classified have ``error`` set; they never stop the others.
        """
        check_int("top_k", top_k)
        check_int("votes", votes)
        check_int("batch_size", batch_size)
        seed = self.sample_seed if seed is None else check_int("seed", seed, minimum=0)
        orientation = None if up_axis is None else up_axis_rotation(up_axis, self.up_axis)
        items = list(_flatten_inputs(inputs, exclude))
        results: list[Prediction] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc="Classifying", unit="shape", mininterval=1.0)
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                results.extend(self._predict_chunk(chunk, top_k, votes, seed, orientation))
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return results

    def predict_probabilities(
        self, points: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None
    ) -> Tensor:
        """Class probabilities of already preprocessed point sets.

        Args:
            points: ``(B, N, 3)`` (or ``(N, 3)``) points, normalized like
                :func:`pointsink.transforms.preprocess_set` output.
            mask: ``(B, N)`` (or ``(N,)``) bool, True for real points, for padded sets;
                None: all real. A mask that is True everywhere is left out, so full sets
                take the model's unmasked path.

        Returns:
            Float32 CPU tensor ``(B, C)`` (``(1, C)`` for a single set).
        """
        batch = torch.as_tensor(points)
        if mask is not None:
            mask = torch.as_tensor(mask)
            if bool(mask.all()):  # checked where the caller built it (the CPU, here)
                mask = None
            else:
                mask = (mask.unsqueeze(0) if batch.dim() == 2 else mask).to(self.device)
        if batch.dim() == 2:
            batch = batch.unsqueeze(0)
        with torch.inference_mode():
            points = batch.to(self.device, torch.float32)
            logits = self.model(points) if mask is None else self.model(points, mask)
        return logits.float().softmax(dim=-1).cpu()

    def view_probabilities(
        self, views: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None
    ) -> Tensor:
        """Class probabilities of every view of every shape, one forward pass for all.

        Args:
            views: ``(S, V, N, 3)`` preprocessed views, e.g. a stack of
                :func:`preprocess_views` outputs.
            mask: ``(S, N)`` bool, each shape's real points (the same in all its views),
                or None (all real).

        Returns:
            Float32 CPU tensor ``(S, V, C)``; averaging over ``V`` is voting.
        """
        views = torch.as_tensor(views)
        if views.dim() != 4:
            raise ValueError(f"views must have shape (S, V, N, 3); got {tuple(views.shape)}.")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.shape != (views.shape[0], views.shape[2]):
                raise ValueError(
                    f"mask must have shape (S, N) = {(views.shape[0], views.shape[2])}; "
                    f"got {tuple(mask.shape)}."
                )
            mask = mask.repeat_interleave(views.shape[1], dim=0)
        flat = self.predict_probabilities(views.reshape(-1, *views.shape[2:]), mask)
        return flat.reshape(*views.shape[:2], -1)

    def _predict_chunk(
        self,
        chunk: list[_Item],
        top_k: int,
        votes: int,
        seed: int,
        orientation: np.ndarray | None = None,
    ) -> list[Prediction]:
        prepared: list[tuple[tuple[np.ndarray, int] | None, str | None, str | None]] = []
        for item in chunk:
            if item.error is not None:
                prepared.append((None, item.error, None))
            else:
                prepared.append(
                    _safe_preprocess(
                        item.source,
                        self.num_points,
                        seed,
                        votes,
                        self.augmentation,
                        orientation,
                        self.takes_mask,
                    )
                )
        valid = [views for views, _, _ in prepared if views is not None]
        probabilities = None
        if valid:
            counts = torch.tensor([count for _, count in valid])
            mask = leading_mask(counts, self.num_points)  # left out if all real
            stacked = np.stack([views for views, _ in valid])
            probabilities = self.view_probabilities(stacked, mask).mean(dim=1)  # (b, C)
        predictions = []
        row = 0
        for item, (views, error, warning) in zip(chunk, prepared, strict=True):
            if views is None:
                predictions.append(Prediction(path=item.path, error=error, warning=warning))
                continue
            assert probabilities is not None
            predictions.append(
                make_prediction(item.path, probabilities[row], self._class_names, top_k, warning)
            )
            row += 1
        return predictions


class _Item(NamedTuple):
    path: str | None
    source: Any
    error: str | None


def _flatten_inputs(inputs: Any, exclude: Iterable[str | os.PathLike[str]] = ()) -> Iterator[_Item]:
    """Splits ``inputs`` (see :meth:`ShapeClassifier.predict`) into single shapes.

    Raises:
        TypeError: ``inputs`` is a mapping, whose keys iteration would take for the inputs.
    """
    if isinstance(inputs, Mapping):
        raise TypeError(
            "inputs must be a shape, a path or a list of them, not a mapping (its keys would "
            "be taken for the inputs); pass list(mapping) or list(mapping.values())."
        )
    single = (str, bytes, os.PathLike, np.ndarray, Tensor, trimesh.Trimesh, trimesh.Scene)
    if isinstance(inputs, (*single, trimesh.PointCloud)) or not isinstance(inputs, Iterable):
        inputs = [inputs]
    elif isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (list, tuple)):
        # points.tolist(): one point set (or a batch), not one input per point.
        nested = _nested_numbers(inputs)
        if nested is not None:
            inputs = [nested]
    # A file reached through several paths is classified once; excluded files never.
    seen = {_file_key(path) for path in exclude}
    for item in inputs:
        if isinstance(item, bytes):  # a path as the OS gives it (os.listdir of bytes)
            item = os.fsdecode(item)
        if isinstance(item, (str, os.PathLike)):
            for entry in _expand_one(item, seen):
                yield _Item(entry.path, entry.path, entry.error)
            continue
        if isinstance(item, (list, tuple)):
            nested = _nested_numbers(item)
            item = item if nested is None else nested
        if isinstance(item, (np.ndarray, Tensor)) and item.ndim == 3:
            for index in range(item.shape[0]):
                yield _Item(None, item[index], None)
        else:
            yield _Item(None, item, None)


def _nested_numbers(value: list | tuple) -> np.ndarray | None:
    """``value`` as a float array if it is a rectangular nest of numbers of depth 2 or 3.

    Only lists and tuples of plain numbers qualify: a list that holds arrays, tensors or
    strings is a list of inputs, each classified (or refused) on its own.
    """
    if not _is_number_nest(value, depth=3):
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except ValueError:  # ragged
        return None
    return array if array.ndim in (2, 3) else None


def _is_number_nest(value: Any, depth: int) -> bool:
    """Whether ``value`` is a list or tuple of numbers, or of such nests, at most ``depth`` deep."""
    if not isinstance(value, (list, tuple)) or not value or depth == 0:
        return False
    if all(isinstance(entry, numbers.Real) and not isinstance(entry, bool) for entry in value):
        return True
    return all(_is_number_nest(entry, depth - 1) for entry in value)


def state_dict_differences(expected: dict[str, Tensor], found: dict[str, Any]) -> list[str]:
    """What keeps ``found`` from loading into a model whose state dict is ``expected``.

    Returns:
        One phrase per kind of problem (missing, unexpected or differently shaped weights,
        each with up to three names); empty when ``found`` fits.
    """
    problems = []
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = [
        key
        for key in expected
        if key in found
        and (not isinstance(found[key], Tensor) or found[key].shape != expected[key].shape)
    ]
    for description, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("with a different shape", mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} weight(s) {description} ({shown})")
    return problems


def checkpoint_model_weights(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> dict:
    """The :class:`~pointsink.model.SetSinkformer` weights inside a checkpoint's state dict.

    The Lightning module holds the network as its ``model`` attribute, so these are the
    ``model.``-prefixed entries of :func:`checkpoint_state_dict`, without the prefix.
    """
    prefix = "model."
    return {
        key.removeprefix(prefix): value
        for key, value in checkpoint_state_dict(checkpoint, path).items()
        if key.startswith(prefix)
    }


def check_state_dict(
    path: str | os.PathLike[str], expected: dict[str, Tensor], found: dict[str, Any]
) -> None:
    """Raises :class:`CheckpointError` naming what differs between two state dicts."""
    problems = state_dict_differences(expected, found)
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not fit the model described by the checkpoint's "
            f"hyperparameters, so it is probably from an incompatible version of pointsink: "
            f"{'; '.join(problems)}."
        )


def _augmentation_from_hparams(
    hparams: dict[str, Any], data_hparams: dict[str, Any]
) -> PointCloudAugmentation:
    """The training's augmentation as the checkpoint records it, else the default.

    pointsink's CLI records it as the model's ``augmentation`` hyperparameter; a data
    module that saves its own hyperparameters records the same settings by name.
    Recorded settings this version cannot use (an unknown name, an invalid value) fall
    back to the default augmentation with a warning: only test-time voting uses it, and
    plain prediction stays exact.
    """
    recorded = hparams.get("augmentation")
    if isinstance(recorded, dict):
        kwargs = dict(recorded)
    else:
        kwargs = {
            argument: data_hparams[key]
            for key, argument in _AUGMENTATION_HPARAMS.items()
            if data_hparams.get(key) is not None
        }
    # A view is there to show the shape in another pose; dropping points only hides it.
    kwargs.pop("max_point_dropout", None)
    try:
        return PointCloudAugmentation(**kwargs)
    except (TypeError, ValueError) as error:
        warnings.warn(
            f"the checkpoint's recorded augmentation {kwargs} cannot be used ({error}); "
            "test-time voting uses the default augmentation instead.",
            UserWarning,
            stacklevel=3,
        )
    # The vertical axis, which up_axis turns inputs to, stays the recorded one if it can.
    try:
        return PointCloudAugmentation(up_axis=kwargs.get("up_axis", 2))
    except (TypeError, ValueError):
        return PointCloudAugmentation()


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def format_predictions(
    predictions: Sequence[Prediction], output_format: OutputFormat = "table"
) -> str:
    """Renders predictions as a readable table, CSV or a JSON list.

    Args:
        predictions: Records to render.
        output_format: ``"table"``, ``"csv"`` (columns ``path, label, probability, topk,
            error, warning``; ``topk`` as ``name:p;name:p``) or ``"json"`` (a list of
            :meth:`Prediction.to_dict` records).

    Returns:
        The text, ending with a newline.
    """
    if output_format == "json":
        if not predictions:
            return "[]\n"
        # One record per line: valid JSON that stays readable and easy to grep.
        return "[\n" + ",\n".join(json.dumps(p.to_dict()) for p in predictions) + "\n]\n"
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label", "probability", "topk", "error", "warning"])
        for p in predictions:
            topk = ";".join(f"{name}:{probability:.6f}" for name, probability in p.topk)
            writer.writerow(
                [
                    _display_path(p, None),
                    p.label or "",
                    "" if p.probability is None else repr(p.probability),
                    topk,
                    p.error or "",
                    p.warning or "",
                ]
            )
        return buffer.getvalue()
    if output_format == "table":
        return _format_table(predictions)
    raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}; got {output_format!r}.")


def _display_path(prediction: Prediction, position: int | None) -> str:
    if prediction.path is not None:
        return prediction.path
    return f"<input {position}>" if position is not None else ""


def _escape_control_characters(text: str) -> str:
    r"""``text`` with control characters written as escapes (a newline as ``\n``).

    So are surrogates (the bytes of a file name invalid in the file system's encoding,
    ``os.fsdecode``), which a terminal would show escaped anyway, wider than measured.
    """
    return "".join(
        repr(char)[1:-1] if unicodedata.category(char) in ("Cc", "Cs") else char for char in text
    )


def _display_width(text: str) -> int:
    """Terminal columns of ``text``: wide (East Asian) characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _format_table(predictions: Sequence[Prediction]) -> str:
    rows = [("path", "label", "prob", "top classes")]
    notes = []
    for position, p in enumerate(predictions):
        # A newline or tab in a file name would break the table's rows and columns.
        path = _escape_control_characters(_display_path(p, position))
        if p.error is not None:
            rows.append((path, "ERROR", "-", p.error))
        else:
            topk = ", ".join(f"{name} {probability:.3f}" for name, probability in p.topk)
            rows.append((path, p.label or "", f"{p.probability:.3f}", topk))
        if p.warning:
            notes.append(f"warning: {path}: {p.warning}")
    widths = [max(_display_width(row[column]) for row in rows) for column in range(3)]
    lines = [
        "  ".join(
            cell + " " * (width - _display_width(cell))
            for cell, width in zip(row[:3], widths, strict=True)
        )
        + "  "
        + row[3]
        for row in rows
    ]
    failed = sum(1 for p in predictions if p.error is not None)
    lines.append(f"{len(predictions) - failed} classified, {failed} failed.")
    return "\n".join([line.rstrip() for line in lines] + notes) + "\n"
