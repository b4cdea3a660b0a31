"""Turning shapes into normalized point sets, and training-time augmentation.

:func:`preprocess_set` is the single preprocessing path: the training cache and
prediction both call it, so a shape seen at prediction time is sampled and normalized
exactly like the training data.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from typing import Any

import numpy as np
import torch
import trimesh
from torch import Tensor

from pointsink.embedding import knn_indices
from pointsink.io import ShapeLoadError, as_shape, load_shape
from pointsink.validation import check_int, check_real

__all__ = [
    "PointCloudAugmentation",
    "file_sample_seed",
    "load_for_sampling",
    "mix_point_regions",
    "normalize_points",
    "preprocess_set",
    "preprocess_shape",
    "principal_spreads",
    "sample_points",
    "turn_about_vertical",
    "turn_by",
    "up_axis_index",
    "up_axis_rotation",
    "yaw_rotations",
]

AXIS_NAMES = ("x", "y", "z")

#: Fewest points a shape is sampled into: one point has no scale to normalize.
MIN_NUM_POINTS = 2

# Below this ratio of spreads (thinnest principal direction to widest) a shape is called
# flat, and lines likewise by the middle direction. The flattest of ModelNet10's 4,899
# shapes (a monitor) has 3.2 %; 1 % flags sheets and lines, which no solid training shape
# resembles.
DEGENERATE_SPREAD_RATIO = 0.01


def sample_points(shape: Any, num_points: int, seed: int) -> np.ndarray:
    """Samples a fixed number of points from a mesh surface or a point cloud.

    Meshes are sampled uniformly over their surface (faces weighted by area). Point clouds
    are subsampled without replacement; a cloud with fewer than ``num_points`` points keeps
    all of its points and repeats randomly chosen ones to fill up (a ``UserWarning`` says so).

    Args:
        shape: A mesh or point cloud accepted by :func:`pointsink.io.as_shape`
            (e.g. a :class:`trimesh.Trimesh` or an array ``(P, 3)``).
        num_points: Number of points ``N`` to return (>= 1).
        seed: Seed of the sampling (>= 0); the same seed gives the same points.

    Returns:
        Float32 array of shape ``(N, 3)``.
    """
    seed = check_int("seed", seed, minimum=0)
    return _sample_points_float64(as_shape(shape), num_points, seed).astype(np.float32)


def normalize_points(points: np.ndarray) -> np.ndarray:
    """Centres points at their centroid and scales them into the unit sphere.

    The centroid (mean point) is used rather than the bounding-box centre because it
    depends on all points, so it varies less between two samplings of the same shape than
    the box centre, which depends only on the few extreme points; it is also the
    convention of the usual ModelNet preprocessing (PointNet/PointNet++). The computation
    is done in float64 so that coordinates around 1e6 keep their relative precision.

    Args:
        points: Array of shape ``(N, 3)``, any float dtype.

    Returns:
        Float32 array ``(N, 3)`` with mean 0 and maximum point norm 1.

    Raises:
        ValueError: ``points`` does not have shape ``(N, 3)``, is empty, is not finite,
            all its points coincide (nothing to scale), or its coordinates are so large
            (around 1e306) that their mean overflows float64.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"normalize_points expects an array of shape (N, 3); got {points.shape}.")
    if not np.isfinite(points).all():
        raise ValueError("normalize_points got NaN or infinite coordinates.")
    # Overflow is reported below as one clear error instead of numpy RuntimeWarnings.
    with np.errstate(over="ignore", invalid="ignore"):
        centred = points - points.mean(axis=0)
        largest = np.abs(centred).max()
    # Dividing by an overflowed (inf or NaN) size would silently give zeros or NaN.
    if not np.isfinite(largest):
        raise ValueError(
            "normalize_points cannot scale these points: their coordinates are too large "
            f"for float64 (largest magnitude {np.abs(points).max():.3g}; the mean overflows)."
        )
    if largest == 0.0:
        raise ValueError("normalize_points cannot scale points that all coincide.")
    if not 1e-150 < largest < 1e150:
        # The squares in the norm would overflow or underflow: bring the offsets to ~1
        # first. Ordinary scales skip this, so their results stay bit for bit the same.
        centred = centred / largest
    radius = np.linalg.norm(centred, axis=1).max()
    return (centred / radius).astype(np.float32)


def file_sample_seed(path: str | os.PathLike[str], seed: int) -> int:
    """Sampling seed of one shape file: ``seed * 2**32 + crc32(file contents)``.

    The training cache and prediction both sample a file with this seed, so
    ``pointsink-predict`` sees the points that ``train.py test`` scores. Seeding from the
    contents gives every file its own draw (one seed for all files would give meshes that
    share a triangulation the same face picks, i.e. correlated samples) and keeps a file's
    points when it is renamed or moved or when other files are added.

    Args:
        path: Shape file to read.
        seed: Base seed (>= 0).

    Returns:
        Non-negative integer seed.
    """
    seed = check_int("seed", seed, minimum=0)
    checksum = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            checksum = zlib.crc32(chunk, checksum)
    return seed * 2**32 + checksum


def load_for_sampling(
    source: str | os.PathLike[str] | Any, seed: int = 0
) -> tuple[trimesh.Trimesh | np.ndarray, int]:
    """Loads a shape and the seed that the training cache and prediction sample it with.

    With ``shape, s = load_for_sampling(source, seed)``, ``preprocess_set(shape, N, s)``
    is the training sample of a file (the cache's, with ``sample_seed = seed``) and
    prediction's first view of it.

    Args:
        source: A file path (see :func:`pointsink.io.load_shape`) or an in-memory shape
            (see :func:`pointsink.io.as_shape`).
        seed: Base seed (>= 0).

    Returns:
        ``(shape, sampling_seed)``: the validated shape, and :func:`file_sample_seed` of
        ``(source, seed)`` for a file or ``seed`` itself for an in-memory shape.

    Raises:
        pointsink.io.ShapeLoadError: The file or object is not a usable shape.
    """
    if isinstance(source, (str, os.PathLike)):
        shape, seed = load_shape(source), file_sample_seed(source, seed)
    else:
        shape, seed = as_shape(source), check_int("seed", seed, minimum=0)
    _warn_if_degenerate(shape)
    return shape, seed


def principal_spreads(shape: trimesh.Trimesh | np.ndarray) -> np.ndarray:
    """Root-mean-square spread of a shape along its principal directions.

    For a mesh this is the spread of its surface, the distribution that sampling draws
    from (exact, not sampled): a finely tessellated face weighs by its area, not by its
    vertex count, and unreferenced vertices do not count.

    Args:
        shape: A validated mesh or point cloud ``(P, 3)``.

    Returns:
        Float64 array ``(3,)``, widest direction first (the square roots of the
        eigenvalues of the covariance).
    """
    # Moments about a point inside the shape, in units of its extent: far from the origin
    # (geographic coordinates) the second moment minus the squared mean would cancel to
    # noise, and at extreme scales the squares would overflow or underflow.
    is_mesh = isinstance(shape, trimesh.Trimesh)
    # A mesh's (F, 3 corners, 3) triangle corners, or a cloud's (P, 3) points.
    corners = np.asarray(shape.triangles if is_mesh else shape, dtype=np.float64)
    points = corners.reshape(-1, 3)
    low, high = points.min(axis=0), points.max(axis=0)
    extent = float(np.max(high - low))
    if not 0.0 < extent < np.inf:
        return np.zeros(3)  # all points coincide (or overflow): nothing to compare
    corners = (corners - (low + high) / 2.0) / extent
    if is_mesh:
        areas = np.asarray(shape.area_faces, dtype=np.float64)
        weights = areas / areas.sum()
        # A uniform point on triangle (a, b, c) has mean (a + b + c) / 3 and second moment
        # (a a^T + b b^T + c c^T + (a + b + c)(a + b + c)^T) / 12.
        mean = weights @ corners.mean(axis=1)
        sums = corners.sum(axis=1)
        second = (
            np.einsum("f,fki,fkj->ij", weights, corners, corners)
            + np.einsum("f,fi,fj->ij", weights, sums, sums)
        ) / 12.0
        covariance = second - np.outer(mean, mean)
    else:
        centred = corners - corners.mean(axis=0)
        covariance = centred.T @ centred / len(centred)
    eigenvalues = np.linalg.eigvalsh(covariance)[::-1]
    return extent * np.sqrt(np.clip(eigenvalues, 0.0, None))


def _warn_if_degenerate(shape: trimesh.Trimesh | np.ndarray) -> None:
    """Warns when a shape is a sheet or a line, which a solid-shape classifier cannot judge.

    Such inputs still get a class (every input does), often with high confidence, so the
    user is told once per shape, when it is loaded.
    """
    spreads = principal_spreads(shape)
    if spreads[0] == 0.0:
        return  # all points coincide: normalize_points reports that as an error
    middle, thinnest = spreads[1] / spreads[0], spreads[2] / spreads[0]
    if middle < DEGENERATE_SPREAD_RATIO:
        kind, ratio, direction = "a line", middle, "second-widest"
    elif thinnest < DEGENERATE_SPREAD_RATIO:
        kind, ratio, direction = "flat", thinnest, "thinnest"
    else:
        return
    warnings.warn(
        f"The shape is {kind}: its spread along its {direction} direction is "
        f"{100 * ratio:.1f} % of that along its widest. Classifiers are trained on solid "
        "3D shapes, so its predicted class is unreliable even when its probability is high.",
        UserWarning,
        stacklevel=3,
    )


def preprocess_shape(
    shape_or_path: str | os.PathLike[str] | Any, num_points: int, seed: int = 0
) -> np.ndarray:
    """Loads (if given a path), samples and normalizes a shape into exactly ``N`` points.

    Training and prediction call :func:`preprocess_set`, which gives the same points except
    for a point cloud of fewer than ``N`` points: this function fills such a cloud up by
    repeating its points (with a ``UserWarning``), for a model or a pipeline that cannot take
    padding masks. Called with a path, it samples with ``seed`` itself.

    Args:
        shape_or_path: A file path (see :func:`pointsink.io.load_shape`) or an in-memory
            shape (see :func:`pointsink.io.as_shape`).
        num_points: Number of points ``N`` to sample (>= 2: one point has no scale).
        seed: Sampling seed (>= 0).

    Returns:
        Float32 array of shape ``(N, 3)``, centred at the origin with maximum norm 1.

    Raises:
        pointsink.io.ShapeLoadError: The file or object is not a usable shape.
        ValueError: ``num_points`` or ``seed`` is not an integer in range.
    """
    num_points = check_int("num_points", num_points, minimum=MIN_NUM_POINTS)
    seed = check_int("seed", seed, minimum=0)
    return _normalized_sample(_shape_of(shape_or_path), num_points, seed)


def _normalized_sample(
    shape: trimesh.Trimesh | np.ndarray, num_points: int, seed: int
) -> np.ndarray:
    """``num_points`` points sampled from ``shape`` with ``seed``, normalized: ``(N, 3)``.

    Raises:
        pointsink.io.ShapeLoadError: The sampled points all coincide (a cloud with few
            distinct points), so they have no scale.
    """
    # Sample in float64 and normalize before casting: a small object far from the origin
    # (coordinates ~1e6) would lose its detail if cast to float32 first.
    sample = _sample_points_float64(shape, num_points, seed)
    if (sample == sample[0]).all():
        raise ShapeLoadError(
            f"the {num_points} points sampled from this shape all coincide, so they cannot be "
            "scaled into the unit sphere (a point cloud with few distinct points)."
        )
    return normalize_points(sample)


def _shape_of(shape_or_path: str | os.PathLike[str] | Any) -> trimesh.Trimesh | np.ndarray:
    """The validated shape of a file path (loaded) or of an in-memory shape."""
    if isinstance(shape_or_path, (str, os.PathLike)):
        return load_shape(shape_or_path)
    return as_shape(shape_or_path)


def preprocess_set(
    shape_or_path: str | os.PathLike[str] | Any,
    num_points: int,
    seed: int = 0,
    warn_small: bool = True,
) -> tuple[np.ndarray, int]:
    """Loads (if given a path), samples and normalizes a shape into a padded point set.

    This is the one preprocessing function shared by the training cache and prediction,
    which load each file with :func:`load_for_sampling` first (a file's own seed comes from
    :func:`file_sample_seed`). A mesh, or a point cloud of at least ``N`` points, gives the
    ``N`` points of :func:`preprocess_shape`. A point cloud of ``P < N`` points gives its
    ``P`` points, normalized, followed by ``N - P`` rows of zeros; the count ``P`` says
    which rows are real (the mask ``arange(N) < P``), and the model takes the ``P`` points
    alone (padding masks, README "Sets of different sizes"), with a ``UserWarning`` unless
    ``warn_small`` is False (the training cache says it once for all such files).
    Filling up by repeated points instead would hand the set abstraction groups of fewer
    distinct points: the width-128 ModelNet10 model shipped until 2026-12-06 scored 51.3 %
    instead of 90.5 % on 256-point test clouds that way (``benchmarks/RESULTS.md``).

    Args:
        shape_or_path: A file path (see :func:`pointsink.io.load_shape`) or an in-memory
            shape (see :func:`pointsink.io.as_shape`).
        num_points: Number of points ``N`` (>= 2: one point has no scale).
        seed: Sampling seed (>= 0; a cloud of fewer than ``N`` points does not use it).
        warn_small: Warn when a point cloud has fewer than ``N`` points.

    Returns:
        ``(points, count)``: float32 array ``(N, 3)`` whose first ``count`` rows are the
        shape's points, centred at the origin with maximum norm 1, and ``count``, ``N``
        except for a smaller point cloud.

    Raises:
        pointsink.io.ShapeLoadError: The file or object is not a usable shape.
        ValueError: ``num_points`` or ``seed`` is not an integer in range.
    """
    num_points = check_int("num_points", num_points, minimum=MIN_NUM_POINTS)
    seed = check_int("seed", seed, minimum=0)
    shape = _shape_of(shape_or_path)
    if isinstance(shape, trimesh.Trimesh) or len(shape) >= num_points:
        return _normalized_sample(shape, num_points, seed), num_points
    count = len(shape)
    if warn_small:
        warnings.warn(
            f"The point cloud has only {count} points but {num_points} were requested; the "
            f"model takes its {count} points alone (padded and masked).",
            UserWarning,
            stacklevel=2,
        )
    points = np.zeros((num_points, 3), dtype=np.float32)
    points[:count] = normalize_points(shape)
    return points, count


def up_axis_index(axis: int | str) -> int:
    """Index of a coordinate axis given as ``0``, ``1``, ``2`` or ``"x"``, ``"y"``, ``"z"``.

    Raises:
        ValueError: Anything else.
    """
    if isinstance(axis, str) and axis.strip().lower() in AXIS_NAMES:
        return AXIS_NAMES.index(axis.strip().lower())
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis <= 2:
        return int(axis)
    raise ValueError(f"an up axis is 'x', 'y', 'z' (or 0, 1, 2); got {axis!r}.")


def up_axis_rotation(from_axis: int | str, to_axis: int | str) -> np.ndarray:
    """The quarter turn that stands a shape whose vertical is ``from_axis`` up along ``to_axis``.

    Files differ in which axis points up: glTF is y-up by definition, ModelNet and the
    shipped models are z-up. This rotation ``R`` turns about the remaining axis ``c`` with
    ``R e_from = e_to`` and ``R e_to = -e_from``, e.g. y-up to z-up maps ``(x, y, z)`` to
    ``(x, -z, y)``, the usual glTF-to-z-up conversion. It is a proper rotation (no mirror
    image) and exact in floating point (signs and a permutation). It fixes the vertical
    only: the facing direction about it is whatever the file has.

    Args:
        from_axis: The input's vertical axis (see :func:`up_axis_index`).
        to_axis: The vertical axis wanted.

    Returns:
        Float64 array ``(3, 3)``; rotate points ``(N, 3)`` as ``points @ R.T``. The
        identity when the axes are the same.
    """
    source, target = up_axis_index(from_axis), up_axis_index(to_axis)
    rotation = np.eye(3)
    if source != target:
        rotation[:, source] = np.eye(3)[target]
        rotation[:, target] = -np.eye(3)[source]
    return rotation


def yaw_rotations(angles: Tensor, up_axis: int = 2) -> Tensor:
    """Rotations about the vertical axis (turns in the plane of the two horizontal axes).

    Args:
        angles: ``(S,)`` angles in radians. A positive angle turns the first horizontal axis
            towards the second (x towards y for z-up: counter-clockwise seen from above).
        up_axis: Index (0, 1 or 2) of the vertical axis, which every rotation keeps fixed.

    Returns:
        ``(S, 3, 3)`` rotation matrices ``R`` (apply as ``R @ p``), in ``angles``' dtype
        and device. The row of ``up_axis`` is exactly the unit vector, so the up
        coordinate passes through unchanged.
    """
    up = up_axis_index(up_axis)
    first, second = (axis for axis in range(3) if axis != up)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rotations = torch.zeros(len(angles), 3, 3, dtype=angles.dtype, device=angles.device)
    rotations[:, up, up] = 1.0
    rotations[:, first, first], rotations[:, first, second] = cos, -sin
    rotations[:, second, first], rotations[:, second, second] = sin, cos
    return rotations


def turn_about_vertical(
    points: Tensor, max_degrees: float, up_axis: int = 2, seed: int = 0
) -> Tensor:
    """Turns each point set by its own random angle about the vertical axis.

    The angles are uniform in ``[-max_degrees, max_degrees]`` (180: any facing), drawn in
    the sets' order from a generator seeded with ``seed``: the same sets in the same order
    are turned the same way every time. This is how the data modules'
    ``eval_rotation_degrees`` and ``benchmarks/facing.py`` score shapes facing other ways
    than the training's. Padding rows at the origin stay there.

    Args:
        points: ``(S, N, 3)`` point sets.
        max_degrees: Largest turn, in ``[0, 180]``.
        up_axis: Index (0, 1 or 2) of the vertical axis.
        seed: Seed of the angles.

    Returns:
        ``(S, N, 3)`` turned copies, in ``points``' dtype and device.

    Raises:
        ValueError: ``points`` is not ``(S, N, 3)`` or ``max_degrees`` is outside ``[0, 180]``.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (S, N, 3); got {tuple(points.shape)}.")
    check_real("max_degrees", max_degrees, 0.0, 180.0)
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(len(points), generator=generator, dtype=torch.float64)
    angles = math.radians(max_degrees) * (2.0 * uniform - 1.0)
    return turn_by(points, angles, up_axis)


def turn_by(points: Tensor, angles: Tensor, up_axis: int = 2) -> Tensor:
    """Turns each point set by its own given angle about the vertical axis.

    Args:
        points: ``(S, N, 3)`` point sets.
        angles: ``(S,)`` angles in radians (see :func:`yaw_rotations`); the rotations are
            formed in ``angles``' dtype, then cast to ``points``'.
        up_axis: Index (0, 1 or 2) of the vertical axis.

    Returns:
        ``(S, N, 3)`` turned copies, in ``points``' dtype and device.
    """
    rotations = yaw_rotations(angles, up_axis).to(device=points.device, dtype=points.dtype)
    return torch.einsum("sij,snj->sni", rotations, points)


def _sample_points_float64(
    shape: trimesh.Trimesh | np.ndarray, num_points: int, seed: int
) -> np.ndarray:
    """Implements :func:`sample_points` on a validated shape, returning float64 ``(N, 3)``."""
    num_points = check_int("num_points", num_points)
    if isinstance(shape, trimesh.Trimesh):
        points, _ = trimesh.sample.sample_surface(shape, num_points, seed=seed)
        return np.asarray(points, dtype=np.float64)

    rng = np.random.default_rng(seed)
    num_available = len(shape)
    if num_available >= num_points:
        return shape[rng.choice(num_available, size=num_points, replace=False)]
    warnings.warn(
        f"The point cloud has only {num_available} points but {num_points} were requested; "
        "sampling with replacement (some points are repeated).",
        UserWarning,
        stacklevel=3,
    )
    # Keep every point once and draw only the shortfall with replacement, so no point of
    # an already small cloud is lost.
    extra = rng.choice(num_available, size=num_points - num_available, replace=True)
    order = rng.permutation(np.concatenate([np.arange(num_available), extra]))
    return shape[order]


class PointCloudAugmentation(torch.nn.Module):
    """Random training-time augmentation of one point set.

    In order: anisotropic scaling (one factor per axis), a small rotation about the up
    axis, an optional translation (one shift per axis, as in DGCNN's ModelNet training),
    clipped Gaussian jitter, an optional random point dropout (PointNet++'s ModelNet
    training) and a random permutation of the points. Random numbers
    come from torch's global RNG unless a generator is passed. Lightning's seeding makes
    that RNG differ between dataloader workers only with ``seed_everything(workers=True)``,
    and never between DDP ranks without workers (every rank would draw the same
    augmentation), so a dataset should pass its own generator per worker and rank, as
    :class:`pointsink.data.PointCloudDataset` does.

    Args:
        scale_low: Lower bound of the per-axis scale factor (> 0).
        scale_high: Upper bound of the per-axis scale factor (>= scale_low).
        max_rotation_degrees: Rotation angle about the up axis is drawn uniformly from
            ``[-max_rotation_degrees, max_rotation_degrees]`` (>= 0).
        up_axis: The vertical axis (0, 1, 2 or "x", "y", "z"); the rotation keeps it fixed.
        jitter_sigma: Standard deviation of the per-coordinate Gaussian noise (>= 0).
        jitter_clip: Noise is clipped to ``[-jitter_clip, jitter_clip]`` (>= 0).
        shuffle: Whether to permute the order of the points.
        max_translation: Each axis is shifted by a draw from
            ``[-max_translation, max_translation]`` (>= 0; 0 turns it off and draws
            nothing, so the other draws stay as without the option).
        max_point_dropout: Each set drops a fraction of its points drawn from
            ``[0, max_point_dropout]`` (each point independently with that probability)
            and the dropped points become copies of the first point, so the set keeps its
            size ``N`` while its density varies, as PointNet++'s ``random_point_dropout``
            (Qi et al., 2017; 0.875 there). In ``[0, 1)``; 0 turns it off and draws nothing.
    """

    def __init__(
        self,
        scale_low: float = 0.8,
        scale_high: float = 1.25,
        max_rotation_degrees: float = 15.0,
        up_axis: int | str = 2,
        jitter_sigma: float = 0.01,
        jitter_clip: float = 0.05,
        shuffle: bool = True,
        max_translation: float = 0.0,
        max_point_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        settings = {
            "scale_low": scale_low,
            "scale_high": scale_high,
            "max_rotation_degrees": max_rotation_degrees,
            "jitter_sigma": jitter_sigma,
            "jitter_clip": jitter_clip,
            "max_translation": max_translation,
            "max_point_dropout": max_point_dropout,
        }
        # NaN passes every comparison below (and would turn every point into NaN).
        not_finite = [
            f"{name}={value}" for name, value in settings.items() if not math.isfinite(value)
        ]
        if not_finite:
            raise ValueError(f"Augmentation settings must be finite; got {', '.join(not_finite)}.")
        if not 0.0 < scale_low <= scale_high:
            raise ValueError(
                f"Need 0 < scale_low <= scale_high; got scale_low={scale_low}, "
                f"scale_high={scale_high}."
            )
        if max_rotation_degrees < 0.0:
            raise ValueError(f"max_rotation_degrees must be >= 0; got {max_rotation_degrees}.")
        if jitter_sigma < 0.0 or jitter_clip < 0.0:
            raise ValueError(
                f"jitter_sigma and jitter_clip must be >= 0; got {jitter_sigma}, {jitter_clip}."
            )
        if max_translation < 0.0:
            raise ValueError(f"max_translation must be >= 0; got {max_translation}.")
        if not 0.0 <= max_point_dropout < 1.0:
            raise ValueError(f"max_point_dropout must be in [0, 1); got {max_point_dropout}.")
        self.scale_low = float(scale_low)
        self.scale_high = float(scale_high)
        self.max_rotation_degrees = float(max_rotation_degrees)
        # As everywhere else: "x"/"y"/"z" or 0/1/2, and True (== 1) is refused.
        try:
            self.up_axis = up_axis_index(up_axis)
        except ValueError as error:
            raise ValueError(f"up_axis: {error}") from None
        self.jitter_sigma = float(jitter_sigma)
        self.jitter_clip = float(jitter_clip)
        self.shuffle = bool(shuffle)
        self.max_translation = float(max_translation)
        self.max_point_dropout = float(max_point_dropout)

    def forward(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Returns an augmented copy of ``points``.

        Args:
            points: Float tensor of shape ``(N, 3)``; it is not modified.
            generator: Optional torch generator (on ``points.device``) for reproducible
                draws; torch's global RNG is used when None.

        Returns:
            Tensor of shape ``(N, 3)``, same dtype and device as ``points``.
        """
        if points.dim() != 2 or points.shape[-1] != 3:
            raise ValueError(f"Expected points of shape (N, 3); got {tuple(points.shape)}.")
        if not points.is_floating_point():
            # The random factors are drawn in the points' dtype, which must hold fractions.
            raise TypeError(f"Expected floating-point points; got {points.dtype}.")
        options: dict[str, Any] = {"device": points.device, "dtype": points.dtype}

        scale = self.scale_low + (self.scale_high - self.scale_low) * torch.rand(
            3, generator=generator, **options
        )
        angle = math.radians(self.max_rotation_degrees) * (
            2.0 * torch.rand((), generator=generator, **options) - 1.0
        )
        rotation = yaw_rotations(angle.reshape(1), self.up_axis)[0]
        augmented = (points * scale) @ rotation.T
        if self.max_translation > 0.0:
            shift = torch.rand(3, generator=generator, **options)
            augmented = augmented + self.max_translation * (2.0 * shift - 1.0)
        if self.jitter_sigma > 0.0:
            noise = self.jitter_sigma * torch.randn(points.shape, generator=generator, **options)
            augmented = augmented + noise.clamp(-self.jitter_clip, self.jitter_clip)
        if self.max_point_dropout > 0.0:
            ratio = self.max_point_dropout * torch.rand((), generator=generator, **options)
            dropped = torch.rand(len(points), generator=generator, **options) < ratio
            augmented = torch.where(dropped.unsqueeze(-1), augmented[:1], augmented)
        if self.shuffle:
            order = torch.randperm(len(points), generator=generator, device=points.device)
            augmented = augmented[order]
        return augmented

    def settings(self) -> dict[str, float | int | bool]:
        """The constructor arguments as plain values.

        ``PointCloudAugmentation(**settings)`` rebuilds this augmentation; checkpoints
        record them for test-time voting.
        """
        return {
            "scale_low": self.scale_low,
            "scale_high": self.scale_high,
            "max_rotation_degrees": self.max_rotation_degrees,
            "up_axis": self.up_axis,
            "jitter_sigma": self.jitter_sigma,
            "jitter_clip": self.jitter_clip,
            "shuffle": self.shuffle,
            "max_translation": self.max_translation,
            "max_point_dropout": self.max_point_dropout,
        }

    def extra_repr(self) -> str:
        """Shows the settings in ``repr(module)``."""
        return (
            f"scale=[{self.scale_low}, {self.scale_high}], "
            f"max_rotation_degrees={self.max_rotation_degrees}, up_axis={self.up_axis}, "
            f"jitter_sigma={self.jitter_sigma}, jitter_clip={self.jitter_clip}, "
            f"shuffle={self.shuffle}, max_translation={self.max_translation}, "
            f"max_point_dropout={self.max_point_dropout}"
        )


def mix_point_regions(
    points: Tensor, partner_points: Tensor, num_replaced: int, centers: Tensor
) -> Tensor:
    """Replaces a local region of each point set by the same region of a partner set.

    The batch-level mixing of PointCutMix-K and RSMix (Zhang et al., "PointCutMix", 2021;
    Lee et al., "Regularization Strategy for Point Cloud via Rigidly Mixed Sample", 2021):
    the ``K`` points of ``points[b]`` nearest ``centers[b]`` are dropped and the ``K``
    points of ``partner_points[b]`` nearest the same centre take their place. Both sets are
    normalized alike, so the region is the same part of space in both and the mixed set
    stays locally coherent (a set abstraction's neighbourhoods mostly see one shape). The
    label weight of the partner is ``K / N``.

    Args:
        points: ``(B, N, 3)`` point sets; not modified.
        partner_points: ``(B, N', 3)`` sets that give the replacement regions, ``N' >= K``.
        num_replaced: ``K``, points replaced per set, ``0 <= K <= N``.
        centers: ``(B, 3)`` region centres.

    Returns:
        ``(B, N, 3)`` mixed point sets.
    """
    if points.dim() != 3 or partner_points.dim() != 3 or points.shape[0] != partner_points.shape[0]:
        raise ValueError(
            "points and partner_points must be (B, N, 3) with the same B; got "
            f"{tuple(points.shape)} and {tuple(partner_points.shape)}."
        )
    if centers.shape != (points.shape[0], points.shape[-1]):
        raise ValueError(
            f"centers must have shape {(points.shape[0], points.shape[-1])}; "
            f"got {tuple(centers.shape)}."
        )
    if not 0 <= num_replaced <= min(points.shape[1], partner_points.shape[1]):
        raise ValueError(
            f"num_replaced must be between 0 and the number of points; got {num_replaced}."
        )
    mixed = points.clone()
    if num_replaced == 0:
        return mixed
    queries = centers.unsqueeze(1)
    dropped = knn_indices(points, num_replaced, queries).squeeze(1)
    taken = knn_indices(partner_points, num_replaced, queries).squeeze(1)
    rows = torch.arange(points.shape[0], device=points.device).unsqueeze(1)
    mixed[rows, dropped] = partner_points[rows, taken]
    return mixed
