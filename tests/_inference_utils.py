"""Helpers shared by test_inference.py and test_predict.py: a tiny checkpoint and shape files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import trimesh
from torch.utils.data import DataLoader

from pointsink.module import SinkformerClassifier

CLASSES = ["box", "cone", "sphere"]
NUM_POINTS = 64


def build_tiny_checkpoint(path: Path) -> Path:
    """Trains a tiny classifier for one short epoch on random points and saves it."""
    torch.manual_seed(0)
    module = SinkformerClassifier(
        class_names=CLASSES,
        num_points=NUM_POINTS,
        channels=16,
        num_heads=2,
        num_inducing_points=4,
        dropout=0.0,
    )
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % len(CLASSES)
    points = torch.randn(12, 16, 3, generator=generator) * (labels + 1).view(-1, 1, 1)
    samples = [{"points": points[i], "label": labels[i], "index": i} for i in range(12)]
    trainer = pl.Trainer(
        max_epochs=1,
        default_root_dir=path.parent,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(samples, batch_size=4)
    trainer.fit(module, loader, loader)
    trainer.save_checkpoint(path)
    return path


def scene_of_two() -> trimesh.Scene:
    """A scene with two separate geometries (a box and a translated sphere)."""
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    sphere.apply_translation([2.0, 0.0, 0.0])
    return trimesh.Scene([trimesh.creation.box(), sphere])


def write_format_files(folder: Path) -> dict[str, Path]:
    """Writes one small shape per supported format; returns ``{format name: path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    mesh = trimesh.creation.cone(radius=0.5, height=1.0, sections=12)
    cloud = trimesh.PointCloud(np.random.default_rng(0).normal(size=(200, 3)))
    files: dict[str, tuple[str, bytes | str]] = {
        "off": ("cone.off", mesh.export(file_type="off")),
        "obj": ("cone.obj", mesh.export(file_type="obj")),
        "stl_binary": ("cone_binary.stl", mesh.export(file_type="stl")),
        "stl_ascii": ("cone_ascii.stl", mesh.export(file_type="stl_ascii")),
        "ply_ascii": ("cone_ascii.ply", mesh.export(file_type="ply", encoding="ascii")),
        "ply_binary": ("cone_binary.ply", mesh.export(file_type="ply", encoding="binary")),
        "ply_points": ("cloud.ply", cloud.export(file_type="ply")),
        "glb_scene": ("scene.glb", scene_of_two().export(file_type="glb")),
        "gltf_scene": (
            "scene.gltf",
            trimesh.exchange.gltf.export_gltf(scene_of_two(), embed_buffers=True)["model.gltf"],
        ),
        "3mf_scene": ("scene.3mf", scene_of_two().export(file_type="3mf")),  # needs lxml
        "upper_case": ("UPPER.OFF", mesh.export(file_type="off")),
    }
    paths = {}
    for name, (file_name, data) in files.items():
        path = folder / file_name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        paths[name] = path
    return paths


def write_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Writes unusable inputs; returns ``{case: (path, expected error fragment)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    binary_stl = trimesh.creation.box().export(file_type="stl")
    contents: dict[str, tuple[str, bytes | str | None, str]] = {
        "missing": ("missing.off", None, "no such file"),
        "truncated": ("truncated.stl", binary_stl[: len(binary_stl) // 2], "not a readable"),
        "empty_file": ("empty_file.ply", b"", "the file is empty"),
        "not_a_mesh": ("notes.obj", "these are my notes, not a mesh\n", "not a readable"),
        "garbage_off": ("garbage.off", "hello world\n", "not a readable"),
        "empty_mesh": ("empty_mesh.off", "OFF\n0 0 0\n", "empty"),
        "nan": ("nan.off", "OFF\n3 1 0\n0 0 0\nnan 1 0\n0 0 1\n3 0 1 2\n", "NaN or infinite"),
        "inf": ("inf.off", "OFF\n3 1 0\n0 0 0\ninf 1 0\n0 0 1\n3 0 1 2\n", "NaN or infinite"),
        "degenerate": ("flat.off", "OFF\n3 1 0\n0 0 0\n1 1 1\n2 2 2\n3 0 1 2\n", "degenerate"),
    }
    cases = {}
    for name, (file_name, data, expected) in contents.items():
        path = folder / file_name
        if isinstance(data, str):
            path.write_text(data)
        elif isinstance(data, bytes):
            path.write_bytes(data)
        cases[name] = (path, expected)
    empty_folder = folder / "no_shapes_here"
    (empty_folder / "sub").mkdir(parents=True, exist_ok=True)
    (empty_folder / "sub" / "README.md").write_text("no meshes\n")
    cases["empty_folder"] = (empty_folder, "contains no shape files")
    cases["no_match"] = (folder / "*.nothing", "matches no shape files")
    return cases
