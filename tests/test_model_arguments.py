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

FACTORIES: dict[str, tuple[Callable[..., nn.Module], dict, list[str]]] = {
    # name: (constructor, valid keyword arguments, integer arguments to spoil)
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
        ["in_channels", "channels", "num_heads", "num_inducing_points", "num_seeds"],
    ),
    "attention": (
        MultiheadAttention,
        {"query_channels": 3, "key_channels": 5, "channels": 8, "num_heads": 2},
        ["query_channels", "key_channels", "channels", "num_heads"],
    ),
    "mab": (
        MultiheadAttentionBlock,
        {"query_channels": 3, "key_channels": 5, "channels": 8, "num_heads": 2},
        ["query_channels", "key_channels", "channels", "num_heads"],
    ),
    "sab": (
        SetAttentionBlock,
        {"in_channels": 3, "channels": 8, "num_heads": 2},
        ["in_channels", "channels", "num_heads"],
    ),
    "isab": (
        InducedSetAttentionBlock,
        {"in_channels": 3, "channels": 8, "num_heads": 2, "num_inducing_points": 2},
        ["in_channels", "channels", "num_heads", "num_inducing_points"],
    ),
    "pma": (
        PoolingByMultiheadAttention,
        {"channels": 8, "num_heads": 2, "num_seeds": 2},
        ["channels", "num_heads", "num_seeds"],
    ),
}
CASES = [
    (kind, argument, value)
    for kind, (_, _, arguments) in FACTORIES.items()
    for argument in arguments
    for value in BAD_VALUES
]


@pytest.mark.parametrize(("kind", "argument", "value"), CASES)
def test_bad_integer_argument_is_named(kind: str, argument: str, value: object) -> None:
    factory, kwargs, _ = FACTORIES[kind]
    with pytest.raises(ValueError, match=rf"^{argument} must be"):
        factory(**{**kwargs, argument: value})


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_numpy_integers_are_accepted(kind: str) -> None:
    factory, kwargs, arguments = FACTORIES[kind]
    torch.manual_seed(0)
    expected = factory(**kwargs)
    torch.manual_seed(0)
    converted = {name: np.int64(kwargs[name]) for name in arguments}
    module = factory(**{**kwargs, **converted})
    for name in ("num_heads", "channels"):
        if hasattr(module, name):
            assert type(getattr(module, name)) is int
    for got, want in zip(module.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(got, want)


def test_heads_must_divide_channels() -> None:
    with pytest.raises(ValueError, match=r"channels \(10\) must be divisible by num_heads \(4\)"):
        SetSinkformer(3, channels=10, num_heads=4)
