from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import trimesh

from pointsink.io import ShapeLoadError
from pointsink.transforms import (
    PointCloudAugmentation,
    file_sample_seed,
    load_for_sampling,
    mix_point_regions,
    normalize_points,
    preprocess_set,
    preprocess_shape,
    principal_spreads,
    sample_points,
    turn_about_vertical,
    turn_by,
    up_axis_rotation,
    yaw_rotations,
)

EXTENTS = np.array([1.0, 1.0, 10.0])
BOX = trimesh.creation.box(extents=EXTENTS)


def test_mesh_samples_lie_on_the_surface_and_are_area_weighted():
    points = sample_points(BOX, 4000, seed=0)

    assert points.shape == (4000, 3)
    assert points.dtype == np.float32
    # On the surface of an axis-aligned box: inside it, and on a face in at least one axis.
    relative = np.abs(points) / (EXTENTS / 2)
    assert relative.max() <= 1 + 1e-5
    np.testing.assert_allclose(relative.max(axis=1), 1.0, atol=1e-5)
    # The two 1x1 end caps hold 2 / 42 of the area; picking faces uniformly would give 1/3.
    on_caps = np.mean(relative[:, 2] > 1 - 1e-5)
    assert on_caps == pytest.approx(2 / 42, abs=0.015)


def test_mesh_sampling_is_seeded():
    first = sample_points(BOX, 256, seed=3)

    np.testing.assert_array_equal(first, sample_points(BOX, 256, seed=3))
    assert not np.allclose(first, sample_points(BOX, 256, seed=4))


def test_point_cloud_subset_without_replacement_is_seeded():
    cloud = np.random.default_rng(0).normal(size=(500, 3))

    subset = sample_points(cloud, 100, seed=1)

    assert subset.shape == (100, 3)
    assert len(np.unique(subset, axis=0)) == 100
    source_rows = {tuple(row) for row in cloud.astype(np.float32)}
    assert all(tuple(row) in source_rows for row in subset)
    np.testing.assert_array_equal(subset, sample_points(cloud, 100, seed=1))
    assert not np.array_equal(subset, sample_points(cloud, 100, seed=2))


@pytest.mark.parametrize("seed", range(8))
def test_small_point_cloud_is_filled_with_replacement_and_warns(seed):
    cloud = np.random.default_rng(seed).normal(size=(10, 3))

    with pytest.warns(UserWarning, match="only 10 points but 25 were requested"):
        points = sample_points(cloud, 25, seed=seed)

    assert points.shape == (25, 3)
    # Every original point is kept (25 draws with replacement miss one in most seeds); the
    # rest are repeats.
    np.testing.assert_array_equal(np.unique(points, axis=0), np.unique(cloud.astype("f4"), axis=0))


def test_enough_points_do_not_warn():
    cloud = np.random.default_rng(0).normal(size=(10, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_points(cloud, 10, seed=0)


def test_normalize_points_centres_and_scales_to_unit_sphere():
    points = np.random.default_rng(0).normal(loc=5.0, scale=3.0, size=(300, 3))

    normalized = normalize_points(points)

    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized.mean(axis=0), 0.0, atol=1e-6)
    assert np.linalg.norm(normalized, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    # Only a translation and one uniform scale: shape is preserved.
    expected = (points - points.mean(0)) / np.linalg.norm(points - points.mean(0), axis=1).max()
    np.testing.assert_allclose(normalized, expected, atol=1e-6)


def test_normalize_points_rejects_coincident_points():
    with pytest.raises(ValueError, match="coincide"):
        normalize_points(np.ones((5, 3)))


@pytest.mark.parametrize("magnitude", [1e-320, 1e-165, 1e160, 1e300, 1e306])
def test_normalize_points_scales_coordinates_whose_squares_leave_float64(magnitude):
    # The squares in the radius under- or overflow; the points are still representable.
    points = np.random.default_rng(0).normal(size=(50, 3)) * magnitude
    expected = normalize_points(points / magnitude)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow or underflow warnings either
        normalized = normalize_points(points)
    np.testing.assert_allclose(
        normalized, expected, rtol=0, atol=1e-6 if magnitude > 1e-300 else 1e-2
    )
    assert np.linalg.norm(normalized, axis=1).max() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("preprocess", [preprocess_set, preprocess_shape])
def test_sampled_points_without_a_scale_are_a_shape_error(preprocess) -> None:
    # One point has no scale to normalize: refused up front, not per file.
    with pytest.raises(ValueError, match="num_points must be at least 2; got 1"):
        preprocess(BOX, 1, 0)
    # A cloud with one point apart from 99 copies of another: the 8 sampled points
    # coincide for these seeds, which is the shape's problem (skipped as a bad file).
    cloud = np.zeros((100, 3))
    cloud[-1] = [1.0, 0.0, 0.0]
    with pytest.raises(ShapeLoadError, match="8 points sampled from this shape all coincide"):
        preprocess(cloud, 8, 1)


def test_normalize_points_rejects_coordinates_whose_mean_overflows():
    points = np.full((4, 3), 1.7e308)
    points[0] = -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one clear error, not numpy overflow warnings
        with pytest.raises(ValueError, match="too large for float64"):
            normalize_points(points)


def test_normalize_points_still_scales_large_but_representable_coordinates():
    points = np.random.default_rng(0).normal(size=(50, 3)) * 1e150

    normalized = normalize_points(points)

    centred = points - points.mean(axis=0)
    expected = (centred / np.linalg.norm(centred, axis=1).max()).astype(np.float32)
    np.testing.assert_array_equal(normalized, expected)


def test_preprocessing_is_exact_far_from_the_origin():
    # A unit box at 1e6: float32 has a resolution of 0.06 there, so sampling or centring
    # in float32 would visibly distort the result.
    far_box = BOX.copy()
    far_box.apply_translation([1e6, -2e6, 3e6])

    near = preprocess_shape(BOX, 512, seed=5)
    far = preprocess_shape(far_box, 512, seed=5)

    np.testing.assert_allclose(far, near, atol=1e-5)
    assert np.linalg.norm(far, axis=1).max() == pytest.approx(1.0, abs=1e-6)


def test_preprocess_shape_path_and_object_agree(tmp_path):
    path = tmp_path / "box.off"
    BOX.export(path)

    from_path = preprocess_shape(path, 128, seed=1)
    from_str = preprocess_shape(str(path), 128, seed=1)
    from_object = preprocess_shape(BOX, 128, seed=1)

    assert from_path.shape == (128, 3)
    assert from_path.dtype == np.float32
    np.testing.assert_allclose(from_path, from_object, atol=1e-6)
    np.testing.assert_array_equal(from_path, from_str)


def test_load_for_sampling_seeds_a_file_by_its_contents(tmp_path):
    path = tmp_path / "box.off"
    BOX.export(path)
    copy = tmp_path / "renamed.off"
    copy.write_bytes(path.read_bytes())

    shape, seed = load_for_sampling(path, 2)
    assert isinstance(shape, trimesh.Trimesh) and len(shape.faces) == len(BOX.faces)
    # A file's own seed, the same under another name; another base seed gives another.
    assert seed == file_sample_seed(path, 2) == load_for_sampling(copy, 2)[1]
    assert seed != load_for_sampling(path, 3)[1]
    # An in-memory shape has no contents to hash: the base seed is its seed.
    assert load_for_sampling(BOX, 2) == (BOX, 2)
    with pytest.raises(ValueError, match="seed"):
        load_for_sampling(BOX, -1)


def test_principal_spreads_are_the_rms_spreads_along_the_principal_axes():
    cloud = np.random.default_rng(0).normal(size=(20000, 3)) * [3.0, 1.0, 2.0]
    np.testing.assert_allclose(principal_spreads(cloud), [3.0, 2.0, 1.0], rtol=0.03)
    # A mesh's spreads are its surface's (what sampling draws from), exact and turned with
    # it: a large surface sample agrees.
    turned = BOX.copy().apply_transform(trimesh.transformations.rotation_matrix(0.7, [1, 2, 3]))
    surface = sample_points(turned, 400_000, seed=0).astype(np.float64)
    np.testing.assert_allclose(principal_spreads(turned), principal_spreads(surface), rtol=3e-3)
    # Finely tessellating one end cap and adding an unreferenced vertex change nothing.
    vertices, faces = BOX.vertices, BOX.faces
    for _ in range(5):
        centres = vertices[faces].mean(axis=1)
        cap = np.flatnonzero(centres[:, 2] > EXTENTS[2] / 2 - 1e-9)
        vertices, faces = trimesh.remesh.subdivide(vertices, faces, face_index=cap)
    assert len(vertices) > 500
    fine = trimesh.Trimesh(np.vstack([vertices, [[50.0, 0.0, 0.0]]]), faces, process=False)
    np.testing.assert_allclose(principal_spreads(fine), principal_spreads(BOX), rtol=1e-9)


@pytest.mark.parametrize("offset", [1e6, 6.4e6])
@pytest.mark.parametrize("kind", ["mesh", "cloud"])
def test_principal_spreads_do_not_depend_on_where_the_shape_stands(offset, kind):
    # Geographic coordinates: a 1 x 1 x 0.05 slab some 6,400 km from the origin is no sheet.
    slab = trimesh.creation.box(extents=[1.0, 1.0, 0.05])
    shift = np.array([offset, 0.3 * offset, 0.5 * offset])
    if kind == "mesh":
        moved = slab.copy().apply_translation(shift)
    else:
        slab = slab.sample(2000, seed=0)
        moved = slab + shift
    np.testing.assert_allclose(principal_spreads(moved), principal_spreads(slab), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_for_sampling(moved, 0)


def test_principal_spreads_of_clouds_at_extreme_scales():
    # The squares of 1e160 overflow and those of 1e-200 underflow: spreads, not an error.
    cloud = np.random.default_rng(0).normal(size=(500, 3)) * [3.0, 1.0, 2.0]
    for scale in (1e160, 1e-200):
        spreads = principal_spreads(cloud * scale)
        np.testing.assert_allclose(spreads / scale, principal_spreads(cloud), rtol=1e-9)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (trimesh.creation.box(extents=[1.0, 0.8, 0.001]), "The shape is flat: .* 0.2 %"),
        # A ribbon: thin against its width (0.8 %), though not against its middle (8 %).
        (trimesh.creation.box(extents=[1.0, 0.1, 0.005]), "The shape is flat: .* 0.8 %"),
        (np.c_[np.random.default_rng(0).random((500, 2)), np.zeros(500)], "is flat: .* 0.0 %"),
        (np.outer(np.linspace(0.0, 1.0, 300), [1.0, 2.0, 3.0]), "is a line: .*second-widest"),
    ],
)
def test_sheets_and_lines_warn_once_when_loaded(tmp_path, shape, message):
    with pytest.warns(UserWarning, match=message) as caught:
        loaded, seed = load_for_sampling(shape, 0)
    assert len(caught) == 1
    # Files warn too, and sampling and normalizing them still works.
    path = tmp_path / "shape.ply"
    (trimesh.PointCloud(shape) if isinstance(shape, np.ndarray) else shape).export(path)
    with pytest.warns(UserWarning, match=message):
        loaded, seed = load_for_sampling(path, 0)
    assert preprocess_shape(loaded, 64, seed).shape == (64, 3)


def test_thin_but_solid_shapes_do_not_warn():
    # 3 % thick, like the flattest ModelNet10 shape (a monitor); and a cylinder and a torus.
    shapes = [
        trimesh.creation.box(extents=[1.0, 0.6, 0.04]),
        trimesh.creation.cylinder(radius=0.05, height=1.0),
        trimesh.creation.torus(major_radius=0.5, minor_radius=0.05),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape in shapes:
            load_for_sampling(shape, 0)


def test_sample_points_validates_num_points():
    with pytest.raises(ValueError, match="at least 1"):
        sample_points(BOX, 0, seed=0)


@pytest.mark.parametrize("sample", [sample_points, preprocess_shape, preprocess_set])
@pytest.mark.parametrize(
    ("seed", "message"),
    [
        (-1, "seed must be at least 0; got -1"),
        (2.0, "seed must be an integer; got 2.0"),
        ("3", "seed must be an integer; got '3'"),
        (True, "seed must be an integer; got True"),  # would be seed 1
    ],
)
def test_sampling_seed_is_checked_by_name(sample, seed, message):
    # Also for a cloud smaller than N, whose padding path draws nothing with the seed.
    for shape in (BOX, np.eye(3)):
        with pytest.raises(ValueError, match=re.escape(message)):
            sample(shape, 8, seed)


def _cloud(n: int = 200) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0))


def test_augmentation_refuses_integer_points_by_name():
    # torch's own message names a kernel ("check_uniform_bounds" not implemented for 'Long').
    with pytest.raises(TypeError, match=r"Expected floating-point points; got torch\.int64"):
        PointCloudAugmentation()(torch.zeros(5, 3, dtype=torch.long))


def test_augmentation_changes_points_and_keeps_shape():
    points = _cloud()
    augmented = PointCloudAugmentation()(points, generator=torch.Generator().manual_seed(1))

    assert augmented.shape == points.shape
    assert augmented.dtype == points.dtype
    assert not torch.allclose(augmented, points)
    assert torch.equal(points, _cloud())  # the input is left untouched


def test_rotation_is_about_the_up_axis_only():
    points = _cloud()
    for up_axis in (0, 1, 2):
        rotate_only = PointCloudAugmentation(
            scale_low=1.0,
            scale_high=1.0,
            max_rotation_degrees=90.0,
            up_axis=up_axis,
            jitter_sigma=0.0,
            shuffle=False,
        )
        rotated = rotate_only(points, generator=torch.Generator().manual_seed(up_axis))
        horizontal = [axis for axis in range(3) if axis != up_axis]

        torch.testing.assert_close(rotated[:, up_axis], points[:, up_axis])
        torch.testing.assert_close(
            rotated[:, horizontal].norm(dim=1), points[:, horizontal].norm(dim=1)
        )
        assert not torch.allclose(rotated[:, horizontal], points[:, horizontal])


def test_scaling_stays_in_range_and_is_per_axis():
    points = _cloud()
    scale_only = PointCloudAugmentation(
        scale_low=0.5, scale_high=2.0, max_rotation_degrees=0.0, jitter_sigma=0.0, shuffle=False
    )
    ratios = scale_only(points, generator=torch.Generator().manual_seed(0)) / points

    per_axis = ratios.mean(dim=0)
    torch.testing.assert_close(ratios, per_axis.expand_as(ratios))
    assert ((per_axis >= 0.5) & (per_axis <= 2.0)).all()
    assert per_axis.unique().numel() == 3  # anisotropic


def test_jitter_is_clipped_and_shuffle_permutes():
    points = _cloud()
    jitter_only = PointCloudAugmentation(
        scale_low=1.0,
        scale_high=1.0,
        max_rotation_degrees=0.0,
        jitter_sigma=1.0,
        jitter_clip=0.05,
        shuffle=False,
    )
    offsets = jitter_only(points, generator=torch.Generator().manual_seed(0)) - points
    assert offsets.abs().max() <= 0.05 + 1e-6
    assert offsets.abs().max() > 0.04

    shuffle_only = PointCloudAugmentation(
        scale_low=1.0, scale_high=1.0, max_rotation_degrees=0.0, jitter_sigma=0.0
    )
    shuffled = shuffle_only(points, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, points)
    assert torch.equal(shuffled.sort(dim=0).values, points.sort(dim=0).values)


def _with_and_without(
    option: str, value: float, seeds: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(plain, with option)`` augmentations of one cloud, same generator seed in each pair.

    Scale and rotation draw first, so each pair shares its scaled and rotated points and
    differs only by what ``option`` does on top (no jitter, no shuffling here).
    """
    points = _cloud()
    settings = {"max_rotation_degrees": 15.0, "jitter_sigma": 0.0, "shuffle": False}
    plain = PointCloudAugmentation(**settings)
    varied = PointCloudAugmentation(**settings, **{option: value})
    assert getattr(PointCloudAugmentation(**varied.settings()), option) == value
    return [
        (
            plain(points, generator=torch.Generator().manual_seed(seed)),
            varied(points, generator=torch.Generator().manual_seed(seed)),
        )
        for seed in range(seeds)
    ]


def test_translation_shifts_each_axis_within_range():
    shifts = []
    for plain, moved in _with_and_without("max_translation", 0.2, seeds=20):
        # One shift per axis, the same for every point.
        offset = moved - plain
        torch.testing.assert_close(offset, offset[:1].expand_as(offset))
        shifts.append(offset[0])
    shifts = torch.stack(shifts)
    # Symmetric about 0 and reaching near both ends of [-0.2, 0.2].
    assert shifts.abs().max() <= 0.2 and shifts.max() > 0.1 and shifts.min() < -0.1


def test_point_dropout_copies_the_first_point_over_a_drawn_fraction():
    fractions = []
    for plain, thinned in _with_and_without("max_point_dropout", 0.5, seeds=40):
        # Dropped points become copies of the first; the others stay where they were.
        changed = (thinned != plain).any(dim=-1)
        torch.testing.assert_close(thinned[changed], plain[:1].expand(int(changed.sum()), 3))
        fractions.append(changed.float().mean())
    fractions = torch.stack(fractions)
    # Each set draws its own fraction from [0, 0.5].
    assert fractions.max() <= 0.6 and fractions.max() > 0.3 and fractions.min() < 0.1


def test_generators_and_global_rng_drive_the_randomness():
    points = _cloud()
    augment = PointCloudAugmentation()

    first = augment(points, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(augment(points, generator=torch.Generator().manual_seed(1)), first)
    assert not torch.allclose(augment(points, generator=torch.Generator().manual_seed(2)), first)

    torch.manual_seed(7)
    global_first = augment(points)
    torch.manual_seed(7)
    torch.testing.assert_close(augment(points), global_first)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale_low": 0.0},
        {"scale_low": 2.0, "scale_high": 1.0},
        {"max_rotation_degrees": -1.0},
        {"up_axis": 3},
        {"jitter_sigma": -0.1},
        {"max_translation": -0.1},
        {"max_point_dropout": -0.1},
        {"max_point_dropout": 1.0},
    ],
)
def test_augmentation_rejects_invalid_settings(kwargs):
    # The message names the setting at fault.
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PointCloudAugmentation(**kwargs)


@pytest.mark.parametrize(
    "name",
    [
        "scale_low",
        "scale_high",
        "max_rotation_degrees",
        "jitter_sigma",
        "jitter_clip",
        "max_translation",
        "max_point_dropout",
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_augmentation_rejects_settings_that_are_not_finite(name, value):
    # NaN passes every range comparison; accepted, it turned every point into NaN.
    kwargs = {name: value}
    if name == "scale_low":
        kwargs["scale_high"] = float("inf")  # so that only finiteness can refuse inf
    with pytest.raises(ValueError, match=f"must be finite; got .*{name}={value}"):
        PointCloudAugmentation(**kwargs)


def test_region_mixing_swaps_the_same_region_of_both_sets():
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(3, 50, 3, generator=generator)
    partner = torch.rand(3, 40, 3, generator=generator)
    centers = points[:, 7]
    mixed = mix_point_regions(points, partner, 12, centers)
    assert mixed.shape == points.shape
    for b in range(3):
        # The 12 points nearest the centre are gone; the rest stay where they were.
        order = (points[b] - centers[b]).norm(dim=-1).argsort()
        kept, dropped = order[12:], order[:12]
        torch.testing.assert_close(mixed[b, kept], points[b, kept])
        # In their places: the partner's 12 points nearest the same centre.
        nearest = (partner[b] - centers[b]).norm(dim=-1).argsort()[:12]
        expected = partner[b, nearest]
        got = mixed[b, dropped]
        assert torch.equal(got[got[:, 0].argsort()], expected[expected[:, 0].argsort()]), (
            "replacement region differs from the partner's"
        )
    # The inputs are untouched; K = 0 and K = N are the two sets themselves.
    assert not torch.equal(mixed, points)
    torch.testing.assert_close(mix_point_regions(points, partner, 0, centers), points)
    whole = mix_point_regions(points[:, :40], partner, 40, centers)
    torch.testing.assert_close(whole.sort(dim=1).values, partner.sort(dim=1).values)


def test_region_mixing_rejects_bad_arguments():
    points = torch.rand(2, 10, 3)
    with pytest.raises(ValueError, match="num_replaced"):
        mix_point_regions(points, points, 11, points[:, 0])
    with pytest.raises(ValueError, match="centers"):
        mix_point_regions(points, points, 3, points[0])
    with pytest.raises(ValueError, match="same B"):
        mix_point_regions(points, points[:1], 3, points[:, 0])


@pytest.mark.parametrize("up_axis", [0, 1, 2, "y"])
def test_yaw_rotations_turn_about_the_up_axis(up_axis) -> None:
    rotations = yaw_rotations(torch.tensor([math.pi / 2, 0.3], dtype=torch.float64), up_axis)
    assert rotations.dtype == torch.float64
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(
        rotations @ rotations.mT, torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    )
    index = {"y": 1}.get(up_axis, up_axis)
    up = torch.eye(3, dtype=torch.float64)[index]
    assert torch.equal(rotations[:, index], up.expand(2, 3))  # exactly: heights unchanged
    first, second = (axis for axis in range(3) if axis != index)
    # A quarter turn takes the first horizontal axis to the second.
    torch.testing.assert_close(
        rotations[0] @ torch.eye(3, dtype=torch.float64)[first],
        torch.eye(3, dtype=torch.float64)[second],
    )


def test_turn_by_turns_each_set_by_its_own_angle() -> None:
    points = torch.tensor([[[1.0, 0.0, 0.5]], [[1.0, 0.0, 0.5]]])
    angles = torch.tensor([math.pi / 2, math.pi], dtype=torch.float64)
    turned = turn_by(points, angles, up_axis=2)
    assert turned.dtype == torch.float32
    expected = torch.tensor([[[0.0, 1.0, 0.5]], [[-1.0, 0.0, 0.5]]])
    torch.testing.assert_close(turned, expected, atol=1e-7, rtol=0)


def test_turn_about_vertical_draws_one_seeded_angle_per_set_within_the_range() -> None:
    points = torch.randn(400, 5, 3, generator=torch.Generator().manual_seed(0))
    points[:, -1] = 0.0  # padding rows stay at the origin
    turned = turn_about_vertical(points, 30.0, up_axis=2, seed=7)
    torch.testing.assert_close(turned[..., 2], points[..., 2], atol=0, rtol=0)
    assert torch.equal(turned[:, -1], points[:, -1])
    before = torch.complex(points[:, :-1, 0], points[:, :-1, 1])
    after = torch.complex(turned[:, :-1, 0], turned[:, :-1, 1])
    angles = torch.rad2deg((after / before).angle())  # per point; one per set
    torch.testing.assert_close(angles, angles[:, :1].expand_as(angles), atol=1e-3, rtol=0)
    assert -30.0 <= float(angles.min()) < -25.0 and 25.0 < float(angles.max()) <= 30.0
    assert torch.equal(turn_about_vertical(points, 30.0, 2, seed=7), turned)
    assert not torch.allclose(turn_about_vertical(points, 30.0, 2, seed=8), turned)
    assert torch.equal(turn_about_vertical(points, 0.0, 2, seed=7), points)
    for bad in (-1.0, 181.0):
        with pytest.raises(ValueError, match=r"max_degrees must be a number in \[0, 180\]"):
            turn_about_vertical(points, bad)


def test_rotation_angles_span_both_directions_of_the_range():
    # Angles uniform in [-max, max] about the up axis (z): not one-sided.
    augmentation = PointCloudAugmentation(
        scale_low=1.0, scale_high=1.0, max_rotation_degrees=30.0, jitter_sigma=0.0,
        shuffle=False,
    )  # fmt: skip
    unit_x = torch.tensor([[1.0, 0.0, 0.0]])
    rotated = torch.cat(
        [augmentation(unit_x, generator=torch.Generator().manual_seed(s)) for s in range(200)]
    )
    angles = torch.atan2(rotated[:, 1], rotated[:, 0]).rad2deg()
    assert angles.min() < -25 and angles.max() > 25 and abs(angles.mean()) < 5
    assert angles.abs().max() <= 30 + 1e-4


def test_jitter_has_the_given_sigma():
    # With sigma well below the clip, the noise's std is sigma (not the clip).
    augmentation = PointCloudAugmentation(
        scale_low=1.0, scale_high=1.0, max_rotation_degrees=0.0, jitter_sigma=0.01,
        jitter_clip=0.05, shuffle=False,
    )  # fmt: skip
    noise = augmentation(torch.zeros(20000, 3), generator=torch.Generator().manual_seed(0))
    assert noise.std().item() == pytest.approx(0.01, rel=0.05)


def test_small_clouds_are_filled_with_random_repeats():
    # 1000 points from a 10-point cloud: every point about 100 times, not one point 991 times.
    cloud = np.arange(30, dtype=float).reshape(10, 3)
    with pytest.warns(UserWarning):
        points = sample_points(cloud, 1000, seed=0)
    _, counts = np.unique(points, axis=0, return_counts=True)
    assert len(counts) == 10 and counts.max() < 200


def test_up_axis_rotation_stands_the_given_axis_up_without_mirroring():
    point = np.array([1.0, 2.0, 3.0])
    # glTF (y-up) to z-up: the usual (x, y, z) -> (x, -z, y).
    np.testing.assert_array_equal(up_axis_rotation("y", "z") @ point, [1.0, -3.0, 2.0])
    np.testing.assert_array_equal(up_axis_rotation("Z", 2), np.eye(3))
    for source in range(3):
        for target in range(3):
            rotation = up_axis_rotation(source, target)
            np.testing.assert_array_equal(rotation @ np.eye(3)[source], np.eye(3)[target])
            np.testing.assert_array_equal(rotation.T @ rotation, np.eye(3))
            assert np.linalg.det(rotation) == pytest.approx(1.0)  # a turn, not a mirror
            np.testing.assert_array_equal(up_axis_rotation(target, source) @ rotation, np.eye(3))
    for bad in ("up", 3, -1, True, 1.0):
        with pytest.raises(ValueError, match="'x', 'y', 'z'"):
            up_axis_rotation(bad, "z")


def test_augmentation_up_axis_is_read_as_everywhere_else() -> None:
    # As up_axis_index reads it: names work, and True (== 1 to Python) is no axis.
    assert PointCloudAugmentation(up_axis="y").up_axis == 1
    for bad in (True, 3, "up"):
        with pytest.raises(ValueError, match="an up axis is 'x', 'y', 'z'"):
            PointCloudAugmentation(up_axis=bad)
