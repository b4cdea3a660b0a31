"""Loading and validating 3D shapes: meshes and point clouds from files or memory.

Everything that enters the preprocessing pipeline (training cache or prediction) goes
through :func:`load_shape` (files) or :func:`as_shape` (in-memory objects), so a shape is
either a :class:`trimesh.Trimesh` with faces and positive surface area, or a finite float64
point array of shape ``(P, 3)`` (point clouds, and meshes of any format that have vertices
but no faces). Anything else raises :class:`ShapeLoadError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import torch
import trimesh

__all__ = [
    "MESH_EXTENSIONS",
    "POINT_ARRAY_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "TEXT_POINT_EXTENSIONS",
    "ShapeLoadError",
    "as_shape",
    "exclusive_lock",
    "file_extension",
    "geometry_files",
    "is_shape_file",
    "load_shape",
]

#: Formats read by trimesh. PLY may hold a mesh or a point cloud (no faces).
MESH_EXTENSIONS: frozenset[str] = frozenset({"off", "obj", "stl", "ply", "glb", "gltf", "3mf"})
#: Whitespace-, comma- or semicolon-separated text, one point per row (extra columns are ignored).
TEXT_POINT_EXTENSIONS: frozenset[str] = frozenset({"xyz", "pts", "txt"})
#: NumPy ``.npy`` arrays of shape ``(P, C)``, ``C >= 3`` (extra columns are ignored).
POINT_ARRAY_EXTENSIONS: frozenset[str] = frozenset({"npy"})
#: Every extension :func:`load_shape` accepts, lower-case without the dot.
SUPPORTED_EXTENSIONS: frozenset[str] = (
    MESH_EXTENSIONS | TEXT_POINT_EXTENSIONS | POINT_ARRAY_EXTENSIONS
)

# Keeps error messages on one line and readable when a parser dumps a long message.
_MAX_REASON_CHARS = 200


class ShapeLoadError(ValueError):
    """A file or object is not a usable mesh or point cloud.

    The message is one sentence that names the source and what is wrong with it.
    """


class _PointFileError(ValueError):
    """This package's own, complete reason why a point file cannot be read.

    Unlike a parser's exception it is passed on whole, not cut to ``_MAX_REASON_CHARS``.
    """


def file_extension(path: str | os.PathLike[str]) -> str:
    """Returns the lower-case extension without the dot (``"CHAIR.OFF"`` gives ``"off"``)."""
    return Path(path).suffix.lower().lstrip(".")


def is_shape_file(path: str | os.PathLike[str]) -> bool:
    """Whether a folder entry is a shape to read: a regular file with a supported extension.

    Hidden files (``.name``, e.g. macOS's ``._chair_0001.off``) are metadata, not shapes.
    Training folders and prediction folders are listed by this one rule.
    """
    name = os.path.basename(path)
    return (
        not name.startswith(".")
        and file_extension(name) in SUPPORTED_EXTENSIONS
        and os.path.isfile(path)
    )


def geometry_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files :func:`load_shape` reads the geometry of ``path`` from: itself, first.

    A ``.gltf`` file keeps its vertex data in the buffers it names (``"buffers": [{"uri":
    ...}]``), usually a ``.bin`` beside it; every other format is one file. Embedded
    (``data:``) buffers and buffers that are not there are left out; an unreadable
    ``.gltf`` is listed alone (loading it will say what is wrong). Images are not geometry.

    Args:
        path: A shape file.

    Returns:
        ``path`` and, for glTF, its existing external buffer files.
    """
    path = Path(path)
    if file_extension(path) != "gltf":
        return [path]
    try:
        buffers = json.loads(path.read_bytes()).get("buffers") or []
        uris = [buffer.get("uri") for buffer in buffers if isinstance(buffer, dict)]
    except (OSError, ValueError, AttributeError):
        return [path]
    found = [path]
    for uri in uris:
        if isinstance(uri, str) and uri and not uri.startswith("data:"):
            buffer = path.parent / unquote(uri)
            if buffer.is_file():
                found.append(buffer)
    return found


def load_shape(path: str | os.PathLike[str]) -> trimesh.Trimesh | np.ndarray:
    """Loads a mesh or point cloud from a file and validates it.

    Meshes come back as :class:`trimesh.Trimesh` (scenes with several geometries are
    merged into one mesh, with their transforms applied). Point clouds (any mesh format
    without faces, XYZ/PTS/TXT text, NPY) come back as float64 arrays of shape ``(P, 3)``.
    ModelNet's broken OFF headers (``OFF1234 5678 0`` on one line) are read as well, and an
    OFF file must hold as many vertex and face lines as its header declares.

    Args:
        path: File with one of :data:`SUPPORTED_EXTENSIONS` (case-insensitive).

    Returns:
        A mesh with faces and positive area, or a finite float64 array ``(P, 3)``, P >= 1.

    Raises:
        ShapeLoadError: The file is missing, empty, has an unsupported extension, cannot
            be parsed, is a truncated OFF file, or holds no usable geometry (no points,
            NaN/inf coordinates, zero surface area, all points coincide), or is a mesh
            whose coordinates (beyond about 1e77 or below 1e-80) put its surface area out
            of float64's range.
    """
    path = Path(path)
    extension = file_extension(path)
    if extension not in SUPPORTED_EXTENSIONS:
        supported = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        raise ShapeLoadError(
            f"{path}: unsupported file extension {path.suffix or '(none)'!r} "
            f"(supported: {supported})."
        )
    if not path.exists():
        raise ShapeLoadError(f"{path}: no such file.")
    if not path.is_file():
        raise ShapeLoadError(f"{path}: not a regular file.")
    if path.stat().st_size == 0:
        raise ShapeLoadError(f"{path}: the file is empty.")

    try:
        if extension in POINT_ARRAY_EXTENSIONS:
            # allow_pickle=False: an .npy file must never be able to run code.
            loaded: Any = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray) and loaded.ndim == 2:
                loaded = _xyz_columns(loaded)
        elif extension in TEXT_POINT_EXTENSIONS:
            loaded = _read_point_text(path)
        else:
            source: Any = path
            if extension == "off":
                # trimesh reads a cut-off OFF file as a smaller mesh (or fails obscurely);
                # the bytes checked are the bytes parsed, read once.
                data = path.read_bytes()
                _check_off_counts(data, path)
                source = io.BytesIO(data)
            # process=False keeps NaN vertices and degenerate faces visible to the checks
            # below instead of trimesh silently dropping them.
            loaded = trimesh.load(source, file_type=extension, process=False)
    except ShapeLoadError:
        raise
    except _PointFileError as exc:
        raise ShapeLoadError(f"{path}: not a readable point cloud ({exc}).") from exc
    except Exception as exc:  # parsers raise many types (ValueError, IndexError, struct.error...)
        raise ShapeLoadError(
            f"{path}: not a readable mesh or point cloud ({_describe(exc)})."
        ) from exc
    return _validate(loaded, source=str(path))


def as_shape(obj: Any) -> trimesh.Trimesh | np.ndarray:
    """Validates an in-memory shape the same way :func:`load_shape` validates files.

    Args:
        obj: A :class:`trimesh.Trimesh`, :class:`trimesh.Scene` (merged into one mesh),
            :class:`trimesh.PointCloud`, or a NumPy array / torch tensor of shape ``(P, 3)``.

    Returns:
        A mesh with faces and positive area (the input mesh itself, not a copy), or a new
        finite float64 array ``(P, 3)`` (for a point cloud or a mesh without faces).

    Raises:
        ShapeLoadError: The object has an unsupported type or no usable geometry.
    """
    return _validate(obj, source=f"in-memory {type(obj).__name__}")


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike[str]) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``lock_path`` (created if missing) while in the block.

    Serializes processes on one machine that build the same files (dataset generation,
    preprocessing caches). Uses ``fcntl.flock``; where that does not exist (Windows) the
    block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is None:  # pragma: no cover
        yield
        return
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


# One number written with a decimal comma, as European locales do: "-0,132", "1,5e-3".
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+(?:[eE][-+]?\d+)?")


def _refuse_decimal_commas(rows: list[str]) -> None:
    """Raises on a row of space-separated numbers written with decimal commas.

    Read with commas as separators, ``0,126 -0,132 0,640`` would be six columns, x y z =
    0 126 -0. A row with a token that starts or ends with a comma (``7, 12,456``) uses
    commas as separators, and a row of one token (``1,2,3``) has no other separator.
    """
    for row in rows:
        tokens = row.split()
        if len(tokens) < 2 or any(token[0] == "," or token[-1] == "," for token in tokens):
            continue
        decimal_comma = next((t for t in tokens if _DECIMAL_COMMA.fullmatch(t)), None)
        if decimal_comma is not None:
            raise _PointFileError(
                f"{decimal_comma!r} in {row!r} has a decimal comma; write numbers with a "
                "decimal point (commas separate columns)"
            )


def _read_point_text(path: Path) -> np.ndarray:
    """Reads an XYZ-like text file into an array ``(P, C)``, C >= 3.

    Accepts whitespace, comma or semicolon separators and ``#`` comments. A leading line
    with a single integer (the point count of some ``.pts`` variants) is skipped, and so is
    a leading line of column names without a number (``x y z``, CloudCompare's
    ``//X,Y,Z,R,G,B``). Errors name the file's line.
    """
    # utf-8-sig drops the byte-order mark that Windows editors write first. Numbers are
    # ASCII, so other bytes (a Latin-1 comment) are replaced, not fatal; in a row they
    # still fail the parse below.
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    # Semicolons separate columns in spreadsheet exports of locales that write decimal
    # commas, so they become spaces before the decimal-comma check.
    rows = [line.split("#", 1)[0].replace(";", " ").strip() for line in text.splitlines()]
    if _DECIMAL_COMMA.search(text):
        _refuse_decimal_commas(rows)
    # (line number, row) of the non-empty rows, so that errors point into the file.
    numbered = [(number, row.replace(",", " ")) for number, row in enumerate(rows, 1) if row]
    if numbered and (
        re.fullmatch(r"\d+", numbered[0][1]) or not any(map(_is_number, numbered[0][1].split()))
    ):
        numbered = numbered[1:]
    if not numbered:
        raise _PointFileError("no point rows found")
    try:
        points = np.loadtxt([row for _, row in numbered], dtype=np.float64, ndmin=2)
    except ValueError:
        # Slow, row by row, only to say which line is wrong; else numpy's message stands.
        _check_point_rows(numbered)
        raise
    if points.shape[1] < 3:
        raise _PointFileError(f"rows have {points.shape[1]} columns, need at least 3 (x y z)")
    return _xyz_columns(points)


def _check_point_rows(numbered: list[tuple[int, str]]) -> None:
    """Raises, naming the file's line, on a row with a non-number or another column count.

    Args:
        numbered: ``(line number, row)`` pairs, separators already spaces.
    """
    first_number, first_row = numbered[0]
    num_columns = len(first_row.split())
    for number, row in numbered:
        tokens = row.split()
        bad_token = next((token for token in tokens if not _is_number(token)), None)
        if bad_token is not None:
            raise _PointFileError(f"line {number}: {bad_token!r} is not a number")
        if len(tokens) != num_columns:
            raise _PointFileError(
                f"line {number} has {len(tokens)} columns, line {first_number} has "
                f"{num_columns}: every point needs the same columns"
            )


def _is_number(token: str) -> bool:
    """Whether ``token`` reads as a float, as :func:`numpy.loadtxt` would read it."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def _xyz_columns(points: np.ndarray) -> np.ndarray:
    """The x y z columns of a ``(P, C)`` point array; later ones (normals...) are dropped.

    Raises:
        _PointFileError: Fewer rows than columns: the array is channels first,
            ``(C, P)``, and would otherwise pass as a few points with many extra columns.
    """
    if points.shape[1] > 3 and points.shape[0] < points.shape[1]:
        raise _PointFileError(
            f"expected one point per row, (P, 3) or (P, C) with x y z first; got shape "
            f"{points.shape}, which looks channels-first (transpose it). If it is "
            f"{points.shape[0]} points with {points.shape[1] - 3} extra columns, pass only "
            "their x y z columns: fewer points than columns cannot be told from channels-first"
        )
    return points[:, :3]


def _check_off_counts(data: bytes, path: Path) -> None:
    """Raises unless an OFF file's ``data`` hold the vertex and face lines its header declares.

    The file is split into lines exactly as trimesh's OFF reader does (same decoding and
    comment stripping, the counts line is the first one after the ``OFF`` keyword, so
    ``OFF1234 5678 0``, ``COFF`` and ``NOFF`` work), so what is checked is what trimesh
    parses. Files whose counts line cannot be read are left to trimesh to reject.

    Raises:
        ShapeLoadError: Fewer lines than declared, or a last line cut short.
    """
    text = trimesh.util.comment_strip(trimesh.util.decode_text(data)).strip()
    parts = re.split("(COFF|OFF)", text, maxsplit=1)
    if len(parts) != 3:
        return
    lines = [line.split() for line in parts[2].splitlines()]
    lines = [tokens for tokens in lines if tokens]
    try:
        num_vertices, num_faces = (int(token) for token in lines[0][:2])
    except (IndexError, ValueError):
        return
    if num_vertices < 0 or num_faces < 0:
        return
    body = lines[1 : 1 + num_vertices + num_faces]
    if len(body) < num_vertices + num_faces:
        found_vertices = min(len(body), num_vertices)
        raise ShapeLoadError(
            f"{path}: the OFF file is truncated or its header is wrong (the header declares "
            f"{num_vertices} vertices and {num_faces} faces, but the file holds "
            f"{found_vertices} vertex lines and {len(body) - found_vertices} face lines)."
        )
    if not body:
        return
    # A file cut inside its last line keeps the line count; the line's length tells.
    last = body[-1]
    if num_faces == 0:
        needed = 3
    else:
        try:
            needed = 1 + int(last[0])
        except ValueError:
            return  # not a face line at all: trimesh's error describes it
    if len(last) < needed:
        raise ShapeLoadError(
            f"{path}: the OFF file is truncated (the header declares {num_vertices} vertices "
            f"and {num_faces} faces, and the last line {' '.join(last)!r} has only "
            f"{len(last)} of the {needed} values it needs)."
        )


def _validate(obj: Any, source: str) -> trimesh.Trimesh | np.ndarray:
    """Turns a loaded object into a validated mesh or point array; see :func:`as_shape`."""
    if isinstance(obj, trimesh.Scene):
        obj = _merge_scene(obj, source)
    if isinstance(obj, trimesh.Trimesh):
        return _validate_mesh(obj, source)
    if isinstance(obj, trimesh.PointCloud):
        return _validate_points(np.asarray(obj.vertices), source)
    if isinstance(obj, torch.Tensor):
        # float64 for every floating dtype: NumPy has no bfloat16.
        tensor = obj.detach().cpu()
        return _validate_points(
            (tensor.double() if tensor.is_floating_point() else tensor).numpy(), source
        )
    if isinstance(obj, np.ndarray):
        return _validate_points(obj, source)
    raise ShapeLoadError(
        f"{source}: not a mesh or point cloud (got {type(obj).__name__}; expected a "
        "trimesh.Trimesh, Scene or PointCloud, or an array of shape (P, 3))."
    )


def _merge_scene(scene: trimesh.Scene, source: str) -> trimesh.Trimesh | np.ndarray:
    """Bakes scene transforms and merges all meshes (or, failing that, all point clouds)."""
    geometries = scene.dump()  # copies with their scene-graph transforms applied
    meshes = [g for g in geometries if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]
    if meshes:
        return meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)
    # Meshes without faces are point clouds, as everywhere else.
    clouds = [
        np.asarray(g.vertices)
        for g in geometries
        if isinstance(g, (trimesh.PointCloud, trimesh.Trimesh)) and len(g.vertices) > 0
    ]
    if clouds:
        return np.concatenate(clouds, axis=0)
    # Text that some parsers (OBJ, ASCII STL) accept without finding anything ends up here.
    raise ShapeLoadError(f"{source}: not a readable mesh or point cloud (no geometry found).")


def _validate_mesh(mesh: trimesh.Trimesh, source: str) -> trimesh.Trimesh | np.ndarray:
    """Validates a mesh; one with vertices but no faces comes back as points ``(P, 3)``."""
    vertices = np.asarray(mesh.vertices)
    faces = np.asarray(mesh.faces)
    if len(vertices) == 0:
        raise ShapeLoadError(f"{source}: the mesh is empty (no vertices).")
    if not np.isfinite(vertices).all():
        raise ShapeLoadError(f"{source}: the mesh has NaN or infinite vertex coordinates.")
    # Some readers (PLY, OBJ) already return faceless files as point clouds, others (OFF) as
    # meshes without faces; treating both alike makes the result independent of the format.
    if len(faces) == 0:
        return _validate_points(vertices, source)
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ShapeLoadError(f"{source}: the mesh has face indices outside its vertex range.")
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        area = float(mesh.area)
    if np.isfinite(area) and area > 0.0:
        return mesh
    offsets = vertices - vertices.mean(axis=0)
    size = float(np.abs(offsets).max())
    if size > 0.0 and np.isfinite(size):
        # The area sums squared cross products (size**4), which leave float64 from about
        # 1e77 or below 1e-77: say so instead of calling a good mesh degenerate.
        unit_area = float(trimesh.Trimesh(offsets / size, faces, process=False).area)
        if np.isfinite(unit_area) and unit_area > 0.0:
            raise ShapeLoadError(
                f"{source}: the mesh's size ({size:.3g}) is too extreme for its surface area "
                f"to be computed in float64 (area {area:g}); rescale its coordinates to "
                "within about 1e-70 to 1e70."
            )
    raise ShapeLoadError(f"{source}: the mesh is degenerate (total surface area {area:g}).")


def _validate_points(array: np.ndarray, source: str) -> np.ndarray:
    points = np.asarray(array)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ShapeLoadError(
            f"{source}: expected a point array of shape (P, 3), got shape {points.shape}."
        )
    if not (np.issubdtype(points.dtype, np.floating) or np.issubdtype(points.dtype, np.integer)):
        raise ShapeLoadError(f"{source}: point coordinates have non-numeric dtype {points.dtype}.")
    if len(points) == 0:
        raise ShapeLoadError(f"{source}: the point cloud has zero points.")
    points = points.astype(np.float64)  # always a copy, so callers may modify it freely
    if not np.isfinite(points).all():
        raise ShapeLoadError(f"{source}: the point cloud has NaN or infinite coordinates.")
    if (points == points[:1]).all():
        # Would make the unit-sphere normalization divide by zero. Compared, not np.ptp:
        # max - min overflows (a RuntimeWarning) for coordinates near +-1.7e308.
        raise ShapeLoadError(f"{source}: the point cloud is degenerate (all points coincide).")
    return points


def _describe(exc: BaseException) -> str:
    """One-line, bounded description of a parser exception."""
    message = " ".join(str(exc).split()) or "no details"
    if len(message) > _MAX_REASON_CHARS:
        message = message[: _MAX_REASON_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {message}"
