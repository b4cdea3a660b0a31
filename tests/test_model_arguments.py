"""Integer arguments of the model and its blocks fail early with a message naming them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from pointsink.attention import MultiheadAttention
from pointsink.blocks import (
    InducedSetAttentionBlock,
    MultiheadAttentionBlock,
    PoolingByMultiheadAttention,
    SetAttentionBlock,
)
from pointsink.model import SetSinkformer

# Each is rejected by check_int: zero and negative counts, integral floats and bools.
BAD_VALUES = [0, -4, 2.0, True]

# MultiheadAttention and the block built on it take the same arguments.
ATTENTION_KWARGS = {"query_channels": 3, "key_channels": 5, "channels": 8, "num_heads": 2}
FACTORIES: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    # name: (constructor, valid integer keyword arguments; each is spoiled in turn)
    "model": (
        SetSinkformer,
        {
            "num_classes": 3,
            "in_channels": 3,
            "channels": 8,
            "num_heads": 2,
            "num_inducing_points": 2,
            "num_seeds": 1,
        },
    ),
    "attention": (MultiheadAttention, ATTENTION_KWARGS),
    "mab": (MultiheadAttentionBlock, ATTENTION_KWARGS),
    "sab": (SetAttentionBlock, {"in_channels": 3, "channels": 8, "num_heads": 2}),
    "isab": (
        InducedSetAttentionBlock,
        {"in_channels": 3, "channels": 8, "num_heads": 2, "num_inducing_points": 2},
    ),
    "pma": (PoolingByMultiheadAttention, {"channels": 8, "num_heads": 2, "num_seeds": 2}),
}
CASES = [
    (kind, argument, value)
    for kind, (_, kwargs) in FACTORIES.items()
    for argument in kwargs
    for value in BAD_VALUES
]


@pytest.mark.parametrize(("kind", "argument", "value"), CASES)
def test_bad_integer_argument_is_named(kind: str, argument: str, value: object) -> None:
    factory, kwargs = FACTORIES[kind]
    with pytest.raises(ValueError, match=rf"^{argument} must be"):
        factory(**{**kwargs, argument: value})


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_numpy_integers_are_accepted(kind: str) -> None:
    factory, kwargs = FACTORIES[kind]
    torch.manual_seed(0)
    expected = factory(**kwargs)
    torch.manual_seed(0)
    module = factory(**{name: np.int64(value) for name, value in kwargs.items()})
    # The stored sizes are Python ints (they reach view() and hparams), in every attention.
    attentions = [m for m in module.modules() if isinstance(m, MultiheadAttention)]
    assert attentions
    for attention in attentions:
        for name in ("num_heads", "channels", "head_channels", "n_iter"):
            assert type(getattr(attention, name)) is int, name
    for got, want in zip(module.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(got, want)


def test_heads_must_divide_channels() -> None:
    with pytest.raises(ValueError, match=r"channels \(10\) must be divisible by num_heads \(4\)"):
        SetSinkformer(3, channels=10, num_heads=4)


@pytest.mark.parametrize("dropout", [True, float("nan"), 1.0, -0.1, "0.1"])
def test_dropout_must_be_a_probability(dropout: object) -> None:
    # nn.Dropout took True as p = 1: every feature dropped, a model that cannot learn.
    with pytest.raises(ValueError, match=r"^dropout must be a number in \[0, 1\)"):
        SetSinkformer(3, dropout=dropout)


def test_local_channels_is_named() -> None:
    # Was reported as "channels must be at least 1", the model's other width.
    with pytest.raises(ValueError, match=r"^local_channels must be at least 1"):
        SetSinkformer(3, local_neighbors=4, local_channels=0)


@pytest.mark.parametrize("num_groups", [0, 4])
def test_a_batch_without_points_is_refused_with_or_without_a_mask(num_groups: int) -> None:
    # With the set abstraction and a mask this was an IndexError inside argmax.
    model = SetSinkformer(3, channels=8, num_heads=2, num_groups=num_groups, group_size=2)
    points = torch.zeros(2, 0, 3)
    for mask in (None, torch.zeros(2, 0, dtype=torch.bool)):
        with pytest.raises(ValueError, match="points holds no point"):
            model(points, mask)


@pytest.mark.parametrize("switch", ["layer_norm", "normalize_offsets"])
def test_switches_must_be_bools(switch: str) -> None:
    # The string "false" is truthy: it turned layer norms on.
    with pytest.raises(ValueError, match=rf"^{switch} must be True or False"):
        SetSinkformer(3, channels=8, num_heads=2, num_groups=4, group_size=2, **{switch: "false"})
    SetSinkformer(3, channels=8, num_heads=2, num_groups=4, group_size=2, **{switch: np.True_})
