from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
import time
import urllib.error
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch_geometric.data
import trimesh
from _modelnet10 import MODELNET10_DIR, requires_modelnet10
from pytorch_lightning.trainer.states import TrainerFn

import pointsink.data as data_module
from pointsink.data import (
    MODELNET10_CLASSES,
    MODELNET40_CLASSES,
    DatasetLayoutError,
    DatasetNotFoundError,
    ModelNetDataModule,
    PointCloudDataset,
    ShapeFolderDataModule,
    SyntheticShapesDataModule,
    build_point_cache,
    load_point_cache,
    recorded_split,
    stratified_split,
)
from pointsink.inference import CheckpointError, ShapePredictionDataset, preprocess_views
from pointsink.io import ShapeLoadError
from pointsink.synthetic import SYNTHETIC_CLASSES
from pointsink.transforms import (
    PointCloudAugmentation,
    file_sample_seed,
    preprocess_set,
    preprocess_shape,
)

CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture
def count_preprocessing(monkeypatch):
    """Counts calls of the preprocessing function used by the cache (built in-process).

    The cache loads each file first, so the calls receive loaded shapes, not paths.
    """
    calls: list[object] = []

    def counting(shape, num_points, seed=0, **options):
        calls.append(shape)
        return preprocess_set(shape, num_points, seed=seed, **options)

    monkeypatch.setattr(data_module, "preprocess_set", counting)
    return calls


def _build(root: Path, tmp_path: Path, **kwargs) -> Path:
    options = {"num_points": 32, "cache_dir": tmp_path / "cache", "workers": 1, **kwargs}
    return build_point_cache(root, CLASSES, "train", **options)


def _datamodule(root: Path, tmp_path: Path, **kwargs) -> ShapeFolderDataModule:
    options = {
        "num_points": 32,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
        "preprocess_workers": 1,
        **kwargs,
    }
    return ShapeFolderDataModule(str(root), **options)


# -- cache -------------------------------------------------------------------------------


def test_cache_holds_normalized_points_labels_and_relative_paths(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes")

    cache = load_point_cache(_build(root, tmp_path, sample_seed=2))

    assert cache.points.shape == (12, 32, 3)
    assert cache.points.dtype == torch.float32
    assert cache.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert cache.paths[0] == "alpha/train/alpha_0001.off"
    assert [path.split("/")[0] for path in cache.paths] == [CLASSES[i] for i in cache.labels]
    assert cache.skipped == []
    norms = cache.points.norm(dim=-1).max(dim=1).values
    torch.testing.assert_close(norms, torch.ones(12))
    # Matches the one preprocessing path with the documented per-file seed.
    seed = file_sample_seed(root / cache.paths[5], 2)
    expected = preprocess_shape(root / cache.paths[5], 32, seed=seed)
    np.testing.assert_array_equal(cache.points[5].numpy(), expected)


def test_prediction_sees_the_points_the_cache_holds(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes")
    cache = load_point_cache(_build(root, tmp_path, sample_seed=2))
    paths = [root / relative for relative in cache.paths]

    # pointsink-predict / ShapeClassifier.predict (view 0) and Trainer.predict's dataset.
    for row in (0, 7):
        views, _, _ = preprocess_views(paths[row], 32, seed=2, votes=2)
        np.testing.assert_array_equal(views[0], cache.points[row].numpy())
    dataset = ShapePredictionDataset(paths, 32, seed=2)
    torch.testing.assert_close(torch.stack([item["points"] for item in dataset]), cache.points)
    # Another base seed draws other points.
    other, _, _ = preprocess_views(paths[0], 32, seed=3)
    assert not np.allclose(other[0], cache.points[0].numpy())


def test_file_seed_follows_contents_not_names(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes")
    first, second = root / "alpha/train/alpha_0001.off", root / "alpha/train/alpha_0002.off"
    renamed = tmp_path / "elsewhere.off"
    renamed.write_bytes(first.read_bytes())

    assert file_sample_seed(renamed, 0) == file_sample_seed(first, 0)
    assert file_sample_seed(second, 0) != file_sample_seed(first, 0)
    assert file_sample_seed(first, 1) - file_sample_seed(first, 0) == 2**32
    with pytest.raises(ValueError, match="seed"):
        file_sample_seed(first, -1)


def test_second_build_reuses_the_cache(tmp_path, make_shape_folder, count_preprocessing):
    root = make_shape_folder(tmp_path / "shapes")
    cache_path = _build(root, tmp_path)
    assert len(count_preprocessing) == 12
    mtime = cache_path.stat().st_mtime_ns

    assert _build(root, tmp_path) == cache_path

    assert len(count_preprocessing) == 12
    assert cache_path.stat().st_mtime_ns == mtime


def test_a_changed_gltf_buffer_triggers_a_rebuild(tmp_path, make_shape_folder):
    # A .gltf keeps its vertices in the .bin buffers it names: editing a buffer alone
    # changes the shape, so the cache must not serve the old points.
    root = make_shape_folder(tmp_path / "shapes")
    folder = root / CLASSES[0] / "train"
    exported = trimesh.exchange.gltf.export_gltf(trimesh.Scene(trimesh.creation.box()))
    for name, content in exported.items():
        (folder / (f"{CLASSES[0]}_0100.gltf" if name == "model.gltf" else name)).write_bytes(
            content
        )
    first = _build(root, tmp_path)
    # The same box, stretched: the buffer's bytes change, the .gltf file does not.
    stretched = trimesh.creation.box(extents=(4.0, 1.0, 1.0))
    buffers = trimesh.exchange.gltf.export_gltf(trimesh.Scene(stretched))
    for name, content in buffers.items():
        if name.endswith(".bin"):
            (folder / name).write_bytes(content)
    assert (folder / f"{CLASSES[0]}_0100.gltf").read_bytes() == exported["model.gltf"]
    second = _build(root, tmp_path)
    assert second != first
    index = load_point_cache(second).paths.index(f"{CLASSES[0]}/train/{CLASSES[0]}_0100.gltf")
    points = load_point_cache(second).points[index]
    extent = points.amax(dim=0) - points.amin(dim=0)
    assert extent[0] > 3 * extent[1]


def test_changed_added_or_removed_files_trigger_a_rebuild(
    tmp_path, make_shape_folder, count_preprocessing
):
    root = make_shape_folder(tmp_path / "shapes")
    first = _build(root, tmp_path)
    first_points = load_point_cache(first).points

    touched = root / "beta" / "train" / "beta_0002.off"
    os.utime(touched, ns=(time.time_ns(), touched.stat().st_mtime_ns + 10**9))
    touched_cache = _build(root, tmp_path)
    assert touched_cache != first
    assert not first.exists()  # the outdated cache of this configuration is removed
    assert len(count_preprocessing) == 24
    # Per-file seeds: rebuilding gives the same points.
    torch.testing.assert_close(load_point_cache(touched_cache).points, first_points)

    (root / "beta" / "train" / "beta_0099.off").write_bytes(touched.read_bytes())
    added = load_point_cache(_build(root, tmp_path))
    assert len(added.paths) == 13
    assert "beta/train/beta_0099.off" in added.paths

    (root / "alpha" / "train" / "alpha_0001.off").unlink()
    removed = load_point_cache(_build(root, tmp_path))
    assert len(removed.paths) == 12
    assert "alpha/train/alpha_0001.off" not in removed.paths


def _replace_keeping_size_and_mtime(path: Path) -> None:
    """Changes one digit of ``path``, then restores its mtime, as ``cp -p`` or ``tar`` would.

    Waits until the inode change time differs too (it has the kernel clock's granularity).
    """
    before = path.stat()
    text = path.read_text()
    # The first vertex coordinate's first digit after the decimal point (header is 2 lines).
    start = text.index("\n", text.index("\n") + 1) + 1
    position = text.index(".", start) + 1
    changed = "1" if text[position] != "1" else "2"
    for _ in range(100):
        path.write_text(text[:position] + changed + text[position + 1 :])
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if path.stat().st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.01)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


def test_a_file_replaced_with_its_size_and_mtime_kept_triggers_a_rebuild(
    tmp_path, make_shape_folder, count_preprocessing
):
    root = make_shape_folder(tmp_path / "shapes")
    first = load_point_cache(_build(root, tmp_path))
    replaced = root / "beta" / "train" / "beta_0002.off"
    row = first.paths.index("beta/train/beta_0002.off")

    _replace_keeping_size_and_mtime(replaced)
    rebuilt = load_point_cache(_build(root, tmp_path))

    assert len(count_preprocessing) == 24  # not the stale cache
    expected = preprocess_shape(replaced, 32, seed=file_sample_seed(replaced, 0))
    np.testing.assert_array_equal(rebuilt.points[row].numpy(), expected)
    assert not torch.equal(rebuilt.points[row], first.points[row])


def test_datasets_sharing_a_cache_dir_keep_their_own_caches(
    tmp_path, make_shape_folder, count_preprocessing
):
    first_root = make_shape_folder(tmp_path / "first", seed=0)
    second_root = make_shape_folder(tmp_path / "second", seed=1)  # same classes and names
    first = _build(first_root, tmp_path)
    second = _build(second_root, tmp_path)
    assert first != second
    assert first.exists() and second.exists()
    assert len(count_preprocessing) == 24

    # Each reuses its own cache, with its own points.
    assert _build(first_root, tmp_path) == first
    assert _build(second_root, tmp_path) == second
    assert len(count_preprocessing) == 24
    assert not torch.equal(load_point_cache(first).points, load_point_cache(second).points)

    # A rebuild of one root removes its own outdated cache only.
    (first_root / "alpha" / "train" / "alpha_0001.off").unlink()
    updated = _build(first_root, tmp_path)
    assert not first.exists()
    assert updated.exists() and second.exists()


def test_a_cache_from_before_root_hashed_names_is_rebuilt_once(
    tmp_path, make_shape_folder, count_preprocessing
):
    root = make_shape_folder(tmp_path / "shapes")
    cache_dir = root / "processed"  # the default: the dataset's own cache folder
    current = _build(root, tmp_path, cache_dir=cache_dir)
    # The name the previous version gave it: no root hash, the fingerprint without ctime.
    split, points, config, _, _ = current.stem.split("-")
    legacy = cache_dir / f"{split}-{points}-{config}-{'0' * 16}.pt"
    current.rename(legacy)

    rebuilt = _build(root, tmp_path, cache_dir=cache_dir)
    assert rebuilt == current
    assert len(count_preprocessing) == 24
    assert not legacy.exists()  # the outdated cache of the dataset's own folder is gone
    assert _build(root, tmp_path, cache_dir=cache_dir) == current
    assert len(count_preprocessing) == 24
    assert load_point_cache(current).points.shape == (12, 32, 3)


def test_other_settings_get_their_own_cache(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes")
    default = _build(root, tmp_path)
    other_seed = _build(root, tmp_path, sample_seed=1)
    more_points = _build(root, tmp_path, num_points=64)

    assert len({default, other_seed, more_points}) == 3
    assert all(path.exists() for path in (default, other_seed, more_points))
    assert not torch.equal(load_point_cache(default).points, load_point_cache(other_seed).points)


def test_concurrent_builds_are_serialized(tmp_path, make_shape_folder, monkeypatch):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=2)
    calls: list[str] = []

    def slow(path, num_points, seed=0, **options):
        calls.append(str(path))
        time.sleep(0.01)  # widen the window in which the two builds would overlap
        return preprocess_set(path, num_points, seed=seed, **options)

    monkeypatch.setattr(data_module, "preprocess_set", slow)
    results: list[Path] = []
    # flock locks belong to open file descriptions, so threads exclude each other too.
    threads = [
        threading.Thread(target=lambda: results.append(_build(root, tmp_path))) for _ in "ab"
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results[0] == results[1]
    assert len(calls) == 6  # built once
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"] == [
        results[0].name
    ]


def test_parallel_build_matches_in_process_build(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=4)
    serial = load_point_cache(_build(root, tmp_path, cache_dir=tmp_path / "serial"))
    parallel = load_point_cache(_build(root, tmp_path, cache_dir=tmp_path / "parallel", workers=2))

    assert parallel.paths == serial.paths
    torch.testing.assert_close(parallel.points, serial.points)


def test_malformed_files_are_skipped_with_a_warning_naming_each(
    tmp_path, make_shape_folder, monkeypatch
):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=3)
    bad = {
        root / "alpha" / "train" / "alpha_0901.off": "OFF\n8 12 0\n0 0 0\n",
        root / "beta" / "train" / "beta_0902.off": "",
        root / "gamma" / "train" / "gamma_0903.off": "these are my notes, not a mesh\n",
    }
    for path, content in bad.items():
        path.write_text(content)
    datamodule = _datamodule(root, tmp_path, val_fraction=0.0)

    with pytest.warns(UserWarning) as record:
        datamodule.prepare_data()

    messages = [str(warning.message) for warning in record]
    for path in bad:
        assert sum(str(path) in message for message in messages) == 1, path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the files were just reported: no second warning
        datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 9
    assert not set(map(str, bad)) & set(datamodule.train_dataset.paths)
    # A process that only reuses the cache gets the news once, as a summary.
    monkeypatch.setattr(data_module, "_REPORTED_CACHES", set())
    with pytest.warns(UserWarning, match="3 train file") as record:
        _datamodule(root, tmp_path, val_fraction=0.0).setup("fit")
    assert all(str(path) in str(record[0].message) for path in bad)


# -- datasets and data modules ------------------------------------------------------------


def test_point_cloud_dataset_items_and_transform():
    points = torch.randn(5, 8, 3)
    dataset = PointCloudDataset(points, torch.arange(5), [f"f{i}.off" for i in range(5)])

    item = dataset[3]
    assert torch.equal(item["points"], points[3])
    assert item["label"].dtype == torch.int64
    assert item["label"].item() == 3
    assert item["index"] == 3

    def in_place(p):
        return p.mul_(2)

    doubled = PointCloudDataset(points, torch.arange(5), dataset.paths, transform=in_place)
    torch.testing.assert_close(doubled[1]["points"], 2 * points[1])
    torch.testing.assert_close(doubled[1]["points"], 2 * points[1])  # the cache is intact

    with pytest.raises(ValueError, match="must match"):
        PointCloudDataset(points, torch.arange(4), dataset.paths)


def test_stratified_split_properties():
    labels = np.repeat([0, 1, 2], [10, 20, 3])

    train, val = stratified_split(labels, 0.2, seed=0)

    assert set(train).isdisjoint(val)
    assert sorted([*train, *val]) == list(range(len(labels)))
    assert np.bincount(labels[val]).tolist() == [2, 4, 1]
    again_train, again_val = stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=1)[1])
    assert len(stratified_split(labels, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        stratified_split(labels, 1.0, seed=0)


@pytest.mark.parametrize(
    ("stage", "recorded", "outcome"),
    [
        (TrainerFn.FITTING, (0.1, 1), "refused"),
        (TrainerFn.FITTING, (0.2, 0), "refused"),
        (TrainerFn.VALIDATING, (0.1, 1), "warned"),
        (TrainerFn.TESTING, (0.1, 1), "accepted"),
        (TrainerFn.FITTING, (0.1, 0), "accepted"),
    ],
)
def test_restored_split_is_checked_by_stage(stage, recorded, outcome):
    data = ShapeFolderDataModule("unused", class_names=["a", "b"], val_fraction=0.1)
    data.trainer = SimpleNamespace(state=SimpleNamespace(fn=stage))  # what Lightning sets
    saved = dict(zip(("val_fraction", "split_seed"), recorded, strict=True))
    if outcome == "refused":
        with pytest.raises(CheckpointError, match="resuming would validate on shapes"):
            data.load_state_dict(saved)
    elif outcome == "warned":
        with pytest.warns(UserWarning, match="may be shapes the model was trained on"):
            data.load_state_dict(saved)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            data.load_state_dict(saved)
    assert recorded_split({"ShapeFolderDataModule": data.state_dict()}) == (0.1, 0)


def _fitting(datamodule: ShapeFolderDataModule, stage=TrainerFn.FITTING) -> ShapeFolderDataModule:
    datamodule.trainer = SimpleNamespace(state=SimpleNamespace(fn=stage))  # what Lightning sets
    datamodule.setup("fit")  # Lightning calls setup before restoring the checkpoint
    return datamodule


def _recorded_state(root: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    datamodule = _datamodule(root, tmp_path, val_fraction=0.25)
    datamodule.setup("fit")
    return datamodule.state_dict(), datamodule.val_dataset.paths


def test_resuming_after_a_training_file_was_added_is_refused(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=8)
    state, val_paths = _recorded_state(root, tmp_path)
    assert len(state["val_files"]) == 6
    assert state["val_files"] == sorted(
        Path(path).relative_to(root).as_posix() for path in val_paths
    )

    # Sorts first, so the positions the split picks now hold other files.
    first = root / "alpha" / "train" / "alpha_0001.off"
    shutil.copyfile(first, root / "alpha" / "train" / "alpha_0000.off")
    resumed = _fitting(_datamodule(root, tmp_path, val_fraction=0.25))
    assert resumed.val_dataset.paths != val_paths

    with pytest.raises(CheckpointError, match="validation split differs") as error:
        resumed.load_state_dict(state)
    message = str(error.value)
    assert "validation split differs from the checkpoint's in 2 files" in message
    assert "1 of the checkpoint's 6 left it and 1 joined it" in message
    assert "adding, removing or no longer being able to read training files" in message
    assert "resuming would validate on shapes the run has trained on" in message

    with pytest.warns(UserWarning, match="may be shapes the model was trained on"):
        _fitting(
            _datamodule(root, tmp_path, val_fraction=0.25), TrainerFn.VALIDATING
        ).load_state_dict(state)


def test_resuming_with_the_same_files_passes_even_after_the_folder_moved(
    tmp_path, make_shape_folder
):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=8)
    state, _ = _recorded_state(root, tmp_path)
    moved = tmp_path / "elsewhere" / "shapes"
    shutil.copytree(root, moved)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for folder in (root, moved):
            _fitting(_datamodule(folder, tmp_path, val_fraction=0.25)).load_state_dict(state)


def test_checkpoint_without_recorded_validation_files_is_accepted(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=8)
    state, _ = _recorded_state(root, tmp_path)
    older = {"val_fraction": state["val_fraction"], "split_seed": state["split_seed"]}
    (root / "alpha" / "train" / "alpha_0001.off").unlink()  # the split changes

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fitting(_datamodule(root, tmp_path, val_fraction=0.25)).load_state_dict(older)
    assert recorded_split({"ShapeFolderDataModule": state}) == (0.25, 0)


def test_resuming_with_another_validation_turn_is_refused(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=8)
    state, _ = _recorded_state(root, tmp_path)
    assert state["eval_rotation_degrees"] == 0.0

    turned = _datamodule(root, tmp_path, val_fraction=0.25, eval_rotation_degrees=180.0)
    with pytest.raises(CheckpointError, match=r"validated with eval_rotation_degrees=0\.0"):
        _fitting(turned).load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Scoring a checkpoint on turned shapes is what the option is for.
        _fitting(
            _datamodule(root, tmp_path, val_fraction=0.25, eval_rotation_degrees=180.0),
            TrainerFn.VALIDATING,
        ).load_state_dict(state)
        # Checkpoints written before the turn was recorded were all upright; accepted.
        older = {key: value for key, value in state.items() if key != "eval_rotation_degrees"}
        _fitting(
            _datamodule(root, tmp_path, val_fraction=0.25, eval_rotation_degrees=180.0)
        ).load_state_dict(older)


def test_root_and_cache_dir_may_start_with_the_home_folder(
    tmp_path, make_shape_folder, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_shape_folder(tmp_path / "shapes")
    data = _datamodule(Path("~/shapes"), tmp_path)
    assert data.root == tmp_path / "shapes"
    assert data.class_names == CLASSES
    assert _datamodule(tmp_path / "shapes", tmp_path, cache_dir="~/cache").cache_dir == (
        tmp_path / "cache"
    )


def test_a_cache_file_gets_the_mode_of_a_plain_new_file(tmp_path, make_shape_folder):
    # A group-shared dataset (umask 002): a private (0600) cache would stop the group's
    # other users, who are sent to the same processed/ folder, at torch.load.
    root = make_shape_folder(tmp_path / "shapes")
    previous = os.umask(0o002)
    try:
        cache = _build(root, tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o664


def test_without_validation_the_split_seed_does_not_matter():
    data = ShapeFolderDataModule("unused", class_names=["a", "b"], val_fraction=0.0)
    data.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    data.load_state_dict({"val_fraction": 0.0, "split_seed": 7})  # no validation shapes either way


def test_datamodule_splits_and_loaders(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=10, test_per_class=3)
    (root / "processed").mkdir()  # not a class folder: no train/test inside
    datamodule = _datamodule(root, tmp_path, val_fraction=0.2, split_seed=1, batch_size=7)
    assert datamodule.class_names == CLASSES
    assert datamodule.num_classes == 3

    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    train, val, test = datamodule.train_dataset, datamodule.val_dataset, datamodule.test_dataset

    assert (len(train), len(val), len(test)) == (24, 6, 9)
    assert set(train.paths).isdisjoint(val.paths)
    assert all("/train/" in path for path in train.paths + val.paths)
    assert all("/test/" in path for path in test.paths)
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    # Same seed, same split; another seed, another split.
    same = _datamodule(root, tmp_path, val_fraction=0.2, split_seed=1)
    same.setup("fit")
    assert same.val_dataset.paths == val.paths
    other = _datamodule(root, tmp_path, val_fraction=0.2, split_seed=2)
    other.setup("fit")
    assert other.val_dataset.paths != val.paths

    batch = next(iter(datamodule.train_dataloader()))
    assert batch["points"].shape == (7, 32, 3)
    assert batch["points"].dtype == torch.float32
    assert batch["label"].dtype == batch["index"].dtype == torch.int64
    assert batch["label"].shape == batch["index"].shape == (7,)
    # Training samples are augmented, evaluation samples are served as cached.
    for i in range(7):
        cached = train.points[batch["index"][i]]
        assert not torch.allclose(batch["points"][i], cached)
        assert batch["label"][i] == train.labels[batch["index"][i]]
    val_batch = next(iter(datamodule.val_dataloader()))
    assert val_batch["index"].tolist() == list(range(6))
    torch.testing.assert_close(val_batch["points"], val.points)
    assert sum(len(b["label"]) for b in datamodule.test_dataloader()) == 9


def test_augmentation_settings_reach_the_training_set(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes")
    plain = _datamodule(root, tmp_path, augment=False, val_fraction=0.0)
    plain.setup("fit")
    assert plain.train_dataset.transform is None

    # What checkpoints record for voting: without augmentation, the identity.
    points = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    identity = PointCloudAugmentation(**plain.augmentation_settings)
    torch.testing.assert_close(identity(points), points)

    tuned = _datamodule(root, tmp_path, up_axis=1, jitter_sigma=0.0, shuffle_points=False)
    assert tuned.augmentation.up_axis == 1
    assert tuned.augmentation.jitter_sigma == 0.0
    assert tuned.augmentation.shuffle is False
    assert tuned.augmentation_settings == tuned.augmentation.settings()
    assert PointCloudAugmentation(**tuned.augmentation_settings).settings()["up_axis"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_points": 1}, "num_points must be at least 2; got 1"),
        ({"val_fraction": 1.0}, r"val_fraction must be a number in \[0, 1\)"),
        ({"val_fraction": -0.1}, r"val_fraction must be a number in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"class_names": []}, "non-empty"),
        ({"scale_low": 0.0}, "scale_low"),
    ],
)
def test_invalid_arguments_raise_clear_errors(tmp_path, make_shape_folder, kwargs, message):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=1, test_per_class=0)
    with pytest.raises(ValueError, match=message):
        _datamodule(root, tmp_path, **kwargs)


def test_numpy_integers_are_kept_as_python_ints(tmp_path, make_shape_folder):
    # num_points goes into the model's hyperparameters, which must load weights-only.
    root = make_shape_folder(tmp_path / "shapes", train_per_class=1, test_per_class=0)
    datamodule = _datamodule(root, tmp_path, num_points=np.int64(64), batch_size=np.int32(4))
    assert type(datamodule.num_points) is int and datamodule.num_points == 64
    assert type(datamodule.batch_size) is int


def test_a_wrong_root_for_testing_leaves_nothing_behind(tmp_path):
    # Testing a mistyped root with given classes: one clear error, and no processed/ folder
    # (it held an empty cache, and stopped a later ModelNet download into that folder).
    root = tmp_path / "typo"
    datamodule = ShapeFolderDataModule(str(root), class_names=["mug"], preprocess_workers=1)
    with pytest.raises(DatasetLayoutError, match="Found no test shapes"):
        datamodule.setup("test")
    datamodule.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.TESTING))
    with pytest.raises(DatasetLayoutError, match="Found no test shapes"):
        datamodule.prepare_data()
    assert not root.exists()


def test_testing_a_split_whose_files_are_all_unreadable_says_so(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes", class_names=("mug",), train_per_class=1)
    for path in (root / "mug" / "test").iterdir():
        path.write_text("OFF\nnot numbers\n")
    datamodule = _datamodule(root, tmp_path)
    with pytest.warns(UserWarning, match="Skipping unreadable"):
        with pytest.raises(DatasetLayoutError, match=r"None of the test shapes .* could be read"):
            datamodule.setup("test")


@pytest.mark.parametrize("name", ["ModelNet10.zip", "notes.txt"])
def test_a_file_as_root_is_refused_up_front(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not a folder")
    with pytest.raises(DatasetLayoutError, match="is a file, not a folder") as error:
        ModelNetDataModule(str(path), class_names=["chair"])
    assert ("extracted into" in str(error.value)) == name.endswith(".zip")
    with pytest.raises(DatasetLayoutError, match="is a file, not a folder"):
        ShapeFolderDataModule(str(path), class_names=["mug"])


def test_synthetic_counts_and_seed_are_kept_as_python_ints(tmp_path):
    # NumPy integers reached the JSON manifest, written after every shape was generated.
    datamodule = SyntheticShapesDataModule(
        str(tmp_path / "synthetic"), train_per_class=np.int64(1), test_per_class=np.int64(0),
        generation_seed=np.int64(3), class_names=["box"], num_points=32, preprocess_workers=1,
    )  # fmt: skip
    assert type(datamodule.train_per_class) is int and type(datamodule.generation_seed) is int
    datamodule.prepare_data()


def test_a_passing_read_error_is_tried_again_before_the_file_is_skipped(
    tmp_path, make_shape_folder, monkeypatch
):
    # A file that failed once with EIO (an NFS hiccup) stayed out of the cache, which is
    # reused as long as the files do not change. Lasting errors are not tried again.
    root = make_shape_folder(tmp_path / "shapes", class_names=("mug",), train_per_class=3,
                             test_per_class=0)  # fmt: skip
    flaky, broken, locked = sorted(str(path) for path in (root / "mug" / "train").iterdir())
    calls = {flaky: 0, broken: 0, locked: 0}
    real = data_module.load_for_sampling

    def reading(path, seed):
        calls[path] += 1
        if path == flaky and calls[path] == 1:
            raise ShapeLoadError(f"{path}: cannot be read") from OSError(errno.EIO, "I/O error")
        if path == broken:
            raise OSError(errno.EIO, "I/O error", path)
        if path == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, seed)

    monkeypatch.setattr(data_module, "load_for_sampling", reading)
    with pytest.warns(UserWarning, match="Skipping unreadable"):
        cache = load_point_cache(
            build_point_cache(root, ["mug"], "train", 32, cache_dir=tmp_path / "c", workers=1)
        )
    assert cache.paths == [Path(flaky).relative_to(root).as_posix()]
    assert calls == {flaky: 2, broken: data_module.READ_ATTEMPTS, locked: 1}


def test_root_without_class_folders_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"<class>/train or <class>/test") as error:
        ShapeFolderDataModule(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(error.value)

    (tmp_path / "empty" / "chair" / "train").mkdir(parents=True)
    datamodule = _datamodule(tmp_path / "empty", tmp_path)
    with pytest.raises(ValueError, match="no training shapes"):
        datamodule.prepare_data()


def test_any_file_name_is_a_shape_and_other_kinds_are_named(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes", class_names=("mug", "vase"))
    vases = sorted((root / "vase" / "train").iterdir())
    for number, path in enumerate(vases):
        path.rename(path.with_name(f"scan {number}{path.suffix}"))  # not ModelNet's names
    hidden = root / "vase" / "train" / f"._scan 0{vases[0].suffix}"  # macOS metadata
    hidden.write_bytes(b"\x00\x05\x16\x07")
    datamodule = _datamodule(root, tmp_path, val_fraction=0.0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    paths = datamodule.train_dataset.paths
    assert sum("/vase/train/scan " in path for path in paths) == 4 and len(paths) == 8

    for path in (root / "vase" / "train").iterdir():
        path.rename(path.with_name(path.name + ".bak"))  # no supported extension left
    with pytest.raises(ValueError, match=r"for the classes \['vase'\]") as error:
        _datamodule(root, tmp_path).prepare_data()
    assert "vase/train has 4 files, none with a supported extension (e.g. " in str(error.value)


def test_shapes_in_sub_folders_are_named_as_not_read(tmp_path, make_shape_folder):
    root = make_shape_folder(tmp_path / "shapes", class_names=("mug", "vase"))
    scans = root / "vase" / "train" / "scans 2025" / "left"
    scans.mkdir(parents=True)
    first = sorted((root / "vase" / "train").glob("*.off"))[0]
    first.rename(scans / first.name)
    (root / "mug" / "train" / "notes").mkdir()  # no shapes in it: not named
    (root / "mug" / "train" / "notes" / "readme.md").write_text("measured by hand")
    with pytest.warns(UserWarning, match="Shape files in sub-folders are not read") as caught:
        _datamodule(root, tmp_path, val_fraction=0.0).prepare_data()
    message = next(str(w.message) for w in caught if "sub-folders" in str(w.message))
    assert "vase/train/scans 2025" in message and "notes" not in message
    assert "directly in <class>/train" in message


def test_read_only_root_gets_a_user_cache_dir(tmp_path, make_shape_folder, monkeypatch):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=1, test_per_class=0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_module.default_cache_dir(root) == root / "processed"

    root.chmod(0o555)
    try:
        fallback = data_module.default_cache_dir(root)
    finally:
        root.chmod(0o755)
    assert fallback.parent == tmp_path / "xdg" / "pointsink"
    assert fallback.name.startswith("shapes-")


# -- ModelNet -----------------------------------------------------------------------------


def test_modelnet_class_lists_are_known_without_data(tmp_path):
    modelnet10 = ModelNetDataModule(root=str(tmp_path / "nothing"))
    modelnet40 = ModelNetDataModule(name="ModelNet40", root=str(tmp_path / "nothing"))

    assert modelnet10.class_names == list(MODELNET10_CLASSES) == sorted(MODELNET10_CLASSES)
    assert len(MODELNET10_CLASSES) == 10
    assert modelnet40.class_names == sorted(MODELNET40_CLASSES)
    assert len(set(MODELNET40_CLASSES)) == 40
    assert {"night_stand", "flower_pot", "glass_box", "range_hood", "tv_stand", "xbox"} <= set(
        MODELNET40_CLASSES
    )
    assert set(MODELNET10_CLASSES) <= set(MODELNET40_CLASSES)
    assert ModelNetDataModule().root == Path("data/ModelNet10")
    assert modelnet40.url.endswith("ModelNet40.zip")
    with pytest.raises(ValueError, match="ModelNet10"):
        ModelNetDataModule(name="ModelNet20")
    with pytest.raises(ValueError, match="not ModelNet10 classes"):
        ModelNetDataModule(class_names=["chair", "airplane"])


def test_modelnet_offline_raises_dataset_not_found(tmp_path, monkeypatch):
    def offline(url, folder, log=True, filename=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch_geometric.data, "download_url", offline)
    root = tmp_path / "data" / "ModelNet10"
    datamodule = ModelNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"))

    with pytest.raises(DatasetNotFoundError) as error:
        datamodule.prepare_data()

    message = str(error.value)
    assert "\n" not in message
    assert datamodule.url in message
    assert str(root) in message
    assert str(tmp_path / "data" / "ModelNet10.zip") in message
    assert not list((tmp_path / "data").glob("*.part"))


def test_modelnet_on_a_folder_of_other_classes_points_to_shape_folders(
    tmp_path, monkeypatch, make_shape_folder
):
    requested: list[str] = []
    monkeypatch.setattr(
        torch_geometric.data, "download_url", lambda url, *args, **kwargs: requested.append(url)
    )
    own = make_shape_folder(tmp_path / "mine", class_names=("mug", "vase"), train_per_class=2)
    with pytest.raises(DatasetLayoutError, match=r"\(mug, vase\).*ShapeFolderDataModule"):
        ModelNetDataModule(root=str(own), cache_dir=str(tmp_path / "cache")).prepare_data()

    cluttered = tmp_path / "cluttered"
    cluttered.mkdir()
    (cluttered / "notes.txt").write_text("not a dataset")
    with pytest.raises(DatasetNotFoundError, match="holds other files"):
        ModelNetDataModule(root=str(cluttered), cache_dir=str(tmp_path / "cache")).prepare_data()
    assert requested == []  # neither started a download


def test_modelnet_folder_with_only_test_splits_is_tested_without_download(
    tmp_path, monkeypatch, make_shape_folder
):
    requested: list[str] = []
    monkeypatch.setattr(
        torch_geometric.data, "download_url", lambda url, *args, **kwargs: requested.append(url)
    )
    root = make_shape_folder(tmp_path / "ModelNet10", class_names=("bed", "chair"))
    for train in root.glob("*/train"):
        shutil.rmtree(train)  # the test split alone, as shared for evaluation
    datamodule = ModelNetDataModule(
        root=str(root), class_names=["bed", "chair"], num_points=16,
        cache_dir=str(tmp_path / "cache"), preprocess_workers=1,
    )  # fmt: skip
    datamodule.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.TESTING))
    datamodule.prepare_data()
    datamodule.setup("test")
    assert len(datamodule.test_dataset) == 4 and requested == []
    datamodule.trainer.state.fn = TrainerFn.FITTING  # fitting on it names what is missing
    with pytest.raises(DatasetLayoutError, match="Found no training shapes"):
        datamodule.prepare_data()


def test_modelnet_download_is_extracted_into_root(tmp_path, monkeypatch, make_shape_folder):
    source = make_shape_folder(
        tmp_path / "source", class_names=("bed", "chair"), train_per_class=3, test_per_class=1
    )
    requested: list[str] = []

    def fake_download(url, folder, log=True, filename=None):
        requested.append(url)
        archive = Path(folder) / (filename or url.rpartition("/")[2])
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in source.rglob("*.off"):
                zipped.write(path, f"ModelNet10/{path.relative_to(source).as_posix()}")
            zipped.writestr("__MACOSX/ignored", "")
        return str(archive)

    monkeypatch.setattr(torch_geometric.data, "download_url", fake_download)
    root = tmp_path / "data" / "ModelNet10"
    datamodule = ModelNetDataModule(
        root=str(root),
        class_names=["bed", "chair"],
        num_points=16,
        val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
        preprocess_workers=1,
    )

    datamodule.prepare_data()
    datamodule.setup("test")

    assert requested == [datamodule.url]
    assert (root / "chair" / "train" / "chair_0001.off").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ModelNet10"]
    assert len(datamodule.test_dataset) == 2
    datamodule.prepare_data()  # data present now: no second download
    assert len(requested) == 1


@requires_modelnet10
def test_real_modelnet10_folder(tmp_path):
    datamodule = ModelNetDataModule(root=str(MODELNET10_DIR), cache_dir=str(tmp_path))
    assert datamodule.class_names == sorted(p.name for p in MODELNET10_DIR.iterdir() if p.is_dir())

    files = data_module.find_shape_files(MODELNET10_DIR, datamodule.class_names, "test")
    for path, _ in files[:: len(files) // 5][:5]:
        points = preprocess_shape(path, 256, seed=0)
        assert points.shape == (256, 3)
        assert np.linalg.norm(points, axis=1).max() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-5)


# -- synthetic ----------------------------------------------------------------------------


def test_synthetic_datamodule_end_to_end(tmp_path):
    datamodule = SyntheticShapesDataModule(
        root=str(tmp_path / "synthetic"),
        train_per_class=3,
        test_per_class=1,
        num_points=16,
        batch_size=64,
        val_fraction=0.34,
        preprocess_workers=1,
    )
    assert datamodule.class_names == list(SYNTHETIC_CLASSES)
    assert SyntheticShapesDataModule().root == Path("data/synthetic")

    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")

    classes = len(SYNTHETIC_CLASSES)
    assert (tmp_path / "synthetic" / "processed").is_dir()
    assert len(datamodule.train_dataset) == 2 * classes
    assert sorted(datamodule.val_dataset.labels.tolist()) == list(range(classes))
    assert len(datamodule.test_dataset) == classes
    batch = next(iter(datamodule.train_dataloader()))
    assert sorted(batch["label"].tolist()) == sorted(list(range(classes)) * 2)


# -- what the loaders serve (found missing by a mutation run) ------------------------------


def test_stratified_split_rounds_the_validation_share():
    _, val = stratified_split(np.zeros(7, dtype=np.int64), 0.4, seed=0)
    assert len(val) == 3  # 0.4 x 7 = 2.8 rounds to 3, not down to 2


def test_labels_follow_their_files_when_a_file_is_skipped(tmp_path, make_shape_folder):
    # An unreadable training file is left out; the labels of the files after it must not
    # shift onto their neighbours.
    root = make_shape_folder(tmp_path / "shapes")
    (root / "alpha" / "train" / "alpha_0002.off").write_text("not a mesh\n")
    datamodule = _datamodule(root, tmp_path, val_fraction=0.0)
    with pytest.warns(UserWarning, match="alpha_0002"):
        datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 11
    for path, label in zip(
        datamodule.train_dataset.paths, datamodule.train_dataset.labels.tolist(), strict=True
    ):
        assert Path(path).parent.parent.name == CLASSES[label], path


def test_a_class_whose_training_files_are_all_unreadable_is_an_error(tmp_path, make_shape_folder):
    # Its folder has files, so the layout check passes; the model must not get an output
    # for a class it never trains on.
    root = make_shape_folder(tmp_path / "shapes")
    for path in (root / "beta" / "train").iterdir():
        path.write_text("not a mesh\n")
    datamodule = _datamodule(root, tmp_path, val_fraction=0.0)
    with (
        pytest.warns(UserWarning, match="beta_0001"),
        pytest.raises(DatasetLayoutError, match=r"training shapes of the classes \['beta'\]"),
    ):
        datamodule.setup("fit")


def test_training_batches_are_shuffled_and_test_batches_are_not_augmented(
    tmp_path, make_shape_folder
):
    root = make_shape_folder(tmp_path / "shapes", train_per_class=6, test_per_class=3)
    datamodule = _datamodule(root, tmp_path, val_fraction=0.0, batch_size=32)
    datamodule.setup("fit")
    torch.manual_seed(0)
    order = next(iter(datamodule.train_dataloader()))["index"].tolist()
    assert sorted(order) == list(range(18)) and order != list(range(18))
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    torch.testing.assert_close(batch["points"], datamodule.test_dataset.points[batch["index"]])


def test_eval_rotation_turns_validation_and_test_shapes_once(tmp_path, make_shape_folder):
    # `test --data.eval_rotation_degrees 180` scores shapes facing any way: each validation
    # and test shape turned about the up axis by its own fixed angle; training shapes not.
    root = make_shape_folder(tmp_path / "shapes", train_per_class=5, test_per_class=3)
    upright = _datamodule(root, tmp_path, val_fraction=0.2, up_axis=1)
    turned = _datamodule(root, tmp_path, val_fraction=0.2, up_axis=1, eval_rotation_degrees=180)
    for data in (upright, turned):
        data.setup("fit")
        data.setup("test")
    torch.testing.assert_close(turned.train_dataset.points, upright.train_dataset.points)
    for split in ("val_dataset", "test_dataset"):
        before, after = getattr(upright, split).points, getattr(turned, split).points
        # About the up axis (y here): heights and horizontal distances kept, shapes moved.
        torch.testing.assert_close(after[..., 1], before[..., 1], atol=0, rtol=0)
        torch.testing.assert_close(after.norm(dim=-1), before.norm(dim=-1))
        moved = (after - before).norm(dim=-1).amax(dim=-1)
        assert bool((moved > 1e-3).all()), moved
        # One angle per shape: the horizontal angle of every point moved by the same amount.
        angles = torch.atan2(after[..., 2], after[..., 0]) - torch.atan2(
            before[..., 2], before[..., 0]
        )
        turn = torch.polar(torch.ones_like(angles), angles)
        torch.testing.assert_close(turn, turn[:, :1].expand_as(turn), atol=1e-4, rtol=0)
        assert len({round(float(a), 4) for a in turn[:, 0].angle()}) == len(after)
        batch = next(
            iter(turned.val_dataloader() if split == "val_dataset" else turned.test_dataloader())
        )
        torch.testing.assert_close(batch["points"], after[batch["index"]])
    # The same settings turn the same shapes the same way.
    again = _datamodule(root, tmp_path, val_fraction=0.2, up_axis=1, eval_rotation_degrees=180)
    again.setup("test")
    torch.testing.assert_close(again.test_dataset.points, turned.test_dataset.points)
    with pytest.raises(ValueError, match=r"eval_rotation_degrees must be a number in \[0, 180\]"):
        _datamodule(root, tmp_path, eval_rotation_degrees=-5)


def test_predict_loader_samples_a_file_as_the_cache_did(tmp_path, make_shape_folder):
    # data.sample_seed, not seed 0: `train.py predict` scores the points `test` scores.
    root = make_shape_folder(tmp_path / "shapes")
    path = str(root / "beta" / "train" / "beta_0002.off")
    datamodule = _datamodule(root, tmp_path, val_fraction=0.0, sample_seed=5, predict_files=[path])
    datamodule.setup("fit")
    cached = datamodule.train_dataset.points[datamodule.train_dataset.paths.index(path)]
    batch = next(iter(datamodule.predict_dataloader()))
    torch.testing.assert_close(batch["points"][0], cached)


def test_a_reused_data_module_augments_each_fit_afresh(tmp_path, make_shape_folder) -> None:
    # Two fits with the same seed (a notebook, an in-process sweep) draw the same
    # augmentations; the second used to continue the first fit's stream.
    root = make_shape_folder(tmp_path / "shapes", train_per_class=2, test_per_class=0)
    datamodule = ShapeFolderDataModule(
        str(root), num_points=16, val_fraction=0.0, preprocess_workers=1
    )

    def first_fit_samples() -> torch.Tensor:
        datamodule.setup("fit")  # as Lightning does at the start of every fit
        torch.manual_seed(0)
        dataset = datamodule.train_dataloader().dataset
        return torch.stack([dataset[index]["points"] for index in range(4)])

    first = first_fit_samples()
    torch.testing.assert_close(first_fit_samples(), first, rtol=0, atol=0)
