"""Point clouds with fewer points than the model takes: padded and masked, in training and
in prediction, so that the model sees the cloud itself rather than repeated points."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import trimesh
from _inference_utils import CLASSES, NUM_POINTS, build_tiny_checkpoint

from pointsink.data import ShapeFolderDataModule, build_point_cache, load_point_cache
from pointsink.inference import ShapeClassifier, ShapePredictionDataset, preprocess_views
from pointsink.module import SinkformerClassifier
from pointsink.transforms import (
    PointCloudAugmentation,
    normalize_points,
    preprocess_set,
    preprocess_shape,
)

SMALL = 10  # points of the small cloud, fewer than any num_points below


def _small_cloud(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(SMALL, 3)) * [1.0, 2.0, 0.5] + 7.0


# --- preprocessing ----------------------------------------------------------------------------


def test_a_small_cloud_is_padded_not_repeated() -> None:
    cloud = _small_cloud()
    with pytest.warns(UserWarning, match="only 10 points but 25 were requested; the model takes"):
        points, count = preprocess_set(cloud, 25, seed=3)
    assert count == SMALL and points.shape == (25, 3) and points.dtype == np.float32
    np.testing.assert_array_equal(points[:SMALL], normalize_points(cloud))
    assert (points[SMALL:] == 0).all()


@pytest.mark.parametrize(
    "shape", [trimesh.creation.box(), np.random.default_rng(1).normal(size=(40, 3))]
)
def test_meshes_and_large_clouds_give_the_fixed_size_points(shape: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        points, count = preprocess_set(shape, 25, seed=3)
    assert count == 25
    np.testing.assert_array_equal(points, preprocess_shape(shape, 25, seed=3))


def test_voting_views_augment_only_the_real_points() -> None:
    augmentation = PointCloudAugmentation(max_translation=0.3)  # shuffles and jitters too
    views, count, messages = preprocess_views(
        _small_cloud(), 16, seed=2, votes=3, augmentation=augmentation
    )
    assert count == SMALL and views.shape == (3, 16, 3)
    assert len(messages) == 1 and "only 10 points" in messages[0]
    assert (views[:, SMALL:] == 0).all()
    assert not np.allclose(views[1, :SMALL], views[0, :SMALL])


# --- training -------------------------------------------------------------------------------


def _folder_with_a_small_cloud(root: Path, make_shape_folder) -> Path:
    make_shape_folder(root, class_names=("alpha", "beta"), train_per_class=4, test_per_class=1)
    np.save(root / "alpha" / "train" / "alpha_0099.npy", _small_cloud())
    return root


def test_the_cache_records_counts_and_items_carry_masks(tmp_path, make_shape_folder) -> None:
    root = _folder_with_a_small_cloud(tmp_path / "shapes", make_shape_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = build_point_cache(root, ["alpha", "beta"], "train", 24, cache_dir=tmp_path / "c")
    # One warning for the split, naming the file, not one per file.
    (message,) = [str(w.message) for w in caught if "fewer than" in str(w.message)]
    assert message.startswith("1 of 9 train shapes are point clouds of fewer than 24 points")
    assert "alpha/train/alpha_0099.npy" in message
    assert not any("only 10 points" in str(w.message) for w in caught)
    cache = load_point_cache(path)
    small = cache.paths.index("alpha/train/alpha_0099.npy")
    assert cache.counts[small] == SMALL and (cache.counts[np.arange(9) != small] == 24).all()
    assert (cache.points[small, SMALL:] == 0).all()

    module = ShapeFolderDataModule(
        str(root), num_points=24, batch_size=3, val_fraction=0.0, cache_dir=str(tmp_path / "c")
    )
    module.setup("fit")
    dataset = module.train_dataset
    item = dataset[small]
    assert item["mask"].tolist() == [True] * SMALL + [False] * 14
    # The augmentation moved the real points only: the padding is still zeros, last.
    assert (item["points"][SMALL:] == 0).all() and (item["points"][:SMALL] != 0).all()
    assert all("mask" in dataset[index] for index in range(len(dataset)))
    # Without small clouds no item has a mask: full batches take the unmasked path.
    assert "mask" not in dataset.subset([i for i in range(len(dataset)) if i != small])[0]


def test_fit_with_small_clouds_masks_them(tmp_path, make_shape_folder) -> None:
    root = _folder_with_a_small_cloud(tmp_path / "shapes", make_shape_folder)
    data = ShapeFolderDataModule(
        str(root), num_points=24, batch_size=3, val_fraction=0.0, cache_dir=str(tmp_path / "c")
    )
    model = SinkformerClassifier(
        class_names=["alpha", "beta"],
        num_points=24,
        channels=8,
        num_heads=2,
        num_inducing_points=3,
        num_groups=12,
        group_size=4,
        normalize_offsets=True,
    )
    seen: list[torch.Tensor] = []

    class RecordMasks(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if "mask" in batch:
                seen.append(batch["mask"].sum(dim=1))
            else:
                seen.append(torch.full((len(batch["label"]),), batch["points"].shape[1]))

    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordMasks()],
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model, datamodule=data)
    assert sorted(torch.cat(seen).tolist()) == [SMALL] + [24] * 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- prediction -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> ShapeClassifier:
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    return ShapeClassifier.from_checkpoint(path, device="cpu")


def test_a_small_cloud_is_classified_as_the_cloud_itself(classifier: ShapeClassifier) -> None:
    cloud = _small_cloud()
    (prediction,) = classifier.predict(cloud, top_k=len(CLASSES))
    assert "only 10 points" in prediction.warning and "padded and masked" in prediction.warning
    alone = classifier.predict_probabilities(normalize_points(cloud))[0]
    found = torch.tensor([dict(prediction.topk)[name] for name in CLASSES])
    torch.testing.assert_close(found, alone, rtol=0, atol=1e-6)
    # Filling up by repetition gives other probabilities: the mask is what made them equal.
    repeated = classifier.predict_probabilities(preprocess_shape(cloud, NUM_POINTS, seed=0))[0]
    assert not torch.allclose(repeated, alone, atol=1e-4)


def test_a_chunk_of_small_and_full_inputs_classifies_each_alone(
    classifier: ShapeClassifier,
) -> None:
    small, full = _small_cloud(), np.random.default_rng(5).normal(size=(NUM_POINTS, 3))
    # With votes, a shape's mask must follow each of its views in the flattened batch.
    together = classifier.predict([small, full], top_k=len(CLASSES), votes=3)
    alone = [classifier.predict(cloud, top_k=len(CLASSES), votes=3)[0] for cloud in (small, full)]
    for joint, single in zip(together, alone, strict=True):
        assert dict(joint.topk) == pytest.approx(dict(single.topk), abs=1e-6)


def test_prediction_batches_carry_a_mask_only_when_a_cloud_is_padded(tmp_path: Path) -> None:
    np.save(tmp_path / "small.npy", _small_cloud())
    np.save(tmp_path / "full.npy", np.random.default_rng(5).normal(size=(NUM_POINTS, 3)))
    dataset = ShapePredictionDataset(
        [tmp_path / "small.npy", tmp_path / "full.npy"], num_points=NUM_POINTS
    )
    small, full = dataset[0], dataset[1]
    assert small["mask"].sum() == SMALL and "only 10 points" in small["warning"]
    assert "mask" in ShapePredictionDataset.collate([small, full])
    assert "mask" not in ShapePredictionDataset.collate([full, full])


def test_loaders_give_a_mask_exactly_to_batches_with_a_small_cloud(
    tmp_path, make_shape_folder
) -> None:
    root = _folder_with_a_small_cloud(tmp_path / "shapes", make_shape_folder)
    data = ShapeFolderDataModule(
        str(root), num_points=24, batch_size=2, val_fraction=0.0, cache_dir=str(tmp_path / "c")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data.setup("fit")
    small = data.train_dataset.paths.index(str(root / "alpha" / "train" / "alpha_0099.npy"))
    batches = list(data.train_dataloader())
    assert len(batches) == 5
    for batch in batches:
        # A full batch takes the unmasked path (on CUDA, the Triton sampling kernel).
        assert ("mask" in batch) == (small in batch["index"].tolist())


def test_trainer_predict_classifies_a_small_file_as_the_classifier_does(tmp_path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    np.save(tmp_path / "small.npy", _small_cloud())
    np.save(tmp_path / "full.npy", np.random.default_rng(5).normal(size=(NUM_POINTS, 3)))
    files = [str(tmp_path / "small.npy"), str(tmp_path / "full.npy")]
    data = ShapeFolderDataModule(
        str(tmp_path), class_names=CLASSES, num_points=NUM_POINTS, predict_files=files
    )
    module = SinkformerClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    (batch,) = trainer.predict(module, dataloaders=data.predict_dataloader())
    # Only batches with a padded cloud carry a mask: full ones take the unmasked path.
    full_only = ShapeFolderDataModule(
        str(tmp_path), class_names=CLASSES, num_points=NUM_POINTS, predict_files=files[1:]
    )
    assert "mask" not in next(iter(full_only.predict_dataloader()))
    classifier = ShapeClassifier.from_checkpoint(checkpoint, device="cpu")
    for row, path in enumerate(files):
        (prediction,) = classifier.predict(path, top_k=len(CLASSES))
        expected = torch.tensor([dict(prediction.topk)[name] for name in CLASSES])
        torch.testing.assert_close(batch["probabilities"][row], expected, rtol=0, atol=1e-6)


def test_a_model_without_masks_gets_small_clouds_filled_up(classifier: ShapeClassifier) -> None:
    class PointsOnly(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, points: torch.Tensor) -> torch.Tensor:
            return self.model(points)

    plain = ShapeClassifier(PointsOnly(classifier.model), CLASSES, NUM_POINTS, device="cpu")
    assert classifier.takes_mask and not plain.takes_mask
    cloud = _small_cloud()
    (prediction,) = plain.predict(cloud, top_k=len(CLASSES))
    assert prediction.error is None and "with replacement" in prediction.warning
    repeated = classifier.predict_probabilities(preprocess_shape(cloud, NUM_POINTS, seed=0))[0]
    found = torch.tensor([dict(prediction.topk)[name] for name in CLASSES])
    torch.testing.assert_close(found, repeated, rtol=0, atol=1e-6)
