"""benchmarks/facing.py: shapes turned about the vertical, and yaw voting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _benchmark_utils import load_benchmark
from _inference_utils import CLASSES, build_tiny_checkpoint

from pointsink import SetSinkformer
from pointsink.transforms import yaw_rotations


@pytest.fixture(scope="module")
def facing():
    return load_benchmark("facing")


def test_yaw_votes_do_not_depend_on_a_turn_by_a_multiple_of_their_step(facing) -> None:
    torch.manual_seed(0)
    model = SetSinkformer(3, channels=8, num_heads=2, num_inducing_points=3).eval()
    points = torch.randn(4, 20, 3)
    step = torch.full((4,), 2.0 * math.pi / 4)
    turned = torch.einsum("sij,snj->sni", yaw_rotations(step), points)
    voted = facing.yaw_voted(model, points, 4, 2, batch_size=3)
    torch.testing.assert_close(facing.yaw_voted(model, turned, 4, 2, 3), voted, atol=1e-5, rtol=0)
    # One view is not invariant: the turn changes the probabilities.
    assert not torch.allclose(
        facing.probabilities(model, turned, 3), facing.probabilities(model, points, 3)
    )


def test_main_scores_every_row(facing, tmp_path: Path, make_shape_folder) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), test_per_class=2)
    rows = facing.main(
        ["--data-root", str(root), "--checkpoint", str(checkpoint), "--votes", "2",
         "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert [name for name, *_ in rows] == [
        "upright", "random yaw", "random yaw, 2 yaw votes", "upright, 2 yaw votes"
    ]  # fmt: skip
    assert all(0.0 <= value <= 100.0 for _, *values in rows for value in values)


def test_main_takes_the_checkpoints_seed_and_up_axis(
    facing, tmp_path: Path, make_shape_folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `train.py test --data.eval_rotation_degrees 180` does: a checkpoint trained with
    # data.sample_seed 3 and y up is scored on the points and turns of that seed and axis.
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.ckpt")
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["sample_seed"] = 3
    content["hyper_parameters"]["augmentation"] = {"up_axis": 1}
    torch.save(content, checkpoint)
    root = make_shape_folder(tmp_path / "shapes", class_names=tuple(CLASSES), test_per_class=2)
    seen: dict[str, object] = {}
    build, turn = facing.build_point_cache, facing.turn_about_vertical

    def recording_build(*args, **kwargs):
        seen["sample_seed"] = kwargs["sample_seed"]
        return build(*args, **kwargs)

    def recording_turn(points, degrees, up_axis, seed):
        seen["turn"] = (up_axis, seed)
        return turn(points, degrees, up_axis, seed)

    monkeypatch.setattr(facing, "build_point_cache", recording_build)
    monkeypatch.setattr(facing, "turn_about_vertical", recording_turn)
    argv = ["--data-root", str(root), "--checkpoint", str(checkpoint), "--votes", "2",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    facing.main(argv)
    assert seen == {"sample_seed": 3, "turn": (1, 3)}
    facing.main([*argv, "--seed", "5", "--up-axis", "2"])  # given: they win
    assert seen == {"sample_seed": 5, "turn": (2, 5)}


def test_accuracy_is_the_clis_overall_and_mean_per_class(facing) -> None:
    # Class 2 has no shapes: the mean runs over classes 0 and 1 (1/2 and 1/1 right).
    found = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    overall, per_class = facing.accuracy(found, torch.tensor([0, 0, 1]), 3)
    assert overall == pytest.approx(200 / 3) and per_class == pytest.approx(75.0)


def test_main_refuses_votes_below_one(
    facing, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        facing.main(["--data-root", str(tmp_path), "--votes", "2", "0"])
    assert raised.value.code == 2
    assert "--votes must be >= 1" in capsys.readouterr().err
