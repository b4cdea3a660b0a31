from __future__ import annotations

import warnings
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

    # Commas with spaces after them are separators too; integers are numbers.
    (tmp_path / "spaced.txt").write_text(
        "\n".join(", ".join(f"{v:.17g}" for v in point) for point in points) + "\n"
    )
    np.testing.assert_array_equal(
        load_shape(_write(tmp_path / "ints.xyz", "1,2,3\n4,5,6\n-1,0,2\n")),
        [[1, 2, 3], [4, 5, 6], [-1, 0, 2]],
    )
    # Fixed-width columns: "12,456" after "7," is two columns, not a decimal comma.
    np.testing.assert_array_equal(
        load_shape(_write(tmp_path / "fixed.xyz", "  7, 12,456\n-25, 15,2\n  1,  0,  3\n")),
        [[7, 12, 456], [-25, 15, 2], [1, 0, 3]],
    )

    # A leading row of column names, as scanner software exports them.
    (tmp_path / "named.txt").write_text("x y z\n" + "\n".join(rows) + "\n")
    (tmp_path / "cloudcompare.txt").write_text("//X,Y,Z,Nx,Ny,Nz\n" + "\n".join(rows) + "\n")

    # Semicolon-separated, as spreadsheets export them, with a header row.
    (tmp_path / "semicolons.txt").write_text(
        "x;y;z\n" + "\n".join(";".join(f"{v:.17g}" for v in point) for point in points) + "\n"
    )

    names = (
        "cloud.xyz",
        "cloud.pts",
        "spaced.txt",
        "named.txt",
        "cloudcompare.txt",
        "semicolons.txt",
    )
    for name in (*names, "cloud.npy", "normals.npy"):
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
        ("cut.off", "OFF\n8 12 0\n0 0 0\n1 1 1\n", "declares 8 vertices and 12 faces"),
        ("notes.off", "this is a shopping list, not a mesh\n", "not a readable"),
        ("notes.obj", "this is a shopping list, not a mesh\n", "no geometry"),
        ("notes.stl", "this is a shopping list, not a mesh\n", "no geometry"),
        ("notes.xyz", "hello world\n", "not a readable"),
        ("garbage.ply", b"\x00\x01\x02 not a ply", "not a readable"),
        ("nan.off", "OFF\n3 1 0\n0 0 0\nnan 1 0\n0 1 0\n3 0 1 2\n", "NaN"),
        ("flat.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n", "degenerate"),
        ("nofaces.off", "OFF\n3 0 0\n0 0 0\n0 0 0\n0 0 0\n", "all points coincide"),
        ("bad_index.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "not a readable"),
        ("zero.off", "OFF\n0 0 0\n", "empty"),
        ("inf.xyz", "0 0 0\n1 inf 0\n", "NaN or infinite"),
        ("same.xyz", "1 2 3\n1 2 3\n", "all points coincide"),
        # Read with commas as separators it would be six columns, x y z = 0 126 -0.
        (
            "comma.xyz",
            "0,126 -0,132 0,640\n" + "1,5 2,5 3,5\n" * 7,
            "'0,126' in '0,126 -0,132 0,640' has a decimal comma",
        ),
        ("shape.unknown", "OFF\n", "unsupported file extension"),
        # Errors in text files name the file's line, counting comments and blank lines.
        (
            "typo.xyz",
            "# scan export\n# units: m\n\n0 0 0\n1 0 0\n0 1 0\n0 0 1x\n",
            "line 7: '1x' is not a number",
        ),
        ("ragged.xyz", "0 0 0\n1 0 0 5\n0 1 0\n", "line 2 has 4 columns, line 1 has 3"),
    ],
)
def test_bad_files_raise_one_sentence_naming_the_path(tmp_path, name, content, reason):
    path = _write(tmp_path / name, content)

    with pytest.raises(ShapeLoadError, match=reason) as error:
        load_shape(path)

    _assert_one_sentence_naming(error, path)


SPHERE = trimesh.creation.icosphere(subdivisions=2)  # 162 vertices, 320 faces


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("fused_header", [False, True])
def test_truncated_off_is_rejected_naming_the_counts(tmp_path, fraction, fused_header):
    text = _off_text(SPHERE.vertices, SPHERE.faces, fused_header=fused_header)
    path = _write(tmp_path / "cut.off", text[: int(len(text) * fraction)])

    with pytest.raises(ShapeLoadError, match="truncated") as error:
        load_shape(path)

    _assert_one_sentence_naming(error, path)
    assert "declares 162 vertices and 320 faces" in str(error.value)


def test_off_cut_inside_its_last_line_is_truncated(tmp_path):
    text = _off_text(SPHERE.vertices, SPHERE.faces).rstrip("\n")
    path = _write(tmp_path / "cut.off", text.rsplit(" ", 1)[0] + "\n")  # last index gone

    with pytest.raises(ShapeLoadError, match=r"truncated .* last line .* only 3 of the 4 values"):
        load_shape(path)


def test_off_without_faces_cut_inside_its_last_vertex_is_truncated(tmp_path):
    path = _write(tmp_path / "cut.off", "OFF\n3 0 0\n0 0 0\n1 0 0\n0 1\n")

    with pytest.raises(ShapeLoadError, match=r"truncated .* last line '0 1' .* only 2 of the 3"):
        load_shape(path)


def test_off_header_claiming_more_faces_than_it_holds_is_rejected(tmp_path):
    text = _off_text(BOX.vertices, BOX.faces).replace("8 12 0", "8 13 0", 1)
    path = _write(tmp_path / "more.off", text)

    with pytest.raises(ShapeLoadError, match="truncated or its header is wrong") as error:
        load_shape(path)

    assert "13 faces" in str(error.value)
    assert "8 vertex lines and 12 face lines" in str(error.value)


@pytest.mark.parametrize("keyword", ["COFF", "NOFF"])
def test_off_variants_with_extra_vertex_columns_are_checked_too(tmp_path, keyword):
    extra = " 0.5 0.5 0.5" if keyword == "NOFF" else " 255 0 0 255"
    rows = [" ".join(f"{v:.6f}" for v in vertex) + extra for vertex in BOX.vertices]
    faces = [f"3 {a} {b} {c}" for a, b, c in BOX.faces]
    complete = f"{keyword}\n# comment\n8 12 0\n" + "\n".join(rows + faces) + "\n"

    mesh = load_shape(_write(tmp_path / "full.off", complete))
    assert isinstance(mesh, trimesh.Trimesh)
    assert mesh.faces.shape == (12, 3)
    with pytest.raises(ShapeLoadError, match="11 face lines"):
        load_shape(_write(tmp_path / "cut.off", complete.rsplit("3 ", 1)[0]))


def test_faceless_meshes_are_point_clouds_in_every_format(tmp_path):
    points = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rows = "\n".join(" ".join(f"{v:g}" for v in point) for point in points)
    _write(tmp_path / "cloud.off", f"OFF\n4 0 0\n{rows}\n")
    _write(tmp_path / "cloud.obj", "".join(f"v {row}\n" for row in rows.splitlines()))
    trimesh.PointCloud(points).export(tmp_path / "cloud.ply")
    faceless = trimesh.Trimesh(points, np.zeros((0, 3), dtype=np.int64), process=False)
    scene = trimesh.Scene()
    scene.add_geometry(faceless)

    shapes = [load_shape(tmp_path / f"cloud.{ext}") for ext in ("off", "obj", "ply")]
    for shape in [*shapes, as_shape(faceless), as_shape(scene)]:
        assert isinstance(shape, np.ndarray)
        assert shape.dtype == np.float64
        np.testing.assert_array_equal(shape, points)


def test_text_points_with_utf8_byte_order_mark(tmp_path):
    points = np.random.default_rng(3).normal(size=(5, 3))
    rows = "\n".join(" ".join(f"{v:.17g}" for v in point) for point in points)
    path = tmp_path / "bom.xyz"
    path.write_text("\ufeff" + rows + "\n", encoding="utf-8")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")

    np.testing.assert_array_equal(load_shape(path), points)


def test_text_points_with_a_latin1_comment(tmp_path):
    points = np.random.default_rng(4).normal(size=(5, 3))
    rows = "\n".join(" ".join(f"{v:.17g}" for v in point) for point in points)
    path = tmp_path / "latin1.xyz"
    path.write_bytes("# température relevée\n".encode("latin-1") + rows.encode() + b"\n")
    np.testing.assert_array_equal(load_shape(path), points)
    # Such a byte inside a row is still an error, not a silently dropped column.
    path.write_bytes(rows.encode() + "\n1 2 3\xe9\n".encode("latin-1"))
    with pytest.raises(ShapeLoadError):
        load_shape(path)


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


@pytest.mark.parametrize("scale", [1e-100, 1e100, 1e300])
def test_mesh_too_extreme_for_its_area_is_not_called_degenerate(scale):
    # Its area under- or overflows float64, but the mesh itself is a good box: the error
    # must say what to do, not that the mesh is degenerate.
    mesh = trimesh.Trimesh(BOX.vertices * scale, BOX.faces, process=False)
    with np.errstate(all="ignore"), pytest.raises(ShapeLoadError, match="too extreme") as error:
        as_shape(mesh)
    assert "degenerate" not in str(error.value)


@pytest.mark.parametrize("scale", [1e-60, 1e60])
def test_mesh_at_large_but_computable_scales_loads(scale):
    mesh = trimesh.Trimesh(BOX.vertices * scale, BOX.faces, process=False)
    assert as_shape(mesh) is mesh


def test_flat_mesh_is_still_degenerate_at_extreme_scales():
    flat = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    for scale in (1.0, 1e100):
        mesh = trimesh.Trimesh(flat * scale, [[0, 1, 2]], process=False)
        with np.errstate(all="ignore"), pytest.raises(ShapeLoadError, match="degenerate"):
            as_shape(mesh)


def test_point_cloud_spanning_the_float64_range_loads_without_overflow_warnings():
    # max - min of these coordinates overflows; the loader's coincidence check must not.
    points = np.array([[-1.7e308, 0.0, 0.0], [1.7e308, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(as_shape(points), points)
    with pytest.raises(ShapeLoadError, match="all points coincide"):
        as_shape(np.full((3, 3), -1.7e308))
    # Points that differ in one coordinate only do not coincide.
    for axis in range(3):
        line = np.zeros((3, 3))
        line[:, axis] = [0.0, 1.0, 2.0]
        np.testing.assert_array_equal(as_shape(line), line)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tensors_of_any_float_dtype_are_point_clouds(dtype: torch.dtype) -> None:
    points = torch.randn(50, 3).to(dtype)
    shape = as_shape(points)
    assert shape.dtype == np.float64
    np.testing.assert_array_equal(shape, points.double().numpy())


@pytest.mark.parametrize("name", ["cloud.npy", "cloud.xyz"])
def test_channels_first_point_files_are_refused(tmp_path, name):
    # (3, P) would otherwise read as 3 points with P - 3 ignored columns, and be classified.
    points = np.random.default_rng(0).normal(size=(3, 50))
    for shape in [(3, 4), (4, 5)]:  # one point fewer than columns is already refused
        np.save(tmp_path / "small.npy", np.zeros(shape))
        with pytest.raises(ShapeLoadError, match="looks channels-first"):
            load_shape(tmp_path / "small.npy")
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, points)
    else:
        np.savetxt(path, points)
    with pytest.raises(ShapeLoadError, match=r"looks channels-first \(transpose it\)") as error:
        load_shape(path)
    assert str(path) in str(error.value)
    # A few points with many extra columns look the same; the message says how to pass them.
    # The whole explanation, not cut short like a parser's message.
    assert str(error.value).endswith(
        "If it is 3 points with 47 extra columns, pass only their x y z columns: fewer points "
        "than columns cannot be told from channels-first)."
    )
    np.save(tmp_path / "rows.npy", points.T)  # the same points as rows load
    assert load_shape(tmp_path / "rows.npy").shape == (50, 3)
