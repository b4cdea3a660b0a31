"""The shipped checkpoints: they load safely, match their configs and reproduce their accuracy."""

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from _modelnet10 import MODELNET10_DIR, requires_modelnet10

from pointsink.cli import main
from pointsink.inference import CheckpointError
from pointsink.model import SetSinkformer
from pointsink.module import SinkformerClassifier

REPO = Path(__file__).resolve().parents[1]

# checkpoint -> (its config, [(extra `test` arguments, test OA, test mAcc, how the README
# states them), ...])
SHIPPED = {
    "modelnet10-sinkformer.ckpt": ("modelnet10.yaml", [
        ((), 0.9295, 0.9271,
         "Overall test accuracy **{oa} %**, mean per-class accuracy **{macc} %**"),
    ]),
    "modelnet10-cpu-sinkformer.ckpt": ("modelnet10-cpu.yaml", [
        ((), 0.8987, 0.8919, "Reproduce its numbers ({oa} % OA, {macc} % mAcc)"),
    ]),
    "modelnet10-anyfacing-sinkformer.ckpt": ("modelnet10-anyfacing.yaml", [
        ((), 0.9020, 0.8940,
         "upright test shapes: **{oa} %** OA, **{macc} %** mAcc"),
        (("--data.eval_rotation_degrees", "180"), 0.9031, 0.8952,
         "each test shape turned by its own random angle: **{oa} %** OA, **{macc} %** mAcc"),
    ]),
}  # fmt: skip
EVALUATIONS = [
    (name, index) for name, (_, runs) in sorted(SHIPPED.items()) for index in range(len(runs))
]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_matches_its_config(name: str) -> None:
    """The README's `test --config C --ckpt_path K` builds the model that K was trained as."""
    config_name, _ = SHIPPED[name]
    path = REPO / "checkpoints" / name
    assert path.stat().st_size < 20 * 2**20
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = yaml.safe_load((REPO / "configs" / config_name).read_text())
    saved = checkpoint["hyper_parameters"]
    differing = {
        key: (value, saved.get(key, "<missing>"))
        for key, value in config["model"].items()
        if key not in saved or saved[key] != value
    }
    assert differing == {}, f"{config_name} and {name} disagree (config, checkpoint): {differing}"
    assert saved["num_points"] == config["data"]["init_args"]["num_points"]

    # Rebuilt from the file alone, with every weight in place.
    model = SinkformerClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert model.state_dict().keys() == checkpoint["state_dict"].keys()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_loads_in_plain_pytorch(name: str, tmp_path: Path) -> None:
    """SetSinkformer.from_checkpoint rebuilds the model that Lightning loads, in eval mode."""
    path = REPO / "checkpoints" / name
    model = SetSinkformer.from_checkpoint(path)
    lightning = SinkformerClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    assert not model.training
    points = torch.randn(
        2, lightning.hparams.num_points, 3, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(points), lightning(points))
        # The features are what the head reads.
        features = model.forward_features(points)
        torch.testing.assert_close(model.head(features), model(points))
    assert features.shape == (2, model.head.in_features)
    # A checkpoint with a number of classes but no names (as Lightning allows) loads too.
    unnamed = torch.load(path, map_location="cpu", weights_only=True)
    hparams = unnamed["hyper_parameters"]
    hparams["num_classes"], hparams["class_names"] = len(hparams["class_names"]), None
    torch.save(unnamed, tmp_path / "unnamed.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(
            SetSinkformer.from_checkpoint(tmp_path / "unnamed.ckpt")(points), model(points)
        )
    # A checkpoint without pointsink's hyperparameters is named as such.
    stripped = torch.load(path, map_location="cpu", weights_only=True)
    del stripped["hyper_parameters"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    with pytest.raises(CheckpointError, match="no 'hyper_parameters'"):
        SetSinkformer.from_checkpoint(tmp_path / "stripped.ckpt")


def test_plain_and_lightning_loading_fill_missing_settings_alike() -> None:
    # An older checkpoint's missing setting takes the class default: the two classes must
    # agree on every default they share.
    model = inspect.signature(SetSinkformer.__init__).parameters
    module = inspect.signature(SinkformerClassifier.__init__).parameters
    differing = {
        name: (model[name].default, module[name].default)
        for name in model.keys() & module.keys() - {"self", "num_classes"}
        if model[name].default != module[name].default
    }
    assert differing == {}


@pytest.mark.parametrize(("name", "index"), EVALUATIONS)
def test_readme_states_the_shipped_accuracy(name: str, index: int) -> None:
    _, oa, macc, statement = SHIPPED[name][1][index]
    readme = " ".join((REPO / "README.md").read_text().split())  # line breaks as spaces
    assert statement.format(oa=f"{100 * oa:.2f}", macc=f"{100 * macc:.2f}") in readme


@requires_modelnet10
@pytest.mark.parametrize(("name", "index"), EVALUATIONS)
def test_shipped_checkpoint_reproduces_its_accuracy(name: str, index: int, tmp_path: Path) -> None:
    """The README's reproduce commands, on the real test split."""
    config_name, runs = SHIPPED[name]
    extra, oa, macc, _ = runs[index]
    cli = main([
        "test",
        "--config", str(REPO / "configs" / config_name),
        "--data.root", str(MODELNET10_DIR),
        "--ckpt_path", str(REPO / "checkpoints" / name),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    # 908 test shapes: one shape is 0.11 points; allow for bf16 rounding on other CPUs.
    assert float(metrics["test/oa"]) == pytest.approx(oa, abs=0.0025)
    assert float(metrics["test/macc"]) == pytest.approx(macc, abs=0.0035)


def test_the_anyfacing_checkpoint_was_trained_on_every_facing() -> None:
    checkpoint = torch.load(
        REPO / "checkpoints" / "modelnet10-anyfacing-sinkformer.ckpt", weights_only=True
    )
    assert checkpoint["hyper_parameters"]["augmentation"]["max_rotation_degrees"] == 180.0
