"""End to end through the CLI entry point, as a user runs it."""

import csv
import json
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser

from pointsink.cli import BatchLimitTrainer, main
from pointsink.data import recorded_split
from pointsink.inference import ShapeClassifier
from pointsink.module import SinkformerClassifier

REPO = Path(__file__).resolve().parents[1]


def _tiny_args(tmp_path: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "synthetic.yaml"),
        "--data.root", str(tmp_path / "synthetic"),
        "--data.train_per_class", "6",
        "--data.test_per_class", "2",
        "--data.num_points", "32",
        "--data.batch_size", "8",
        "--data.preprocess_workers", "1",
        "--model.channels", "16",
        "--model.num_heads", "2",
        "--model.num_inducing_points", "4",
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip


def test_fit_checkpoint_load_test(tmp_path: Path) -> None:
    cli = main(["fit", *_tiny_args(tmp_path)])
    assert cli is not None
    checkpoints = sorted((tmp_path / "run").rglob("*.ckpt"))
    names = {path.name for path in checkpoints}
    assert names == {"best.ckpt", "last.ckpt"}
    best = next(path for path in checkpoints if path.name == "best.ckpt")

    # The checkpoint alone rebuilds the model: plain hyperparameters, class names included.
    raw = torch.load(best, weights_only=True)
    class_names = raw["hyper_parameters"]["class_names"]
    assert class_names == cli.datamodule.class_names and len(class_names) >= 8
    restored = SinkformerClassifier.load_from_checkpoint(best, map_location="cpu")
    assert restored.hparams.channels == 16
    assert restored.hparams.num_points == 32

    test_cli = main(["test", *_tiny_args(tmp_path), "--ckpt_path", str(best)])
    # The test ran the checkpoint's weights, not a freshly seeded model's.
    tested = test_cli.model.state_dict()
    assert tested.keys() == raw["state_dict"].keys()
    for key, value in tested.items():
        torch.testing.assert_close(value, raw["state_dict"][key], rtol=0, atol=0)
    metrics = test_cli.trainer.callback_metrics
    assert {"test/oa", "test/macc", "test/loss"} <= set(metrics)
    assert 0.0 <= float(metrics["test/oa"]) <= 1.0
    # The test report agrees with the logged metrics and comes with its picture.
    report_dir = Path(test_cli.trainer.log_dir)
    report = json.loads((report_dir / "test_report.json").read_text())
    assert report["overall_accuracy"] == pytest.approx(float(metrics["test/oa"]), abs=1e-6)
    assert report["mean_class_accuracy"] == pytest.approx(float(metrics["test/macc"]), abs=1e-6)
    assert sum(map(sum, report["confusion_matrix"])) == len(test_cli.datamodule.test_dataset)
    class_names = test_cli.datamodule.class_names
    assert list(report["per_class"]) == list(report["support"]) == class_names
    assert (report_dir / "confusion_matrix.png").stat().st_size > 1000

    validate_cli = main(["validate", *_tiny_args(tmp_path), "--ckpt_path", str(best)])
    assert {"val/oa", "val/macc"} <= set(validate_cli.trainer.callback_metrics)


def test_last_checkpoint_is_the_last_epoch(tmp_path: Path) -> None:
    # With lr 0 the weights never change, so val/oa never beats epoch 0: best.ckpt stays at
    # epoch 0 while last.ckpt must follow training to its final epoch (resuming needs it).
    main(["fit", *_tiny_args(tmp_path), "--trainer.max_epochs", "3", "--model.lr", "0"])
    directory = next((tmp_path / "run").rglob("best.ckpt")).parent
    assert torch.load(directory / "best.ckpt", weights_only=True)["epoch"] == 0
    last = torch.load(directory / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2


def test_last_checkpoint_follows_epochs_without_validation(tmp_path: Path) -> None:
    # Validating every 2nd epoch, last.ckpt is still written after epoch index 2.
    main(["fit", *_tiny_args(tmp_path), "--trainer.max_epochs", "3",
          "--trainer.check_val_every_n_epoch", "2"])  # fmt: skip
    last = torch.load(next((tmp_path / "run").rglob("last.ckpt")), weights_only=True)
    assert last["epoch"] == 2


def test_resumed_fit_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    # `fit --ckpt_path last.ckpt` logs to a new version folder. Plain ModelCheckpoint then
    # forgets the best score, and the first epoch after resuming counts as best whatever
    # its accuracy.
    first = main(["fit", *_tiny_args(tmp_path)]).trainer.checkpoint_callback
    last = Path(first.dirpath) / "last.ckpt"
    # max_epochs is reached already: this fit only restores the state.
    restored = main(["fit", *_tiny_args(tmp_path), "--ckpt_path", str(last)])
    callback = restored.trainer.checkpoint_callback
    assert callback.dirpath != first.dirpath
    assert callback.best_model_score == first.best_model_score
    assert callback.best_model_path == first.best_model_path

    # One more epoch: the best checkpoint is the best epoch of the whole run.
    resumed = main(
        ["fit", *_tiny_args(tmp_path), "--trainer.max_epochs", "3", "--ckpt_path", str(last)]
    )
    callback = resumed.trainer.checkpoint_callback
    scores = []
    for metrics in sorted((tmp_path / "run").rglob("metrics.csv")):
        with metrics.open() as handle:
            scores += [float(row["val/oa"]) for row in csv.DictReader(handle) if row.get("val/oa")]
    assert len(scores) == 3
    assert float(callback.best_model_score) == pytest.approx(max(scores))
    best = torch.load(callback.best_model_path, weights_only=True)
    assert best["epoch"] == scores.index(max(scores))


def test_resumed_fit_continues_as_the_uninterrupted_run(tmp_path: Path) -> None:
    # Constant learning rate, so that a 2-epoch run is the start of a 3-epoch one; dropout
    # and augmentation on, so the restored generators matter.
    args = [*_tiny_args(tmp_path), "--model.scheduler", "none", "--data.augment", "true"]
    whole = main(["fit", *args, "--trainer.max_epochs", "3",
                  "--trainer.default_root_dir", str(tmp_path / "whole")])  # fmt: skip
    interrupted = ["--trainer.default_root_dir", str(tmp_path / "interrupted")]
    main(["fit", *args, *interrupted, "--trainer.max_epochs", "2"])
    resumed = main(["fit", *args, *interrupted, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    expected = whole.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_resume_and_validate_check_the_validation_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = main(["fit", *_tiny_args(tmp_path)]).trainer.checkpoint_callback
    last = Path(first.dirpath) / "last.ckpt"
    assert recorded_split(torch.load(last, weights_only=True)) == (0.15, 0)
    other_split = ["--data.split_seed", "1"]
    # Another split would put shapes the run has trained on into validation.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_tiny_args(tmp_path), *other_split, "--trainer.max_epochs", "3",
              "--ckpt_path", str(last)])  # fmt: skip
    assert exit_info.value.code == 2
    assert "trained with val_fraction=0.15 and split_seed=0" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="may be shapes the model was trained on"):
        main(["validate", *_tiny_args(tmp_path), *other_split, "--ckpt_path", str(last)])
    # The test split does not depend on it.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*split_seed.*")
        main(["test", *_tiny_args(tmp_path), *other_split, "--ckpt_path", str(last)])


def test_fit_does_not_resume_from_weights_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint without optimizer state (as shipped) is refused in one sentence."""
    first = main(["fit", *_tiny_args(tmp_path)]).trainer.checkpoint_callback
    checkpoint = torch.load(Path(first.dirpath) / "last.ckpt", weights_only=True)
    del checkpoint["optimizer_states"]
    weights_only = tmp_path / "weights.ckpt"
    torch.save(checkpoint, weights_only)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_tiny_args(tmp_path), "--trainer.max_epochs", "3",
              "--ckpt_path", str(weights_only)])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optimizer's state" in err and f"--model.weights {weights_only}" in err
    # Evaluating needs only the weights.
    tested = main(["test", *_tiny_args(tmp_path), "--ckpt_path", str(weights_only)])
    assert "test/oa" in tested.trainer.callback_metrics


def test_ckpt_path_names_resolve_and_overrides_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _tiny_args(tmp_path)
    first = main(["fit", *args]).trainer.checkpoint_callback
    last = Path(first.dirpath) / "last.ckpt"

    # `last` is the newest last.ckpt below default_root_dir, not one in the new (empty)
    # version folder: the fit resumes at epoch 2 instead of starting again from scratch.
    resumed = main(["fit", *args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(last)
    assert torch.load(next((tmp_path / "run").rglob("version_1/**/last.ckpt")))["epoch"] == 2

    # The checkpoint rebuilds the model; given model arguments it overrides are named, and
    # a point count other than the checkpoint's is reported (and used: testing at another
    # density is an experiment of its own).
    with pytest.warns(UserWarning) as caught:
        tested = main(
            ["test", *args, "--ckpt_path", "best", "--model.n_iter", "9",
             "--data.num_points", "40"]
        )  # fmt: skip
    messages = " ".join(str(warning.message) for warning in caught)
    assert "n_iter=9 (checkpoint: 5)" in messages
    assert "trained with num_points=32; this run uses 40" in messages
    assert tested.model.hparams.n_iter == 5 and tested.model.hparams.num_points == 40

    # Evaluating without weights, or with another class list, stops with one sentence,
    # and leaves no version folder behind (Lightning saves config.yaml before the check).
    versions = sorted((tmp_path / "run").rglob("version_*"))
    for extra, expected in (
        ([], "test needs the weights to use: pass --ckpt_path"),
        (["--ckpt_path", str(last), "--data.class_names", "[box, cone, sphere]"],
         "The checkpoint was trained on the classes"),
        (["--ckpt_path", str(tmp_path / "missing")], "no such checkpoint file"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["test", *args, *extra])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
        assert sorted((tmp_path / "run").rglob("version_*")) == versions
    # A logger version folder that existed before the refused run stays.
    mine = tmp_path / "logs" / "lightning_logs" / "mine"
    mine.mkdir(parents=True)
    (mine / "hparams.yaml").write_text("written: before\n")
    with pytest.raises(SystemExit):
        main(["test", *args, "--ckpt_path", str(last), "--data.class_names", "[box, cone, sphere]",
              "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs"),
              "--trainer.logger.version", "mine"])  # fmt: skip
    assert (mine / "hparams.yaml").read_text() == "written: before\n"
    assert (mine / "config.yaml").is_file()  # written by the refused run, before the check

    # Predicting needs no class folders: the class names are the checkpoint's.
    output = tmp_path / "predictions.json"
    main(
        ["predict", *args, "--data", "pointsink.data.ShapeFolderDataModule",
         "--data.root", str(tmp_path / "nowhere"), "--data.num_points", "32",
         "--data.predict_files", str(tmp_path / "synthetic" / "cone" / "test"),
         "--prediction_writer.output", str(output), "--ckpt_path", str(last)]
    )  # fmt: skip
    records = json.loads(output.read_text())
    assert len(records) == 2
    assert {record["label"] for record in records} <= set(first_classes(last))


def test_ckpt_path_names_search_the_checkpoint_callbacks_dirpath(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An older run below default_root_dir, then one whose callbacks write elsewhere: `best`
    # and `last` must be the new run's, not the older run's found below the root.
    args = _tiny_args(tmp_path)
    older = Path(
        main(["fit", *args, "--trainer.max_epochs", "1"]).trainer.checkpoint_callback.dirpath
    )
    kept = tmp_path / "kept"
    dirpaths = ["--checkpoint.dirpath", str(kept), "--last_checkpoint.dirpath", str(kept / "last")]
    main(["fit", *args, *dirpaths])
    assert (older / "best.ckpt").exists() and (kept / "best.ckpt").exists()
    tested = main(["test", *args, *dirpaths, "--ckpt_path", "best"])
    assert tested.trainer.ckpt_path == str(kept / "best.ckpt")
    validated = main(["validate", *args, *dirpaths, "--ckpt_path", "last"])
    assert validated.trainer.ckpt_path == str(kept / "last" / "last.ckpt")
    # A dirpath without the file names that option in its one-sentence error.
    with pytest.raises(SystemExit):
        main(
            ["test", *args, "--checkpoint.dirpath", str(tmp_path / "empty"), "--ckpt_path", "best"]
        )
    assert "(the run's --checkpoint.dirpath)" in capsys.readouterr().err


def test_checkpoint_from_before_a_setting_rebuilds_its_default(tmp_path: Path) -> None:
    args = _tiny_args(tmp_path)
    last = Path(
        main(["fit", *args, "--trainer.max_epochs", "1"]).trainer.checkpoint_callback.dirpath
    )
    content = torch.load(last / "last.ckpt", weights_only=True)
    for name in ("logit_scale", "sinkhorn_marginals", "pooling_projection", "group_hidden_layers"):
        del content["hyper_parameters"][name]
    old = tmp_path / "old.ckpt"
    torch.save(content, old)
    # The settings given (a config of the reference code's model) are not the checkpoint's.
    with pytest.warns(UserWarning, match="logit_scale='width' \\(checkpoint: 'head'\\)"):
        tested = main(
            ["test", *args, "--ckpt_path", str(old), "--model.logit_scale", "width",
             "--model.sinkhorn_marginals", "uniform", "--model.pooling_projection", "false",
             "--model.group_hidden_layers", "2"]
        )  # fmt: skip
    hparams = tested.model.hparams
    assert (hparams.logit_scale, hparams.sinkhorn_marginals) == ("head", "attention")
    assert hparams.pooling_projection and hparams.group_hidden_layers == 1
    assert {
        module.logit_scale for module in tested.model.modules() if hasattr(module, "logit_scale")
    } == {"head"}


def first_classes(path: Path) -> list[str]:
    return torch.load(path, weights_only=True)["hyper_parameters"]["class_names"]


def test_checkpoint_records_the_sampling_seed_for_inference(tmp_path: Path) -> None:
    one_step = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]
    main(["fit", *_tiny_args(tmp_path), *one_step, "--data.sample_seed", "3"])
    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    classifier = ShapeClassifier.from_checkpoint(checkpoint, device="cpu")
    assert classifier.sample_seed == 3
    # By default a file gets the points of the training cache (seed 3), not seed 0's.
    shape = str(next((tmp_path / "synthetic" / "cone" / "test").iterdir()))
    default, three, zero = (
        classifier.predict(shape, top_k=9, seed=seed)[0].topk for seed in (None, 3, 0)
    )
    assert default == three != zero

    # train.py predict samples a file as ShapeClassifier does: the checkpoint's seed and
    # point count, whatever the data config says (here seed 0 and 40 points), so the two
    # give the same probabilities.
    output = tmp_path / "predictions.json"
    with pytest.warns(UserWarning) as caught:
        main(["predict", *_tiny_args(tmp_path), "--data.predict_files", shape,
              "--data.num_points", "40", "--prediction_writer.output", str(output),
              "--ckpt_path", str(checkpoint)])  # fmt: skip
    messages = " ".join(str(warning.message) for warning in caught)
    assert "(sample_seed=3); --data.sample_seed 0 is not used" in messages
    assert "(num_points=32); --data.num_points 40 is not used" in messages
    (record,) = json.loads(output.read_text())
    expected = classifier.predict(shape, top_k=len(record["topk"]))[0].topk
    assert [name for name, _ in record["topk"]] == [name for name, _ in expected]
    assert [p for _, p in record["topk"]] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_fit_without_checkpointing(tmp_path: Path) -> None:
    # Lightning refuses ModelCheckpoint callbacks with enable_checkpointing=False.
    main(["fit", *_tiny_args(tmp_path), "--trainer.max_epochs", "1",
          "--trainer.enable_checkpointing", "false"])  # fmt: skip
    assert not list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("limit", "expected_batches"),
    [("1", lambda full: 1), ("2", lambda full: 2), ("1.0", lambda full: full),
     ("0.5", lambda full: full // 2)],
)  # fmt: skip
def test_batch_limit_one_means_one_batch(
    tmp_path: Path, limit: str, expected_batches: Callable[[int], int]
) -> None:
    # As Lightning documents: an int counts batches, a float is a fraction (jsonargparse
    # read Lightning's float-first annotation "1" as 1.0, all batches).
    cli = main(["fit", *_tiny_args(tmp_path), "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", limit])  # fmt: skip
    full = len(cli.datamodule.train_dataloader())
    assert full > 4
    assert cli.trainer.num_training_batches == expected_batches(full)
    assert cli.trainer.global_step == expected_batches(full)


def test_batch_limit_stays_an_int_after_lightnings_trainer_was_parsed(tmp_path: Path) -> None:
    # Parsing Lightning's own Trainer first (as another CLI in the process would) once made
    # the int-first annotation float-first again, through typing's cache of equal Unions.
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.parse_args(["--trainer.limit_train_batches", "1"])
    cli = main(["--config", str(REPO / "configs" / "synthetic.yaml"),
                "--data.root", str(tmp_path / "synthetic"),
                "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1.0"],
               run=False)  # fmt: skip
    assert cli is not None
    assert (cli.trainer.limit_train_batches, cli.trainer.limit_val_batches) == (1, 1.0)
    assert type(cli.trainer.limit_train_batches) is int
    assert type(cli.trainer.limit_val_batches) is float
    # "all" is all batches, as Lightning's default.
    cli = main(["--config", str(REPO / "configs" / "synthetic.yaml"),
                "--data.root", str(tmp_path / "synthetic"),
                "--trainer.limit_train_batches", "all"], run=False)  # fmt: skip
    assert cli is not None and cli.trainer.limit_train_batches == 1.0


def test_help_and_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "fit" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "modelnet10.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "pointsink.data.ModelNetDataModule" in printed
    assert "n_iter: 5" in printed


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["fit", "--model.attention", "softmx"], "Got value: softmx"),
        (["test", "--config", "missing.yaml"], "File does not exist"),
        (["fit", "--trainer.max_epochs", "many"], "max_epochs"),
    ],
)
def test_a_mistyped_argument_gets_a_short_message(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # argparse's default usage listed every option (~120 lines) before the error.
    assert message in err and len(err.splitlines()) < 15, err
    assert err.startswith(f"usage: {Path(sys.argv[0]).name} [options] {arguments[0]} [options]")
    with pytest.raises(SystemExit):
        main([arguments[0], "--help"])
    assert "--model.attention" in capsys.readouterr().out  # --help still lists the options


@pytest.mark.parametrize("config", sorted(path.name for path in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_parse(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / config), "--print_config"])
    assert exit_info.value.code == 0


def test_offline_modelnet_fails_with_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch_geometric.data

    def offline(url: str, folder: str, *args: object, **kwargs: object) -> str:
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch_geometric.data, "download_url", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "modelnet10.yaml"),
              "--data.root", str(tmp_path / "missing" / "ModelNet10"),
              "--trainer.max_epochs", "1"])  # fmt: skip
    assert exit_info.value.code == 2
    error_lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("error")
    ]
    assert len(error_lines) == 1
    assert "ModelNet10" in error_lines[0] and "http" in error_lines[0]
    assert "Traceback" not in error_lines[0]


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (["--model.n_iter", "0"], "n_iter must be at least 1; got 0."),
        (["--model.channels", "18", "--model.num_heads", "4"], "divisible"),
        (["--data.num_points", "1"], "num_points must be at least 2; got 1"),
    ],
)
def test_refused_argument_values_fail_with_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argument: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_tiny_args(tmp_path), *argument])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert message in line and "Traceback" not in err


def test_weight_averaged_checkpoint_serves_the_averaged_weights(tmp_path: Path) -> None:
    """With the optional EMA callback, checkpoints, `test` and inference use averaged weights."""
    from pointsink.inference import ShapeClassifier

    ema = [
        "--trainer.callbacks+=pytorch_lightning.callbacks.EMAWeightAveraging",
        "--trainer.callbacks.decay", "0.9",
    ]  # fmt: skip
    main(["fit", *_tiny_args(tmp_path), *ema])
    best = next((tmp_path / "run").rglob("best.ckpt"))
    raw = torch.load(best, weights_only=True)
    averaged, current = raw["state_dict"], raw["current_model_state"]
    assert averaged.keys() == current.keys()
    assert any(not torch.equal(averaged[key], current[key]) for key in averaged)

    classifier = ShapeClassifier.from_checkpoint(best, device="cpu")
    for key, value in classifier.model.state_dict().items():
        torch.testing.assert_close(value, averaged[key], rtol=0, atol=0)

    test_cli = main(["test", *_tiny_args(tmp_path), *ema, "--ckpt_path", str(best)])
    for key, value in test_cli.model.state_dict().items():
        torch.testing.assert_close(value, averaged[key], rtol=0, atol=0)


def test_console_command_exits_with_status_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pointsink-train` (pyproject [project.scripts]) ends a successful run with status 0."""
    (script,) = entry_points(group="console_scripts", name="pointsink-train")
    one_step = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]
    monkeypatch.setattr(sys, "argv", ["pointsink-train", "fit", *_tiny_args(tmp_path), *one_step])
    # What the generated console script does with the function's return value.
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(script.load()())
    assert exit_info.value.code in (None, 0)


def test_main_with_args_ignores_the_callers_argv(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`main(args)` under another program's argv (reproduce.py, pytest) parses args quietly."""
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--seeds", "0"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("always")
        main(["fit", "--config", str(REPO / "configs" / "synthetic.yaml"), "--print_config"])
    # Parsing sys.argv instead would exit with a usage error (code 2) on --seeds.
    assert exit_info.value.code in (None, 0)
    assert "pointsink.data.SyntheticShapesDataModule" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
@pytest.mark.parametrize("caller_initialized", [False, True])
def test_main_destroys_the_process_group_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caller_initialized: bool
) -> None:
    """A DDP run on CPUs (gloo) ends with its process group destroyed: left to interpreter
    finalization, gloo can abort the exiting rank, and Lightning then kills the others.
    A group the caller made before is left to the caller."""
    # Lightning's launcher writes these into os.environ; monkeypatch restores them after.
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "1"]
    one_step = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]
    if caller_initialized:
        store = f"file://{tmp_path / 'store'}"
        torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        cli = main(["fit", *_tiny_args(tmp_path), *ddp, *one_step])
        assert type(cli.trainer.strategy).__name__ == "DDPStrategy"
        assert torch.distributed.is_initialized() == caller_initialized
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "mistake",
    [
        "missing root",
        "no class folders",
        "split above class",
        "flat class",
        "one class's folder",
        "no training files",
    ],
)
def test_shape_folder_mistakes_fail_with_one_sentence(
    tmp_path: Path, make_shape_folder, capsys: pytest.CaptureFixture[str], mistake: str
) -> None:
    root = tmp_path / "shapes"
    if mistake == "no class folders":
        (root / "chair").mkdir(parents=True)  # no train/ or test/ inside
    elif mistake == "split above class":
        (root / "train" / "chair").mkdir(parents=True)  # train/<class>, not <class>/train
    elif mistake == "flat class":
        make_shape_folder(root, class_names=("mug", "vase"), train_per_class=2, test_per_class=0)
        for path in root.glob("*/train/*"):
            path.rename(path.parent.parent / path.name)  # <class>/*.<ext>, no split folders
        for folder in [*root.glob("*/train"), *root.glob("*/test")]:
            folder.rmdir()
    elif mistake == "one class's folder":
        make_shape_folder(tmp_path / "all", class_names=("mug", "vase"), train_per_class=2)
        (tmp_path / "all" / "mug").rename(root)  # root/{train,test}/*.off: one class
    elif mistake == "no training files":
        make_shape_folder(root, class_names=("mug", "vase"), train_per_class=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data", "pointsink.data.ShapeFolderDataModule", "--data.root", str(root),
              "--trainer.max_epochs", "1",
              "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    expected = {
        "missing root": "does not exist",
        "no class folders": "Found no class folders",
        "split above class": "holds train/<class> instead: swap the two levels",
        "flat class": "mug, vase hold shape files directly: move each class's files into",
        "one class's folder": f"looks like one class's folder (its test and train hold shape "
        f"files): give its parent, {tmp_path},",
        "no training files": "Found no training shapes",
    }[mistake]
    assert expected in line and str(root) in line
    assert "Traceback" not in err and "Namespace(" not in err


def test_test_split_alone_is_enough_to_test(
    tmp_path: Path, make_shape_folder, capsys: pytest.CaptureFixture[str]
) -> None:
    """`test` reads and caches only <class>/test: a folder without train/ can be tested."""
    trained = make_shape_folder(tmp_path / "trained", class_names=("mug", "vase"))
    data = ["--data", "pointsink.data.ShapeFolderDataModule", "--data.num_points", "32",
            "--data.batch_size", "4", "--data.preprocess_workers", "1",
            "--model.channels", "16", "--model.num_heads", "2",
            "--model.num_inducing_points", "4", "--trainer.enable_progress_bar", "false",
            "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    main(["fit", *data, "--data.root", str(trained)])
    test_only = tmp_path / "test_only"
    for class_name in ("mug", "vase"):
        (test_only / class_name).mkdir(parents=True)
        (trained / class_name / "test").rename(test_only / class_name / "test")
    cli = main(["test", *data, "--data.root", str(test_only), "--ckpt_path", "best"])
    assert len(cli.datamodule.test_dataset) == 4
    assert cli.datamodule.train_dataset is None
    assert not list((test_only / "processed").glob("*train*"))
    # Scored facing other ways: the same test shapes, each turned about the vertical.
    turned = main(["test", *data, "--data.root", str(test_only), "--ckpt_path", "best",
                   "--data.eval_rotation_degrees", "180"])  # fmt: skip
    upright, moved = cli.datamodule.test_dataset.points, turned.datamodule.test_dataset.points
    torch.testing.assert_close(moved[..., 2], upright[..., 2])
    assert not torch.allclose(moved, upright)

    # Without test shapes (here files of another kind), `test` stops with one sentence
    # instead of testing nothing and exiting 0 without a metric.
    for path in test_only.glob("*/test/*"):
        path.rename(path.with_name(path.name + ".bak"))
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *data, "--data.root", str(test_only), "--ckpt_path", "best"])
    assert exit_info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"Found no test shapes in {test_only}" in line
    assert "mug/test has 2 files, none with a supported extension" in line


def test_predict_with_another_data_config_takes_the_checkpoints_classes(
    tmp_path: Path, make_shape_folder
) -> None:
    """A checkpoint of non-synthetic classes predicts under configs/synthetic.yaml (as the
    README's `train.py predict` example reads), instead of being refused as unknown classes."""
    shapes = make_shape_folder(tmp_path / "shapes", class_names=("mug", "vase"))
    main(["fit", "--data", "pointsink.data.ShapeFolderDataModule", "--data.root", str(shapes),
          "--data.num_points", "32", "--data.batch_size", "4", "--data.preprocess_workers", "1",
          "--model.channels", "16", "--model.num_heads", "2", "--model.num_inducing_points", "4",
          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    output = tmp_path / "predictions.json"
    main(["predict", "--config", str(REPO / "configs" / "synthetic.yaml"),
          "--data.root", str(tmp_path / "synthetic"), "--data.num_points", "32",
          "--data.predict_files", str(shapes / "vase" / "test"),
          "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar",
          "false", "--prediction_writer.output", str(output), "--ckpt_path", "best"])  # fmt: skip
    records = json.loads(output.read_text())
    assert len(records) == 2 and all(record["error"] is None for record in records)
    assert {record["label"] for record in records} <= {"mug", "vase"}
    assert not (tmp_path / "synthetic").exists()  # nothing generated for predict


def test_default_logger_writes_csv_even_with_tensorboard_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metrics.csv, which the README and reproduce.py read, does not depend on what else is
    installed: Lightning's own default turns to TensorBoard when tensorboard is importable."""
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.trainer.connectors.logger_connector import logger_connector

    monkeypatch.setattr(logger_connector, "_TENSORBOARD_AVAILABLE", True)
    for logger in (None, True):
        trainer = BatchLimitTrainer(logger=logger, default_root_dir=str(tmp_path))
        assert isinstance(trainer.logger, CSVLogger)
        assert Path(trainer.logger.log_dir).parent == tmp_path / "lightning_logs"
    assert BatchLimitTrainer(logger=False, default_root_dir=str(tmp_path)).logger is None
    mine = CSVLogger(tmp_path / "mine")
    assert BatchLimitTrainer(logger=mine).logger is mine
