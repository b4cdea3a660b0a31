"""Distributed (DDP) correctness, on CPU with 2 processes.

Lightning's ``ddp`` strategy re-launches the current command for the other ranks, so the
end-to-end tests run ``python train.py ...`` in a subprocess (with ``tests/conf/tiny.yaml``)
and read back the CSV logger's ``metrics.csv`` and the per-rank records of
``tests/ddp_probe.py``. The rest are in-process unit tests of the pieces they rely on.

On a machine with two or more GPUs, ``POINTSINK_TEST_ACCELERATOR=gpu pytest tests/test_ddp.py``
runs the end-to-end tests on GPUs (NCCL) instead of CPU processes (gloo).
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, DistributedSampler

import pointsink.data as data_module
from pointsink.callbacks import RandomStateCheckpoint
from pointsink.data import (
    DatasetLayoutError,
    PointCloudDataset,
    ShapeFolderDataModule,
    build_point_cache,
    load_point_cache,
)
from pointsink.transforms import PointCloudAugmentation

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TINY = TESTS / "conf" / "tiny.yaml"
# tiny.yaml: 9 classes x 6 training shapes, 15 % of each class for validation, 3 test shapes.
NUM_TRAIN, NUM_VAL, NUM_TEST = 45, 9, 27
WORLD_SIZE = 2
ACCELERATOR = os.environ.get("POINTSINK_TEST_ACCELERATOR", "cpu")
CLASSES = ["alpha", "beta", "gamma"]  # conftest's make_shape_folder default

# Variables that would make Lightning join an outer job (SLURM, torchrun) instead of
# launching its own two local processes.
_LAUNCHER_VARIABLES = {
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
}

needs_distributed = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available())
    or (ACCELERATOR == "gpu" and torch.cuda.device_count() < WORLD_SIZE),
    reason=f"needs torch.distributed (gloo), and {WORLD_SIZE} GPUs for accelerator gpu",
)


def _run(args: list[str], timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Runs ``python ARGS`` from the repository root; fails the test on error or timeout."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCHER_VARIABLES and not key.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
    }
    env["OMP_NUM_THREADS"] = "1"  # two ranks share two cores
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    # A session of its own, so a hung run can be killed with the rank it launched.
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {timeout} s: {args}\n{stdout[-2000:]}\n{stderr[-4000:]}")
    result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    assert result.returncode == 0, f"{args}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return result


def _cli(command: str, data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(
        [
            "train.py",
            command,
            "--config",
            str(TINY),
            "--data.init_args.root",
            str(data),
            "--trainer.default_root_dir",
            str(run),
            "--trainer.logger.init_args.save_dir",
            str(run),
            "--trainer.accelerator",
            ACCELERATOR,
            *extra,
        ]
    )


def _ddp(probe: Path) -> list[str]:
    return [
        "--trainer.devices",
        str(WORLD_SIZE),
        "--trainer.strategy",
        "ddp",
        "--trainer.callbacks+=ddp_probe.SampleProbe",
        "--trainer.callbacks.output_dir",
        str(probe),
    ]


def _metrics(run: Path) -> dict[str, list[float]]:
    """Every logged value in the run's (only) metrics.csv, by name, in logging order."""
    (path,) = run.glob("lightning_logs/version_*/metrics.csv")
    values: dict[str, list[float]] = {}
    with path.open() as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if value:
                    values.setdefault(key, []).append(float(value))
    return values


def _probe(probe: Path, stage: str) -> list[dict[str, list]]:
    return [
        json.loads((probe / f"{stage}-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)
    ]


def _assert_counts_whole_samples(accuracy: float, num_samples: int) -> None:
    # Overall accuracy over exactly num_samples samples is a multiple of 1/num_samples.
    correct = accuracy * num_samples
    assert abs(correct - round(correct)) < 1e-4, (accuracy, num_samples)


FIT_OPTIONS = [
    "--trainer.max_epochs", "2",
    "--data.init_args.jitter_sigma", "0",
    "--data.init_args.max_rotation_degrees", "0",
    "--data.init_args.shuffle_points", "false",
    "--trainer.callbacks+=pointsink.callbacks.DoublyStochasticMonitor",
]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 2-epoch fit with 2 CPU processes; augmentation reduced to a per-axis scale so the
    probe can read it back; with the plotting DoublyStochasticMonitor."""
    base = tmp_path_factory.mktemp("ddp")
    paths = SimpleNamespace(data=base / "data", run=base / "fit", probe=base / "fit-probe")
    paths.result = _cli("fit", paths.data, paths.run, *FIT_OPTIONS, *_ddp(paths.probe))
    return paths


# -- end to end ----------------------------------------------------------------------------


@needs_distributed
def test_ddp_fit_writes_once_and_feeds_each_rank_its_share(ddp_fit: SimpleNamespace) -> None:
    # Written once, by rank 0: one log version, one checkpoint per name.
    (version,) = (ddp_fit.run / "lightning_logs").iterdir()
    checkpoints = sorted(path.name for path in ddp_fit.run.rglob("*.ckpt"))
    assert checkpoints == ["best.ckpt", "last.ckpt"]
    assert [path.name for path in ddp_fit.run.rglob("metrics.csv")] == ["metrics.csv"]
    assert [path.name for path in ddp_fit.run.rglob("config.yaml")] == ["config.yaml"]
    assert (version / "checkpoints" / "best.ckpt").is_file()
    assert (version / "doubly_stochastic.png").is_file()  # on_fit_end did not deadlock
    # prepare_data ran on local rank 0 only; the other rank waited and reused the caches
    # (tqdm draws each build's bar from "| 0/<files> [").
    stderr = ddp_fit.result.stderr
    assert stderr.count(f"| 0/{NUM_TRAIN + NUM_VAL} [") == 1
    assert stderr.count(f"| 0/{NUM_TEST} [") == 0  # fit needs no test split

    records = _probe(ddp_fit.probe, "fit")
    orders = []
    for epoch in range(2):
        shares = [
            [index for e, indices, _ in rank["train"] if e == epoch for index in indices]
            for rank in records
        ]
        # DistributedSampler: equal shares covering every sample, padded with at most
        # WORLD_SIZE - 1 repeats so that all ranks take the same number of steps.
        assert len(shares[0]) == len(shares[1]) == -(-NUM_TRAIN // WORLD_SIZE)
        assert set(shares[0]) | set(shares[1]) == set(range(NUM_TRAIN))
        assert len(shares[0]) + len(shares[1]) - NUM_TRAIN <= WORLD_SIZE - 1
        orders.append(shares[0])
        # Evaluation: every validation sample exactly once across ranks, no padding.
        val = [
            index
            for rank in records
            for e, indices, _ in rank["val"]
            if e == epoch
            for index in indices
        ]
        assert sorted(val) == list(range(NUM_VAL))
        assert [sum(e == epoch for e, _, _ in rank["val"]) for rank in records] == [2, 1]
    assert orders[0] != orders[1]  # reshuffled every epoch (set_epoch)

    # Each rank draws its own augmentation: the k-th batch's scales differ between ranks.
    scales = [torch.tensor([scale for _, _, scale in rank["train"]]) for rank in records]
    assert scales[0].shape == scales[1].shape
    assert not torch.isclose(scales[0], scales[1], atol=1e-3).all(dim=1).any()
    # ... and its own dropout and mixing stream (RandomStateCheckpoint reseeds per rank).
    fingerprints = [rank["torch_rng"] for rank in records]
    assert len(fingerprints[0]) == len(fingerprints[1]) > 0
    assert not set(fingerprints[0]) & set(fingerprints[1])

    metrics = _metrics(ddp_fit.run)
    for accuracy in metrics["val/oa"]:
        _assert_counts_whole_samples(accuracy, NUM_VAL)
    # The doubly-stochastic history (the plot's data, saved in checkpoints) holds the
    # logged, rank-averaged values of every epoch, not rank 0's.
    checkpoint = torch.load(next(ddp_fit.run.rglob("last.ckpt")), weights_only=True)
    (monitor,) = [state for key, state in checkpoint["callbacks"].items()
                  if key.startswith("DoublyStochasticMonitor")]  # fmt: skip
    logged_layers = {key.split("/")[1] for key in metrics if key.endswith("/col_dev")}
    assert set(monitor["history"]) == logged_layers and len(logged_layers) == 3  # ISAB + PMA
    for name, points in monitor["history"].items():
        assert [epoch for epoch, _ in points] == [0, 1]
        logged = metrics[f"ds/{name}/col_dev"]
        assert [value for _, value in points] == pytest.approx(logged, rel=1e-6)
    # The epoch's training loss is the sample-weighted mean over both ranks' batches.
    for epoch in range(2):
        batches = [(size, loss) for rank in records for e, size, loss in rank["train_loss"]
                   if e == epoch]  # fmt: skip
        expected = sum(size * loss for size, loss in batches) / sum(size for size, _ in batches)
        assert metrics["train/loss_epoch"][epoch] == pytest.approx(expected, rel=1e-5)


@needs_distributed
def test_ddp_test_metrics_equal_single_process(ddp_fit: SimpleNamespace) -> None:
    checkpoint = next(ddp_fit.run.rglob("best.ckpt"))
    base = ddp_fit.run.parent
    probe = base / "test-probe"
    # Shares of 14 and 13 test shapes: 2 batches on rank 0, 1 on rank 1.
    options = ["--ckpt_path", str(checkpoint), "--data.init_args.eval_batch_size", "13"]
    ddp = _cli("test", ddp_fit.data, base / "test-ddp", *options, *_ddp(probe))
    # The test cache, first needed now, was built once, by one rank.
    assert ddp.stderr.count(f"| 0/{NUM_TEST} [") == 1
    assert f"| 0/{NUM_TRAIN + NUM_VAL} [" not in ddp.stderr
    _cli("test", ddp_fit.data, base / "test-single", *options)

    distributed, single = _metrics(base / "test-ddp"), _metrics(base / "test-single")
    assert distributed["test/oa"] == single["test/oa"]
    assert distributed["test/macc"] == single["test/macc"]
    assert distributed["test/loss"] == pytest.approx(single["test/loss"], rel=1e-5)
    _assert_counts_whole_samples(single["test/oa"][0], NUM_TEST)

    records = _probe(probe, "test")
    tested = [index for rank in records for _, indices, _ in rank["test"] for index in indices]
    assert sorted(tested) == list(range(NUM_TEST))
    assert [len(rank["test"]) for rank in records] == [2, 1]  # uneven steps are fine
    # Lightning kept our sampler instead of injecting its padding one (it warns when it does).
    assert "evaluated exactly once" not in ddp.stderr


@needs_distributed
def test_ddp_resumed_fit_continues_as_the_uninterrupted_run(ddp_fit: SimpleNamespace) -> None:
    # Each rank restores its own generators (its augmentation stream above all), so the
    # third epoch after resuming from the 2-epoch fit is the uninterrupted run's third.
    base = ddp_fit.run.parent
    three = [*FIT_OPTIONS, "--trainer.max_epochs", "3"]
    _cli("fit", ddp_fit.data, base / "whole", *three, *_ddp(base / "whole-probe"))
    last = next(ddp_fit.run.rglob("last.ckpt"))
    resumed_options = [*three, "--ckpt_path", str(last), *_ddp(base / "resumed-probe")]
    _cli("fit", ddp_fit.data, base / "resumed", *resumed_options)
    whole, resumed = (
        torch.load(next((base / run).rglob("last.ckpt")), weights_only=True)
        for run in ("whole", "resumed")
    )
    assert whole["epoch"] == resumed["epoch"] == 2
    for name, value in resumed["state_dict"].items():
        torch.testing.assert_close(value, whole["state_dict"][name], rtol=0, atol=0, msg=name)


# -- units ---------------------------------------------------------------------------------


def _attach(datamodule: ShapeFolderDataModule, world_size: int, rank: int) -> None:
    # The loaders only read these two trainer attributes.
    datamodule.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("num_samples", [4, 9, 16, 27])
def test_eval_loaders_give_each_sample_to_exactly_one_rank(
    num_samples: int, world_size: int
) -> None:
    datamodule = ShapeFolderDataModule("unused", class_names=["a"], batch_size=8)
    datamodule.test_dataset = PointCloudDataset(
        torch.zeros(num_samples, 2, 3), torch.zeros(num_samples), ["f"] * num_samples
    )
    seen = []
    for rank in range(world_size):
        _attach(datamodule, world_size, rank)
        loader = datamodule.test_dataloader()
        # A DistributedSampler is what stops Lightning from injecting its padding one.
        assert isinstance(loader.sampler, DistributedSampler)
        seen += [index for batch in loader for index in batch["index"].tolist()]
    assert sorted(seen) == list(range(num_samples))


def test_eval_loader_single_process_and_too_many_ranks() -> None:
    datamodule = ShapeFolderDataModule("unused", class_names=["a"])
    datamodule.test_dataset = PointCloudDataset(torch.zeros(3, 2, 3), torch.zeros(3), ["f"] * 3)
    assert not isinstance(datamodule.test_dataloader().sampler, DistributedSampler)
    _attach(datamodule, world_size=4, rank=0)
    # A DatasetLayoutError, which the CLI reports in one line instead of a traceback.
    with pytest.raises(DatasetLayoutError, match="3 samples cannot be shared among 4 processes"):
        datamodule.test_dataloader()


def test_augmentation_differs_per_rank_and_is_reproducible(tmp_path, make_shape_folder) -> None:
    root = make_shape_folder(tmp_path / "shapes", train_per_class=2, test_per_class=0)

    def first_samples(rank: int) -> torch.Tensor:
        datamodule = ShapeFolderDataModule(
            str(root), num_points=16, val_fraction=0.0, preprocess_workers=1
        )
        datamodule.setup("fit")
        _attach(datamodule, world_size=2, rank=rank)
        torch.manual_seed(0)  # what seed_everything(0) does on every rank
        dataset = datamodule.train_dataloader().dataset
        return torch.stack([dataset[index]["points"] for index in range(4)])

    rank0 = first_samples(0)
    assert not torch.allclose(rank0, first_samples(1))
    torch.testing.assert_close(rank0, first_samples(0))


def test_each_rank_gets_its_own_torch_stream_unless_restored() -> None:
    def state_after_fit_start(world_size: int, rank: int, restored: bool = False) -> torch.Tensor:
        callback = RandomStateCheckpoint()
        trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        callback.setup(trainer, None, "fit")
        torch.manual_seed(0)  # what seed_everything(0) does on every rank
        if restored:  # as on_load_checkpoint leaves it after setting the saved state
            callback._restored = True
        callback.on_fit_start(trainer, None)
        return torch.get_rng_state()

    torch.manual_seed(0)
    seeded = torch.get_rng_state()
    assert torch.equal(state_after_fit_start(1, 0), seeded)  # one process: untouched
    rank0, rank1 = state_after_fit_start(2, 0), state_after_fit_start(2, 1)
    assert not torch.equal(rank0, rank1) and not torch.equal(rank0, seeded)
    assert torch.equal(rank0, state_after_fit_start(2, 0))  # reproducible
    assert torch.equal(state_after_fit_start(2, 1, restored=True), seeded)


def test_saved_cuda_stream_is_restored_once_the_gpu_is_known(monkeypatch) -> None:
    # Lightning reads the checkpoint while the model is still on the CPU and moves it to
    # its GPU afterwards: the CUDA stream must be set then, on the strategy's device.
    restored: list[tuple[torch.Tensor, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((s, d)))
    cuda_states = torch.arange(2 * 16, dtype=torch.uint8).reshape(2, 16)
    checkpoint = {
        RandomStateCheckpoint.key: {
            "torch": torch.stack([torch.get_rng_state()] * 2),
            "cuda": cuda_states,
        }
    }
    device = torch.device("cuda", 1)
    trainer = SimpleNamespace(
        world_size=2,
        global_rank=1,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        strategy=SimpleNamespace(root_device=device),
        datamodule=None,
    )
    module = SimpleNamespace(device=torch.device("cpu"))
    callback = RandomStateCheckpoint()
    callback.setup(trainer, module, "fit")
    callback.on_load_checkpoint(trainer, module, checkpoint)
    assert restored == []
    callback.on_fit_start(trainer, module)
    assert len(restored) == 1
    assert torch.equal(restored[0][0], cuda_states[1]) and restored[0][1] == device

    # test, validate and predict with a checkpoint draw nothing: no restore, no warning
    # about the checkpoint's number of ranks.
    for stage in (TrainerFn.TESTING, TrainerFn.VALIDATING, TrainerFn.PREDICTING):
        torch.manual_seed(5)
        before = torch.get_rng_state()
        single = SimpleNamespace(world_size=1, global_rank=0, state=SimpleNamespace(fn=stage))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            RandomStateCheckpoint().on_load_checkpoint(single, module, checkpoint)
        assert torch.equal(torch.get_rng_state(), before)


def test_augmentation_differs_per_dataloader_worker() -> None:
    # Identical samples: any difference between items comes from the augmentation stream.
    dataset = PointCloudDataset(
        torch.randn(1, 16, 3).expand(4, 16, 3),
        torch.zeros(4),
        ["f"] * 4,
        transform=PointCloudAugmentation(),
        seed=7,
    )
    dataset[0]  # a generator made in the main process must not be inherited by workers

    def items() -> torch.Tensor:
        torch.manual_seed(0)
        loader = DataLoader(dataset, batch_size=1, num_workers=2)
        return torch.cat([batch["points"] for batch in loader])

    first = items()
    # Items 0 and 1 are the first draws of worker 0 and worker 1.
    assert not torch.allclose(first[0], first[1])
    torch.testing.assert_close(first, items())


def _build_at_barrier(
    barrier: Any, root: str, cache_dir: str, calls: str, results: Any, name: str
) -> None:
    """Child process: waits for the other one, then builds the cache, counting files."""
    original = data_module.preprocess_set

    def counted(*args: Any, **kwargs: Any) -> Any:
        with open(calls, "a") as log:
            log.write(f"{name}\n")
        time.sleep(0.005)  # widen the window in which the two builds overlap
        return original(*args, **kwargs)

    data_module.preprocess_set = counted  # this process's copy of the module only
    barrier.wait()
    path = build_point_cache(root, CLASSES, "train", num_points=64, cache_dir=cache_dir, workers=1)
    results.put(str(path))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_concurrent_cache_builds_in_two_processes(tmp_path, make_shape_folder) -> None:
    """Two processes build the same cache at once: one builds, the other waits and reuses it."""
    root = make_shape_folder(tmp_path / "shapes", train_per_class=10, test_per_class=0)
    cache_dir, calls = tmp_path / "cache", tmp_path / "calls.log"
    # fork: the children start without re-importing torch and Lightning (seconds each).
    context = mp.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(
            target=_build_at_barrier,
            args=(barrier, str(root), str(cache_dir), str(calls), results, name),
        )
        for name in "ab"
    ]
    for process in processes:
        process.start()
    paths = {results.get(timeout=120) for _ in processes}
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]

    assert len(paths) == 1
    path = Path(paths.pop())
    built = load_point_cache(path)
    assert len(calls.read_text().splitlines()) == 30  # preprocessed once, not twice
    assert sorted(p.name for p in cache_dir.iterdir() if p.suffix != ".lock") == [path.name]
    reference = load_point_cache(
        build_point_cache(
            root, CLASSES, "train", num_points=64, cache_dir=tmp_path / "reference", workers=1
        )
    )
    assert built.paths == reference.paths
    assert torch.equal(built.points, reference.points)
    assert torch.equal(built.labels, reference.labels)
