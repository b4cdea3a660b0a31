"""benchmarks/reproduce.py: the paper-comparison grid, run in parallel and resumed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _benchmark_utils import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    return load_benchmark("reproduce")


def test_n_iter_one_is_the_softmax_run(reproduce) -> None:
    names = [name for name, _, _ in reproduce._variants([1, 3, 5, 9])]
    assert names == ["softmax", "sinkhorn-3", "sinkhorn-5", "sinkhorn-9"]


def test_n_iter_one_is_its_own_run_with_the_reference_codes_weights(reproduce) -> None:
    """With sinkhorn_marginals uniform, one Sinkhorn iteration is softmax over n: a run."""
    reference = REPO / "configs" / "modelnet10-reference.yaml"
    assert not reproduce._sinkhorn_one_is_softmax(reference, [])
    assert reproduce._sinkhorn_one_is_softmax(reference, ["--model.sinkhorn_marginals=attention"])
    paper = REPO / "configs" / "modelnet10-paper.yaml"
    assert reproduce._sinkhorn_one_is_softmax(paper, [])
    assert not reproduce._sinkhorn_one_is_softmax(paper, ["--model.sinkhorn_marginals", "uniform"])
    names = [name for name, _, _ in reproduce._variants([1, 3], sinkhorn_one_is_softmax=False)]
    assert names == ["softmax", "sinkhorn-1", "sinkhorn-3"]


def test_parallel_grid_writes_results_and_resumes(
    reproduce, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [
        "--config", str(REPO / "tests" / "conf" / "tiny.yaml"),
        "--out", str(out), "--seeds", "0", "--n-iter", "1", "3", "--jobs", "2",
        "--", "--data.init_args.root", str(tmp_path / "synthetic"),
        "--trainer.callbacks+=pointsink.callbacks.DoublyStochasticMonitor",
    ]  # fmt: skip
    table = reproduce.main(argv)
    assert "| softmax | 1 |" in table and "| sinkhorn-3 | 1 |" in table
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["variant"], row["n_iter"]) for row in rows] == [
        ("softmax", "1"),
        ("sinkhorn-3", "3"),
    ]
    for row in rows:
        assert 0.0 <= float(row["test_oa"]) <= 1.0
        # Each run trained in its own process, with its own log and checkpoint.
        assert Path(row["best_checkpoint"]).is_file()
        assert (Path(row["run_dir"]) / "log.txt").is_file()
    assert (out / "learning_curves.png").stat().st_size > 1000
    # Validation beside test, from each run's own log (one seed: the value, no std).
    for row in rows:
        logged = reproduce._read_logged(Path(row["run_dir"]))
        best_oa, macc_there = reproduce.best_validation(logged)
        final_loss, final_oa = reproduce.final_validation(logged)
        assert (
            f"| {100 * best_oa:.2f} | {100 * macc_there:.2f} "
            f"| {final_loss:.4f} | {100 * final_oa:.2f} |"
        ) in table
    assert "±" not in table
    # The monitor's measurements are summarized per variant and layer: Sinkhorn with 3
    # iterations ends on columns, so its column sums are exact; softmax's are not.
    summary = (out / "summary.md").read_text()
    deviation = {}
    for line in summary.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 5 and cells[1] == "encoder.0.mab_induce":
            deviation[cells[0]] = float(cells[4])
    assert deviation["sinkhorn-3"] < 1e-3 < deviation["softmax"]
    assert (out / "doubly_stochastic.png").stat().st_size > 1000

    # The same grid again trains nothing: every run's result.json is reused.
    result = out / "runs" / "sinkhorn-3-seed0" / "result.json"
    before = result.stat().st_mtime_ns
    capsys.readouterr()
    assert reproduce.main(argv) == table
    assert "reusing sinkhorn-3 seed 0" in capsys.readouterr().out
    assert result.stat().st_mtime_ns == before

    # --rerun retrains every run, in the parallel children too.
    split = argv.index("--")
    assert reproduce.main([*argv[:split], "--rerun", *argv[split:]]) is not None
    assert result.stat().st_mtime_ns != before

    # Other training arguments make it a different run: it is trained again.
    recorded = json.loads(result.read_text())["arguments"]["extra"]
    assert reproduce.load_result(out, "sinkhorn-3", 0, argv[1], None, [*recorded, "-x"]) is None

    # Rows from other devices (reused across sessions) are flagged in the summary.
    content = json.loads(result.read_text())
    content["row"]["device"] = "cuda:0"
    result.write_text(json.dumps(content))
    reproduce.main(argv)
    summary = (out / "summary.md").read_text()
    assert "**Mixed devices across the rows:** cpu, cuda:0." in summary
    assert "Runs: device cpu, cuda:0;" in summary and "finished 20" in summary
    assert "another commit" not in summary

    # A row trained at other code is reused, but said to be, in the output and the summary.
    content["row"]["training_commits"] = "0000000"
    result.write_text(json.dumps(content))
    reproduce.main(argv)
    assert "(trained at 0000000)" in capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert "**Trained at another commit than this checkout's (" in summary
    assert "):** sinkhorn-3 seed 0." in summary
    assert "**Mixed training commits across the rows:** 0000000, " in summary


def test_mean_std_is_the_sample_std_and_omits_it_for_one_seed(reproduce) -> None:
    # Population std would give 1.63; the sample std (n - 1) of 90, 92, 94 % is 2.
    assert reproduce.mean_std([0.90, 0.92, 0.94]) == "92.00 ± 2.00"
    assert reproduce.mean_std([0.5812], digits=4, scale=1.0) == "0.5812"


def test_best_validation_is_the_epoch_best_ckpt_keeps(reproduce) -> None:
    logged = {
        "val/oa": [(0, 0.5), (1, 0.8), (2, 0.8)],
        "val/macc": [(0, 0.4), (1, 0.7), (2, 0.9)],
    }
    # A tie keeps the earlier epoch, as the checkpoint callback does.
    assert reproduce.best_validation(logged) == (0.8, 0.7)
    # Epoch 1 validated twice (killed before its checkpoint, then resumed): its later
    # values count, OA and mAcc alike.
    logged = {"val/oa": [(0, 0.3), (1, 0.5), (1, 0.2)], "val/macc": [(0, 0.1), (1, 0.4), (1, 0.6)]}
    assert reproduce.best_validation(logged) == (0.3, 0.1)
    logged["val/oa"][-1] = (1, 0.4)
    assert reproduce.best_validation(logged) == (0.4, 0.6)
    assert reproduce.best_validation({"ds/pool.mab/col_dev": [(0, 0.1)]}) is None


def test_final_validation_averages_the_last_epochs_once_each(reproduce) -> None:
    logged = {
        "val/loss": [(0, 2.0), (1, 1.0), (2, 0.8), (2, 0.6), (3, 0.4)],
        "val/oa": [(0, 0.1), (1, 0.5), (2, 0.7), (2, 0.9), (3, 0.7)],
    }
    # Epoch 2 was validated twice (killed before its checkpoint, then resumed): the later
    # value counts, once.
    loss, accuracy = reproduce.final_validation(logged, epochs=2)
    assert loss == pytest.approx(0.5) and accuracy == pytest.approx(0.8)
    loss, accuracy = reproduce.final_validation(logged, epochs=10)
    assert loss == pytest.approx((2.0 + 1.0 + 0.6 + 0.4) / 4)
    assert accuracy == pytest.approx((0.1 + 0.5 + 0.9 + 0.7) / 4)
    assert reproduce.final_validation({"val/oa": [(0, 0.5)]}) is None


def test_mean_curve_matches_runs_by_epoch(reproduce) -> None:
    # The second run validated epoch 1 twice (killed, resumed) and has not reached epoch 3.
    first = [(0, 0.2), (1, 0.4), (2, 0.6), (3, 0.8)]
    second = [(0, 0.4), (1, 0.5), (1, 0.6), (2, 0.8)]
    epochs, means = reproduce._mean_curve([first, second])
    assert epochs == [0, 1, 2]
    assert means == pytest.approx([0.3, 0.5, 0.7])


def test_a_config_edited_in_place_is_another_run(reproduce, tmp_path: Path) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("trainer:\n  max_epochs: 60\n")
    recorded = reproduce._arguments(str(config), "data", [])
    assert reproduce._same_arguments(recorded, reproduce._arguments(str(config), "data", []))
    config.write_text("trainer:\n  max_epochs: 100\n")
    assert not reproduce._same_arguments(recorded, reproduce._arguments(str(config), "data", []))
    # Records from before the contents were hashed still match on path, data and flags.
    hashes = ("config_sha256", "config_values_sha256")
    old_record = {key: value for key, value in recorded.items() if key not in hashes}
    assert reproduce._same_arguments(old_record, reproduce._arguments(str(config), "data", []))
    assert not reproduce._same_arguments(old_record, reproduce._arguments(str(config), "x", []))


def test_a_config_edited_in_comments_only_is_the_same_run(reproduce, tmp_path: Path) -> None:
    """A comment added to a config after launch does not stop its runs from resuming."""
    config = tmp_path / "recipe.yaml"
    config.write_text("trainer:\n  max_epochs: 50\nmodel:\n  channels: 256\n")
    recorded = reproduce._arguments(str(config), "data", [])
    config.write_text(
        "# the recipe\nmodel:\n  # width, chosen on validation\n  channels: 256\n"
        "trainer: {max_epochs: 50}\n"
    )
    assert reproduce._same_arguments(recorded, reproduce._arguments(str(config), "data", []))
    config.write_text("# the recipe\nmodel:\n  channels: 128\ntrainer: {max_epochs: 50}\n")
    assert not reproduce._same_arguments(recorded, reproduce._arguments(str(config), "data", []))
    # A record from before the values were hashed still compares the bytes.
    bytes_only = {key: value for key, value in recorded.items() if key != "config_values_sha256"}
    config.write_text("trainer:\n  max_epochs: 50\nmodel:\n  channels: 256\n")
    assert reproduce._same_arguments(bytes_only, reproduce._arguments(str(config), "data", []))
    config.write_text("# the recipe\ntrainer:\n  max_epochs: 50\nmodel:\n  channels: 256\n")
    assert not reproduce._same_arguments(bytes_only, reproduce._arguments(str(config), "data", []))
    # A config that does not parse has no values to compare and is another run.
    config.write_text("trainer: [unclosed\n")
    assert not reproduce._same_arguments(recorded, reproduce._arguments(str(config), "data", []))


class _KilledError(BaseException):
    """Stands for the process being killed between two epochs.

    A BaseException, as KeyboardInterrupt is: the grid goes on after a run's error, not after
    the process is stopped.
    """


def test_interrupted_run_resumes_from_its_last_checkpoint(
    reproduce, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [
        "--config", str(REPO / "tests" / "conf" / "tiny.yaml"),
        "--out", str(out), "--seeds", "0", "--variants", "sinkhorn-3",
        "--", "--data.init_args.root", str(tmp_path / "synthetic"), "--trainer.max_epochs", "3",
    ]  # fmt: skip
    run_dir = out / "runs" / "sinkhorn-3-seed0"
    fit_and_test = reproduce.cli_main

    def killed_after_one_epoch(args: list[str], run: bool = True):
        if args[0] == "fit":
            fit_and_test([*args, "--trainer.max_epochs", "1"])
            raise _KilledError
        return fit_and_test(args, run=run)

    monkeypatch.setattr(reproduce, "cli_main", killed_after_one_epoch)
    monkeypatch.setattr(reproduce, "_git_commit", lambda: "aaaaaaa")
    with pytest.raises(_KilledError):
        reproduce.main(argv)
    monkeypatch.setattr(reproduce, "cli_main", fit_and_test)
    assert not (run_dir / "result.json").exists()
    assert (run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    # The same command trains the two remaining epochs only, in the next logger version, here
    # at other code: the row names both sessions' commits and the summary flags it.
    monkeypatch.setattr(reproduce, "_git_commit", lambda: "bbbbbbb")
    capsys.readouterr()
    reproduce.main(argv)
    assert "resuming sinkhorn-3 seed 0 at epoch 1" in capsys.readouterr().out
    row = json.loads((run_dir / "result.json").read_text())["row"]
    assert row["epochs"] == 3
    assert (row["commit_started"], row["training_commits"]) == ("aaaaaaa", "aaaaaaa bbbbbbb")
    # The killed session's device was recorded before its fit: one device, nothing mixed.
    assert row["device"] == "cpu"
    # Its time covers the session whose fit ended: two epochs, not the killed one.
    assert row["timed_epochs"] == 2 and row["seconds_per_epoch"] > 0
    summary = (out / "summary.md").read_text()
    assert "**Resumed at other code than it was started with:** sinkhorn-3 seed 0 (aaaaaaa " in (
        summary
    )
    assert "**Trained at another commit than this checkout's (bbbbbbb):** sinkhorn-3" in summary
    assert "Mixed devices" not in summary
    assert [epoch for epoch, _ in reproduce._read_logged(run_dir)["val/oa"]] == [0, 1, 2]
    best = Path(row["best_checkpoint"])
    assert best.is_file() and best.name == "best.ckpt"
    # Selection covered all three epochs, the one before the interruption included.
    scores = [score for _, score in reproduce._read_logged(run_dir)["val/oa"]]
    assert torch.load(best, weights_only=True)["epoch"] == scores.index(max(scores))

    # --rerun starts afresh: the earlier versions are gone, so the curve has each epoch once.
    reproduce.main([*argv[: argv.index("--")], "--rerun", *argv[argv.index("--") :]])
    assert [epoch for epoch, _ in reproduce._read_logged(run_dir)["val/oa"]] == [0, 1, 2]
    row = json.loads((run_dir / "result.json").read_text())["row"]
    assert (row["epochs"], row["training_commits"], row["timed_epochs"]) == (3, "bbbbbbb", 3)
    assert "Resumed at other code" not in (out / "summary.md").read_text()

    # A fresh start that dies takes the earlier result with it: that result's logs and
    # checkpoints are gone, so the next call resumes the new run instead of reusing it.
    rerun = [*argv[: argv.index("--")], "--rerun", *argv[argv.index("--") :]]
    monkeypatch.setattr(reproduce, "cli_main", killed_after_one_epoch)
    with pytest.raises(_KilledError):
        reproduce.main(rerun)
    monkeypatch.setattr(reproduce, "cli_main", fit_and_test)
    assert not (run_dir / "result.json").exists()
    capsys.readouterr()
    reproduce.main(argv)
    assert "resuming sinkhorn-3 seed 0 at epoch 1" in capsys.readouterr().out


@pytest.mark.parametrize("jobs", [2, 1])
def test_a_failed_run_is_named_and_fails_the_grid(reproduce, tmp_path: Path, jobs: int) -> None:
    out = tmp_path / "out"
    config = str(REPO / "tests" / "conf" / "tiny.yaml")
    extra = ["--data.init_args.root", str(tmp_path / "synthetic")]
    argv = [
        "--config", config, "--out", str(out), "--seeds", "0",
        "--variants", "sinkhorn-3", "softmax", "--jobs", str(jobs), "--", *extra,
    ]  # fmt: skip
    # The sinkhorn-3 run must resume from a corrupt last.ckpt, so it fails; the softmax run
    # after it still trains (in one process too), and softmax alone must not pass for the grid.
    run_dir = out / "runs" / "sinkhorn-3-seed0"
    checkpoints = run_dir / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"not a checkpoint")
    arguments = reproduce._arguments(config, None, extra)
    (run_dir / "arguments.json").write_text(json.dumps(arguments))
    with pytest.raises(SystemExit, match="1 of 2 runs failed"):
        reproduce.main(argv)
    summary = (out / "summary.md").read_text()
    assert "| softmax | 1 |" in summary
    assert "**Failed, not in the table above:** sinkhorn-3 seed 0." in summary


@pytest.mark.parametrize("jobs", [2, 1])
def test_a_grid_whose_runs_all_fail_leaves_no_earlier_summary(
    reproduce, tmp_path: Path, jobs: int
) -> None:
    out = tmp_path / "out"
    config = str(REPO / "tests" / "conf" / "tiny.yaml")
    extra = ["--data.init_args.root", str(tmp_path / "synthetic")]
    run_dir = out / "runs" / "sinkhorn-3-seed0"
    checkpoints = run_dir / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"not a checkpoint")
    (run_dir / "arguments.json").write_text(json.dumps(reproduce._arguments(config, None, extra)))
    for earlier in ("summary.md", "results.csv", "learning_curves.png"):
        (out / earlier).write_text("an earlier command's results")
    # sinkhorn-03 is sinkhorn-3: one run, which fails.
    argv = [
        "--config", config, "--out", str(out), "--seeds", "0",
        "--variants", "sinkhorn-3", "sinkhorn-03", "--jobs", str(jobs), "--", *extra,
    ]  # fmt: skip
    where = "their log.txt" if jobs > 1 else "the tracebacks above"
    with pytest.raises(SystemExit, match=f"1 of 1 runs failed: see {where}"):
        reproduce.main(argv)
    summary = (out / "summary.md").read_text()
    assert summary == "No run finished.\n\n**Failed:** sinkhorn-3 seed 0.\n"
    assert not (out / "results.csv").exists() and not (out / "learning_curves.png").exists()
    # With --jobs even a single run trains in a child, with its own log.
    assert (run_dir / "log.txt").is_file() == (jobs > 1)
    assert not (out / "runs" / "sinkhorn-03-seed0").exists()


def test_grid_settings_after_the_separator_are_refused(
    reproduce, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    grid = "would override every run's own setting"
    # The whole model, given as a dict, a file or another class, would override them too,
    # and so would a second config, read after the grid's flags.
    whole_model = "sets the whole model"
    config = "give it as reproduce.py's own --config"
    for flags, message in (
        (["--model.n_iter", "9"], grid),
        (["--model.attention=sinkhorn"], grid),
        (["--seed_everything", "7"], grid),
        (['--model={"attention": "softmax", "n_iter": 9}'], whole_model),
        (["--model", "model.yaml"], whole_model),
        (["--model.init_args={}"], whole_model),
        (["--model.class_path", "pointsink.module.SinkformerClassifier"], whole_model),
        (["--config", "other.yaml"], config),
        (["-c=other.yaml"], config),
        (["--ckpt_path", "best.ckpt"], "the grid resumes each run from its own last.ckpt"),
    ):
        with pytest.raises(SystemExit) as raised:
            reproduce.main(["--out", str(out), "--", *flags])
        assert raised.value.code == 2
        assert message in capsys.readouterr().err
    # A mistyped flag before the separator is an error, not a train.py flag.
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(out), "--n_iter", "3"])
    assert "unrecognized arguments: --n_iter 3" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="sinkhorn-K with K >= 1"):
        reproduce.main(["--out", str(out), "--variants", "sinkhorn-0"])
    assert not (out / "runs").exists()  # rejected before anything was started


def test_a_run_with_other_arguments_is_not_replaced_without_rerun(
    reproduce, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # E.g. a baseline trained with extra flags into the grid's --out: training the grid's
    # softmax run there would delete the baseline's result and checkpoints.
    out = tmp_path / "out"
    config = str(REPO / "tests" / "conf" / "tiny.yaml")
    run_dir = out / "runs" / "softmax-seed0"
    run_dir.mkdir(parents=True)
    recorded = reproduce._arguments(config, None, ["--model.layer_norm", "false"])
    (run_dir / "arguments.json").write_text(json.dumps(recorded))
    (run_dir / "result.json").write_text(json.dumps({"arguments": recorded, "row": {}}))

    with pytest.raises(SystemExit) as raised:
        reproduce.main(
            ["--config", config, "--out", str(out), "--seeds", "0", "--variants", "softmax"]
        )
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "holds a softmax seed 0 run with other arguments" in error
    assert "extra flags --model.layer_norm false" in error
    assert "its own --out, or add --rerun" in error
    assert (run_dir / "result.json").is_file()  # untouched


def test_summary_without_deviations_removes_an_earlier_plot_of_them(
    reproduce, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_dir = out / "runs" / "softmax-seed0" / "lightning_logs" / "version_0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("epoch,val/oa,val/macc,val/loss\n0,0.5,0.5,1.0\n")
    (out / "doubly_stochastic.png").write_bytes(b"an earlier command's plot")
    row = {"variant": "softmax", "seed": 0, "run_dir": str(out / "runs" / "softmax-seed0"),
           "test_oa": 50.0, "test_macc": 50.0, "seconds_per_epoch": 1.0}  # fmt: skip
    table = reproduce.summarize([row], out)
    assert (out / "learning_curves.png").is_file()
    assert not (out / "doubly_stochastic.png").exists()
    # The logs are read under the grid's --out, not the row's recorded run_dir: a moved
    # folder keeps its validation columns.
    row["run_dir"] = str(tmp_path / "where it was trained" / "runs" / "softmax-seed0")
    assert reproduce.summarize([row], out) == table
    assert "| 50.00 | 50.00 | 1.0000 | 50.00 |" in table


def test_doubly_stochastic_distance_is_the_larger_marginal_deviation(
    reproduce, tmp_path: Path
) -> None:
    # After an even number of iterations the columns are exact and the rows are not.
    logs = tmp_path / "lightning_logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(
        "epoch,val/oa,ds/pool.mab/col_dev,ds/pool.mab/row_dev\n0,0.5,0.0,0.03\n1,0.6,0.2,0.0\n"
    )
    logged = reproduce._read_logged(tmp_path)
    assert logged["ds/pool.mab"] == [(0, 0.03), (1, 0.2)]
    table = reproduce.doubly_stochastic_table({"sinkhorn-2": [logged]})
    assert "| sinkhorn-2 | pool.mab | 1 | 0.030 | 0.200 |" in table


def test_bad_jobs_is_a_usage_error(
    reproduce, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        reproduce.main(["--jobs", "0", "--out", str(out)])
    assert raised.value.code == 2
    assert "--jobs must be at least 1; got 0" in capsys.readouterr().err
    assert not out.exists()  # rejected before anything was started


def test_a_run_without_validation_tests_its_last_checkpoint(reproduce, tmp_path: Path) -> None:
    # With data.val_fraction 0 no best.ckpt is written; the test used to get "" as its path.
    out = tmp_path / "out"
    reproduce.main([
        "--config", str(REPO / "tests" / "conf" / "tiny.yaml"),
        "--out", str(out), "--seeds", "0", "--variants", "sinkhorn-3",
        "--", "--data.init_args.root", str(tmp_path / "synthetic"),
        "--data.init_args.val_fraction", "0",
    ])  # fmt: skip
    row = json.loads((out / "runs" / "sinkhorn-3-seed0" / "result.json").read_text())["row"]
    assert Path(row["best_checkpoint"]).name == "last.ckpt"
    assert 0.0 <= row["test_oa"] <= 1.0
