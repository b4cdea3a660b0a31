from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from pointsink.io import SUPPORTED_EXTENSIONS, ShapeLoadError, as_shape, load_shape

BOX = trimesh.creation.box(extents=(1.0, 2.0, 3.0))


def _off_text(vertices: np.ndarray, faces: np.ndarray, fused_header: bool = False) -> str:
    counts = f"{len(vertices)} {len(faces)} 0"
    header = f"OFF{counts}" if fused_header else f"OFF\n{counts}"
    rows = [" ".join(f"{value:.6f}" for value in vertex) for vertex in vertices]
    rows += [f"3 {a} {b} {c}" for a, b, c in faces]
    return header + "\n" + "\n".join(rows) + "\n"


def _assert_one_sentence_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert str(path) in message
    assert "\n" not in message
    assert message.endswith(".")


def test_supported_extensions_cover_the_contract():
    required = {"off", "obj", "stl", "ply", "glb", "gltf", "3mf", "xyz", "npy", "pts", "txt"}
    assert required <= SUPPORTED_EXTENSIONS
    assert all(ext == ext.lower() and not ext.startswith(".") for ext in SUPPORTED_EXTENSIONS)


def test_reads_modelnet_off_with_header_fused_to_counts(tmp_path):
    path = tmp_path / "fused.off"
    path.write_text(_off_text(BOX.vertices, BOX.faces, fused_header=True))
    assert path.read_text().startswith("OFF8 12 0\n")

    mesh = load_shape(path)

    assert isinstance(mesh, trimesh.Trimesh)
    assert mesh.vertices.shape == (8, 3)
    assert mesh.faces.shape == (12, 3)
    assert mesh.area == pytest.approx(BOX.area)


def test_upper_case_extension_is_accepted(tmp_path):
    path = tmp_path / "CHAIR.OFF"
    path.write_text(_off_text(BOX.vertices, BOX.faces))

    mesh = load_shape(path)

    assert isinstance(mesh, trimesh.Trimesh)
    assert mesh.area == pytest.approx(BOX.area)


def test_scene_with_two_geometries_is_merged_with_transforms(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(extents=(1, 1, 1)), node_name="left")
    scene.add_geometry(
        trimesh.creation.icosphere(subdivisions=1),
        node_name="right",
        transform=trimesh.transformations.translation_matrix([10.0, 0.0, 0.0]),
    )
    path = tmp_path / "two.glb"
    scene.export(path)

    for shape in (load_shape(path), as_shape(scene)):
        assert isinstance(shape, trimesh.Trimesh)
        assert len(shape.faces) == 12 + 80
        # The translation of the second geometry was applied when merging.
        assert shape.bounds[1, 0] == pytest.approx(11.0, abs=1e-6)


def test_point_cloud_ply_becomes_float64_array(tmp_path):
    points = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    path = tmp_path / "cloud.ply"
    trimesh.PointCloud(points).export(path)

    loaded = load_shape(path)

    assert isinstance(loaded, np.ndarray)
    assert loaded.dtype == np.float64
    np.testing.assert_allclose(loaded, points, rtol=1e-6)


def test_text_and_npy_point_clouds(tmp_path):
    points = np.random.default_rng(1).normal(size=(20, 3))
    np.savetxt(tmp_path / "cloud.xyz", points)
    # Comma-separated with extra (normal) columns, a comment and a leading count line.
    rows = [",".join(f"{v:.17g}" for v in [*point, 0.0, 0.0, 1.0]) for point in points]
    (tmp_path / "cloud.pts").write_text("# scan\n20\n" + "\n".join(rows) + "\n")
    np.save(tmp_path / "cloud.npy", points)
    np.save(tmp_path / "normals.npy", np.hstack([points, np.ones_like(points)]))

    for name in ("cloud.xyz", "cloud.pts", "cloud.npy", "normals.npy"):
        loaded = load_shape(tmp_path / name)
        np.testing.assert_allclose(loaded, points, rtol=1e-12, err_msg=name)


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.off", "", "empty"),
        ("truncated.off", "OFF\n8 12 0\n0 0 0\n1 1 1\n", "not a readable"),
        ("notes.off", "this is a shopping list, not a mesh\n", "not a readable"),
        ("notes.obj", "this is a shopping list, not a mesh\n", "no geometry"),
        ("notes.stl", "this is a shopping list, not a mesh\n", "no geometry"),
        ("notes.xyz", "hello world\n", "not a readable"),
        ("garbage.ply", b"\x00\x01\x02 not a ply", "not a readable"),
        ("nan.off", "OFF\n3 1 0\n0 0 0\nnan 1 0\n0 1 0\n3 0 1 2\n", "NaN"),
        ("flat.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n", "degenerate"),
        ("nofaces.off", "OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n", "no faces"),
        ("bad_index.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "not a readable"),
        ("zero.off", "OFF\n0 0 0\n", "empty"),
        ("inf.xyz", "0 0 0\n1 inf 0\n", "NaN or infinite"),
        ("same.xyz", "1 2 3\n1 2 3\n", "all points coincide"),
        ("shape.unknown", "OFF\n", "unsupported file extension"),
    ],
)
def test_bad_files_raise_one_sentence_naming_the_path(tmp_path, name, content, reason):
    path = _write(tmp_path / name, content)

    with pytest.raises(ShapeLoadError, match=reason) as error:
        load_shape(path)

    _assert_one_sentence_naming(error, path)


def test_missing_file_and_bad_npy(tmp_path):
    with pytest.raises(ShapeLoadError, match="no such file") as error:
        load_shape(tmp_path / "missing.off")
    _assert_one_sentence_naming(error, tmp_path / "missing.off")

    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    with pytest.raises(ShapeLoadError, match="zero points"):
        load_shape(tmp_path / "empty.npy")
    np.save(tmp_path / "flat.npy", np.zeros((5, 2)))
    with pytest.raises(ShapeLoadError, match=r"shape \(P, 3\)"):
        load_shape(tmp_path / "flat.npy")


def test_as_shape_accepts_in_memory_objects():
    points = np.random.default_rng(2).normal(size=(10, 3)).astype(np.float32)

    for obj in (points, torch.from_numpy(points), trimesh.PointCloud(points)):
        shape = as_shape(obj)
        assert isinstance(shape, np.ndarray)
        assert shape.dtype == np.float64
        np.testing.assert_allclose(shape, points, rtol=1e-6)
    assert as_shape(BOX) is BOX


def test_as_shape_rejects_invalid_objects():
    with pytest.raises(ShapeLoadError, match="not a mesh or point cloud"):
        as_shape([[0.0, 0.0, 0.0]])
    with pytest.raises(ShapeLoadError, match=r"shape \(P, 3\)"):
        as_shape(np.zeros((3, 10)))
    with pytest.raises(ShapeLoadError, match="NaN"):
        as_shape(torch.tensor([[0.0, 0.0, float("nan")], [1.0, 0.0, 0.0]]))
    with pytest.raises(ShapeLoadError, match="no geometry"):
        as_shape(trimesh.Scene())
    broken = trimesh.Trimesh(BOX.vertices.copy(), BOX.faces, process=False)
    broken.vertices[0, 0] = np.inf
    with pytest.raises(ShapeLoadError, match="NaN or infinite"):
        as_shape(broken)
