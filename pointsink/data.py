"""Datasets, the preprocessed-points disk cache, and Lightning DataModules.

Shapes live in ModelNet's layout, ``root/<class>/{train,test}/*.<ext>``. Each split
is preprocessed once (load → sample ``num_points`` → normalize, see
:func:`pointsink.transforms.preprocess_set`) into a single cache file, then served from
memory. Batches are dicts::

    {"points": FloatTensor (B, N, 3), "label": LongTensor (B,), "index": LongTensor (B,)}

plus ``"mask"`` (BoolTensor ``(B, N)``, True for real points) in every batch of a split
that holds point clouds smaller than ``N`` (padded, not filled up by repeated points);
:class:`~pointsink.module.SinkformerClassifier` passes it to the model.

where ``index`` is the position of the sample in its split's dataset, so
``dataset.paths[index]`` maps a prediction back to its file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    default_collate,
    get_worker_info,
)
from tqdm.auto import tqdm

from pointsink.inference import CheckpointError, ShapePredictionDataset
from pointsink.io import (
    SUPPORTED_EXTENSIONS,
    ShapeLoadError,
    exclusive_lock,
    geometry_files,
    is_shape_file,
)
from pointsink.synthetic import SYNTHETIC_CLASSES, generate_synthetic_shapes
from pointsink.transforms import (
    MIN_NUM_POINTS,
    PointCloudAugmentation,
    load_for_sampling,
    preprocess_set,
    turn_about_vertical,
    up_axis_rotation,
)
from pointsink.validation import check_int, check_real

__all__ = [
    "CACHE_VERSION",
    "MODELNET10_CLASSES",
    "MODELNET40_CLASSES",
    "SPLITS",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "ModelNetDataModule",
    "PointCache",
    "PointCloudDataset",
    "ShapeFolderDataModule",
    "SyntheticShapesDataModule",
    "build_point_cache",
    "collate_point_sets",
    "default_cache_dir",
    "derive_seed",
    "find_shape_files",
    "load_point_cache",
    "stratified_split",
]

#: Bump when the preprocessing changes, so existing caches are rebuilt. (3 follows 1: a
#: reverted commit wrote version-2 caches with one seed for all files. 4 records each set's
#: count of real points: point clouds smaller than num_points are padded, not repeated.)
CACHE_VERSION = 4
SPLITS = ("train", "test")

MODELNET10_CLASSES: tuple[str, ...] = (
    "bathtub",
    "bed",
    "chair",
    "desk",
    "dresser",
    "monitor",
    "night_stand",
    "sofa",
    "table",
    "toilet",
)

MODELNET40_CLASSES: tuple[str, ...] = (
    "airplane",
    "bathtub",
    "bed",
    "bench",
    "bookshelf",
    "bottle",
    "bowl",
    "car",
    "chair",
    "cone",
    "cup",
    "curtain",
    "desk",
    "door",
    "dresser",
    "flower_pot",
    "glass_box",
    "guitar",
    "keyboard",
    "lamp",
    "laptop",
    "mantel",
    "monitor",
    "night_stand",
    "person",
    "piano",
    "plant",
    "radio",
    "range_hood",
    "sink",
    "sofa",
    "stairs",
    "stool",
    "table",
    "tent",
    "toilet",
    "tv_stand",
    "vase",
    "wardrobe",
    "xbox",
)

_MODELNET_CLASSES = {"ModelNet10": MODELNET10_CLASSES, "ModelNet40": MODELNET40_CLASSES}


# Default of PointCloudDataset.subset's transform (None already means "no transform").
_KEEP_TRANSFORM: Any = object()


class DatasetNotFoundError(RuntimeError):
    """The dataset is not on disk and could not be downloaded; the message says where to put it."""


class DatasetLayoutError(ValueError):
    """The shapes cannot serve the run as laid out.

    A folder is missing or not laid out as ``<class>/{train,test}/*.<ext>``, a
    split the run needs has no readable shapes, or an evaluation split has fewer shapes
    than there are processes to share it. The CLI reports it in one line.
    """


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


def collate_point_sets(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` of point-set items, without a ``"mask"`` that is True everywhere.

    A split (or a prediction run) with one padded point cloud gives every item a mask, so
    that items collate; a batch whose sets are all full then drops it and takes the
    model's unmasked path, which skips the masks' extra work and gives the numbers of the
    code before masks. The check runs on the CPU, in the loader: no device synchronization.
    """
    batch = default_collate(items)
    if "mask" in batch and bool(batch["mask"].all()):
        del batch["mask"]
    return batch


class PointCloudDataset(Dataset):
    """Preprocessed point sets held in memory, with an optional augmentation.

    Args:
        points: Float tensor ``(S, N, 3)``.
        labels: Integer tensor ``(S,)`` of class indices.
        paths: ``S`` source file paths, one per sample.
        transform: Optional callable applied to each sample's points ``(N, 3)`` → ``(N, 3)``
            (e.g. :class:`~pointsink.transforms.PointCloudAugmentation`).
        seed: Seed of the transform's random stream. None: the transform draws from torch's
            global RNG. Otherwise it is called as ``transform(points, generator=g)`` with a
            generator seeded from ``seed`` in the main process, and from ``seed`` and the
            DataLoader worker's seed in a worker process, so every process draws its own
            deterministic stream. The data modules set it per rank (see
            :meth:`ShapeFolderDataModule.train_dataloader`).
        counts: Int tensor ``(S,)``, the real points of each set, its first rows (the rest
            is padding), or None (all real). When a set has fewer than ``N``, every item
            carries ``"mask"`` (``(N,)`` bool), so that batches collate, and the transform
            sees the real rows alone.
    """

    def __init__(
        self,
        points: Tensor,
        labels: Tensor,
        paths: Sequence[str],
        transform: Callable[..., Tensor] | None = None,
        seed: int | None = None,
        counts: Tensor | None = None,
    ) -> None:
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape (S, N, 3); got {tuple(points.shape)}.")
        if labels.shape != (len(points),) or len(paths) != len(points):
            raise ValueError(
                f"Got {len(points)} point sets, labels of shape {tuple(labels.shape)} and "
                f"{len(paths)} paths; they must match."
            )
        if counts is not None:
            counts = torch.as_tensor(counts).long()
            if counts.shape != (len(points),) or ((counts < 1) | (counts > points.shape[1])).any():
                raise ValueError(
                    f"counts must hold one number between 1 and {points.shape[1]} per point "
                    f"set ({len(points)}); got shape {tuple(counts.shape)}."
                )
            if bool((counts == points.shape[1]).all()):
                counts = None  # no padding: items without masks, as before
        self.counts = counts
        self.points = points.float()
        self.labels = labels.long()
        self.paths: list[str] = [str(path) for path in paths]
        self.transform = transform
        self.seed = seed
        self._stream_key: tuple[int, int | None] | None = None
        self._stream: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: ``{"points": (N, 3) float, "label": () long, "index": int}``.

        With padded sets in the dataset, also ``"mask"``: ``(N,)`` bool, True for real points.
        """
        points = self.points[index]
        count = len(points) if self.counts is None else int(self.counts[index])
        if self.transform is not None:
            # Clone so that a transform working in place cannot corrupt the shared cache.
            # Only the real rows: a shuffle must keep the padding last, jitter must skip it.
            real = points[:count].clone()
            if self.seed is None:
                real = self.transform(real)
            else:
                real = self.transform(real, generator=self._generator(self.seed))
            points = real if count == len(points) else torch.cat([real, points[count:]])
        item = {"points": points, "label": self.labels[index], "index": int(index)}
        if self.counts is not None:
            item["mask"] = torch.arange(len(points)) < count
        return item

    def _generator(self, seed: int) -> torch.Generator:
        """This process's transform generator, (re)created when the seed or process changes."""
        worker = get_worker_info()
        # Workers inherit (fork) or unpickle (spawn) this object, generator included; keyed by
        # the worker's seed, each worker makes its own stream instead of replaying the main
        # process's. Non-persistent workers get a new worker seed each epoch, so a new stream.
        key = (seed, None if worker is None else worker.seed)
        if self._stream is None or self._stream_key != key:
            entropy = [seed] if worker is None else [seed, worker.seed]
            self._stream = torch.Generator().manual_seed(derive_seed(*entropy))
            self._stream_key = key
        return self._stream

    def augmentation_state(self) -> tuple[int, Tensor] | None:
        """``(seed, generator state)`` of the main process's augmentation stream, or None.

        None until the stream has drawn, without a seeded transform, and when DataLoader
        workers augment (their streams live in the workers). Saved in checkpoints by
        :class:`pointsink.callbacks.RandomStateCheckpoint`.
        """
        if self._stream is None or self._stream_key is None or self._stream_key[1] is not None:
            return None
        return self._stream_key[0], self._stream.get_state()

    def reset_augmentation(self) -> None:
        """Makes the next augmentation start a fresh stream from :attr:`seed`."""
        self._stream = None
        self._stream_key = None

    def restore_augmentation_state(self, seed: int, state: Tensor) -> None:
        """Continues the main process's augmentation stream from :meth:`augmentation_state`."""
        self.seed = seed
        self._stream = torch.Generator()
        self._stream.set_state(state)
        self._stream_key = (seed, None)

    def subset(
        self, indices: Sequence[int] | np.ndarray, transform: Any = _KEEP_TRANSFORM
    ) -> PointCloudDataset:
        """Returns a new dataset with the given samples (re-indexed from 0).

        Args:
            indices: Positions of the samples to keep.
            transform: Transform of the new dataset (None for none); by default this one's.
        """
        index_tensor = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return PointCloudDataset(
            self.points[index_tensor],
            self.labels[index_tensor],
            [self.paths[i] for i in index_tensor.tolist()],
            self.transform if transform is _KEEP_TRANSFORM else transform,
            seed=self.seed,
            counts=None if self.counts is None else self.counts[index_tensor],
        )


# --------------------------------------------------------------------------------------
# Finding files and the preprocessed cache
# --------------------------------------------------------------------------------------


def find_shape_files(
    root: str | os.PathLike[str], class_names: Sequence[str], split: str
) -> list[tuple[Path, int]]:
    """Lists the ``root/<class>/<split>/*.<ext>`` files with a supported extension.

    Any file name works (ModelNet's are ``<class>_NNNN.off``); hidden files (``.name``,
    e.g. macOS's ``._chair_0001.off``) are left out.

    Args:
        root: Dataset folder.
        class_names: Class folder names; a file's label is its class's position here.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(path, label)`` pairs, sorted by class then file name. Missing folders give none.
    """
    root = Path(root)
    files: list[tuple[Path, int]] = []
    for label, class_name in enumerate(class_names):
        folder = root / class_name / split
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if is_shape_file(path):
                files.append((path, label))
    return files


def nested_shape_folders(
    root: str | os.PathLike[str], class_names: Sequence[str], split: str
) -> list[str]:
    """The sub-folders of ``root/<class>/<split>`` holding shape files, which are not read.

    Returns:
        Their paths relative to ``root`` (POSIX separators), sorted.
    """
    root = Path(root)
    return [
        folder.relative_to(root).as_posix()
        for class_name in class_names
        if (root / class_name / split).is_dir()
        for folder in sorted((root / class_name / split).iterdir())
        if folder.is_dir() and any(is_shape_file(path) for path in folder.rglob("*"))
    ]


@dataclass
class PointCache:
    """One preprocessed split, as stored on disk.

    Attributes:
        points: Float32 tensor ``(S, N, 3)``.
        counts: Int64 tensor ``(S,)``: the real points of each set, its first rows (``N``
            except for point clouds smaller than ``N``, padded with zeros; see
            :func:`pointsink.transforms.preprocess_set`).
        labels: Int64 tensor ``(S,)``.
        paths: ``S`` file paths relative to the dataset root (POSIX separators).
        skipped: One message per source file that could not be used.
        class_names: Class names the labels index into.
    """

    points: Tensor
    counts: Tensor
    labels: Tensor
    paths: list[str]
    skipped: list[str]
    class_names: list[str]


# Caches whose skipped files were already reported in this process, so that building a
# cache in prepare_data and loading it in setup does not report the same files twice.
_REPORTED_CACHES: set[Path] = set()


def build_point_cache(
    root: str | os.PathLike[str],
    class_names: Sequence[str],
    split: str,
    num_points: int,
    sample_seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> Path:
    """Preprocesses every file of a split into one cache file, unless an up-to-date one exists.

    The cache file name contains ``num_points``, a hash of ``sample_seed``, the class list
    and :data:`CACHE_VERSION`, a hash of the resolved ``root`` (so datasets sharing one
    ``cache_dir`` keep their own caches), and a fingerprint of the relative paths, sizes,
    modification times and inode change times of the split's files (the change time,
    which ``os.utime`` cannot set, catches a file replaced by same-size content with its
    old mtime restored, as ``cp -p``, ``rsync -t`` or ``tar`` do). Any change gives a new
    fingerprint and a rebuild, after which the outdated caches of the same configuration
    and root are deleted; in the root's own cache folder (:func:`default_cache_dir`) so are
    those of the configuration from other roots (the folder moved with its dataset) or
    named before the root hash existed. Building holds a file lock and writes atomically,
    so concurrent runs on one machine neither corrupt the cache nor build it twice. Files
    that cannot be read are skipped with a warning naming them.

    Each file is sampled with :func:`pointsink.transforms.file_sample_seed` (``sample_seed``
    and a checksum of the file's contents), the seed prediction uses too, so its points
    do not change when other files are added or removed.

    Args:
        root: Dataset folder in ModelNet layout.
        class_names: Class folder names (labels are positions in this list).
        split: ``"train"`` or ``"test"``.
        num_points: Points per shape (>= 2).
        sample_seed: Base sampling seed (>= 0).
        cache_dir: Where to write; defaults to :func:`default_cache_dir`.
        workers: Worker processes (None: up to 8, as many as CPUs allow; 1: in-process).

    Returns:
        Path of the cache file, to read with :func:`load_point_cache`.
    """
    root = Path(root)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    files = find_shape_files(root, class_names, split)
    relative_paths = [path.relative_to(root).as_posix() for path, _ in files]
    config_key = _short_hash(
        {"version": CACHE_VERSION, "classes": list(class_names), "seed": sample_seed}
    )
    config_prefix = f"{split}-{num_points}pts-{config_key}-"
    prefix = f"{config_prefix}{_root_key(root)}-"
    # A shape's geometry files (a .gltf's external buffers too): editing any rebuilds.
    fingerprint = _short_hash(
        [(rel, *_file_stamp(path)) for rel, (path, _) in zip(relative_paths, files, strict=True)]
    )
    cache_path = cache_dir / f"{prefix}{fingerprint}.pt"
    if cache_path.exists():
        return cache_path

    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache_dir / f"{split}.lock"):
        if cache_path.exists():  # another process built it while we waited for the lock
            return cache_path
        nested = nested_shape_folders(root, class_names, split)
        if nested:
            warnings.warn(
                f"Shape files in sub-folders are not read: {', '.join(nested[:3])}"
                f"{f' and {len(nested) - 3} more' if len(nested) > 3 else ''} (only files "
                f"directly in <class>/{split} are); move them up to use them.",
                UserWarning,
                stacklevel=2,
            )
        paths = [path for path, _ in files]
        tasks = [(str(path), num_points, sample_seed) for path in paths]
        results = _preprocess_all(tasks, workers, description=f"Preprocessing {root.name}/{split}")

        kept = [i for i, (points, _, _) in enumerate(results) if points is not None]
        skipped = [error for _, error, _ in results if error is not None]
        for _, _, sampling_warnings in results:
            for message in sampling_warnings:
                warnings.warn(message, UserWarning, stacklevel=2)
        for message in skipped:
            warnings.warn(f"Skipping unreadable shape file: {message}", UserWarning, stacklevel=2)
        small = [i for i in kept if results[i][0][1] < num_points]
        if small:
            examples = ", ".join(relative_paths[i] for i in small[:3])
            more = f" and {len(small) - 3} more" if len(small) > 3 else ""
            warnings.warn(
                f"{len(small)} of {len(kept)} {split} shapes are point clouds of fewer than "
                f"{num_points} points ({examples}{more}): each is padded and masked, so the "
                "model sees its points alone (batches holding one carry a 'mask').",
                UserWarning,
                stacklevel=2,
            )
        _REPORTED_CACHES.add(cache_path)

        points = np.zeros((len(kept), num_points, 3), dtype=np.float32)
        counts = np.zeros(len(kept), dtype=np.int64)
        for row, i in enumerate(kept):
            points[row], counts[row] = results[i][0]
        payload = {
            "version": CACHE_VERSION,
            "points": torch.from_numpy(points),
            "counts": torch.from_numpy(counts),
            "labels": torch.tensor([files[i][1] for i in kept], dtype=torch.int64),
            "paths": [relative_paths[i] for i in kept],
            "skipped": skipped,
            "class_names": list(class_names),
        }
        # Write next to the target and rename: readers never see a half-written file.
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            torch.save(payload, tmp_path)
            # The temporary file is private (0600); give the cache the mode a plain new file
            # gets, so that the others a shared dataset folder lets in can read it too.
            os.chmod(tmp_path, 0o666 & ~_current_umask())
            os.replace(tmp_path, cache_path)
        finally:
            tmp_path.unlink(missing_ok=True)
        # A shared cache_dir may hold other roots' caches, which must survive; the root's
        # own folder holds only this dataset's, also from before it moved or was renamed.
        own_folder = cache_dir.resolve() in {
            (root / "processed").resolve(),
            default_cache_dir(root).resolve(),
        }
        for outdated in cache_dir.glob(f"{config_prefix if own_folder else prefix}*.pt"):
            if outdated != cache_path:
                outdated.unlink(missing_ok=True)
    return cache_path


def _current_umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_cache_dir(root: str | os.PathLike[str]) -> Path:
    """Returns ``root/processed``, or a per-root user cache folder if ``root`` is read-only.

    The fallback is ``$XDG_CACHE_HOME/pointsink/<root name>-<hash of its absolute path>``
    (``~/.cache`` without XDG_CACHE_HOME), so shared read-only datasets still get a cache.
    A folder without any write permission bit counts as read-only even for root.
    """
    root = Path(root)
    preferred = root / "processed"
    target = preferred if preferred.is_dir() else root
    if not target.exists() or _is_writable_dir(target):
        return preferred
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "pointsink" / f"{root.resolve().name}-{_root_key(root)}"


def _root_key(root: Path) -> str:
    """Eight hex digits naming a dataset root by its absolute path (cache names and folders)."""
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]


def _is_writable_dir(path: Path) -> bool:
    # os.access alone says yes to root even for a folder marked read-only (r-x), so the
    # write bits are checked too: such a folder is meant not to be written into.
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)


def load_point_cache(cache_path: str | os.PathLike[str]) -> PointCache:
    """Reads a cache written by :func:`build_point_cache` (tensors and strings only)."""
    payload = torch.load(cache_path, map_location="cpu", weights_only=True)
    if payload.get("version") != CACHE_VERSION:
        raise ValueError(f"{cache_path}: cache version {payload.get('version')} is outdated.")
    return PointCache(
        points=payload["points"],
        counts=payload["counts"],
        labels=payload["labels"],
        paths=list(payload["paths"]),
        skipped=list(payload["skipped"]),
        class_names=list(payload["class_names"]),
    )


def stratified_split(
    labels: Sequence[int] | np.ndarray | Tensor, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits sample positions into train and validation parts, class by class.

    Each class with at least two samples puts ``round(val_fraction * count)`` of them (at
    least one, and never all) into validation; a class with a single sample stays in
    training. With ``val_fraction == 0`` validation is empty.

    Args:
        labels: Class index of each sample, shape ``(S,)``.
        val_fraction: Fraction of each class for validation, in ``[0, 1)``.
        seed: Seed of the random choice; the same seed gives the same split.

    Returns:
        Sorted ``(train_indices, val_indices)``, disjoint, covering ``range(S)``.
    """
    check_real("val_fraction", val_fraction, 0.0, 1.0, high_open=True)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if val_fraction == 0.0 or len(members) < 2:
            continue
        num_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val_parts.append(rng.choice(members, size=num_val, replace=False))
    val_indices = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    train_indices = np.setdiff1d(np.arange(len(labels)), val_indices)
    return train_indices, val_indices


def recorded_split(checkpoint: Mapping[str, Any]) -> tuple[float, int] | None:
    """The ``(val_fraction, split_seed)`` of the run that wrote a checkpoint, if recorded.

    :class:`ShapeFolderDataModule` records them through its ``state_dict``, which Lightning
    stores under the data module's class name; checkpoints written before they were
    recorded give None.
    """
    for value in checkpoint.values():
        split = _split_of(value)
        if split is not None:
            return split
    return None


def recorded_validation_files(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """The validation files of the run that wrote a checkpoint, if recorded.

    Paths ``<class>/train/<name>`` relative to the dataset root, as
    :meth:`ShapeFolderDataModule.state_dict` records them; older checkpoints give None.
    """
    for value in checkpoint.values():
        if _split_of(value) is not None and isinstance(value.get("val_files"), list):
            return [str(path) for path in value["val_files"]]
    return None


def validation_files_changes(
    recorded: Sequence[str], current: Sequence[str]
) -> tuple[list[str], list[str]]:
    """How a split's validation files differ from those a checkpoint recorded.

    Args:
        recorded: Root-relative paths ``<class>/train/<name>`` from the checkpoint (see
            :func:`recorded_validation_files`).
        current: The same for the split made now.

    Returns:
        ``(gone, new)``, sorted: recorded files the split no longer holds, and files it
        holds that were not recorded. Both empty when the splits agree.
    """
    recorded_set, current_set = set(map(str, recorded)), set(map(str, current))
    return sorted(recorded_set - current_set), sorted(current_set - recorded_set)


def _split_of(state: Any) -> tuple[float, int] | None:
    """``(val_fraction, split_seed)`` from a data module's saved state, or None."""
    if isinstance(state, Mapping) and {"val_fraction", "split_seed"} <= set(state):
        return float(state["val_fraction"]), int(state["split_seed"])
    return None


def derive_seed(*entropy: int) -> int:
    """Mixes non-negative integers (a base seed, a rank, ...) into one 64-bit seed.

    Uses :class:`numpy.random.SeedSequence`, so nearby inputs (ranks 0 and 1) give
    unrelated seeds, unlike ``seed + rank``, whose streams overlap across runs.
    """
    state = np.random.SeedSequence([int(value) for value in entropy]).generate_state(1, np.uint64)
    return int(state[0])


def _file_stamp(path: Path) -> list[int]:
    """Size, mtime and ctime of each file that ``path``'s geometry is read from.

    :func:`pointsink.io.geometry_files`: a one-file shape gives the three numbers caches
    were always keyed on, so existing caches stay valid.
    """
    stamp = []
    for part in geometry_files(path):
        status = part.stat()
        stamp += [status.st_size, status.st_mtime_ns, status.st_ctime_ns]
    return stamp


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


#: Tries per file when reading fails with an I/O error that may pass (EIO, a stale NFS
#: handle, a timeout): a file skipped once stays out of the cache, which is reused.
READ_ATTEMPTS = 3
_LASTING_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _may_pass(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is an I/O error that a retry may not meet again."""
    while exc is not None:
        if isinstance(exc, OSError) and not isinstance(exc, _LASTING_OS_ERRORS):
            return True
        exc = exc.__cause__
    return False


def _preprocess_file(
    task: tuple[str, int, int],
) -> tuple[tuple[np.ndarray, int] | None, str | None, list[str]]:
    """Preprocesses one file: ``((points, count) or None, error or None, warning messages)``.

    Errors and warnings are returned rather than raised or printed, so that a bad file
    never stops the build and worker-process warnings reach the parent. A read that fails
    with a passing I/O error is tried again (:data:`READ_ATTEMPTS` in all).
    """
    path, num_points, sample_seed = task
    attempt = 1
    while True:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                shape, shape_seed = load_for_sampling(path, sample_seed)
                # Said once for the split by build_point_cache, not once per file.
                prepared = preprocess_set(shape, num_points, shape_seed, warn_small=False)
            except Exception as exc:  # a failure in one file must not stop the run
                if attempt < READ_ATTEMPTS and _may_pass(exc):
                    time.sleep(0.2 * attempt)
                    attempt += 1
                    continue
                if isinstance(exc, ShapeLoadError):
                    return None, str(exc), []
                return None, f"{path}: preprocessing failed ({type(exc).__name__}: {exc}).", []
        return prepared, None, [f"{path}: {w.message}" for w in caught]


def _preprocess_all(
    tasks: list[tuple[str, int, int]], workers: int | None, description: str
) -> list[tuple[np.ndarray | None, str | None, list[str]]]:
    if workers is None:
        workers = min(8, _available_cpus())
    with tqdm(total=len(tasks), desc=description, unit="file", mininterval=1.0) as progress:
        if workers <= 1 or len(tasks) < 2 * workers:
            results = []
            for task in tasks:
                results.append(_preprocess_file(task))
                progress.update()
            return results
        # Small chunks amortize inter-process overhead while keeping the bar moving.
        chunksize = max(1, min(64, len(tasks) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = []
            for result in pool.map(_preprocess_file, tasks, chunksize=chunksize):
                results.append(result)
                progress.update()
            return results


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --------------------------------------------------------------------------------------
# DataModules
# --------------------------------------------------------------------------------------


def _class_folders(root: Path) -> list[str]:
    """Names of ``root``'s sub-folders holding a ``train/`` or ``test/`` folder, sorted."""
    return sorted(
        child.name
        for child in root.iterdir()
        if child.is_dir() and any((child / split).is_dir() for split in SPLITS)
    )


def discover_class_names(root: str | Path) -> list[str]:
    """The class folders of a dataset: sub-folders of ``root`` with ``train/`` or ``test/``.

    Args:
        root: Dataset folder, laid out as ``<class>/{train,test}/*.<ext>``.

    Returns:
        The class names, sorted.

    Raises:
        DatasetLayoutError: ``root`` is missing, not a folder, or holds no class folder.
    """
    root = Path(root)
    layout = "<class>/train or <class>/test holding shape files"
    if not root.exists():
        raise DatasetLayoutError(f"{root} does not exist: give the dataset folder ({layout}).")
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a folder: give the dataset folder ({layout}).")
    found = _class_folders(root)
    if not found:
        swapped = [
            split
            for split in SPLITS
            if (root / split).is_dir() and any(child.is_dir() for child in (root / split).iterdir())
        ]
        flat = sorted(
            child.name
            for child in root.iterdir()
            if child.is_dir() and any(is_shape_file(entry) for entry in child.iterdir())
        )
        hint = ""
        if flat and set(flat) <= set(SPLITS):
            hint = (
                f" {root} looks like one class's folder (its {' and '.join(flat)} hold shape "
                f"files): give its parent, {root.resolve().parent}, the folder of class folders."
            )
        elif swapped:
            hint = (
                f" {root} holds {' and '.join(s + '/<class>' for s in swapped)} instead: swap "
                "the two levels, <class>/train rather than train/<class>."
            )
        elif flat:
            hint = (
                f" {', '.join(flat[:3])}{', ...' if len(flat) > 3 else ''} hold shape files "
                "directly: move each class's files into <class>/train and <class>/test (a "
                "validation split is carved out of train; test is only used by `test`)."
            )
        raise DatasetLayoutError(
            f"Found no class folders in {root}: expected sub-folders {layout}.{hint}"
        )
    return found


class ShapeFolderDataModule(pl.LightningDataModule):
    """Shapes in ModelNet layout: ``root/<class>/{train,test}/*.<ext>`` (any file names).

    ``prepare_data`` builds the preprocessed caches; ``setup`` loads them and carves a
    seeded, stratified validation split out of the train split (the test split is only
    used by ``test``). Any extension in :data:`pointsink.io.SUPPORTED_EXTENSIONS` works.

    Args:
        root: Dataset folder.
        class_names: Class folder names, in label order. None: the sorted sub-folders of
            ``root`` that contain a ``train`` or ``test`` folder.
        num_points: Points sampled per shape.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of each class's training shapes used for validation, in
            ``[0, 1)``.
        split_seed: Seed of the validation split.
        sample_seed: Seed of the point sampling in the cache.
        augment: Whether to augment training samples.
        scale_low: Augmentation: lower bound of the per-axis scale.
        scale_high: Augmentation: upper bound of the per-axis scale.
        max_rotation_degrees: Augmentation: maximum rotation about the up axis.
        up_axis: Augmentation: index of the vertical axis (0, 1 or 2).
        jitter_sigma: Augmentation: standard deviation of the point jitter.
        jitter_clip: Augmentation: clipping of the point jitter.
        shuffle_points: Augmentation: whether to permute the points.
        max_translation: Augmentation: largest shift per axis (0: none).
        max_point_dropout: Augmentation: largest fraction of points replaced by copies of
            the first point (0: none; PointNet++ uses 0.875).
        eval_rotation_degrees: Turns every validation and test shape about ``up_axis`` by
            its own fixed random angle, uniform in ``[-d, d]`` (drawn once, in the split's
            order, seeded by ``sample_seed``; see
            :func:`~pointsink.transforms.turn_about_vertical`), to score shapes facing other
            ways than the files do (180: any facing). With a fit, validation, and so the
            best checkpoint, uses the turned shapes. 0: as the files stand.
        cache_dir: Folder of the preprocessed caches (None: ``root/processed``, or a user
            cache folder if ``root`` is read-only; see :func:`default_cache_dir`).
        preprocess_workers: Processes used to build the caches (None: up to 8).
        predict_files: Files, folders (searched recursively) or glob patterns to classify
            with ``predict`` (not used by training); one path or a list.
        predict_up_axis: The ``predict_files``' vertical axis (``"x"``, ``"y"``, ``"z"``),
            turned to ``up_axis`` before classifying (e.g. ``"y"`` for glTF files); None:
            they stand like the training shapes.
    """

    def __init__(
        self,
        root: str,
        class_names: list[str] | None = None,
        num_points: int = 1024,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        sample_seed: int = 0,
        augment: bool = True,
        scale_low: float = 0.8,
        scale_high: float = 1.25,
        max_rotation_degrees: float = 15.0,
        up_axis: int = 2,
        jitter_sigma: float = 0.01,
        jitter_clip: float = 0.05,
        shuffle_points: bool = True,
        max_translation: float = 0.0,
        max_point_dropout: float = 0.0,
        eval_rotation_degrees: float = 0.0,
        cache_dir: str | None = None,
        preprocess_workers: int | None = None,
        predict_files: list[str] | str | None = None,
        predict_up_axis: str | None = None,
    ) -> None:
        super().__init__()
        # Kept as the Python ints check_int returns: num_points reaches the model's
        # hyperparameters (a NumPy integer there would break weights-only loading).
        num_points = check_int("num_points", num_points, minimum=MIN_NUM_POINTS)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if eval_batch_size is not None:
            eval_batch_size = check_int("eval_batch_size", eval_batch_size, minimum=1)
        num_workers = check_int("num_workers", num_workers, minimum=0)
        split_seed = check_int("split_seed", split_seed, minimum=0)
        sample_seed = check_int("sample_seed", sample_seed, minimum=0)
        if preprocess_workers is not None:
            preprocess_workers = check_int("preprocess_workers", preprocess_workers, minimum=1)
        check_real("val_fraction", val_fraction, 0.0, 1.0, high_open=True)
        self.eval_rotation_degrees = check_real(
            "eval_rotation_degrees", eval_rotation_degrees, 0.0, 180.0
        )

        # expanduser (here and for cache_dir): a YAML ``root: ~/data/...`` would otherwise
        # name a folder "~" in the working directory.
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            # Found late otherwise, as a bare NotADirectoryError (after a download).
            raise DatasetLayoutError(
                f"The data root {self.root} is a file, not a folder: give the folder that "
                "holds (or is to hold) the <class>/ folders"
                + (
                    ", e.g. the one this archive is extracted into."
                    if self.root.suffix.lower() in {".zip", ".tar", ".gz", ".xz", ".bz2", ".7z"}
                    else "."
                )
            )
        self.num_points = num_points
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.sample_seed = sample_seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.preprocess_workers = preprocess_workers
        if isinstance(predict_files, str):
            predict_files = [predict_files]
        self.predict_files = list(predict_files) if predict_files is not None else None
        self.predict_orientation = (
            None if predict_up_axis is None else up_axis_rotation(predict_up_axis, up_axis)
        )
        # Built (and so validated) now, so bad augmentation settings fail at startup.
        augmentation = PointCloudAugmentation(
            scale_low=scale_low,
            scale_high=scale_high,
            max_rotation_degrees=max_rotation_degrees,
            up_axis=up_axis,
            jitter_sigma=jitter_sigma,
            jitter_clip=jitter_clip,
            shuffle=shuffle_points,
            max_translation=max_translation,
            max_point_dropout=max_point_dropout,
        )
        self.augmentation: PointCloudAugmentation | None = augmentation if augment else None
        self.up_axis = augmentation.up_axis
        # Recorded in checkpoints (linked to the model by the CLI) so that test-time voting
        # augments like training did; without augmentation, the identity (views differ only
        # by their point sampling).
        identity = PointCloudAugmentation(1.0, 1.0, 0.0, up_axis, 0.0, 0.0, shuffle=False)
        self.augmentation_settings: dict[str, float | int | bool] = (
            augmentation if augment else identity
        ).settings()
        self.class_names: list[str] = self._resolve_class_names(class_names)

        self.train_dataset: PointCloudDataset | None = None
        self.val_dataset: PointCloudDataset | None = None
        self.test_dataset: PointCloudDataset | None = None
        # Sorted root-relative paths of the validation files, once setup has made the split.
        self._val_files: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def _resolve_class_names(self, class_names: list[str] | None) -> list[str]:
        """Validates given class names, or discovers them from ``root``."""
        if class_names is not None:
            names = [str(name) for name in class_names]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"class_names must be non-empty and unique; got {names}.")
            return names
        return discover_class_names(self.root)

    # -- data preparation ---------------------------------------------------------------

    def prepare_data(self) -> None:
        """Provides the source files, then builds the caches of the splits the run needs.

        Lightning calls it once per node. ``fit`` and ``validate`` need the training split
        (validation is carved out of it), ``test`` the test split, so a folder holding only
        ``<class>/test`` can be tested; called without a trainer, both are built. Skipped
        under ``Trainer.predict``, which reads only ``predict_files``: nothing is
        downloaded, generated or cached then.
        """
        if self._predicting():
            return
        self._provide_source()
        state = getattr(self.trainer, "state", None)
        needed = {
            TrainerFn.FITTING: ("train",),
            TrainerFn.VALIDATING: ("train",),
            TrainerFn.TESTING: ("test",),
        }
        fn = state.fn if state is not None else None
        for split in needed.get(fn, SPLITS):
            # Without a trainer, a dataset may lack its test split.
            self._cache_path(split, required=fn in needed)

    def _provide_source(self) -> None:
        """Makes sure the shape files exist under ``root`` (subclasses download or generate)."""

    def _resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else default_cache_dir(self.root)

    def _cache_path(self, split: str, required: bool = True) -> Path:
        """Builds ``split``'s cache if needed; its path.

        The split's files are checked first (training files always, for every class; the
        test split's when ``required``), so that a wrong root gets one clear error and no
        ``processed/`` folder, which would also stop a later download into it.
        """
        if split == "train":
            self._check_training_files()
        elif required:
            self._check_split_files(split, every_class=False)
        return build_point_cache(
            self.root,
            self.class_names,
            split,
            num_points=self.num_points,
            sample_seed=self.sample_seed,
            cache_dir=self._resolved_cache_dir(),
            workers=self.preprocess_workers,
        )

    def _check_training_files(self) -> None:
        """Raises unless every class has training files (a class never seen is a mistake)."""
        self._check_split_files("train", every_class=True)

    def _check_split_files(self, split: str, every_class: bool) -> None:
        """Raises unless ``split`` has shape files: for every class, or for any at all.

        Args:
            split: ``"train"`` or ``"test"``.
            every_class: Whether each class needs files, or only the split as a whole.

        Raises:
            DatasetLayoutError: Naming the expected layout, and the classes whose folders
                hold files of other kinds.
        """
        labels = {label for _, label in find_shape_files(self.root, self.class_names, split)}
        missing = [name for label, name in enumerate(self.class_names) if label not in labels]
        if not missing or (labels and not every_class):
            return
        kind = "training" if split == "train" else split
        expected = (
            f"expected files <class>/{split}/*.<ext> with an extension in "
            f"{sorted(SUPPORTED_EXTENSIONS)}"
        )
        unsupported = {
            name: sorted(
                path.name
                for path in (self.root / name / split).iterdir()
                if path.is_file() and not path.name.startswith(".")
            )
            for name in missing
            if (self.root / name / split).is_dir()
        }
        hint = "; ".join(
            f"{name}/{split} has {len(files)} files, none with a supported extension "
            f"(e.g. {files[0]})"
            for name, files in unsupported.items()
            if files
        )
        hint = f". {hint}." if hint else "."
        if not labels:
            raise DatasetLayoutError(
                f"Found no {kind} shapes in {self.root}: {expected} for the classes "
                f"{self.class_names}" + hint
            )
        raise DatasetLayoutError(
            f"Found no {kind} shapes for the classes {missing} in {self.root}: {expected}" + hint
        )

    def _load_split(self, split: str, required: bool = True) -> PointCloudDataset:
        # Builds the cache if prepare_data did not (e.g. setup called directly); cheap if
        # it exists, since only file metadata is read to check the fingerprint.
        cache_path = self._cache_path(split, required)
        cache = load_point_cache(cache_path)
        if cache.skipped and cache_path not in _REPORTED_CACHES:
            _REPORTED_CACHES.add(cache_path)
            shown = " ".join(cache.skipped[:5])
            more = f" (and {len(cache.skipped) - 5} more)" if len(cache.skipped) > 5 else ""
            warnings.warn(
                f"{len(cache.skipped)} {split} file(s) were skipped as unreadable when the "
                f"cache was built: {shown}{more}. Delete {cache_path} to read them again.",
                UserWarning,
                stacklevel=2,
            )
        paths = [str(self.root / relative) for relative in cache.paths]
        return PointCloudDataset(cache.points, cache.labels, paths, counts=cache.counts)

    def setup(self, stage: str | None = None) -> None:
        """Loads the caches needed by ``stage`` and makes the validation split."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            full_train = self._load_split("train")
            # _check_training_files saw files of every class; all of a class's may be unreadable.
            read = set(full_train.labels.tolist())
            unread = [name for label, name in enumerate(self.class_names) if label not in read]
            if unread:
                which = f" of the classes {unread}" if read else ""
                raise DatasetLayoutError(
                    f"None of the training shapes{which} in {self.root} could be read."
                )
            train_indices, val_indices = stratified_split(
                full_train.labels, self.val_fraction, self.split_seed
            )
            self.train_dataset = full_train.subset(train_indices, transform=self.augmentation)
            self.val_dataset = self._turned(full_train.subset(val_indices, transform=None))
            self._val_files = sorted(
                Path(path).relative_to(self.root).as_posix() for path in self.val_dataset.paths
            )
        if stage in (None, "fit") and self.train_dataset is not None:
            # Each fit starts its augmentation afresh: a data module reused for a second fit
            # with the same seed would otherwise continue the first fit's stream. A resumed
            # fit restores the checkpoint's stream after this (RandomStateCheckpoint).
            self.train_dataset.reset_augmentation()
        if stage in (None, "test") and self.test_dataset is None:
            # Testing nothing would end without a metric, and with exit status 0. Without a
            # stage (setup called directly) a dataset may lack its test split.
            self.test_dataset = self._turned(self._load_split("test", required=stage == "test"))
            if stage == "test" and len(self.test_dataset) == 0:
                raise DatasetLayoutError(f"None of the test shapes in {self.root} could be read.")

    def _turned(self, dataset: PointCloudDataset) -> PointCloudDataset:
        """``dataset`` with each shape turned as ``eval_rotation_degrees`` asks (or itself)."""
        if self.eval_rotation_degrees == 0.0:
            return dataset
        dataset.points = turn_about_vertical(
            dataset.points, self.eval_rotation_degrees, self.up_axis, self.sample_seed
        )
        return dataset

    # -- checkpointed state -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The validation split, which Lightning records in every checkpoint it writes.

        A resumed fit must carve the same validation shapes out of ``train/``: with another
        split it would score shapes it has trained on as validation, and its best epoch
        would compare two splits. :func:`recorded_split` reads it back (e.g. for
        ``benchmarks/voting.py --split val``).

        Returns:
            ``{"val_fraction", "split_seed", "eval_rotation_degrees"}`` (the last because a
            resumed fit must also turn its validation shapes as before), and once ``setup``
            has made the split also
            ``"val_files"`` (the validation files' sorted paths ``<class>/train/<name>``,
            relative to ``root`` so that the dataset folder may move).
            The split picks files by position, so the same settings select other files
            once training files are added, removed or become unreadable.
        """
        state: dict[str, Any] = {
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "eval_rotation_degrees": self.eval_rotation_degrees,
        }
        if self._val_files is not None:
            state["val_files"] = list(self._val_files)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Checks a restored checkpoint's split: refused when fitting, a warning when validating.

        Both the settings and, where the checkpoint records them (see :meth:`state_dict`;
        older checkpoints do not), the validation files are compared; Lightning restores
        the state after ``setup``, so the current files are known. ``test`` and
        ``predict`` do not use the split, so they accept any.

        Raises:
            CheckpointError: ``fit`` resumes a checkpoint trained with another split.
        """
        recorded = _split_of(state_dict)
        current = (self.val_fraction, self.split_seed)
        if recorded is None or recorded[0] == current[0] == 0.0:
            return  # nothing recorded, or no validation (then the seed does not matter)
        stage = self.trainer.state.fn if self.trainer is not None else None
        if recorded == current:
            self._check_validation_files(state_dict, stage)
            self._check_validation_turn(state_dict, stage)
            return
        message = (
            f"The checkpoint was trained with val_fraction={recorded[0]} and "
            f"split_seed={recorded[1]}, but the data module has val_fraction={current[0]} "
            f"and split_seed={current[1]}"
        )
        if stage == TrainerFn.FITTING:
            raise CheckpointError(
                f"{message}: resuming would validate on shapes the run has trained on. Give "
                "the checkpoint's --data.val_fraction and --data.split_seed, or start a new "
                "run (--model.weights fine-tunes from its weights)."
            )
        if stage == TrainerFn.VALIDATING:
            warnings.warn(
                f"{message}: part of this validation split may be shapes the model was trained on.",
                UserWarning,
                stacklevel=2,
            )

    def _check_validation_turn(self, state_dict: Mapping[str, Any], stage: Any) -> None:
        """Refuses to resume a fit whose validation shapes were turned otherwise."""
        recorded = state_dict.get("eval_rotation_degrees")
        if stage != TrainerFn.FITTING or recorded is None:
            return  # validate/test may score any turn; older checkpoints do not record it
        if float(recorded) != self.eval_rotation_degrees:
            raise CheckpointError(
                f"The checkpoint was validated with eval_rotation_degrees={recorded}, but the "
                f"data module has eval_rotation_degrees={self.eval_rotation_degrees}: resuming "
                "would pick its best epoch across upright and turned validation shapes. Give "
                f"--data.eval_rotation_degrees {recorded}, or start a new run (--model.weights "
                "fine-tunes from its weights)."
            )

    def _check_validation_files(self, state_dict: Mapping[str, Any], stage: Any) -> None:
        """Compares the recorded validation files with this split's (same settings)."""
        recorded_files = state_dict.get("val_files")
        if not isinstance(recorded_files, list) or self._val_files is None:
            return  # an older checkpoint, or setup has not made the split
        gone, new = validation_files_changes(recorded_files, self._val_files)
        if not gone and not new:
            return
        detail = (
            f"this run's validation split differs from the checkpoint's in "
            f"{len(gone) + len(new)} files ({len(gone)} of the checkpoint's "
            f"{len(recorded_files)} left it and {len(new)} joined it, e.g. {(gone or new)[0]!r})"
        )
        message = (
            f"The checkpoint was trained with the same val_fraction and split_seed, but "
            f"{detail}: the split picks files by position, so adding, removing or no longer "
            f"being able to read training files in {self.root} changes it"
        )
        if stage == TrainerFn.FITTING:
            raise CheckpointError(
                f"{message}; resuming would validate on shapes the run has trained on and "
                "compare its best epoch across two validation sets. Restore the training "
                "files the checkpoint was trained with, or start a new run (--model.weights "
                "fine-tunes from its weights)."
            )
        if stage == TrainerFn.VALIDATING:
            warnings.warn(
                f"{message}; part of this validation split may be shapes the model was trained on.",
                UserWarning,
                stacklevel=3,
            )

    # -- loaders ------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches.

        Under DDP, Lightning shards the samples with a ``DistributedSampler`` (reshuffled
        every epoch through ``set_epoch``). The augmentation stream is seeded from torch's
        seed (the ``seed_everything`` value) and the global rank: every rank starts with the
        same global RNG, so otherwise all ranks would draw the same augmentation parameters.
        """
        dataset = self._require(self.train_dataset, "fit")
        if dataset.transform is not None:
            dataset.seed = derive_seed(torch.initial_seed(), self._world()[1])
        return self._loader(dataset, self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (held-out part of the train split), not augmented."""
        return self._loader(self._require(self.val_dataset, "fit"), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        """Test-split batches, not augmented."""
        return self._loader(self._require(self.test_dataset, "test"), self.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the ``predict_files`` (files, folders, glob patterns), in order.

        Each file is loaded and preprocessed on the fly with ``num_points`` points and the
        cache's per-file seed from ``sample_seed`` (see
        :class:`pointsink.inference.ShapePredictionDataset`); a file that cannot be used
        yields an item with an ``error`` instead of stopping the run.
        Under DDP every rank gets an equal, non-empty share (padded by repeating files,
        which :class:`pointsink.callbacks.PredictionWriter` drops by dataset index).

        Raises:
            DatasetNotFoundError: ``predict_files`` is empty.
        """
        if not self.predict_files:
            # DatasetNotFoundError: the CLI prints it as one line instead of a traceback.
            raise DatasetNotFoundError(
                "No files to predict: pass --data.predict_files PATH or "
                "--data.predict_files '[PATH, ...]' (files, folders or glob patterns)."
            )
        dataset = ShapePredictionDataset(
            self.predict_files, self.num_points, self.sample_seed, self.predict_orientation
        )
        world_size, rank = self._world()
        sampler = None
        if world_size > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
            )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_point_sets,
        )

    def _predicting(self) -> bool:
        """Whether the attached trainer runs ``predict`` (which needs no training data)."""
        state = getattr(self.trainer, "state", None)
        return state is not None and state.fn == TrainerFn.PREDICTING

    @staticmethod
    def _require(dataset: PointCloudDataset | None, stage: str) -> PointCloudDataset:
        if dataset is None:
            raise RuntimeError(f"Call setup({stage!r}) before requesting this dataloader.")
        return dataset

    def _world(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the attached trainer; ``(1, 0)`` without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _eval_sampler(self, dataset: PointCloudDataset) -> UnrepeatedDistributedSampler | None:
        """Under DDP, a sampler giving each rank a disjoint share, without padding.

        Lightning's own injected ``DistributedSampler`` pads the shares to equal length by
        repeating samples, which would count them twice in validation/test metrics. Lightning
        keeps a loader's sampler that already is a ``DistributedSampler`` (as this one is).
        Shares may differ by one sample; metrics are synchronized only at epoch end, so the
        ranks' different batch counts are fine.
        """
        world_size, rank = self._world()
        if world_size <= 1 or len(dataset) == 0:
            return None
        if len(dataset) < world_size:
            # A rank without samples would skip the metric synchronization the others wait in.
            raise DatasetLayoutError(
                f"An evaluation set of {len(dataset)} samples cannot be shared among "
                f"{world_size} processes (each needs at least one); use fewer devices or more "
                "samples."
            )
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=False
        )

    def _loader(self, dataset: PointCloudDataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = None if shuffle else self._eval_sampler(dataset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_point_sets,
        )


class ModelNetDataModule(ShapeFolderDataModule):
    """ModelNet10 or ModelNet40, downloaded by ``prepare_data`` if it is not on disk.

    Class names are the official lists (:data:`MODELNET10_CLASSES`,
    :data:`MODELNET40_CLASSES`), so they are known before any data exists. The archive
    comes from the URL in :attr:`torch_geometric.datasets.ModelNet.urls` and is extracted
    so that ``root`` is the dataset folder. Point-cloud copies with the same layout (e.g.
    ``.ply`` files) work too.

    Args:
        root: Dataset folder (None: ``data/<name>``, relative to the working directory).
        name: ``"ModelNet10"`` or ``"ModelNet40"``.
        class_names: A subset of the official classes (None: all of them).
        **kwargs: The other arguments of :class:`ShapeFolderDataModule` (the CLI lists
            them too).
    """

    def __init__(
        self,
        root: str | None = None,
        name: str = "ModelNet10",
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if name not in _MODELNET_CLASSES:
            raise ValueError(f"name must be 'ModelNet10' or 'ModelNet40'; got {name!r}.")
        official = _MODELNET_CLASSES[name]
        if class_names is not None and not set(class_names) <= set(official):
            unknown = sorted(set(class_names) - set(official))
            raise ValueError(f"{unknown} are not {name} classes; choose from {list(official)}.")
        self.name = name
        super().__init__(
            root=root if root is not None else str(Path("data") / name),
            class_names=list(class_names) if class_names is not None else list(official),
            **kwargs,
        )

    @property
    def url(self) -> str:
        """Download URL of the official archive (from torch_geometric)."""
        from torch_geometric.datasets import ModelNet

        return ModelNet.urls[self.name.removeprefix("ModelNet")]

    def _has_data(self) -> bool:
        # Either split: `test` needs no train/ folders (and `fit` without them says so).
        return any(
            (self.root / name / split).is_dir() for name in self.class_names for split in SPLITS
        )

    def _provide_source(self) -> None:
        """Downloads and extracts the dataset if ``root`` lacks it (and is empty or absent).

        Raises:
            DatasetLayoutError: ``root`` holds class folders, but none of the classes asked
                for: most likely the user's own shapes, for :class:`ShapeFolderDataModule`.
            DatasetNotFoundError: ``root`` holds other files (the download would have to
                replace them), or the download failed.
        """
        if self._has_data():
            return
        if self.root.is_dir() and any(self.root.iterdir()):
            # Checked before downloading: the archive is large and could not be put there.
            found = _class_folders(self.root)
            if found:
                raise DatasetLayoutError(
                    f"{self.root} holds class folders ({', '.join(found[:6])}"
                    f"{', ...' if len(found) > 6 else ''}) but none of {self.name}'s classes "
                    f"asked for ({', '.join(self.class_names[:6])}"
                    f"{', ...' if len(self.class_names) > 6 else ''}); for your own classes, "
                    "use --data pointsink.data.ShapeFolderDataModule (in Python, "
                    "ShapeFolderDataModule) with this root."
                )
            raise DatasetNotFoundError(
                f"{self.name} is not in {self.root}, and that folder holds other files, so it "
                f"is not downloaded there; point --data.root at an empty or new folder, or at "
                f"the extracted {self.name} folder (with <class>/train and <class>/test "
                "sub-folders)."
            )
        self._download()

    def _download(self) -> None:
        from torch_geometric.data import download_url, extract_zip

        download_dir = self.root.parent
        download_dir.mkdir(parents=True, exist_ok=True)
        archive = download_dir / f"{self.name}.zip"
        instructions = (
            f"download it manually and put the archive at {archive} or the extracted folder "
            f"(with <class>/train and <class>/test sub-folders) at {self.root}"
        )
        if not archive.is_file():
            partial = download_dir / f"{self.name}.zip.part"
            partial.unlink(missing_ok=True)
            try:
                download_url(self.url, str(download_dir), filename=partial.name)
            except Exception as exc:  # URLError, HTTPError, timeouts, SSL errors...
                partial.unlink(missing_ok=True)
                raise DatasetNotFoundError(
                    f"{self.name} is not in {self.root} and downloading it from {self.url} "
                    f"failed ({type(exc).__name__}: {exc}); {instructions}."
                ) from exc
            # Renamed only once complete, so an interrupted download is never mistaken
            # for the archive.
            os.replace(partial, archive)

        extract_dir = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=download_dir))
        try:
            try:
                extract_zip(str(archive), str(extract_dir))
            except zipfile.BadZipFile as exc:
                raise DatasetNotFoundError(
                    f"{archive} is not a valid zip archive ({exc}); delete it and {instructions}."
                ) from exc
            extracted = extract_dir / self.name
            if not extracted.is_dir():
                raise DatasetNotFoundError(
                    f"{archive} does not contain a {self.name} folder; {instructions}."
                )
            if self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()  # an empty placeholder folder would block the rename
            self.root.parent.mkdir(parents=True, exist_ok=True)
            os.replace(extracted, self.root)
        finally:
            shutil.rmtree(extract_dir, ignore_errors=True)
        archive.unlink()


class SyntheticShapesDataModule(ShapeFolderDataModule):
    """The procedurally generated shapes of :mod:`pointsink.synthetic` (no download).

    Args:
        root: Output folder of the generated OFF files (None: ``data/synthetic``, relative
            to the working directory).
        train_per_class: Generated training shapes per class.
        test_per_class: Generated test shapes per class.
        generation_seed: Seed of the shape generation.
        class_names: A subset of :data:`pointsink.synthetic.SYNTHETIC_CLASSES` (None: all).
        **kwargs: The other arguments of :class:`ShapeFolderDataModule` (the CLI lists
            them too).
    """

    def __init__(
        self,
        root: str | None = None,
        train_per_class: int = 60,
        test_per_class: int = 20,
        generation_seed: int = 0,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if class_names is not None and not set(class_names) <= set(SYNTHETIC_CLASSES):
            unknown = sorted(set(class_names) - set(SYNTHETIC_CLASSES))
            raise ValueError(
                f"{unknown} are not synthetic classes; choose from {list(SYNTHETIC_CLASSES)}."
            )
        # As Python ints: NumPy ones would reach the JSON manifest, written last.
        self.train_per_class = check_int("train_per_class", train_per_class, minimum=1)
        self.test_per_class = check_int("test_per_class", test_per_class, minimum=0)
        self.generation_seed = check_int("generation_seed", generation_seed, minimum=0)
        super().__init__(
            root=root if root is not None else str(Path("data") / "synthetic"),
            class_names=list(class_names) if class_names is not None else list(SYNTHETIC_CLASSES),
            **kwargs,
        )

    def _provide_source(self) -> None:
        """Generates the shapes (skipped when already there)."""
        generate_synthetic_shapes(
            self.root,
            train_per_class=self.train_per_class,
            test_per_class=self.test_per_class,
            seed=self.generation_seed,
        )
