"""The shared checks: integers behind every count, size and seed argument; batches of sets."""

import numpy as np
import pytest
import torch

from pointsink.model import SetSinkformer
from pointsink.sinkhorn import sinkhorn
from pointsink.validation import check_int, check_real, check_set_batch


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3)])
def test_accepts_python_and_numpy_integers(value: object) -> None:
    result = check_int("num_points", value)
    assert result == 3
    assert type(result) is int


@pytest.mark.parametrize("value", [True, 3.0, "3", None])
def test_rejects_non_integers_by_name(value: object) -> None:
    with pytest.raises(ValueError, match="num_points must be an integer"):
        check_int("num_points", value)


def test_minimum_is_inclusive() -> None:
    assert check_int("seed", 0, minimum=0) == 0
    with pytest.raises(ValueError, match="seed must be at least 0; got -1"):
        check_int("seed", -1, minimum=0)


@pytest.mark.parametrize("value", [0.25, 0, np.float32(0.25), np.int64(0)])
def test_check_real_accepts_python_and_numpy_numbers_inside(value: object) -> None:
    result = check_real("val_fraction", value, 0.0, 1.0, high_open=True)
    assert result == float(value)
    assert type(result) is float


def test_check_real_closed_bounds_include_their_ends() -> None:
    assert check_real("p", 0.0, 0.0, 1.0) == 0.0
    assert check_real("p", 1.0, 0.0, 1.0) == 1.0
    assert check_real("degrees", 180, high=180.0) == 180.0


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (1.0, {"low": 0.0, "high": 1.0, "high_open": True}, r"in \[0, 1\); got 1\.0"),
        (0.0, {"low": 0.0, "high": 1.0, "low_open": True}, r"in \(0, 1\]; got 0\.0"),
        (-0.5, {"low": 0.0}, r">= 0; got -0\.5"),
        (0.0, {"low": 0.0, "low_open": True}, r"> 0; got 0\.0"),
        (2.0, {"high": 1.0, "high_open": True}, r"< 1; got 2\.0"),
        (True, {"low": 0.0, "high": 1.0}, r"in \[0, 1\]; got True"),
        ("0.5", {"low": 0.0, "high": 1.0}, r"in \[0, 1\]; got '0\.5'"),
        (float("nan"), {}, r"\(not NaN\); got nan"),
        (float("nan"), {"low": 0.0}, r">= 0; got nan"),
        (None, {"high": 180.0}, r"<= 180; got None"),
    ],
)
def test_check_real_names_the_interval(value: object, bounds: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"^ratio must be a number " + message):
        check_real("ratio", value, **bounds)


def test_callers_report_the_argument_they_were_given() -> None:
    with pytest.raises(ValueError, match="n_iter must be an integer"):
        sinkhorn(torch.zeros(2, 2), n_iter=True)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        SetSinkformer(num_classes=1)
    with pytest.raises(ValueError, match="normalize_offsets applies to the set abstraction"):
        SetSinkformer(num_classes=2, normalize_offsets=True)
    with pytest.raises(ValueError, match="group_hidden_layers must be at least 1; got 0"):
        SetSinkformer(num_classes=2, num_groups=4, group_hidden_layers=0)


def test_set_batch_check_skips_weights_it_cannot_compare() -> None:
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    float_weight = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="convert the input"):
        check_set_batch("x", x, 3, float_weight)
    # Quantized layers: a packed weight behind a method (torch.ao's dynamic Linear), or an
    # integer tensor. They take float inputs, so there is nothing to compare the dtype with.
    check_set_batch("x", x, 3, lambda: float_weight)  # type: ignore[arg-type]
    check_set_batch("x", x, 3, torch.zeros(4, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, set_size, 3\)"):
        check_set_batch("x", x[0], 3, torch.zeros(4, 3, dtype=torch.int8))
    # The meta device has no autocast; a mismatch is still a TypeError.
    with pytest.raises(TypeError, match="convert the input"):
        check_set_batch("x", x.to("meta"), 3, float_weight.to("meta"))


def test_model_checks_inputs_whatever_head_it_is_given() -> None:
    model = SetSinkformer(3, channels=16, num_heads=2).eval()
    points = torch.randn(2, 10, 3)
    features = model.forward_features(points)
    model.head = torch.nn.Identity()  # embeddings: the head swapped out
    torch.testing.assert_close(model(points), features)
    with pytest.raises(TypeError, match=r"points has dtype torch\.float64"):
        model(points.double())
