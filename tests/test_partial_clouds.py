"""benchmarks/partial_clouds.py: sparse clouds, padded and masked or filled by repetition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmark_utils import load_benchmark
from _inference_utils import CLASSES, NUM_POINTS, build_tiny_checkpoint


@pytest.fixture(scope="module")
def partial():
    return load_benchmark("partial_clouds")


def _cloud_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        folder = root / name / "test"
        folder.mkdir(parents=True)
        for number in range(2):
            np.save(folder / f"{name}_{number:04d}.npy", rng.normal(size=(NUM_POINTS + 8, 3)))
    return root


def test_main_scores_like_train_py_test_and_skips_unreadable_files(
    partial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A checkpoint trained with data.sample_seed 3: "full" samples each file as the test
    # cache did, with that seed, unless --seed says otherwise.
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["sample_seed"] = 3
    torch.save(content, checkpoint)
    root = _cloud_folder(tmp_path / "clouds")
    (root / CLASSES[0] / "test" / "broken.npy").write_bytes(b"not an array")
    seeds = set()
    seeded = partial.file_sample_seed

    def recording(path, seed):
        seeds.add(seed)
        return seeded(path, seed)

    monkeypatch.setattr(partial, "file_sample_seed", recording)
    argv = ["--data-root", str(root), "--checkpoint", str(checkpoint)]
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipped .*broken.npy"):
        partial.main([*argv, "--sizes", "8", "8", "16"])  # a repeated size is one row
    output = capsys.readouterr().out
    assert seeds == {3} and "shapes=6 " in output
    rows = [line for line in output.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| 8", "mask"], ["| 8", "repeat"], ["| 16", "mask"], ["| 16", "repeat"],
        [f"| {NUM_POINTS}", "full"],
    ]  # fmt: skip
    seeds.clear()
    with pytest.warns(UserWarning, match="skipped"):
        partial.main([*argv, "--sizes", "8", "--seed", "5"])
    assert seeds == {5}


def test_main_names_a_missing_test_folder(partial, tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    root = _cloud_folder(tmp_path / "clouds")
    (root / CLASSES[1] / "test" / f"{CLASSES[1]}_0000.npy").unlink()
    (root / CLASSES[1] / "test" / f"{CLASSES[1]}_0001.npy").unlink()
    (root / CLASSES[1] / "test").rmdir()
    with pytest.raises(SystemExit, match=f"{CLASSES[1]}/test is not a folder"):
        partial.main(["--data-root", str(root), "--checkpoint", str(checkpoint), "--sizes", "8"])
