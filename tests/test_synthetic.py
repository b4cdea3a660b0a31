from __future__ import annotations

import json

import numpy as np
import trimesh

from pointsink.io import load_shape
from pointsink.synthetic import SYNTHETIC_CLASSES, generate_synthetic_shapes


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.off"))


def test_writes_at_least_eight_classes_in_modelnet_layout(tmp_path):
    root = generate_synthetic_shapes(tmp_path / "syn", train_per_class=2, test_per_class=1)

    assert len(SYNTHETIC_CLASSES) >= 8
    assert len(set(SYNTHETIC_CLASSES)) == len(SYNTHETIC_CLASSES)
    expected = sorted(
        [f"{name}/train/{name}_{number:04d}.off" for name in SYNTHETIC_CLASSES for number in (1, 2)]
        + [f"{name}/test/{name}_0003.off" for name in SYNTHETIC_CLASSES]
    )
    assert _files(root) == expected
    manifest = json.loads((root / "synthetic.json").read_text())
    assert manifest["train_per_class"] == 2
    assert manifest["classes"] == list(SYNTHETIC_CLASSES)


def test_every_shape_is_a_valid_mesh_with_random_proportions(tmp_path):
    root = generate_synthetic_shapes(tmp_path, train_per_class=2, test_per_class=0)

    for name in SYNTHETIC_CLASSES:
        first, second = (load_shape(root / name / "train" / f"{name}_{i:04d}.off") for i in (1, 2))
        assert isinstance(first, trimesh.Trimesh)
        assert first.area > 0
        # Normalized for scale, two shapes of a class still differ in their proportions.
        first_ratio = np.sort(first.extents) / first.extents.max()
        second_ratio = np.sort(second.extents) / second.extents.max()
        assert not np.allclose(first_ratio, second_ratio, atol=1e-3), name


def test_generation_is_deterministic_from_the_seed(tmp_path):
    first = generate_synthetic_shapes(tmp_path / "a", train_per_class=1, test_per_class=1, seed=3)
    again = generate_synthetic_shapes(tmp_path / "b", train_per_class=1, test_per_class=1, seed=3)
    other = generate_synthetic_shapes(tmp_path / "c", train_per_class=1, test_per_class=1, seed=4)

    for relative in _files(first):
        assert (first / relative).read_bytes() == (again / relative).read_bytes()
        assert (first / relative).read_bytes() != (other / relative).read_bytes()


def test_second_call_with_same_parameters_writes_nothing(tmp_path):
    root = generate_synthetic_shapes(tmp_path, train_per_class=1, test_per_class=1)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.off")}

    generate_synthetic_shapes(tmp_path, train_per_class=1, test_per_class=1)

    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.off")} == mtimes


def test_changed_parameters_regenerate_and_remove_stale_files(tmp_path):
    root = generate_synthetic_shapes(tmp_path, train_per_class=3, test_per_class=1)
    box_before = (root / "box" / "train" / "box_0001.off").read_bytes()

    generate_synthetic_shapes(tmp_path, train_per_class=2, test_per_class=1)

    assert sorted(p.name for p in (root / "box").rglob("*.off")) == [
        "box_0001.off",
        "box_0002.off",
        "box_0003.off",
    ]
    assert (root / "box" / "test" / "box_0003.off").exists()
    assert not (root / "box" / "train" / "box_0003.off").exists()
    # Each shape has its own seed, so the first one did not change.
    assert (root / "box" / "train" / "box_0001.off").read_bytes() == box_before

    generate_synthetic_shapes(tmp_path, train_per_class=2, test_per_class=1, seed=1)
    assert (root / "box" / "train" / "box_0001.off").read_bytes() != box_before
