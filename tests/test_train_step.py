"""benchmarks/train_step.py: times the step of any training config, grouped or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _benchmark_utils import load_benchmark

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "conf" / "tiny.yaml"


@pytest.fixture(scope="module")
def train_step():
    return load_benchmark("train_step")


def _grouped_config(tmp_path: Path) -> Path:
    """The tiny config with a set abstraction (8 groups of 4 points), written to a file."""
    config = yaml.safe_load(TINY.read_text())
    config["model"].update(num_groups=8, group_size=4)
    path = tmp_path / "grouped.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rows(output: str) -> list[str]:
    return [line.split("|")[1].strip() for line in output.splitlines() if line.startswith("| ")]


def test_config_without_grouping_times_the_step_only(
    train_step, capsys: pytest.CaptureFixture[str]
) -> None:
    train_step.main(["--config", str(TINY), "--warmup", "0", "--repeats", "1"])
    assert _rows(capsys.readouterr().out)[1:] == ["training step (fwd, loss, bwd, AdamW)"]


def test_grouped_config_times_the_set_abstraction_parts(
    train_step, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _grouped_config(tmp_path)
    train_step.main(["--config", str(path), "--warmup", "0", "--repeats", "1"])
    assert _rows(capsys.readouterr().out)[1:] == [
        "farthest_point_sampling (8 of 32)",
        "knn_indices (4 per centre)",
        "set abstraction fwd+bwd",
        "training step (fwd, loss, bwd, AdamW)",
    ]


@pytest.mark.parametrize("padded", [False, True])
def test_per_sample_gradients_are_timed_both_ways(
    train_step, tmp_path: Path, capsys: pytest.CaptureFixture[str], padded: bool
) -> None:
    path = _grouped_config(tmp_path)
    padding = ["--padded-fraction", "0.25"] if padded else []
    arguments = ["--config", str(path), "--warmup", "0", "--repeats", "1", *padding]
    train_step.main([*arguments, "--per-sample-gradients"])
    assert _rows(capsys.readouterr().out)[-2:] == [
        "per-sample gradients (fp32), torch.func vmap(grad)",
        "per-sample gradients (fp32), one backward per sample",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_cuda_without_a_gpu_is_a_clear_error(
    train_step, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        train_step.main(["--config", str(TINY), "--device", "cuda"])
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_padded_fraction_times_the_masked_path(
    train_step, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from pointsink.embedding import SetAbstraction

    path = _grouped_config(tmp_path)
    masks = []
    forward = SetAbstraction.forward

    def recording(self, x, mask=None):
        masks.append(mask)
        return forward(self, x, mask)

    monkeypatch.setattr(SetAbstraction, "forward", recording)
    train_step.main(
        ["--config", str(path), "--warmup", "0", "--repeats", "1", "--padded-fraction", "0.5"]
    )
    output = capsys.readouterr().out
    assert "padded fraction 0.5" in output and len(_rows(output)) == 5
    # Both the set abstraction part and the training step ran with 16 real points of 32.
    assert len(masks) == 2 and all(mask.sum(dim=1).eq(16).all() for mask in masks)
    # A fraction that rounds up to every point still leaves one real point per set.
    masks.clear()
    train_step.main(
        ["--config", str(path), "--warmup", "0", "--repeats", "1", "--padded-fraction", "0.99"]
    )
    assert len(masks) == 2 and all(mask.sum(dim=1).eq(1).all() for mask in masks)
    with pytest.raises(SystemExit):
        train_step.main(["--config", str(path), "--padded-fraction", "1.0"])
    assert "--padded-fraction must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_step.main(["--config", str(path), "--repeats", "0"])
    assert "--repeats must be at least 1; got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "num_classes", "subset"),
    [
        ("modelnet10.yaml", 10, ["bed", "chair", "desk"]),
        ("modelnet40.yaml", 40, ["airplane", "bed", "car"]),
        ("synthetic.yaml", None, None),
    ],
)
def test_model_has_the_configs_class_count(
    train_step, config: str, num_classes: int | None, subset: list[str] | None
) -> None:
    from pointsink.synthetic import SYNTHETIC_CLASSES

    data = yaml.safe_load((REPO / "configs" / config).read_text())["data"]
    assert train_step._num_classes(data) == (num_classes or len(SYNTHETIC_CLASSES))
    # Class names given in the config win.
    subset = subset or list(SYNTHETIC_CLASSES[:3])
    named = {**data, "init_args": {**data["init_args"], "class_names": subset}}
    assert train_step._num_classes(named) == 3


def test_shape_folder_config_counts_its_class_folders(train_step, tmp_path: Path) -> None:
    data = {"class_path": "pointsink.data.ShapeFolderDataModule", "init_args": {"root": ""}}
    for name in ("mug", "lamp"):
        (tmp_path / name / "train").mkdir(parents=True)
    data["init_args"]["root"] = str(tmp_path)
    assert train_step._num_classes(data) == 2
    data["init_args"]["root"] = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="class_names"):
        train_step._num_classes(data)
