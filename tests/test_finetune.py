"""Fine-tuning from a checkpoint: ``--model.weights`` and ``--model.freeze_backbone``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _inference_utils import CLASSES, build_tiny_checkpoint

from pointsink.cli import main
from pointsink.inference import CheckpointError, ShapeClassifier
from pointsink.module import SinkformerClassifier

# The architecture of build_tiny_checkpoint's model; everything else at its default.
TINY = {"channels": 16, "num_heads": 2, "num_inducing_points": 4, "dropout": 0.0}
NEW_CLASSES = ["cone", "lamp", "box"]  # two of CLASSES, in another order, and a new one


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("pretrained") / "tiny.ckpt")


def _model_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {key.removeprefix("model."): value for key, value in state.items()}


def _assert_same_body(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    body = [key for key in expected if not key.startswith("head.")]
    assert body and sorted(body) == sorted(key for key in found if not key.startswith("head."))
    for key in body:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0, msg=key)


def test_load_pretrained_keeps_the_body_and_carries_head_rows_by_name(pretrained: Path) -> None:
    torch.manual_seed(1)
    # attention and n_iter have no weights: a softmax model can start a Sinkhorn one.
    module = SinkformerClassifier(class_names=NEW_CLASSES, attention="softmax", **TINY)
    fresh = {key: value.clone() for key, value in module.model.state_dict().items()}
    old = _model_weights(pretrained)

    assert module.load_pretrained(pretrained) == ["cone", "box"]

    new = module.model.state_dict()
    _assert_same_body(new, old)
    for row, name in enumerate(NEW_CLASSES):
        source = (old, CLASSES.index(name)) if name in CLASSES else (fresh, row)
        torch.testing.assert_close(new["head.weight"][row], source[0]["head.weight"][source[1]])
        torch.testing.assert_close(new["head.bias"][row], source[0]["head.bias"][source[1]])
    assert not torch.equal(new["head.weight"][1], old["head.weight"][1])


def test_from_pretrained_builds_the_checkpoints_model_for_new_classes(pretrained: Path) -> None:
    torch.manual_seed(1)
    module = SinkformerClassifier.from_pretrained(pretrained, NEW_CLASSES, lr=3e-4)
    saved = torch.load(pretrained, map_location="cpu", weights_only=True)["hyper_parameters"]
    for name in (*TINY, "num_points", "n_iter", "attention"):
        assert module.hparams[name] == saved[name], name
    assert module.hparams.lr == 3e-4 and module.hparams.weights == str(pretrained)
    assert module.class_names == NEW_CLASSES and not module.hparams.freeze_backbone
    old, new = _model_weights(pretrained), module.model.state_dict()
    _assert_same_body(new, old)
    for row, name in enumerate(NEW_CLASSES):
        if name in CLASSES:
            torch.testing.assert_close(
                new["head.weight"][row], old["head.weight"][CLASSES.index(name)]
            )
    probe = SinkformerClassifier.from_pretrained(pretrained, NEW_CLASSES, freeze_backbone=True)
    assert probe.hparams.freeze_backbone
    with pytest.raises(CheckpointError, match="channels=16 there, 32 here"):
        SinkformerClassifier.from_pretrained(pretrained, NEW_CLASSES, channels=32)
    with pytest.raises(TypeError, match="learning_rate"):
        SinkformerClassifier.from_pretrained(pretrained, NEW_CLASSES, learning_rate=1e-3)


def test_from_pretrained_of_a_frozen_checkpoint_trains_the_backbone(
    pretrained: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(pretrained, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["freeze_backbone"] = True  # a linear probe's checkpoint
    torch.save(checkpoint, tmp_path / "probe.ckpt")
    module = SinkformerClassifier.from_pretrained(tmp_path / "probe.ckpt", NEW_CLASSES)
    assert module.hparams.freeze_backbone is False


def test_weights_that_do_not_fit_are_refused_without_recorded_settings(
    pretrained: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(pretrained, map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]  # nothing to compare but the weights
    body = next(key for key in checkpoint["state_dict"] if key.endswith(".weight"))
    checkpoint["state_dict"][body] = torch.zeros(3, 5)
    torch.save(checkpoint, tmp_path / "other.ckpt")
    module = SinkformerClassifier(class_names=NEW_CLASSES, **TINY)
    with pytest.raises(CheckpointError, match="its weights do not fit this model"):
        module.load_pretrained(tmp_path / "other.ckpt")


def test_load_pretrained_names_the_differing_architecture(pretrained: Path, tmp_path: Path) -> None:
    module = SinkformerClassifier(class_names=NEW_CLASSES, **{**TINY, "channels": 8})
    with pytest.raises(CheckpointError, match=r"channels=16 there, 8 here") as info:
        module.load_pretrained(pretrained)
    assert "SinkformerClassifier.from_pretrained builds it" in str(info.value)  # the way out
    module = SinkformerClassifier(class_names=NEW_CLASSES, **TINY, pooling_projection=False)
    with pytest.raises(CheckpointError, match=r"unexpected.*pool\.lin.*pooling_projection=True"):
        module.load_pretrained(pretrained)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        module.load_pretrained(tmp_path / "missing.ckpt")


def test_load_pretrained_refuses_other_weight_free_settings(tmp_path: Path) -> None:
    # The grouping has no weights of its own but decides what the weights see.
    grouped = {**TINY, "num_groups": 4, "group_size": 4, "normalize_offsets": True}
    source = SinkformerClassifier(class_names=CLASSES, num_points=16, **grouped)
    path = tmp_path / "grouped.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, path)
    free = {"attention": "softmax", "pooling_attention": "sinkhorn", "n_iter": 3, "dropout": 0.3}
    free |= {"logit_scale": "width", "sinkhorn_marginals": "uniform"}
    module = SinkformerClassifier(class_names=NEW_CLASSES, **{**grouped, **free})
    assert module.load_pretrained(path) == ["cone", "box"]
    for key, value in (("group_size", 8), ("normalize_offsets", False)):
        module = SinkformerClassifier(class_names=NEW_CLASSES, **{**grouped, key: value})
        with pytest.raises(
            CheckpointError, match=rf"other model settings.*{key}=\S+ there, {value!r} here"
        ):
            module.load_pretrained(path)
    # A checkpoint saved before a setting existed was trained with its default.
    content = torch.load(path, weights_only=True)
    del content["hyper_parameters"]["normalize_offsets"]
    torch.save(content, path)
    module = SinkformerClassifier(
        class_names=NEW_CLASSES, **{**grouped, "normalize_offsets": False}
    )
    assert module.load_pretrained(path) == ["cone", "box"]
    module = SinkformerClassifier(class_names=NEW_CLASSES, **grouped)  # normalize_offsets=True
    with pytest.raises(CheckpointError, match="normalize_offsets=False there, True here"):
        module.load_pretrained(path)


def test_load_pretrained_ignores_settings_that_build_nothing(pretrained: Path) -> None:
    # Without a set abstraction or an EdgeConv embedding their sizes build nothing: a config
    # that states other values for them fine-tunes all the same.
    unused = {"group_size": 8, "local_channels": 7, "group_hidden_layers": 3}
    module = SinkformerClassifier(class_names=NEW_CLASSES, **TINY, **unused)
    assert module.load_pretrained(pretrained) == ["cone", "box"]
    # With the SAB encoder no inducing points are built; the ISAB encoder needs them equal.
    sab = {**TINY, "encoder": "sab"}
    source = SinkformerClassifier(class_names=CLASSES, **sab)
    path = pretrained.parent / "sab.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, path)
    module = SinkformerClassifier(class_names=NEW_CLASSES, **{**sab, "num_inducing_points": 9})
    assert module.load_pretrained(path) == ["cone", "box"]
    module = SinkformerClassifier(class_names=NEW_CLASSES, **{**TINY, "num_inducing_points": 9})
    with pytest.raises(CheckpointError, match="num_inducing_points=4 there, 9 here"):
        module.load_pretrained(pretrained)


def _fit_args(
    root: Path, run: Path, weights: Path, make_shape_folder: Callable[..., Path]
) -> list[str]:
    make_shape_folder(root, class_names=tuple(NEW_CLASSES), train_per_class=4, test_per_class=1)
    return [
        "--data", "pointsink.data.ShapeFolderDataModule",
        "--data.root", str(root),
        "--data.class_names", "[" + ", ".join(NEW_CLASSES) + "]",
        "--data.num_points", "32",
        "--data.batch_size", "4",
        "--data.val_fraction", "0.25",
        "--data.preprocess_workers", "1",
        "--model.channels", "16",
        "--model.num_heads", "2",
        "--model.num_inducing_points", "4",
        "--model.dropout", "0.0",
        "--model.weights", str(weights),
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run),
    ]  # fmt: skip


def _last_checkpoint(run: Path) -> Path:
    """The newest ``last.ckpt`` under ``run`` (a resumed fit writes to the next version)."""
    return max(run.rglob("last.ckpt"), key=lambda path: path.stat().st_mtime_ns)


def test_fine_tune_a_linear_probe_through_the_cli(
    pretrained: Path, tmp_path: Path, make_shape_folder: Callable[..., Path]
) -> None:
    weights = tmp_path / "pretrained.ckpt"
    weights.write_bytes(pretrained.read_bytes())
    args = _fit_args(tmp_path / "shapes", tmp_path / "run", weights, make_shape_folder)
    main(["fit", *args, "--model.freeze_backbone", "true"])
    last = _last_checkpoint(tmp_path / "run")
    old, tuned = _model_weights(pretrained), _model_weights(last)
    _assert_same_body(tuned, old)  # frozen: the body is the pretrained one
    assert not torch.equal(tuned["head.weight"][0], old["head.weight"][CLASSES.index("cone")])

    # The fine-tuned checkpoint stands alone: inference and resuming do not read `weights`
    # (a resumed fit keeps its own weights; reading the deleted file would fail).
    weights.unlink()
    assert ShapeClassifier.from_checkpoint(last, device="cpu").class_names == NEW_CLASSES
    resumed = main([
        "fit", *args, "--model.freeze_backbone", "true",
        "--trainer.max_epochs", "2", "--ckpt_path", str(last),
    ])  # fmt: skip
    assert resumed.trainer.current_epoch == 2
    _assert_same_body(_model_weights(_last_checkpoint(tmp_path / "run")), old)

    # Testing it with a config that does not name `weights` (the usual case) warns about no
    # unused model argument: `weights` only records where the run started.
    without_weights = [arg for arg in args if arg not in ("--model.weights", str(weights))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            ["test", *without_weights, "--model.freeze_backbone", "true", "--ckpt_path", str(last)]
        )
    unused = [str(w.message) for w in caught if "arguments are not used" in str(w.message)]
    assert not unused, unused


def test_unusable_weights_fail_with_one_sentence(
    tmp_path: Path, make_shape_folder: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.ckpt"
    args = _fit_args(tmp_path / "shapes", tmp_path / "run", missing, make_shape_folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "nope.ckpt: no such checkpoint file" in errors[0]
    # Reported before any data preparation: no cache was built for the run.
    assert not list((tmp_path / "shapes").rglob("*.pt"))
