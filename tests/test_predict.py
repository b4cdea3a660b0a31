"""The `pointsink-predict` command and `train.py predict`, checked against the Python API."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _inference_utils import CLASSES, build_tiny_checkpoint, write_bad_files, write_format_files

from pointsink.callbacks import PredictionWriter
from pointsink.cli import main as train_main
from pointsink.data import ShapeFolderDataModule
from pointsink.inference import Prediction, ShapeClassifier, format_predictions
from pointsink.predict import main
from pointsink.transforms import file_sample_seed, preprocess_shape, up_axis_rotation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_format_files(tmp_path_factory.mktemp("shapes"))


def _api_records(checkpoint: Path, paths: list, **kwargs) -> list[dict]:
    classifier = ShapeClassifier.from_checkpoint(checkpoint, device="cpu")
    return [prediction.to_dict() for prediction in classifier.predict(paths, **kwargs)]


def test_json_output_matches_the_python_api(checkpoint, files, tmp_path, capsys) -> None:
    paths = [str(files["off"]), str(files["glb_scene"]), str(tmp_path / "missing.off")]
    options = ["--top-k", "2", "--seed", "5", "--votes", "2", "--device", "cpu"]
    status = main([str(checkpoint), *paths, "--format", "json", *options])
    captured = capsys.readouterr()
    assert status == 1  # one file could not be classified
    records = json.loads(captured.out)
    assert records == _api_records(checkpoint, paths, top_k=2, seed=5, votes=2)
    assert [record["error"] is None for record in records] == [True, True, False]
    assert {"path", "label", "probability", "topk", "error"} <= set(records[0])
    assert "missing.off: no such file" in captured.err
    assert "2 of 3 file(s) classified" in captured.err


def test_up_axis_option_matches_the_python_api(checkpoint, files, capsys) -> None:
    paths = [str(files["glb_scene"]), str(files["obj"])]
    status = main([str(checkpoint), *paths, "--format", "json", "--up-axis", "y"])
    records = json.loads(capsys.readouterr().out)
    assert status == 0
    assert records == _api_records(checkpoint, paths, up_axis="y")
    assert records != _api_records(checkpoint, paths)
    with pytest.raises(SystemExit):
        main([str(checkpoint), *paths, "--up-axis", "w"])
    assert "--up-axis: invalid choice: 'w'" in capsys.readouterr().err


def test_predict_loader_turns_files_with_predict_up_axis(files) -> None:
    path = files["obj"]
    loader = ShapeFolderDataModule(
        "unused", class_names=CLASSES, num_points=64, predict_files=[str(path)],
        predict_up_axis="x",
    ).predict_dataloader()  # fmt: skip
    points = loader.dataset[0]["points"].numpy()
    plain = preprocess_shape(path, 64, seed=file_sample_seed(path, 0))
    np.testing.assert_array_equal(points, (plain @ up_axis_rotation("x", "z").T).astype("f4"))


def test_folder_table_output_and_exit_zero(checkpoint, files, capsys) -> None:
    folder = files["off"].parent
    status = main([str(checkpoint), str(folder), "--device", "cpu", "--top-k", "3"])
    captured = capsys.readouterr()
    assert status == 0, captured.out
    lines = captured.out.splitlines()
    assert lines[0].split() == ["path", "label", "prob", "top", "classes"]
    assert len(lines) == 1 + len(files) + 1
    assert lines[-1] == f"{len(files)} classified, 0 failed."


def test_table_written_into_the_folder_is_not_read_back(
    checkpoint, files, tmp_path, monkeypatch
) -> None:
    folder = tmp_path / "shapes"
    folder.mkdir()
    (folder / files["off"].name).write_bytes(files["off"].read_bytes())
    output = folder / "predictions.txt"  # .txt is also a point-cloud format
    for _ in range(2):  # the second run finds the first run's table in the folder
        assert main([str(checkpoint), str(folder), "--output", str(output)]) == 0
        rows = output.read_text().splitlines()
        assert len(rows) == 3 and rows[1].startswith(str(folder / files["off"].name))
    # Excluded wherever it is reached (a pattern, its own path), given relative to the cwd.
    monkeypatch.chdir(tmp_path)
    classifier = ShapeClassifier.from_checkpoint(checkpoint, device="cpu")
    found = classifier.predict(["shapes/*", str(output)], exclude=["shapes/predictions.txt"])
    assert [prediction.path for prediction in found] == [f"shapes/{files['off'].name}"]


def test_table_keeps_one_row_per_file_with_a_newline_in_its_name() -> None:
    odd = 'odd,"name\n\t.xyz'
    predictions = [
        Prediction(path=odd, label="chair", probability=0.9, topk=(("chair", 0.9),)),
        Prediction(path="plain.xyz", error="no such file"),
    ]
    lines = format_predictions(predictions, "table").splitlines()
    assert len(lines) == 1 + len(predictions) + 1
    assert lines[1].startswith('odd,"name\\n\\t.xyz  chair')
    assert lines[2].index("ERROR") == lines[1].index("chair")  # columns stay aligned
    # CSV and JSON keep the name as it is.
    assert json.loads(format_predictions(predictions, "json"))[0]["path"] == odd


def test_bad_files_are_reported_and_others_kept(checkpoint, files, tmp_path, capsys) -> None:
    bad = write_bad_files(tmp_path / "bad")
    paths = [str(files["obj"]), *(str(path) for path, _ in bad.values()), str(files["stl_ascii"])]
    output = tmp_path / "out" / "predictions.csv"
    status = main([str(checkpoint), *paths, "--format", "csv", "--output", str(output)])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    rows = output.read_text().splitlines()
    assert len(rows) == 1 + len(paths)
    assert rows[1].startswith(f"{files['obj']},") and rows[-1].startswith(f"{files['stl_ascii']},")
    for (_, expected), row in zip(bad.values(), rows[2:-1], strict=True):
        assert expected in row
    assert f"written to {output}" in captured.err


def test_unusable_checkpoint_exits_2_without_traceback(files, tmp_path, capsys) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint at all")
    output = tmp_path / "new" / "folders" / "predictions.json"
    assert main([str(broken), str(files["off"]), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("pointsink-predict: error: ") and "not a readable PyTorch" in err
    assert not (tmp_path / "new").exists()  # the refused run leaves no folders behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_a_numbered_cuda_device_is_taken_and_checked_with_the_checkpoint(
    checkpoint, files, capsys
) -> None:
    # "cuda:1" is a device name the parser takes (it refused all but auto, cpu and cuda);
    # on a machine without CUDA the checkpoint's loading refuses it in one line.
    assert main([str(checkpoint), str(files["off"]), "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsink-predict: error: device 'cuda:1' was requested but CUDA")


def test_too_few_points_for_the_model_exit_2(files, capsys) -> None:
    # The shipped model groups 1024 points into 256 groups of 32: it cannot take 100.
    shipped = REPO / "checkpoints" / "modelnet10-sinkformer.ckpt"
    assert main([str(shipped), str(files["off"]), "--points", "100", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsink-predict: error: ") and "needs at least 256 points" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "arguments",
    [
        ["--top-k", "0"],
        ["--votes", "x"],
        ["--format", "xml"],
        ["--device", "tpu"],
        ["--device", "cuda:x"],
        [],
    ],
)
def test_usage_errors_exit_2(checkpoint, files, arguments, capsys) -> None:
    paths = [] if not arguments else [str(files["off"])]
    with pytest.raises(SystemExit) as info:
        main([str(checkpoint), *paths, *arguments])
    assert info.value.code == 2
    assert "usage: pointsink-predict" in capsys.readouterr().err


def test_console_command_in_a_subprocess(checkpoint, files) -> None:
    paths = [str(files["ply_binary"]), str(files["3mf_scene"])]
    command = [sys.executable, "-m", "pointsink.predict", str(checkpoint), *paths]
    result = subprocess.run(
        [*command, "--format", "json", "--device", "cpu", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == _api_records(checkpoint, paths, seed=7)
    # The console command is registered (pyproject [project.scripts], `pip install -e .`).
    (script,) = entry_points(group="console_scripts", name="pointsink-predict")
    assert script.value == "pointsink.predict:main"


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--votes" in capsys.readouterr().out


def _prediction_writer(cli) -> PredictionWriter:
    (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)]
    return writer


def test_train_py_fit_then_predict(files, tmp_path, monkeypatch, capsys) -> None:
    args = [
        "--config", str(REPO / "configs" / "synthetic.yaml"),
        "--data.root", str(tmp_path / "synthetic"),
        "--data.class_names", "[box, cone, sphere]",
        "--data.train_per_class", "4",
        "--data.test_per_class", "1",
        "--data.num_points", "32",
        "--data.batch_size", "4",
        "--data.preprocess_workers", "1",
        "--data.up_axis", "1",
        "--data.scale_low", "0.9",
        "--model.channels", "16",
        "--model.num_heads", "2",
        "--model.num_inducing_points", "4",
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    fit = train_main(["fit", *args])
    best = Path(fit.trainer.checkpoint_callback.best_model_path)
    raw = torch.load(best, weights_only=True)  # a safe load works on the CLI's checkpoint
    assert raw["hyper_parameters"]["class_names"] == ["box", "cone", "sphere"]
    recorded = raw["hyper_parameters"]["augmentation"]
    assert recorded == fit.datamodule.augmentation.settings()
    assert type(recorded["up_axis"]) is int and type(recorded["shuffle"]) is bool
    classifier = ShapeClassifier.from_checkpoint(best, device="cpu")
    assert classifier.num_points == 32
    # Voting augments its extra views like this training did (a y-up dataset here).
    assert classifier.augmentation.settings() == fit.datamodule.augmentation.settings()
    assert classifier.augmentation.up_axis == 1 and classifier.augmentation.scale_low == 0.9

    test_files = sorted(str(p) for p in (tmp_path / "synthetic").glob("*/test/*.off"))
    inputs = [*test_files, str(files["gltf_scene"]), str(tmp_path / "missing.ply")]
    predict = train_main(
        [
            "predict", *args,
            "--ckpt_path", str(best),
            "--data.predict_files", json.dumps(inputs),
            "--prediction_writer.top_k", "3",
        ]
    )  # fmt: skip
    output = _prediction_writer(predict).last_output
    assert output is not None and output.name == "predictions.json"
    assert (tmp_path / "run") in output.parents
    records = json.loads(output.read_text())
    expected = [p.to_dict() for p in classifier.predict(inputs, top_k=3, seed=0)]
    assert [r["path"] for r in records] == [r["path"] for r in expected] == inputs
    assert [r["label"] for r in records] == [r["label"] for r in expected]
    for record, reference in zip(records, expected, strict=True):
        assert record["error"] == reference["error"]
        if reference["error"] is None:
            assert record["probability"] == pytest.approx(reference["probability"], abs=1e-5)
    assert "no such file" in records[-1]["error"]

    # From the command line, predict exits with status 1 when a file failed, as
    # pointsink-predict does; with only good files, 0.
    command = ["predict", *args, "--ckpt_path", str(best)]
    for predict_files, status in ((inputs, 1), (test_files, 0)):
        output = tmp_path / f"predictions-{status}.json"
        argv = [*command, "--data.predict_files", json.dumps(predict_files)]
        monkeypatch.setattr(
            sys, "argv", ["train.py", *argv, "--prediction_writer.output", str(output)]
        )
        capsys.readouterr()
        if status:
            with pytest.raises(SystemExit) as info:
                train_main()
            assert info.value.code == 1
            assert f"1 of {len(inputs)} file(s) could not be classified" in capsys.readouterr().err
        else:
            assert train_main() is not None
        assert len(json.loads(output.read_text())) == len(predict_files)

    # Files that stand on z are turned to the checkpoint's vertical (y), whatever the
    # config's up_axis says, as pointsink-predict --up-axis z does.
    with pytest.warns(UserWarning, match="trained with up_axis=1"):
        turned = train_main(
            [*command, "--data.up_axis", "2", "--data.predict_up_axis", "z",
             "--data.predict_files", json.dumps(test_files)]
        )  # fmt: skip
    records = json.loads(_prediction_writer(turned).last_output.read_text())
    expected = [p.to_dict() for p in classifier.predict(test_files, top_k=5, up_axis="z")]
    plain = [p.to_dict() for p in classifier.predict(test_files, top_k=5)]
    for record, reference in zip(records, expected, strict=True):
        assert dict(record["topk"]) == pytest.approx(dict(reference["topk"]), abs=1e-5)
    # Unturned files score beyond that tolerance, so the check above can fail.
    gaps = [
        abs(dict(turned_record["topk"])[name] - probability)
        for turned_record, plain_record in zip(expected, plain, strict=True)
        for name, probability in plain_record["topk"]
        if name in dict(turned_record["topk"])
    ]
    assert max(gaps) > 1e-4


@pytest.mark.parametrize(("num_files", "world_size"), [(1, 2), (3, 2), (4, 3)])
def test_predict_loader_gives_every_rank_a_share(files, num_files, world_size) -> None:
    paths = [str(files["off"])] + [f"missing_{i}.off" for i in range(num_files - 1)]
    datamodule = ShapeFolderDataModule(
        "unused", class_names=CLASSES, num_points=16, eval_batch_size=2, predict_files=paths
    )
    seen = []
    for rank in range(world_size):
        datamodule.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        batches = list(datamodule.predict_dataloader())
        assert batches, f"rank {rank} has nothing to predict"  # it would miss the gather
        seen += [index for batch in batches for index in batch["index"].tolist()]
    assert sorted(set(seen)) == list(range(num_files))
    one = ShapeFolderDataModule("unused", class_names=CLASSES, predict_files="a.off")
    assert one.predict_files == ["a.off"]  # `--data.predict_files a.off` works too


def test_writer_orders_and_deduplicates_records(tmp_path) -> None:
    writer = PredictionWriter(top_k=2)
    writer._class_names = CLASSES
    trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path), default_root_dir=".")
    probabilities = torch.tensor([[0.1, 0.7, 0.2], [0.0, 0.0, 1.0]])
    # Two ranks' batches; index 0 appears twice, as DistributedSampler padding repeats it.
    parts = [([2, 0], ["c.off", "a.off"], ["", ""]), ([1, 0], ["b", "a.off"], ["b: bad.", ""])]
    for indices, paths, errors in parts:
        batch = {"path": paths, "error": errors, "warning": ["", ""]}
        prediction = {"index": torch.tensor(indices), "probabilities": probabilities}
        writer.write_on_batch_end(trainer, None, prediction, None, batch, 0, 0)
    writer.write_on_epoch_end(trainer, None, [], [])
    assert writer.last_output == tmp_path / "predictions.json"
    records = json.loads(writer.last_output.read_text())
    assert [r["path"] for r in records] == ["a.off", "b", "c.off"]
    assert records[0]["topk"] == [["sphere", 1.0], ["box", 0.0]]
    assert records[1]["error"] == "b: bad." and records[1]["label"] is None
    assert records[2]["label"] == "cone" and len(records[2]["topk"]) == 2

    # A file name with bytes not valid in UTF-8 (a surrogate in Python) keeps its bytes.
    writer = PredictionWriter(format="csv")
    writer._class_names = CLASSES
    batch = {"path": [os.fsdecode(b"caf\xe9.off")], "error": [""], "warning": [""]}
    prediction = {"index": torch.tensor([0]), "probabilities": probabilities[:1]}
    writer.write_on_batch_end(trainer, None, prediction, None, batch, 0, 0)
    writer.write_on_epoch_end(trainer, None, [], [])
    assert b"caf\xe9.off" in (tmp_path / "predictions.csv").read_bytes()


@pytest.mark.parametrize("problem", ["folder", "file as folder"])
def test_unwritable_output_exits_2_before_classifying(
    checkpoint, files, tmp_path, capsys, monkeypatch, problem
) -> None:
    output = tmp_path if problem == "folder" else Path(files["off"]) / "out.json"
    monkeypatch.setattr(ShapeClassifier, "predict", None)  # never reached
    assert main([str(checkpoint), str(files["off"]), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pointsink-predict: error: --output {output}: ")
    assert "Traceback" not in err


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="a UTF-8 file system")
def test_file_names_not_valid_utf8_are_written_and_shown(
    checkpoint, files, tmp_path, capsys
) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    # Latin-1 bytes: Python names the file with a surrogate (os.fsdecode).
    name = os.fsdecode(b"caf\xe9.off")
    (folder / name).write_bytes(Path(files["off"]).read_bytes())
    output = tmp_path / "out.csv"
    assert main([str(checkpoint), str(folder), "--format", "csv", "--output", str(output)]) == 0
    assert os.fsencode(str(folder / name)) in output.read_bytes()  # the original bytes
    assert main([str(checkpoint), str(folder)]) == 0  # the table on stdout
    assert "caf\\udce9.off" in capsys.readouterr().out
