"""A small procedurally generated shape dataset in ModelNet's folder layout.

It lets the whole pipeline (loading, caching, training, evaluation) run in seconds without
downloading anything. Classes deliberately overlap in their proportions (short cylinders,
capsules and squashed spheres; cones and pyramids; chairs with low backrests and tables)
so that the task is not trivially separable, while a point-set model still gets far above
chance. The z axis is up (``up_axis=2`` in the augmentation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import trimesh
from trimesh import creation
from trimesh.transformations import rotation_matrix

from pointsink.io import exclusive_lock

__all__ = ["GENERATOR_VERSION", "SYNTHETIC_CLASSES", "generate_synthetic_shapes"]

#: Bump when the generated shapes change, so existing folders get regenerated.
GENERATOR_VERSION = 1

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "box",
    "capsule",
    "chair",
    "cone",
    "cylinder",
    "pyramid",
    "sphere",
    "table",
    "torus",
)

_MANIFEST_NAME = "synthetic.json"
_SPLITS = ("train", "test")
_MAX_TILT_DEGREES = 8.0
_VERTEX_NOISE = 0.01  # relative to the shape's size (before the random global scale)


def generate_synthetic_shapes(
    root: str | os.PathLike[str],
    train_per_class: int = 60,
    test_per_class: int = 20,
    seed: int = 0,
) -> Path:
    """Writes the synthetic dataset as OFF meshes in ModelNet layout, unless already there.

    Files are ``root/<class>/{train,test}/<class>_NNNN.off``, numbered from 1 with test
    files continuing after the train files (as in ModelNet). Every shape is drawn from its
    own seed ``(seed, class, split, item)``, so the output is deterministic and a shape does
    not change when the number of shapes per class changes. ``root/synthetic.json`` records
    the parameters; when it matches, nothing is written. Otherwise the old ``.off`` files of
    the synthetic classes are removed and everything is regenerated.

    Args:
        root: Output folder (created if missing).
        train_per_class: Number of training shapes per class (>= 1).
        test_per_class: Number of test shapes per class (>= 0).
        seed: Generation seed (>= 0).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    if train_per_class < 1 or test_per_class < 0 or seed < 0:
        raise ValueError(
            "Need train_per_class >= 1, test_per_class >= 0 and seed >= 0; got "
            f"{train_per_class}, {test_per_class} and {seed}."
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "classes": list(SYNTHETIC_CLASSES),
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
    }
    manifest_path = root / _MANIFEST_NAME
    # The lock keeps two processes (e.g. two runs started together) from interleaving.
    with exclusive_lock(root / ".synthetic.lock"):
        if _read_manifest(manifest_path) == manifest:
            return root
        # Remove the manifest first: if generation is interrupted, the next call redoes it.
        manifest_path.unlink(missing_ok=True)
        for class_index, class_name in enumerate(SYNTHETIC_CLASSES):
            counts = {"train": train_per_class, "test": test_per_class}
            number = 0
            for split_index, split in enumerate(_SPLITS):
                folder = root / class_name / split
                if folder.exists():
                    for stale in folder.glob(f"{class_name}_*.off"):
                        stale.unlink()
                folder.mkdir(parents=True, exist_ok=True)
                for item in range(counts[split]):
                    number += 1
                    rng = np.random.default_rng((seed, class_index, split_index, item))
                    mesh = _random_shape(class_name, rng)
                    path = folder / f"{class_name}_{number:04d}.off"
                    path.write_text(trimesh.exchange.off.export_off(mesh, digits=6))
        tmp_path = manifest_path.with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp_path, manifest_path)
    return root


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _random_shape(class_name: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """Builds one random shape of a class: proportions, pose and vertex noise."""
    mesh = _BUILDERS[class_name](rng)
    size = float(np.linalg.norm(mesh.extents))
    vertices = mesh.vertices + rng.normal(0.0, _VERTEX_NOISE * size, mesh.vertices.shape)
    mesh = trimesh.Trimesh(vertices, mesh.faces, process=False)
    # Any heading about the up axis, a small tilt, then an irrelevant scale and offset
    # (the preprocessing normalizes them away; they exercise that it does).
    pose = rotation_matrix(rng.uniform(0.0, 2.0 * np.pi), [0.0, 0.0, 1.0])
    for axis in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]):
        tilt = np.radians(rng.uniform(-_MAX_TILT_DEGREES, _MAX_TILT_DEGREES))
        pose = rotation_matrix(tilt, axis) @ pose
    mesh.apply_transform(pose)
    mesh.apply_scale(rng.uniform(0.5, 2.0))
    mesh.apply_translation(rng.uniform(-1.0, 1.0, size=3))
    return mesh


def _box(rng: np.random.Generator) -> trimesh.Trimesh:
    return creation.box(extents=rng.uniform(0.3, 1.0, size=3))


def _cylinder(rng: np.random.Generator) -> trimesh.Trimesh:
    # Short ones (height < diameter) look like the squashed spheres and short capsules.
    return creation.cylinder(
        radius=rng.uniform(0.3, 0.6), height=rng.uniform(0.3, 1.5), sections=24
    )


def _capsule(rng: np.random.Generator) -> trimesh.Trimesh:
    # A nearly zero cylinder part makes an almost perfect sphere.
    return creation.capsule(
        height=rng.uniform(0.05, 1.0), radius=rng.uniform(0.3, 0.6), count=[16, 16]
    )


def _sphere(rng: np.random.Generator) -> trimesh.Trimesh:
    # An ellipsoid with moderately unequal axes overlaps with capsules and cylinders.
    sphere = creation.icosphere(subdivisions=2, radius=0.5)
    sphere.apply_scale(rng.uniform(0.75, 1.3, size=3))
    return sphere


def _cone(rng: np.random.Generator) -> trimesh.Trimesh:
    return creation.cone(radius=rng.uniform(0.3, 0.7), height=rng.uniform(0.4, 1.4), sections=24)


def _pyramid(rng: np.random.Generator) -> trimesh.Trimesh:
    # Same proportions as the cones, but with a square (4-sided) base.
    return creation.cone(radius=rng.uniform(0.3, 0.7), height=rng.uniform(0.4, 1.4), sections=4)


def _torus(rng: np.random.Generator) -> trimesh.Trimesh:
    major = rng.uniform(0.4, 0.7)
    return creation.torus(
        major_radius=major,
        minor_radius=major * rng.uniform(0.15, 0.6),
        major_sections=24,
        minor_sections=12,
    )


def _legs(
    rng: np.random.Generator, width: float, depth: float, height: float, thickness: float
) -> list[trimesh.Trimesh]:
    """Four vertical legs of a ``width`` x ``depth`` furniture piece, from z=0 to ``height``."""
    inset = rng.uniform(0.0, 0.1) * min(width, depth)
    legs = []
    for sign_x in (-1.0, 1.0):
        for sign_y in (-1.0, 1.0):
            centre = [
                sign_x * (width / 2 - inset - thickness / 2),
                sign_y * (depth / 2 - inset - thickness / 2),
                height / 2,
            ]
            legs.append(
                creation.box(
                    extents=[thickness, thickness, height],
                    transform=trimesh.transformations.translation_matrix(centre),
                )
            )
    return legs


def _furniture(
    width: float,
    depth: float,
    leg_height: float,
    top_thickness: float,
    leg_thickness: float,
    rng: np.random.Generator,
) -> list[trimesh.Trimesh]:
    """A flat top on four legs, shared by tables and chairs."""
    top = creation.box(
        extents=[width, depth, top_thickness],
        transform=trimesh.transformations.translation_matrix(
            [0.0, 0.0, leg_height + top_thickness / 2]
        ),
    )
    return [top, *_legs(rng, width, depth, leg_height, leg_thickness)]


def _table(rng: np.random.Generator) -> trimesh.Trimesh:
    width = rng.uniform(0.5, 1.4)
    depth = rng.uniform(0.45, 1.0)
    parts = _furniture(
        width=width,
        depth=depth,
        leg_height=rng.uniform(0.35, 0.8),
        top_thickness=rng.uniform(0.03, 0.08),
        leg_thickness=rng.uniform(0.04, 0.1),
        rng=rng,
    )
    return trimesh.util.concatenate(parts)


def _chair(rng: np.random.Generator) -> trimesh.Trimesh:
    width = rng.uniform(0.4, 0.7)
    depth = rng.uniform(0.4, 0.7)
    leg_height = rng.uniform(0.3, 0.55)
    seat_thickness = rng.uniform(0.03, 0.08)
    parts = _furniture(
        width=width,
        depth=depth,
        leg_height=leg_height,
        top_thickness=seat_thickness,
        leg_thickness=rng.uniform(0.03, 0.08),
        rng=rng,
    )
    # A low backrest (from 0.1) makes some chairs look much like small tables.
    back_height = rng.uniform(0.1, 0.7)
    back_thickness = rng.uniform(0.03, 0.08)
    seat_top = leg_height + seat_thickness
    back = creation.box(
        extents=[width, back_thickness, back_height],
        transform=trimesh.transformations.translation_matrix(
            [0.0, -depth / 2 + back_thickness / 2, seat_top + back_height / 2]
        ),
    )
    return trimesh.util.concatenate([*parts, back])


_BUILDERS: dict[str, Callable[[np.random.Generator], trimesh.Trimesh]] = {
    "box": _box,
    "capsule": _capsule,
    "chair": _chair,
    "cone": _cone,
    "cylinder": _cylinder,
    "pyramid": _pyramid,
    "sphere": _sphere,
    "table": _table,
    "torus": _torus,
}
