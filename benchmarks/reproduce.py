"""Reproduce the Sinkformers paper's comparison: softmax vs Sinkhorn attention.

Trains every variant (softmax, Sinkhorn with each ``n_iter``) for every seed with the same
config and budget, evaluates the best-validation checkpoint on the test split, and writes

* ``OUT/results.csv``: one row per run,
* ``OUT/summary.md``: mean ± sample std of test overall / mean per-class accuracy, the mean
  time per epoch, and, if the config has ``DoublyStochasticMonitor``, each attention layer's
  distance to doubly stochastic after the first and the last epoch,
* ``OUT/learning_curves.png``: validation accuracy per epoch, mean and range over seeds,
* ``OUT/doubly_stochastic.png``: that distance per layer and epoch, mean over seeds.

Example (the paper's setup on real ModelNet10)::

    python benchmarks/reproduce.py --config configs/modelnet10-paper.yaml \
        --data-root ../shared/data/ModelNet10 --seeds 0 1 2 --n-iter 1 3 5 9

Extra arguments after ``--`` go to every ``train.py fit`` and ``test`` call (e.g.
``-- --trainer.max_epochs 10 --data.num_points 512``); the attention, ``n_iter``, seed, the
whole model (``--model``, ``--model.init_args``, ``--model.class_path``), a second
``--config`` and ``--ckpt_path`` are the grid's own and are refused there. A repeated seed or
variant runs once. A run folder that holds a run with other arguments (config path or values,
data or extra flags; a config whose comments alone changed is the same run) is never
overwritten without ``--rerun``: give such a command its own ``--out``.

``--jobs N`` trains up to N runs at once, each in its own process with its log in
``OUT/runs/<variant>-seed<k>/log.txt``; the CPU cores are split evenly between the runs
started together and, with several CUDA devices, each job gets its own. Every finished run
leaves a ``result.json``; a rerun with the same config and arguments reuses it, and resumes
an unfinished run from its ``last.ckpt`` (the best-validation selection covers the whole
run), so an interrupted grid resumes; ``sessions.json`` in a run's folder records each
session's commit, threads and device, and the summary flags a run resumed at other code.
``--rerun`` trains every run from scratch. A run that fails (an error in training or
testing) is named and the grid goes on with the others, with or without ``--jobs``; the
summary lists it as failed and the script exits with an error at the end.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

from pointsink import cli
from pointsink.cli import find_checkpoint
from pointsink.cli import main as cli_main

VALIDATION_KEYS = ("val/oa", "val/macc", "val/loss")
# Epochs averaged by final_validation: enough to smooth out single epochs, few enough to
# stay at the end of the schedule.
FINAL_EPOCHS = 5
# Lowest value drawn on the doubly-stochastic plot's log axis (exact marginals give 0).
LOG_FLOOR = 1e-6
# Flags the grid sets for every run; after `--` they would silently override it.
GRID_FLAGS = (
    "--model.attention",
    "--model.init_args.attention",
    "--model.n_iter",
    "--model.init_args.n_iter",
    "--seed_everything",
)
# Flags that set the whole model (a dict, a YAML file, or another class) after `--`: read
# after the grid's flags, they would replace its attention and n_iter too.
WHOLE_MODEL_FLAGS = ("--model", "--model.init_args", "--model.class_path")
# A config after `--` would be read after the grid's flags and override them all.
CONFIG_FLAGS = ("--config", "-c")
# The grid picks each run's checkpoint: its last.ckpt to resume from, its best to test.
CHECKPOINT_FLAGS = ("--ckpt_path",)


def _variants(
    n_iters: list[int], sinkhorn_one_is_softmax: bool = True
) -> list[tuple[str, str, int]]:
    # One Sinkhorn iteration is softmax attention exactly, so n_iter = 1 is the softmax run,
    # unless the weights are the reference code's transport plan (softmax over n).
    variants = [("softmax", "softmax", 1)]
    variants += [
        (f"sinkhorn-{k}", "sinkhorn", k)
        for k in dict.fromkeys(n_iters)
        if k != 1 or not sinkhorn_one_is_softmax
    ]
    return variants


def _sinkhorn_one_is_softmax(config: str | Path, extra: list[str]) -> bool:
    """Whether Sinkhorn with ``n_iter`` 1 is softmax attention under ``config`` and ``extra``.

    It is, unless ``model.sinkhorn_marginals`` (in the config, or a later flag) is
    ``"uniform"``: then it is softmax divided by the number of queries.
    """
    settings = yaml.safe_load(Path(config).read_text()) or {}
    model = settings.get("model") or {}
    model = model.get("init_args", model) if isinstance(model, dict) else {}
    marginals = str(model.get("sinkhorn_marginals", "attention"))
    flags = ("--model.sinkhorn_marginals", "--model.init_args.sinkhorn_marginals")
    for index, arg in enumerate(extra):
        name, equals, value = arg.partition("=")
        if name in flags:
            marginals = value if equals else (extra[index + 1] if index + 1 < len(extra) else "")
    return marginals != "uniform"


def _parse_variant(name: str) -> tuple[str, str, int]:
    if name == "softmax":
        return ("softmax", "softmax", 1)
    kind, _, n_iter = name.partition("-")
    if kind != "sinkhorn" or not n_iter.isdigit() or int(n_iter) < 1:
        raise SystemExit(f"unknown variant {name!r}: use softmax or sinkhorn-K with K >= 1")
    # sinkhorn-03 is sinkhorn-3: one run folder and one table row.
    return (f"sinkhorn-{int(n_iter)}", "sinkhorn", int(n_iter))


def _read_logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch curves of ``val/oa``, ``val/macc``, ``val/loss`` and each ``ds/<layer>``.

    ``ds/<layer>`` is the larger of the layer's logged column and row deviations
    (``ds/<layer>/col_dev``, ``ds/<layer>/row_dev``): 0 means doubly stochastic.

    The fit and the later test write separate logger versions; only the fit logs these.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    # A resumed fit logs its later epochs to the next version: read the versions in order.
    for metrics in sorted(run_dir.rglob("metrics.csv"), key=lambda path: _version(path.parent)):
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    wanted = key in VALIDATION_KEYS or (
                        key.startswith("ds/") and key.endswith(("/col_dev", "/row_dev"))
                    )
                    if wanted and value:
                        curves.setdefault(key, []).append((int(row["epoch"]), float(value)))
    # Doubly stochastic needs both marginals: after an even number of Sinkhorn iterations
    # the columns are exact and the rows are not, so a layer's distance is the larger one.
    for key in [key for key in curves if key.endswith("/col_dev")]:
        columns = _by_epoch(curves.pop(key))
        rows = _by_epoch(curves.pop(key.replace("/col_dev", "/row_dev"), []))
        layer = key.removesuffix("/col_dev")
        curves[layer] = [(e, max(v, rows.get(e, 0.0))) for e, v in sorted(columns.items())]
    return curves


def best_validation(logged: dict[str, list[tuple[int, float]]]) -> tuple[float, float] | None:
    """The best ``val/oa`` of one run and its ``val/macc`` at the first epoch reaching it.

    That epoch is the one ``best.ckpt`` holds: the checkpoint callback replaces its file only
    on a strictly higher score. An epoch logged twice (a run killed after validation and
    resumed) counts once, with its later values, as in :func:`final_validation`. ``None``
    for a run without validation.
    """
    scores = _by_epoch(logged.get("val/oa", []))
    if not scores:
        return None
    best_epoch, best_score = max(sorted(scores.items()), key=lambda item: item[1])  # the first
    macc = _by_epoch(logged.get("val/macc", [])).get(best_epoch, float("nan"))
    return best_score, macc


def final_validation(
    logged: dict[str, list[tuple[int, float]]], epochs: int = FINAL_EPOCHS
) -> tuple[float, float] | None:
    """Mean ``val/loss`` and ``val/oa`` of one run over its last ``epochs`` epochs.

    The best epoch's OA moves by one shape at a time (0.25 points on ModelNet10's 399
    validation shapes) and, as the maximum of a noisy curve, is biased upward; a mean over
    the last epochs does not hang on one epoch, and the loss counts every shape's
    confidence, not only whether it is right.
    An epoch logged twice (a run killed after validation and resumed) counts once, with
    its later value. ``None`` for a run without validation.
    """
    loss, accuracy = dict(logged.get("val/loss", [])), dict(logged.get("val/oa", []))
    if not loss or not accuracy:
        return None
    last = sorted(loss)[-epochs:]
    return (
        statistics.mean(loss[epoch] for epoch in last),
        statistics.mean(accuracy.get(epoch, float("nan")) for epoch in last),
    )


def _version(log_dir: Path) -> int:
    """The number of a ``version_<k>`` logger folder (-1 for other names)."""
    number = log_dir.name.removeprefix("version_")
    return int(number) if number.isdigit() else -1


def _by_epoch(curve: list[tuple[int, float]]) -> dict[int, float]:
    """A logged curve as ``{epoch: value}``; an epoch logged twice keeps its later value."""
    return dict(curve)


def _aligned(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[list[float]]]:
    """The epochs every run logged, and the runs' values at each.

    Matched by epoch, not by position, so an epoch logged twice by a resumed run does not
    shift the rest of its curve.
    """
    by_epoch = [_by_epoch(curve) for curve in curves]
    epochs = sorted(set.intersection(*(set(curve) for curve in by_epoch)))
    return epochs, [[curve[epoch] for curve in by_epoch] for epoch in epochs]


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """The epochs every run logged, and the mean over runs at each (see :func:`_aligned`)."""
    epochs, values = _aligned(curves)
    return epochs, [statistics.mean(at_epoch) for at_epoch in values]


def _doubly_stochastic_layers(logged: list[dict[str, list[tuple[int, float]]]]) -> list[str]:
    return [key for key in logged[0] if key.startswith("ds/")] if logged else []


def doubly_stochastic_table(by_variant: dict[str, list[dict]]) -> str:
    """Markdown: per variant and layer, deviation from doubly stochastic, first and last epoch.

    Means over seeds of the larger of the column and row deviations that
    ``DoublyStochasticMonitor`` logs (0 = doubly stochastic); empty if the runs did not use
    it. For softmax and odd ``n_iter`` the rows are exact, so this is the column deviation.

    Args:
        by_variant: ``{variant: [logged curves of each seed's run]}``.
    """
    lines = []
    for name, logged in by_variant.items():
        for key in _doubly_stochastic_layers(logged):
            curves = [_by_epoch(run[key]) for run in logged if run.get(key)]
            first = statistics.mean(curve[min(curve)] for curve in curves)
            last = statistics.mean(curve[max(curve)] for curve in curves)
            layer = key.removeprefix("ds/")
            lines.append(f"| {name} | {layer} | {len(curves)} | {first:.3f} | {last:.3f} |")
    if not lines:
        return ""
    header = [
        "| variant | attention layer | seeds | deviation (larger of column and row), first epoch "
        "| last epoch |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + lines)


def _plot_doubly_stochastic(by_variant: dict[str, list[dict]], path: Path, plt) -> None:
    keys = _doubly_stochastic_layers(next(iter(by_variant.values())))
    # Log scale: Sinkhorn variants differ by orders of magnitude near 0 (1e-5 to 1e-2).
    figure, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for name, logged in by_variant.items():
            curves = [run[key] for run in logged if run.get(key)]
            if curves:
                epochs, values = _mean_curve(curves)
                axis.plot(epochs, [max(value, LOG_FLOOR) for value in values], label=name)
        axis.set_title(key.removeprefix("ds/"), fontsize=9)
        axis.set_xlabel("epoch")
        axis.set_yscale("log")
    # The larger of the column and row deviations, values below LOG_FLOOR drawn at it.
    axes[0][0].set_ylabel(f"deviation from doubly stochastic\n(columns or rows; min {LOG_FLOOR:g})")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def resumable_checkpoint(run_dir: Path, arguments: dict) -> Path | None:
    """The ``last.ckpt`` an unfinished run with the same arguments resumes from, or ``None``.

    Its newest logger version's, since every resumed fit logs to a new version.
    """
    recorded = run_dir / "arguments.json"
    if not recorded.is_file() or not _same_arguments(json.loads(recorded.read_text()), arguments):
        return None
    found = list(run_dir.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    return max(found, key=lambda path: _version(path.parents[1])) if found else None


def run_one(
    config: str,
    data_root: str | None,
    out: Path,
    name: str,
    attention: str,
    n_iter: int,
    seed: int,
    extra: list[str],
    rerun: bool = False,
) -> dict:
    """Fits one variant with one seed, tests its best checkpoint, writes ``result.json``.

    An unfinished run with the same arguments resumes from its ``last.ckpt`` unless
    ``rerun``; a fresh start first deletes the run's earlier logs and checkpoints, so that
    they do not mix into its curves.
    """
    run_dir = _run_dir(out, name, seed)
    arguments = _arguments(config, data_root, extra)
    resume_from = None if rerun else resumable_checkpoint(run_dir, arguments)
    # Whatever happens to this call, an earlier result must not stand beside its logs.
    (run_dir / "result.json").unlink(missing_ok=True)
    first_epoch = 0
    if resume_from is None:
        shutil.rmtree(run_dir / "lightning_logs", ignore_errors=True)
    else:
        first_epoch = torch.load(resume_from, map_location="cpu", weights_only=True)["epoch"] + 1
        print(f"resuming {name} seed {seed} at epoch {first_epoch}: {resume_from}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "arguments.json").write_text(json.dumps(arguments, indent=2) + "\n")
    common = ["--config", config, "--seed_everything", str(seed),
              "--trainer.default_root_dir", str(run_dir),
              "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(run_dir),
              "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if data_root:
        common += ["--data.root", data_root]
    model = ["--model.attention", attention, "--model.n_iter", str(n_iter)]
    # Recorded before the fit, so that a session that is killed still names its code and
    # device (the trainer is built, not run, to learn the device it chose).
    device = str(cli_main([*common, *model, *extra], run=False).trainer.strategy.root_device)
    session = {"first_epoch": first_epoch, "commit": _git_commit(),
               "threads": torch.get_num_threads(), "device": device}  # fmt: skip
    sessions = [*_earlier_sessions(run_dir, first_epoch), session]
    _write_sessions(run_dir, sessions)
    resume = ["--ckpt_path", str(resume_from)] if resume_from is not None else []
    start = time.perf_counter()
    fit = cli_main(["fit", *common, *model, *extra, *resume])
    seconds = time.perf_counter() - start
    epochs = max(1, fit.trainer.current_epoch)
    session.update(epochs=epochs - first_epoch, seconds=seconds)
    _write_sessions(run_dir, sessions)
    # Sessions killed before their fit ended have no time.
    timed = [entry for entry in sessions if entry.get("seconds") is not None]
    timed_epochs = sum(entry["epochs"] for entry in timed)
    best = fit.trainer.checkpoint_callback.best_model_path
    if not best:
        # No val/oa was logged (data.val_fraction 0): nothing to select by, so the last
        # epoch is tested, as the paper's code does.
        best = str(find_checkpoint(run_dir, "last"))
        print(f"note: {name} seed {seed} was not validated; testing {best}", flush=True)
    test = cli_main(["test", *common, *model, *extra, "--ckpt_path", best])
    metrics = test.trainer.callback_metrics
    row = {
        "variant": name,
        "attention": attention,
        "n_iter": n_iter,
        "seed": seed,
        "epochs": epochs,
        # The fit calls' wall time (start-up and validation included) over the epochs they
        # trained, summed over the sessions whose fit ended; NaN if none trained an epoch.
        "seconds_per_epoch": (
            sum(entry["seconds"] for entry in timed) / timed_epochs
            if timed_epochs > 0
            else float("nan")
        ),
        "timed_epochs": timed_epochs,
        "resumed_from_epoch": first_epoch,
        "threads": _joined(sessions, "threads"),
        "device": _joined(sessions, "device"),
        "commit": _git_commit(),  # when the result was written
        "commit_started": sessions[0]["commit"],  # when the run's first epoch was trained
        "training_commits": _joined(sessions, "commit"),  # every session's, in order
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "test_oa": float(metrics["test/oa"]),
        "test_macc": float(metrics["test/macc"]),
        "best_checkpoint": best,
        "run_dir": str(run_dir),
    }
    result = {"arguments": arguments, "row": row}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return row


def _earlier_sessions(run_dir: Path, first_epoch: int) -> list[dict]:
    """The recorded training sessions of a run resumed at ``first_epoch`` (``[]`` if fresh).

    Each is ``{"first_epoch", "commit", "threads", "device"}``, plus ``"epochs"`` and
    ``"seconds"`` if its fit ended (earlier versions of this script recorded the device only
    then). Epochs trained before sessions were recorded count as one session of unknown code.
    """
    if first_epoch == 0:
        return []
    path = run_dir / "sessions.json"
    sessions = json.loads(path.read_text()) if path.is_file() else []
    sessions = [entry for entry in sessions if entry["first_epoch"] < first_epoch]
    if not sessions or sessions[0]["first_epoch"] > 0:
        sessions.insert(0, {"first_epoch": 0, "commit": "unknown", "threads": "unknown"})
    return sessions


def _write_sessions(run_dir: Path, sessions: list[dict]) -> None:
    (run_dir / "sessions.json").write_text(json.dumps(sessions, indent=2) + "\n")


def _joined(sessions: list[dict], field: str) -> str:
    """The sessions' distinct values of ``field``, in order, space-separated (``?`` if unset)."""
    return " ".join(dict.fromkeys(str(entry.get(field, "?")) for entry in sessions))


def _run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}-seed{seed}"


def _arguments(config: str, data_root: str | None, extra: list[str]) -> dict:
    """What makes two runs the same run: the config's path and values, data, extra flags.

    Both the file's bytes and its parsed values are hashed; :func:`_same_arguments` compares
    the values where a record has them.
    """
    contents = Path(config).read_bytes()
    return {
        "config": config,
        "config_sha256": hashlib.sha256(contents).hexdigest(),
        "config_values_sha256": _config_values_digest(contents),
        "data_root": data_root,
        "extra": extra,
    }


def _config_values_digest(contents: bytes) -> str | None:
    """SHA-256 of a YAML config's parsed values (comments, layout and key order left out).

    ``None`` for contents that do not parse; the CLI then says why.
    """
    try:
        values = yaml.safe_load(contents)
    except yaml.YAMLError:  # undecodable bytes included (yaml.reader.ReaderError)
        return None
    canonical = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _describe_arguments(recorded: dict) -> str:
    """A short account of a recorded run's arguments, for messages."""
    extra = " ".join(recorded.get("extra") or []) or "none"
    return f"config {recorded.get('config')}, data {recorded.get('data_root')}, extra flags {extra}"


def _same_arguments(recorded: dict, arguments: dict) -> bool:
    """Whether a run recorded with ``recorded`` is the run ``arguments`` describe.

    A config whose values were edited in place is another run (its result is not reused, its
    checkpoint not resumed); an edit of its comments or layout alone is not. Records written
    before the values were hashed compare the file's bytes, and records written before the
    contents were hashed match on the other fields.
    """
    if recorded.get("config_values_sha256") is not None:
        ignored = {"config_sha256"}
    elif "config_sha256" in recorded:
        ignored = {"config_values_sha256"}
    else:
        ignored = {"config_sha256", "config_values_sha256"}
    return {key: value for key, value in recorded.items() if key not in ignored} == {
        key: value for key, value in arguments.items() if key not in ignored
    }


def _git_commit() -> str:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or ``unknown``."""
    try:

        def git(*command: str) -> str:
            return subprocess.run(
                ["git", *command], cwd=Path(__file__).resolve().parent, capture_output=True,
                text=True, check=True, timeout=10,
            ).stdout.strip()  # fmt: skip

        dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
        return git("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_result(
    out: Path, name: str, seed: int, config: str, data_root: str | None, extra: list[str]
) -> dict | None:
    """The row of a finished run with the same arguments, or ``None``."""
    path = _run_dir(out, name, seed) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if not _same_arguments(result.get("arguments") or {}, _arguments(config, data_root, extra)):
        return None
    return result["row"]


def prepare_data(config: str, data_root: str | None, extra: list[str]) -> None:
    """Builds the config's data module and runs its ``prepare_data`` in this process."""
    arguments = ["--config", config, *extra]
    if data_root:
        arguments += ["--data.root", data_root]
    # Not cli_main, which the tests replace to interrupt fits.
    built = cli.main(arguments, run=False)
    assert built is not None
    built.datamodule.prepare_data()


def _job_environment(slot: int, jobs: int) -> dict[str, str]:
    """A job's environment: its share of the CPU cores and, with several GPUs, its own.

    Explicit ``OMP_NUM_THREADS`` / ``CUDA_VISIBLE_DEVICES`` settings are kept.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    if "CUDA_VISIBLE_DEVICES" not in env:
        if torch.cuda.device_count() > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % torch.cuda.device_count())
    return env


def run_parallel(
    runs: list[tuple[str, str, int, int]],
    args: argparse.Namespace,
    extra: list[str],
) -> tuple[dict[tuple[str, int], dict], list[tuple[str, str, int, int]]]:
    """Runs each (name, attention, n_iter, seed) in a child process, ``args.jobs`` at once.

    Returns ``({(name, seed): row}, failed runs)``: the rows of the runs that finished, and
    the runs that did not (each reported with the path of its log).
    """
    # Download, generate and cache the data once here, not in several jobs at once.
    prepare_data(args.config, args.data_root, extra)
    # Fewer runs than jobs (e.g. the one left of an interrupted grid) share the cores.
    jobs = min(args.jobs, len(runs))
    pending = list(runs)
    active: dict[int, tuple[subprocess.Popen, tuple, float]] = {}
    finished: dict[tuple[str, int], dict] = {}
    failed = []
    while pending or active:
        while pending and len(active) < jobs:
            slot = next(i for i in range(jobs) if i not in active)
            name, _, _, seed = run = pending.pop(0)
            run_dir = _run_dir(args.out, name, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(Path(__file__).resolve()), "--config", args.config,
                       "--out", str(args.out), "--variants", name, "--seeds", str(seed),
                       "--no-summary"]  # fmt: skip
            if args.data_root:
                command += ["--data-root", args.data_root]
            if args.rerun:
                command.append("--rerun")
            command += ["--", *extra]
            with (run_dir / "log.txt").open("a") as log:  # a resumed run's log goes on
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT,
                    env=_job_environment(slot, jobs),
                )  # fmt: skip
            active[slot] = (process, run, time.perf_counter())
            print(f"started {name} seed {seed} (job {slot})", flush=True)
        time.sleep(1.0)
        for slot, (process, run, start) in list(active.items()):
            if process.poll() is None:
                continue
            del active[slot]
            name, _, _, seed = run
            minutes = (time.perf_counter() - start) / 60
            row = load_result(args.out, name, seed, args.config, args.data_root, extra)
            if process.returncode != 0 or row is None:
                failed.append(run)
                log = _run_dir(args.out, name, seed) / "log.txt"
                print(f"FAILED {name} seed {seed} after {minutes:.1f} min: see {log}")
            else:
                finished[(name, seed)] = row
                print(
                    f"finished {name} seed {seed} in {minutes:.1f} min: test OA "
                    f"{100 * row['test_oa']:.2f} %, mAcc {100 * row['test_macc']:.2f} %",
                    flush=True,
                )
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed", file=sys.stderr)
    return finished, failed


def mean_std(values: list[float], digits: int = 2, scale: float = 100.0) -> str:
    """``mean ± std`` of ``values * scale`` (by default, fractions in percent).

    The sample standard deviation (``n - 1``); one value is shown alone, since it has none.
    """
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    std = statistics.stdev(values)
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"


def provenance(rows: list[dict], checkout: str) -> str:
    """Where and from which code the rows come, flagging rows that differ.

    Rows reused or resumed across sessions may come from other machines or code: a reused
    row keeps the commits it was trained at, which need not be the checkout's, and a run
    resumed in several sessions lists each session's device, threads and commit.

    Args:
        rows: Result rows (rows written by older versions of this script lack some fields).
        checkout: The commit of the code summarizing them.
    """

    def values(field: str) -> list[str]:
        return sorted({value for row in rows for value in _row_values(row, field)})

    finished = values("finished")
    text = (
        f"Runs: device {', '.join(values('device'))}; {', '.join(values('threads'))} threads; "
        f"trained at commit {', '.join(values('training_commits'))}; finished "
        f"{finished[0]}" + (f" to {finished[-1]}" if len(finished) > 1 else "") + ".\n"
    )
    fields = {
        "device": "devices",
        "threads": "thread counts",
        "training_commits": "training commits",
        "commit": "result commits",
    }
    for field, label in fields.items():
        if len(values(field)) > 1:
            text += f"\n**Mixed {label} across the rows:** {', '.join(values(field))}.\n"
    resumed = [row for row in rows if len(_row_values(row, "training_commits")) > 1]
    if resumed:
        runs = ", ".join(
            f"{row['variant']} seed {row['seed']} ({row['training_commits']})" for row in resumed
        )
        text += f"\n**Resumed at other code than it was started with:** {runs}.\n"
    other = [row for row in rows if _row_values(row, "training_commits") != [checkout]]
    if other:
        runs = ", ".join(f"{row['variant']} seed {row['seed']}" for row in other)
        text += (
            f"\n**Trained at another commit than this checkout's ({checkout}):** {runs}. "
            "`--rerun` retrains them with this code.\n"
        )
    return text


def _row_values(row: dict, field: str) -> list[str]:
    """A row's values of ``field`` (a session field's are space-separated in the row).

    Rows written before sessions were recorded name one commit, ``commit_started``.
    """
    if field == "training_commits" and field not in row:
        field = "commit_started"
    value = str(row.get(field, "?"))
    return value.split() or ["?"] if field in ("training_commits", "device", "threads") else [value]


def summarize(rows: list[dict], out: Path) -> str:
    """Writes the CSV, the markdown summary and the learning-curve plot."""
    with (out / "results.csv").open("w", newline="") as handle:
        # Every field of every row (rows written by older versions of this script lack some).
        fields = list(dict.fromkeys(field for row in rows for field in row))
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    # Validation columns beside test: compare recipes on validation, report them on test.
    lines = [
        "| variant | seeds | test OA (%) | test mAcc (%) | best val OA (%) | val mAcc there (%) "
        f"| val loss, last {FINAL_EPOCHS} epochs | val OA, last {FINAL_EPOCHS} epochs (%) "
        "| s / epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_variant: dict[str, list[dict]] = {}  # each run's metrics.csv read once
    for name in dict.fromkeys(row["variant"] for row in rows):
        group = [row for row in rows if row["variant"] == name]
        # From --out, not the row's recorded run_dir: a grid's folder may have been moved.
        by_variant[name] = [_read_logged(_run_dir(out, name, r["seed"])) for r in group]
        validation = [best_validation(logged) for logged in by_variant[name]]
        if all(validation):
            val_oa = mean_std([oa for oa, _ in validation])
            val_macc = mean_std([macc for _, macc in validation])
        else:
            val_oa = val_macc = "-"
        final = [final_validation(logged) for logged in by_variant[name]]
        if all(final):
            final_loss = mean_std([loss for loss, _ in final], digits=4, scale=1.0)
            final_oa = mean_std([oa for _, oa in final])
        else:
            final_loss = final_oa = "-"
        timed = [r["seconds_per_epoch"] for r in group if math.isfinite(r["seconds_per_epoch"])]
        untimed = f" ({len(timed)} timed)" if 0 < len(timed) < len(group) else ""
        lines.append(
            f"| {name} | {len(group)} | {mean_std([r['test_oa'] for r in group])} | "
            f"{mean_std([r['test_macc'] for r in group])} | {val_oa} | {val_macc} | "
            f"{final_loss} | {final_oa} | "
            f"{f'{statistics.mean(timed):.1f}{untimed}' if timed else '-'} |"
        )
    table = "\n".join(lines)
    doubly_stochastic = doubly_stochastic_table(by_variant)
    summary = table + (
        "\n\nMean ± sample standard deviation (n - 1) over the seeds. s / epoch: the mean "
        "over runs of the `fit` calls' wall time (start-up and validation included) over the "
        "epochs they trained, summed over a resumed run's sessions whose fit ended (a killed "
        "session's time is not known). "
        f"Last {FINAL_EPOCHS} epochs: the last {FINAL_EPOCHS} validated epochs, or all of a "
        "shorter run's.\n\n" + provenance(rows, _git_commit())
    )
    if doubly_stochastic:
        summary += (
            "\nDistance of the attention to doubly stochastic (relative mean absolute "
            "deviation of column sums from n/m or of row sums from 1, whichever is larger; "
            "first validation batch, mean over seeds):"
            "\n\n" + doubly_stochastic + "\n"
        )
    (out / "summary.md").write_text(summary)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, logged in by_variant.items():
        epochs, values = _aligned([run.get("val/oa", []) for run in logged])
        mean = [statistics.mean(at_epoch) for at_epoch in values]
        (line,) = axis.plot(epochs, mean, label=f"{name} ({len(logged)} seeds)")
        if len(logged) > 1:  # the spread over seeds: lowest to highest
            lowest, highest = [min(v) for v in values], [max(v) for v in values]
            axis.fill_between(epochs, lowest, highest, color=line.get_color(), alpha=0.2)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation overall accuracy")
    axis.set_title("Validation OA: mean over seeds (line), lowest to highest (band)", fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "learning_curves.png", dpi=120)
    plt.close(figure)
    if doubly_stochastic:
        _plot_doubly_stochastic(by_variant, out / "doubly_stochastic.png", plt)
    else:  # an earlier command's plot must not stand beside this summary
        (out / "doubly_stochastic.png").unlink(missing_ok=True)
    return table


def main(argv: list[str] | None = None) -> str:
    """Parses arguments, runs the grid and prints the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/modelnet10-paper.yaml")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-iter", type=int, nargs="+", default=[1, 3, 5, 9])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="run only these, e.g. softmax sinkhorn-5 (default: softmax and every --n-iter; "
        "n_iter 1 is the softmax run unless model.sinkhorn_marginals is uniform)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process (default 1: one after another here)",
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="train every run from scratch, even one with a result.json or a last.ckpt",
    )
    # Internal: a child of --jobs writes its result.json and leaves the summary to the parent.
    parser.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    split = raw.index("--") if "--" in raw else len(raw)
    args = parser.parse_args(raw[:split])  # a mistyped flag is an error, not a train.py flag
    extra = raw[split + 1 :]
    for arg in extra:
        name = arg.partition("=")[0]
        if name in GRID_FLAGS:
            parser.error(
                f"{name} after -- would override every run's own setting; the grid sets it "
                "(use --variants, --n-iter and --seeds)"
            )
        if name in WHOLE_MODEL_FLAGS:
            parser.error(
                f"{name} after -- sets the whole model, so it would override every run's "
                "attention and n_iter; set single values (--model.channels 128) or put the "
                "model in reproduce.py's own --config"
            )
        if name in CONFIG_FLAGS:
            parser.error(
                f"{name} after -- would be read after the grid's settings and could override "
                "every run's attention, n_iter and seed; give it as reproduce.py's own --config"
            )
        if name in CHECKPOINT_FLAGS:
            parser.error(
                f"{name} after -- would give every run the same checkpoint; the grid resumes "
                "each run from its own last.ckpt and tests its best (to start from trained "
                "weights, use --model.weights)"
            )
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    if min(args.n_iter) < 1:
        parser.error(f"--n-iter values must be at least 1; got {args.n_iter}")
    args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed is the same run
    args.out.mkdir(parents=True, exist_ok=True)
    variants = _variants(args.n_iter, _sinkhorn_one_is_softmax(args.config, extra))
    if args.variants:
        variants = list(dict.fromkeys(_parse_variant(name) for name in args.variants))
    runs = [(*variant, seed) for variant in variants for seed in args.seeds]
    done = {}
    if not args.rerun:
        checkout = _git_commit()
        for name, _, _, seed in runs:
            row = load_result(args.out, name, seed, args.config, args.data_root, extra)
            if row is not None:
                trained_at = _row_values(row, "training_commits")
                note = "" if trained_at == [checkout] else f" (trained at {' '.join(trained_at)})"
                print(f"reusing {name} seed {seed}: {_run_dir(args.out, name, seed)}{note}")
                done[(name, seed)] = row
    todo = [run for run in runs if (run[0], run[3]) not in done]
    if not args.rerun:
        arguments = _arguments(args.config, args.data_root, extra)
        for name, _, _, seed in todo:
            path = _run_dir(args.out, name, seed) / "arguments.json"
            recorded = json.loads(path.read_text()) if path.is_file() else None
            if recorded is not None and not _same_arguments(recorded, arguments):
                # Training it would delete that run's result and checkpoints.
                parser.error(
                    f"{path.parent} holds a {name} seed {seed} run with other arguments "
                    f"({_describe_arguments(recorded)}); give this command its own --out, "
                    "or add --rerun to replace it"
                )
    failed: list = []
    # With --jobs, every run trains in a child with its own log.txt, even a single one.
    if args.jobs > 1 and todo:
        finished, failed = run_parallel(todo, args, extra)
        done.update(finished)
        rows = [done[(name, seed)] for name, _, _, seed in runs if (name, seed) in done]
    else:
        if todo:
            # As run_parallel does: data preparation is not counted in the first run's time.
            prepare_data(args.config, args.data_root, extra)
        rows = []
        for run in runs:
            name, attention, n_iter, seed = run
            row = done.get((name, seed))
            if row is None:
                try:
                    row = run_one(
                        args.config, args.data_root, args.out, name, attention, n_iter, seed,
                        extra, rerun=args.rerun,
                    )  # fmt: skip
                except Exception:  # one run's failure: go on with the others, as --jobs does
                    traceback.print_exc()
                    print(f"FAILED {name} seed {seed}: the traceback above", file=sys.stderr)
                    failed.append(run)
                    continue
            rows.append(row)
            if not args.no_summary:
                summarize(rows, args.out)  # partial results survive an interrupted grid
    table = ""
    if not args.no_summary:
        if rows:
            table = summarize(rows, args.out)
        else:
            # No run finished: an earlier command's summary, table and plots must not stand.
            for stale in ("results.csv", "learning_curves.png", "doubly_stochastic.png"):
                (args.out / stale).unlink(missing_ok=True)
            (args.out / "summary.md").write_text("No run finished.\n")
        if failed:
            # A mean over the seeds that survived is not the mean that was asked for.
            missing = ", ".join(f"{name} seed {seed}" for name, _, _, seed in failed)
            label = "Failed, not in the table above" if rows else "Failed"
            note = f"\n**{label}:** {missing}.\n"
            with (args.out / "summary.md").open("a") as handle:
                handle.write(note)
            table += note
        print(table)
    if failed:
        where = "their log.txt" if args.jobs > 1 else "the tracebacks above"
        raise SystemExit(f"{len(failed)} of {len(runs)} runs failed: see {where}")
    return table


if __name__ == "__main__":
    main()
