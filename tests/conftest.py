"""Shared fixtures: tiny on-disk shape folders in ModelNet layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import trimesh


def _class_mesh(class_index: int, rng: np.random.Generator) -> trimesh.Trimesh:
    """A small, cheap mesh whose kind depends on the class (box, sphere, cone, ...)."""
    kind = class_index % 3
    if kind == 0:
        return trimesh.creation.box(extents=rng.uniform(0.5, 1.5, size=3))
    if kind == 1:
        return trimesh.creation.icosphere(subdivisions=1, radius=rng.uniform(0.5, 1.5))
    return trimesh.creation.cone(radius=rng.uniform(0.3, 1.0), height=1.0, sections=8)


@pytest.fixture
def make_shape_folder() -> Callable[..., Path]:
    """Factory writing ``root/<class>/{train,test}/<class>_NNNN.off`` meshes.

    Call as ``make_shape_folder(root, class_names=("a", "b"), train_per_class=4,
    test_per_class=2, seed=0)``; returns ``root``. Train files are numbered from 1, test
    files continue after them, as in ModelNet.
    """

    def make(
        root: Path,
        class_names: tuple[str, ...] = ("alpha", "beta", "gamma"),
        train_per_class: int = 4,
        test_per_class: int = 2,
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        for class_index, class_name in enumerate(class_names):
            number = 0
            for split, count in (("train", train_per_class), ("test", test_per_class)):
                folder = root / class_name / split
                folder.mkdir(parents=True, exist_ok=True)
                for _ in range(count):
                    number += 1
                    mesh = _class_mesh(class_index, rng)
                    mesh.export(folder / f"{class_name}_{number:04d}.off")
        return root

    return make


@pytest.fixture(scope="session")
def triton_interpreter() -> None:
    """Skips a test whose kernels run under Triton's interpreter where it cannot run them."""
    from _triton_utils import interpreter_problem

    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)
