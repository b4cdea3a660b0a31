"""Argument checks shared across the package: every integer or real argument fails alike."""

from __future__ import annotations

import math
import os
from numbers import Real
from typing import Any

import numpy as np
import torch

__all__ = [
    "autocast_enabled",
    "check_bool_mask",
    "check_int",
    "check_real",
    "check_set_batch",
    "check_set_mask",
    "plain_value",
]


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Checks an integer argument and returns it as a Python ``int``.

    Python and NumPy integers pass; bools and floats (even integral ones) do not, so that
    ``True`` or ``5.0`` in a config is reported rather than silently used.

    Args:
        name: The argument's name, as the user wrote it (used in the message).
        value: The value to check.
        minimum: The smallest allowed value.

    Returns:
        ``int(value)``.

    Raises:
        ValueError: ``value`` is not an integer, or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}.")
    return int(value)


def check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Checks a real-valued argument against an interval and returns it as a ``float``.

    Python and NumPy numbers pass; bools, strings and NaN do not, so that ``True`` in a
    config or a NaN that every comparison lets through is reported rather than used.

    Args:
        name: The argument's name, as the user wrote it (used in the message).
        value: The value to check.
        low: The lower bound, or None for none.
        high: The upper bound, or None for none.
        low_open: Whether ``low`` itself is excluded.
        high_open: Whether ``high`` itself is excluded.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``value`` is not a real number or lies outside the interval; the
            message names the interval, e.g. ``val_fraction must be a number in [0, 1)``.
    """
    fits = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    if fits and low is not None:
        fits = value > low if low_open else value >= low
    if fits and high is not None:
        fits = value < high if high_open else value <= high
    if not fits:
        if low is not None and high is not None:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            interval = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            interval = f"{'<' if high_open else '<='} {high:g}"
        else:
            interval = "(not NaN)"
        raise ValueError(f"{name} must be a number {interval}; got {value!r}.")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """Checks a switch argument and returns it as a Python ``bool``.

    Python and NumPy bools pass; anything else does not, so that the string ``"false"``
    (truthy) is reported rather than taken as True.

    Raises:
        ValueError: ``value`` is not a bool.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r}.")
    return bool(value)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False where autocast does not exist.

    ``torch.is_autocast_enabled`` itself raises on such devices (e.g. ``meta``).
    """
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_set_batch(
    name: str, x: torch.Tensor, channels: int, weight: torch.Tensor, size_name: str = "set_size"
) -> None:
    """Checks that ``x`` is a batch of sets that a layer with parameter ``weight`` can take.

    Shape, dtype and device checks only (no host synchronization), so that a wrong input
    fails with its name and the expected layout instead of a matrix-multiply error deep
    inside the layer.

    Args:
        name: What ``x`` is, as the user knows it (used in the message).
        x: The input, expected ``(B, N, channels)``.
        channels: The feature size the layer takes.
        weight: A parameter of the layer: ``x`` must share its device, and its dtype
            unless autocast is on (autocast casts inside the layer). Not checked against
            unless it is a floating-point tensor (quantized layers take float inputs).
        size_name: Name of the set dimension in the message.

    Raises:
        ValueError: ``x`` is not ``(B, N, channels)`` or is on another device.
        TypeError: ``x`` has another dtype than the parameters, outside autocast.
    """
    if x.dim() != 3 or x.shape[-1] != channels:
        raise ValueError(
            f"{name} must have shape (batch, {size_name}, {channels}); got {tuple(x.shape)}."
        )
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        return  # quantized layers (a packed weight, or integer dtypes) take float inputs
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the parameters are on {weight.device}.")
    if x.dtype != weight.dtype and not autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} has dtype {x.dtype} but the parameters are {weight.dtype}: convert the "
            f"input (.to({weight.dtype})) or the module (.to({x.dtype}))."
        )


def check_bool_mask(name: str, mask: Any, device: torch.device) -> torch.Tensor:
    """Checks that a padding mask is a bool tensor on ``device``; shapes are the caller's.

    Args:
        name: The mask's name, as the user passed it (used in the message).
        mask: The mask, True for real elements.
        device: The device of the inputs it masks.

    Returns:
        ``mask``.

    Raises:
        TypeError: ``mask`` is not a bool tensor.
        ValueError: It is on another device.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool torch.Tensor (True: a real element); got {got}.")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}.")
    return mask


def check_set_mask(
    name: str, mask: Any, x: torch.Tensor, size_name: str = "set_size"
) -> torch.Tensor:
    """Checks a ``(B, N)`` bool padding mask against the set batch ``x`` ``(B, N, C)``.

    Args:
        name: The mask's name, as the user passed it (used in the message).
        mask: The mask, True for real elements.
        x: The sets it masks.
        size_name: Name of the set dimension in the message.

    Returns:
        ``mask``.

    Raises:
        TypeError: ``mask`` is not a bool tensor.
        ValueError: Its shape is not ``x``'s first two, or it is on another device.
    """
    check_bool_mask(name, mask, x.device)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{name} must have shape (batch, {size_name}) = {tuple(x.shape[:2])}; "
            f"got {tuple(mask.shape)}."
        )
    return mask


def plain_value(value: Any) -> Any:
    """``value`` as plain Python data, which ``torch.load(..., weights_only=True)`` reads back.

    NumPy scalars become Python numbers, paths become strings, tuples and NumPy arrays
    become lists, recursively inside lists and dicts; anything else is returned as is.
    Hyperparameters pass through it before they are saved, so a checkpoint never holds an
    object that a weights-only load refuses (e.g. ``lr=np.float64(1e-3)`` from a sweep).

    Args:
        value: A hyperparameter value.

    Returns:
        The same value built from Python scalars, strings, lists and dicts.
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if isinstance(value, dict):
        return {plain_value(key): plain_value(item) for key, item in value.items()}
    return value
