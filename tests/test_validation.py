"""The shared integer check behind every count, size and seed argument."""

import numpy as np
import pytest
import torch

from pointsink.model import SetSinkformer
from pointsink.sinkhorn import sinkhorn
from pointsink.validation import check_int


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


def test_callers_report_the_argument_they_were_given() -> None:
    with pytest.raises(ValueError, match="n_iter must be an integer"):
        sinkhorn(torch.zeros(2, 2), n_iter=True)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        SetSinkformer(num_classes=1)
    with pytest.raises(ValueError, match="normalize_offsets applies to the set abstraction"):
        SetSinkformer(num_classes=2, normalize_offsets=True)
    with pytest.raises(ValueError, match="group_hidden_layers must be at least 1; got 0"):
        SetSinkformer(num_classes=2, num_groups=4, group_hidden_layers=0)
