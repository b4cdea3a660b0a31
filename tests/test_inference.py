import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from _inference_utils import (
    CLASSES,
    NUM_POINTS,
    build_tiny_checkpoint,
    write_bad_files,
    write_format_files,
)

from pointsink import Prediction, ShapeClassifier
from pointsink.inference import (
    CheckpointError,
    ShapePredictionDataset,
    expand_paths,
    format_predictions,
    make_prediction,
    preprocess_views,
    resolve_device,
)
from pointsink.module import SinkformerClassifier
from pointsink.transforms import (
    PointCloudAugmentation,
    file_sample_seed,
    preprocess_shape,
    up_axis_rotation,
)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="session")
def classifier(checkpoint: Path) -> ShapeClassifier:
    return ShapeClassifier.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="session")
def format_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_format_files(tmp_path_factory.mktemp("formats"))


def _assert_classified(prediction: Prediction, top_k: int = 3) -> None:
    assert prediction.error is None, prediction.error
    assert prediction.label in CLASSES
    assert 0.0 <= prediction.probability <= 1.0
    assert len(prediction.topk) == top_k
    assert prediction.topk[0] == (prediction.label, prediction.probability)
    probabilities = [p for _, p in prediction.topk]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0 + 1e-5
    if top_k == len(CLASSES):
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_from_checkpoint_restores_names_points_and_eval_mode(classifier: ShapeClassifier) -> None:
    assert classifier.class_names == CLASSES
    assert classifier.num_points == NUM_POINTS
    assert classifier.device == torch.device("cpu")
    assert not classifier.model.training


@pytest.mark.parametrize(
    "name",
    [
        "off",
        "obj",
        "stl_binary",
        "stl_ascii",
        "ply_ascii",
        "ply_binary",
        "ply_points",
        "glb_scene",
        "gltf_scene",
        "3mf_scene",
        "upper_case",
    ],
)
def test_every_format_is_classified(
    classifier: ShapeClassifier, format_files: dict[str, Path], name: str
) -> None:
    (prediction,) = classifier.predict(format_files[name], top_k=3)
    assert prediction.path == str(format_files[name])
    _assert_classified(prediction)


def test_scene_geometries_are_merged(format_files: dict[str, Path]) -> None:
    # The scenes hold a box (x in [-0.5, 0.5]) and a sphere (x in [1.5, 2.5]): both must be
    # sampled, so the x coordinates form two clusters with an empty gap between them.
    for name in ["glb_scene", "gltf_scene", "3mf_scene"]:
        views, _, _ = preprocess_views(format_files[name], num_points=256, seed=0)
        x = np.sort(views[0][:, 0])
        split = int(np.argmax(np.diff(x)))
        assert np.diff(x)[split] > 0.3, name
        assert 0.2 < (split + 1) / len(x) < 0.8, name


def test_folders_globs_and_upper_case_extensions(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    deep = root / "deep"
    (root / "deep" / ".hidden").mkdir(parents=True)
    mesh = trimesh.creation.box()
    for relative in ["a.off", "deep/B.STL", "deep/c.Ply", "deep/.hidden/x.off"]:
        data = mesh.export(file_type=Path(relative).suffix.lower().lstrip("."))
        (root / relative).write_bytes(data if isinstance(data, bytes) else data.encode())
    (deep / "notes.md").write_text("not a shape\n")
    found = [entry.path for entry in expand_paths([root])]
    assert found == [
        str(root / "a.off"),
        str(root / "deep" / "B.STL"),
        str(root / "deep" / "c.Ply"),
    ]
    by_glob = expand_paths([str(root / "**" / "*.[sS][tT][lL]"), root / "a.off", root / "a.off"])
    assert [entry.path for entry in by_glob] == [str(deep / "B.STL"), str(root / "a.off")]
    assert all(entry.error is None for entry in by_glob)
    # Also across the arguments of one predict call: each file is classified once.
    assert len(expand_paths([root, deep / "B.STL", str(root / "*.off")])) == 3

    # Linked folders are followed (a link back to an ancestor does not loop), and a file
    # reached through a linked folder is the file itself; but files that are links to one
    # stored file (as git-annex and DVC store identical shapes) are shapes of their own.
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "deep").symlink_to(deep, target_is_directory=True)
    (linked / "loop").symlink_to(linked, target_is_directory=True)
    (linked / "a.off").symlink_to(root / "a.off")
    (linked / "b.off").symlink_to(root / "a.off")
    found = [entry.path for entry in expand_paths([linked])]
    assert found == [str(linked / "a.off"), str(linked / "b.off"),
                     str(linked / "deep" / "B.STL"), str(linked / "deep" / "c.Ply")]  # fmt: skip
    assert len(expand_paths([root, linked])) == 5  # deep/ once, a.off and b.off twice


def test_recursive_pattern_through_linked_folder_loops_ends(tmp_path: Path) -> None:
    # Two links back to an ancestor: Python's glob doubles its search at every level of
    # links (about 2**40 paths); the pattern must find what the folder itself gives.
    shapes = tmp_path / "shapes"
    (shapes / "a").mkdir(parents=True)
    (shapes / "a" / "box.off").write_text(trimesh.creation.box().export(file_type="off"))
    (shapes / "a" / "up").symlink_to("..", target_is_directory=True)
    (shapes / "b").symlink_to("a", target_is_directory=True)
    code = (
        "import sys; from pointsink.inference import expand_paths; "
        "print([entry.path for entry in expand_paths(sys.argv[1:])])"
    )
    pattern = str(shapes / "**" / "*.off")
    # In a child process, so that a search that does not end can be stopped.
    listed = subprocess.run(
        [sys.executable, "-c", code, pattern, str(shapes)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert listed.strip() == repr([str(shapes / "a" / "box.off")])
    # Hidden names stay out of wildcards, as in glob; "**" matches zero folders too.
    (shapes / ".hidden").mkdir()
    (shapes / ".hidden" / "c.off").write_text("")
    (shapes / "top.off").write_text("")
    found = [entry.path for entry in expand_paths([pattern])]
    assert found == [str(shapes / "a" / "box.off"), str(shapes / "top.off")]


def test_bad_inputs_give_errors_and_never_stop_the_batch(
    classifier: ShapeClassifier, format_files: dict[str, Path], tmp_path: Path
) -> None:
    bad = write_bad_files(tmp_path)
    good = [format_files["off"], format_files["ply_binary"]]
    inputs = [good[0], *[path for path, _ in bad.values()], good[1]]
    predictions = classifier.predict(inputs, top_k=2, batch_size=4)
    assert len(predictions) == len(inputs)
    _assert_classified(predictions[0], top_k=2)
    _assert_classified(predictions[-1], top_k=2)
    for prediction, (case, (path, expected)) in zip(predictions[1:-1], bad.items(), strict=True):
        assert prediction.path == str(path), case
        assert prediction.label is None and prediction.probability is None, case
        assert prediction.topk == ()
        assert expected in prediction.error, (case, prediction.error)
        assert "\n" not in prediction.error


def test_in_memory_inputs(classifier: ShapeClassifier, format_files: dict[str, Path]) -> None:
    mesh = trimesh.load(format_files["off"], process=False)
    from_file = classifier.predict(format_files["off"])[0]
    # A file is sampled with its per-file seed; the same seed gives a mesh the same points.
    from_mesh = classifier.predict(mesh, seed=file_sample_seed(format_files["off"], 0))[0]
    assert from_mesh.path is None
    # Same points, same batch size: the same numbers (the tiny model's outputs vary by only
    # ~1e-4 between samplings, so a looser tolerance would miss a wrong seed).
    assert [name for name, _ in from_mesh.topk] == [name for name, _ in from_file.topk]
    assert [p for _, p in from_mesh.topk] == pytest.approx([p for _, p in from_file.topk], abs=1e-7)

    points = np.random.default_rng(1).normal(size=(4, 300, 3))
    batch = classifier.predict(torch.from_numpy(points))
    assert len(batch) == 4
    single = classifier.predict(points[2])
    assert single[0].label == batch[2].label
    assert single[0].probability == pytest.approx(batch[2].probability, abs=1e-5)
    # Nested lists of numbers are point sets, not one input per point.
    (listed,) = classifier.predict(points[2].tolist())
    assert listed.probability == pytest.approx(single[0].probability, abs=1e-6)
    assert len(classifier.predict(points.tolist())) == 4
    pair = classifier.predict([points[0].tolist(), tuple(map(tuple, points[2]))])
    assert pair[1].probability == pytest.approx(single[0].probability, abs=1e-6)
    # A list of inputs whose second is a batch given as lists: one prediction per point set.
    split = classifier.predict([points[2], points[1:3].tolist()])
    assert len(split) == 3
    assert split[2].probability == pytest.approx(single[0].probability, abs=1e-6)
    # A list that holds a tensor is a list of inputs, even one numpy cannot convert.
    tracked = torch.from_numpy(points[2]).requires_grad_()
    from_tensors = classifier.predict([points[0].tolist(), tracked])
    assert from_tensors[1].probability == pytest.approx(single[0].probability, abs=1e-6)
    mixed = classifier.predict([points[0], mesh, np.zeros((5, 4)), "no/such/file.off"])
    assert [p.error is None for p in mixed] == [True, True, False, False]
    assert "shape (P, 3)" in mixed[2].error


def test_point_cloud_with_too_few_points_warns(classifier: ShapeClassifier) -> None:
    points = np.random.default_rng(0).normal(size=(10, 3))
    (prediction,) = classifier.predict(points)
    assert prediction.error is None
    assert "only 10 points" in prediction.warning


def test_flat_shape_is_classified_with_a_warning(classifier: ShapeClassifier) -> None:
    sheet = trimesh.creation.box(extents=[1.0, 0.8, 0.001])
    (prediction,) = classifier.predict(sheet, votes=3)
    assert prediction.error is None
    # Said once, not once per view.
    assert prediction.warning.count("The shape is flat") == 1


def test_very_large_coordinates_are_normalized(classifier: ShapeClassifier) -> None:
    mesh = trimesh.creation.cone(radius=0.5, height=1.0, sections=12)
    far = mesh.copy()
    # float32 spacing is 2 at 3e7, four times the cone's radius: any float32 step before
    # the centring would scramble the points.
    far.apply_translation([1e7, -3e7, 2e7])
    near_views, _, _ = preprocess_views(mesh, NUM_POINTS, seed=0)
    far_views, _, _ = preprocess_views(far, NUM_POINTS, seed=0)
    np.testing.assert_allclose(far_views, near_views, atol=1e-5)
    near_prediction, far_prediction = classifier.predict([mesh, far])
    assert far_prediction.error is None
    for (name, p), (far_name, far_p) in zip(near_prediction.topk, far_prediction.topk, strict=True):
        assert name == far_name
        assert far_p == pytest.approx(p, abs=1e-6)


def test_huge_mesh(classifier: ShapeClassifier, tmp_path: Path) -> None:
    mesh = trimesh.creation.icosphere(subdivisions=6)  # 82k faces
    grid = trimesh.util.concatenate(
        [mesh.copy().apply_translation([3 * i, 0, 0]) for i in range(3)]
    )
    assert len(grid.faces) > 200_000
    path = tmp_path / "huge.ply"
    grid.export(path)
    (prediction,) = classifier.predict(path)
    _assert_classified(prediction, top_k=3)


def test_seeded_and_reproducible_votes(classifier: ShapeClassifier, format_files) -> None:
    path = format_files["obj"]
    first = classifier.predict(path, seed=3, votes=3)[0]
    again = classifier.predict(path, seed=3, votes=3)[0]
    assert first == again
    other_seed = classifier.predict(path, seed=4, votes=3)[0]
    assert other_seed.topk != first.topk
    # View 0 is exactly the training preprocessing; further views differ from it.
    views, _, _ = preprocess_views(
        path, NUM_POINTS, seed=3, votes=3, augmentation=classifier.augmentation
    )
    assert views.shape == (3, NUM_POINTS, 3)
    file_seed = file_sample_seed(path, 3)
    np.testing.assert_array_equal(views[0], preprocess_shape(path, NUM_POINTS, seed=file_seed))
    assert not np.allclose(views[1], views[2])
    # Further views follow the base seed and the file (its contents): otherwise every file,
    # whatever the seed, would share views 1 to V - 1.
    plain_view = preprocess_views(path, NUM_POINTS, seed=3, votes=2)[0][1]
    assert not np.allclose(preprocess_views(path, NUM_POINTS, seed=4, votes=2)[0][1], plain_view)
    twin = path.with_name("twin.obj")  # the same mesh, other bytes
    twin.write_text(path.read_text() + "# a comment\n")
    assert not np.allclose(preprocess_views(twin, NUM_POINTS, seed=3, votes=2)[0][1], plain_view)
    # The reported probabilities are those of these views (the tiny model's outputs are too
    # close to each other to tell how they are combined: see the next test).
    everything = classifier.predict(path, seed=3, votes=3, top_k=len(CLASSES))[0]
    found = torch.tensor([dict(everything.topk)[name] for name in CLASSES])
    expected = classifier.predict_probabilities(torch.from_numpy(views)).mean(dim=0)
    torch.testing.assert_close(found, expected, atol=1e-6, rtol=0)


def test_up_axis_turns_a_lying_shape_upright_first(classifier: ShapeClassifier) -> None:
    # A tall box is stood on its y axis, as a glTF file (y-up) would hold it.
    upright = trimesh.creation.box(extents=[0.3, 0.5, 1.0])
    lying = upright.copy()
    lying.vertices = lying.vertices @ up_axis_rotation("z", "y").T
    assert classifier.up_axis == 2
    everything = {"top_k": len(CLASSES), "seed": 1, "votes": 2}

    def probabilities(shape: trimesh.Trimesh, **kwargs) -> dict[str, float]:
        return dict(classifier.predict(shape, **everything, **kwargs)[0].topk)

    expected = probabilities(upright)
    turned = probabilities(lying, up_axis="y")
    assert turned == pytest.approx(expected, abs=1e-6)
    assert probabilities(lying) != pytest.approx(expected, abs=1e-6)
    assert probabilities(upright, up_axis="z") == expected
    with pytest.raises(ValueError, match="up axis"):
        classifier.predict(upright, up_axis="w")


class _AxisSpreadModel(torch.nn.Module):
    """Logits ``20 * mean(points ** 2)`` per axis: large, and changed by every augmentation."""

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return 20 * points.square().mean(dim=1)


def test_votes_average_probabilities_not_logits(format_files) -> None:
    path = format_files["obj"]
    classifier = ShapeClassifier(_AxisSpreadModel(), CLASSES, num_points=NUM_POINTS, device="cpu")
    views, _, _ = preprocess_views(
        path, NUM_POINTS, seed=5, votes=4, augmentation=classifier.augmentation
    )
    logits = 20 * torch.from_numpy(views).double().square().mean(dim=1)  # (V, C)
    mean_of_probabilities = logits.softmax(dim=-1).mean(dim=0)
    # Otherwise the check could not tell the vote from these alternatives.
    assert (mean_of_probabilities - logits.mean(dim=0).softmax(dim=-1)).abs().max() > 1e-3
    assert (mean_of_probabilities - logits[0].softmax(dim=-1)).abs().max() > 1e-3
    (prediction,) = classifier.predict(path, seed=5, votes=4, top_k=len(CLASSES))
    found = torch.tensor([dict(prediction.topk)[name] for name in CLASSES], dtype=torch.float64)
    torch.testing.assert_close(found, mean_of_probabilities, atol=1e-6, rtol=0)


def test_view_probabilities_keep_shapes_and_views_apart(
    classifier: ShapeClassifier, format_files
) -> None:
    shapes = [format_files["obj"], format_files["ply_points"]]
    views = np.stack(
        [preprocess_views(path, NUM_POINTS, seed=1, votes=3)[0] for path in shapes]
    )  # (S, V, N, 3)
    probabilities = classifier.view_probabilities(views)
    assert probabilities.shape == (2, 3, classifier.model.num_classes)
    for shape in range(2):
        for view in range(3):
            alone = classifier.predict_probabilities(views[shape, view])[0]
            torch.testing.assert_close(probabilities[shape, view], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(S, V, N, 3\)"):
        classifier.view_probabilities(views[0])


def test_num_points_override_and_fallback(checkpoint: Path, tmp_path: Path) -> None:
    assert ShapeClassifier.from_checkpoint(checkpoint, num_points=32).num_points == 32
    content = torch.load(checkpoint, weights_only=True)
    del content["hyper_parameters"]["num_points"]
    stripped = tmp_path / "no_points.ckpt"
    torch.save(content, stripped)
    with pytest.warns(UserWarning, match="does not record the number of points"):
        assert ShapeClassifier.from_checkpoint(stripped).num_points == 1024
    content["datamodule_hyper_parameters"] = {"num_points": 48, "up_axis": 1, "sample_seed": 7}
    torch.save(content, stripped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = ShapeClassifier.from_checkpoint(stripped)
    assert restored.num_points == 48
    assert restored.augmentation.up_axis == 1
    # The data module sampled the training cache: its seed wins over the model's default 0
    # (a model trained from Python, with nothing linking the two).
    assert content["hyper_parameters"]["sample_seed"] == 0
    assert restored.sample_seed == 7


def test_unusable_recorded_augmentation_warns(checkpoint: Path, tmp_path: Path) -> None:
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["augmentation"] = {"scale_low": 2.0, "scale_high": 1.0}
    broken = tmp_path / "bad_augmentation.ckpt"
    torch.save(content, broken)
    with pytest.warns(UserWarning, match="recorded augmentation .* cannot be used"):
        restored = ShapeClassifier.from_checkpoint(broken)
    assert restored.augmentation.settings() == PointCloudAugmentation().settings()
    # The vertical axis, which `up_axis` turns inputs to, is kept when it is valid.
    content["hyper_parameters"]["augmentation"] = {"up_axis": 1, "flip_probability": 0.5}
    torch.save(content, broken)
    with pytest.warns(UserWarning, match="recorded augmentation .* cannot be used"):
        restored = ShapeClassifier.from_checkpoint(broken)
    assert restored.augmentation.settings() == PointCloudAugmentation(up_axis=1).settings()
    assert restored.up_axis == 1


def test_voting_views_keep_every_point(checkpoint: Path, tmp_path: Path) -> None:
    # A training that dropped points records it; voting's views only change the pose.
    content = torch.load(checkpoint, weights_only=True)
    recorded = PointCloudAugmentation(scale_low=0.9, max_point_dropout=0.875).settings()
    content["hyper_parameters"]["augmentation"] = recorded
    dropping = tmp_path / "point_dropout.ckpt"
    torch.save(content, dropping)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = ShapeClassifier.from_checkpoint(dropping)
    expected = PointCloudAugmentation(scale_low=0.9).settings()
    assert restored.augmentation.settings() == expected


def test_too_few_points_for_the_model_are_refused() -> None:
    module = SinkformerClassifier(
        class_names=CLASSES, channels=8, num_heads=2, num_inducing_points=2, num_groups=8,
        group_size=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs at least 8 points"):
        ShapeClassifier(module, CLASSES, num_points=7, device="cpu")
    classifier = ShapeClassifier(module, CLASSES, num_points=8, device="cpu")
    cloud = np.random.default_rng(0).normal(size=(50, 3))
    (prediction,) = classifier.predict([cloud])
    assert prediction.error is None and prediction.label in CLASSES


class _NotAllowed:
    def __init__(self) -> None:
        self.value = 1


def _broken_checkpoints(checkpoint: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    content = torch.load(checkpoint, weights_only=True)
    cases: dict[str, tuple[Path, str]] = {}

    def save(name: str, obj: object, expected: str) -> None:
        path = folder / f"{name}.ckpt"
        torch.save(obj, path)
        cases[name] = (path, expected)

    no_names = {**content, "hyper_parameters": dict(content["hyper_parameters"])}
    del no_names["hyper_parameters"]["class_names"]
    save("no_class_names", no_names, "class names")
    save("no_state_dict", {k: v for k, v in content.items() if k != "state_dict"}, "state_dict")
    save("no_hparams", {"state_dict": content["state_dict"]}, "hyper_parameters")
    wider = {**content, "hyper_parameters": {**content["hyper_parameters"], "channels": 32}}
    save("incompatible", wider, "incompatible version")
    bad_value = {**content, "hyper_parameters": {**content["hyper_parameters"], "encoder": "x"}}
    save("bad_hparam", bad_value, "do not fit this version")
    save("unsafe", {**content, "extra": _NotAllowed()}, "refusing to load")
    save("not_a_dict", [1, 2, 3], "expected a Lightning checkpoint")
    garbage = folder / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    cases["garbage"] = (garbage, "not a readable PyTorch checkpoint")
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    cases["truncated"] = (truncated, "not a readable PyTorch checkpoint")
    cases["missing"] = (folder / "missing.ckpt", "no such checkpoint file")
    cases["folder"] = (folder, r"a folder, not a checkpoint file; give a .ckpt file \(it holds")
    return cases


def test_unusable_checkpoints_raise_clear_errors(checkpoint: Path, tmp_path: Path) -> None:
    for case, (path, expected) in _broken_checkpoints(checkpoint, tmp_path).items():
        with pytest.raises(CheckpointError, match=expected) as info:
            ShapeClassifier.from_checkpoint(path, device="cpu")
        assert str(path) in str(info.value), case
        assert isinstance(info.value, ValueError)


def test_checkpoint_path_expands_the_home_folder(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the inputs' paths do: "~/tiny.ckpt" is the checkpoint in the home folder.
    monkeypatch.setenv("HOME", str(checkpoint.parent))
    classifier = ShapeClassifier.from_checkpoint(f"~/{checkpoint.name}", device="cpu")
    assert classifier.class_names == CLASSES


def test_bytes_paths_are_paths_and_mappings_are_refused(
    classifier: ShapeClassifier, format_files: dict[str, Path]
) -> None:
    path = format_files["off"]
    (expected,) = classifier.predict(path)
    # A bytes path (as os.listdir of bytes gives) is one file, not one input per byte.
    for given in (os.fsencode(path), [os.fsencode(path)]):
        (prediction,) = classifier.predict(given)
        assert (prediction.path, prediction.probability) == (expected.path, expected.probability)
    # A dict's keys would be taken for the inputs.
    with pytest.raises(TypeError, match="not a mapping"):
        classifier.predict({str(path): 1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_requested_without_cuda(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        ShapeClassifier.from_checkpoint(checkpoint, device="cuda")


def test_cuda_index_beyond_the_machines_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    # A one-GPU machine, simulated: "cuda:5" is refused before any tensor is moved.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"'cuda:5' .* has 1 CUDA device\(s\), numbered from 0"):
        resolve_device("cuda:5")


def test_prediction_dataset_carries_errors(format_files: dict[str, Path], tmp_path: Path) -> None:
    dataset = ShapePredictionDataset(
        [format_files["off"], tmp_path / "missing.off"], num_points=NUM_POINTS, seed=0
    )
    good, bad = dataset[0], dataset[1]
    np.testing.assert_array_equal(
        good["points"].numpy(),
        preprocess_shape(format_files["off"], NUM_POINTS, file_sample_seed(format_files["off"], 0)),
    )
    assert good["error"] == "" and good["index"] == 0
    assert "no such file" in bad["error"]
    assert bad["points"].shape == (NUM_POINTS, 3)


def test_output_formats(classifier: ShapeClassifier, format_files: dict[str, Path]) -> None:
    predictions = classifier.predict([format_files["off"], "missing.off"], top_k=2)
    records = json.loads(format_predictions(predictions, "json"))
    assert records == [p.to_dict() for p in predictions]
    assert set(records[0]) >= {"path", "label", "probability", "topk", "error"}
    assert records[1]["error"].startswith("missing.off") and records[1]["label"] is None
    assert [Prediction.from_dict(r) for r in records] == predictions
    csv_lines = format_predictions(predictions, "csv").splitlines()
    assert csv_lines[0] == "path,label,probability,topk,error,warning"
    assert len(csv_lines) == 3
    table = format_predictions(predictions, "table")
    assert "ERROR" in table and predictions[0].label in table
    assert "1 classified, 1 failed." in table


def test_table_columns_line_up_for_any_file_name() -> None:
    # A name invalid in the file system's encoding (its bytes as surrogates, as os.fsdecode
    # gives them) is shown escaped; a wide character takes two terminal columns.
    names = ["plain.off", "lat\udce9.off", "形状.off"]
    predictions = [Prediction(name, "chair", 0.5, (("chair", 0.5),)) for name in names]
    lines = format_predictions(predictions, "table").splitlines()
    assert lines[2].startswith("lat\\udce9.off  ")
    columns = set()
    for line in lines[1:4]:
        name = line[: line.index("chair")]
        columns.add(sum(2 if "\u4e00" <= char <= "\u9fff" else 1 for char in name))
    assert columns == {len("lat\\udce9.off  ")}


def test_voting_augments_every_view_but_the_first() -> None:
    shape = np.random.default_rng(0).normal(size=(500, 3))
    augmentation = PointCloudAugmentation(max_rotation_degrees=90.0)
    plain, _, _ = preprocess_views(shape, 64, seed=3, votes=3, augmentation=None)
    augmented, _, _ = preprocess_views(shape, 64, seed=3, votes=3, augmentation=augmentation)
    np.testing.assert_array_equal(plain[0], augmented[0])  # view 0: the training sample
    for view in (1, 2):
        assert not np.allclose(plain[view], augmented[view]), view


def test_tied_probabilities_are_listed_in_class_order() -> None:
    names = [f"c{index}" for index in range(40)]
    prediction = make_prediction(None, torch.full((40,), 1 / 40), names, top_k=40)
    assert [name for name, _ in prediction.topk] == names
