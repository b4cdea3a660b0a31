"""benchmarks/voting.py: its accuracies are those of ``ShapeClassifier.predict(votes=V)``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _benchmark_utils import load_benchmark
from _inference_utils import CLASSES, build_tiny_checkpoint

from pointsink.data import ShapeFolderDataModule
from pointsink.inference import ShapeClassifier


@pytest.fixture(scope="module")
def voting():
    return load_benchmark("voting")


def test_averaged_views_are_what_predict_reports(voting, tmp_path: Path, make_shape_folder) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), test_per_class=4)
    classifier = ShapeClassifier.from_checkpoint(checkpoint, device="cpu")
    files = voting.test_files(root, CLASSES, classifier.num_points, classifier.sample_seed)
    assert [label for _, label in files] == [0] * 4 + [1] * 4 + [2] * 4
    paths = [path for path, _ in files]
    views = voting.view_probabilities(classifier, paths, seed=0, views=3, batch_size=5)
    assert views.shape == (12, 3, len(CLASSES))
    assert not torch.allclose(views[:, 0], views[:, 1])  # the views differ
    for votes in (1, 3):
        expected = views[:, :votes].mean(dim=1)
        predictions = classifier.predict(paths, top_k=len(CLASSES), votes=votes, seed=0)
        for prediction, row in zip(predictions, expected, strict=True):
            found = torch.tensor([dict(prediction.topk)[name] for name in CLASSES])
            torch.testing.assert_close(found, row, atol=1e-6, rtol=0)


def test_table_reports_overall_and_mean_class_accuracy(
    voting, tmp_path: Path, make_shape_folder
) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), test_per_class=4)
    for path in sorted((root / CLASSES[0] / "test").iterdir())[1:]:
        path.unlink()  # 1, 4 and 4 test shapes: overall and mean class accuracy differ
    table = voting.main(["--ckpt", str(checkpoint), "--data-root", str(root), "--votes", "1", "2"])
    classifier = ShapeClassifier.from_checkpoint(checkpoint, device="cpu")
    files = voting.test_files(root, CLASSES, classifier.num_points, classifier.sample_seed)
    predictions = classifier.predict([path for path, _ in files], votes=2)
    right, support = [0] * len(CLASSES), [0] * len(CLASSES)
    for prediction, (_, label) in zip(predictions, files, strict=True):
        right[label] += prediction.label == CLASSES[label]
        support[label] += 1
    assert support == [1, 4, 4]
    overall = 100 * sum(right) / len(files)
    mean_class = 100 * sum(r / n for r, n in zip(right, support, strict=True)) / len(CLASSES)
    assert abs(overall - mean_class) > 1  # else the check below could not tell them apart
    assert f"| 2 | {overall:.2f} | {mean_class:.2f} |" in table.splitlines()


def test_missing_class_folder_is_a_clear_error(voting, tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    with pytest.raises(SystemExit, match="does not exist; is --data-root the dataset"):
        voting.main(["--ckpt", str(checkpoint), "--data-root", str(tmp_path)])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--split", "train"], "invalid choice: 'train'"),
        (["--val-fraction", "0.2"], "apply to --split val only"),
    ],
)
def test_split_arguments_are_checked(
    voting, tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    # Scoring training shapes, or a split option silently ignored, would mislead.
    with pytest.raises(SystemExit) as exit_info:
        voting.main(["--ckpt", "unused.ckpt", "--data-root", str(tmp_path), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_val_split_is_the_training_validation_split(
    voting, tmp_path: Path, make_shape_folder
) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), train_per_class=10)
    files = voting.validation_files(root, CLASSES, val_fraction=0.2, split_seed=3)
    data = ShapeFolderDataModule(str(root), class_names=CLASSES, val_fraction=0.2, split_seed=3)
    data.prepare_data()
    data.setup("fit")
    assert [path for path, _ in files] == data.val_dataset.paths
    assert len(files) == 6  # 2 of each class's 10 training shapes
    for path, label in files:
        assert Path(path).parent == root / CLASSES[label] / "train"
    split = ["--split", "val", "--val-fraction", "0.2", "--split-seed", "3"]
    table = voting.main(["--ckpt", str(checkpoint), "--data-root", str(root), *split])
    assert "on 6 val shapes" in table


def test_val_split_defaults_to_the_checkpoints_and_refuses_another(
    voting, tmp_path: Path, make_shape_folder
) -> None:
    path = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    content = torch.load(path, weights_only=True)
    # Where Lightning stores ShapeFolderDataModule.state_dict().
    content["ShapeFolderDataModule"] = {"val_fraction": 0.2, "split_seed": 3}
    torch.save(content, path)
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), train_per_class=10)
    table = voting.main(["--ckpt", str(path), "--data-root", str(root), "--split", "val"])
    assert "on 6 val shapes" in table  # 0.2 of 10 per class, not the default 0.1
    assert voting.training_split(str(path), content, None, None) == (0.2, 3)
    with pytest.raises(SystemExit, match=r"trained with val_fraction=0\.2 and split_seed=3"):
        voting.main(
            ["--ckpt", str(path), "--data-root", str(root), "--split", "val", "--split-seed", "0"]
        )


def test_val_split_must_be_the_recorded_files(voting, tmp_path: Path, make_shape_folder) -> None:
    path = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    content = torch.load(path, weights_only=True)
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), train_per_class=10)
    files = voting.validation_files(root, CLASSES, val_fraction=0.2, split_seed=3)
    recorded = sorted(Path(file).relative_to(root).as_posix() for file, _ in files)
    content["ShapeFolderDataModule"] = {"val_fraction": 0.2, "split_seed": 3, "val_files": recorded}
    torch.save(content, path)
    assert "on 6 val shapes" in voting.main(
        ["--ckpt", str(path), "--data-root", str(root), "--split", "val"]
    )
    # One recorded file that this copy of the data would put into training instead.
    content["ShapeFolderDataModule"]["val_files"] = [*recorded[1:], "alpha/train/alpha_0099.off"]
    torch.save(content, path)
    with pytest.raises(SystemExit, match="of which 1 are not in this split"):
        voting.main(["--ckpt", str(path), "--data-root", str(root), "--split", "val"])


def test_scores_what_train_py_test_scores(voting, tmp_path: Path, make_shape_folder) -> None:
    """The test cache's shapes (an unreadable file skipped, not a crash), sampled with the
    checkpoint's data.sample_seed unless --seed is given."""
    path = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    content = torch.load(path, weights_only=True)
    content["hyper_parameters"]["sample_seed"] = 2
    torch.save(content, path)
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), test_per_class=4)
    (root / CLASSES[0] / "test" / f"{CLASSES[0]}_9999.off").write_text("not a mesh\n")
    with pytest.warns(UserWarning, match="Skipping unreadable shape file"):
        table = voting.main(["--ckpt", str(path), "--data-root", str(root), "--votes", "1"])
    assert "on 12 test shapes" in table and "seed 2," in table
    classifier = ShapeClassifier.from_checkpoint(path, device="cpu")
    files = voting.test_files(root, CLASSES, classifier.num_points, classifier.sample_seed)
    assert len(files) == 12
    predictions = classifier.predict([file for file, _ in files])  # the checkpoint's seed
    right = sum(p.label == CLASSES[label] for p, (_, label) in zip(predictions, files, strict=True))
    assert f"| 1 | {100 * right / len(files):.2f} |" in table
    assert "seed 0," in voting.main(
        ["--ckpt", str(path), "--data-root", str(root), "--votes", "1", "--seed", "0"]
    )
    # --cache-dir: the caches of a training run that gave --data.cache_dir, not root's.
    caches = tmp_path / "caches"
    with pytest.warns(UserWarning, match="Skipping unreadable shape file"):
        same = voting.main(
            ["--ckpt", str(path), "--data-root", str(root), "--votes", "1",
             "--cache-dir", str(caches)]
        )  # fmt: skip
    assert same.splitlines()[1:] == table.splitlines()[1:]
    assert [cache.name.startswith("test") for cache in caches.glob("*.pt")] == [True]


def test_no_test_shapes_is_one_sentence(voting, tmp_path: Path, make_shape_folder) -> None:
    path = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), test_per_class=0)
    with pytest.raises(SystemExit, match=r"^error: Found no test shapes in "):
        voting.main(["--ckpt", str(path), "--data-root", str(root), "--votes", "1"])
