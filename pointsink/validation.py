"""Argument checks shared across the package, so every integer argument fails the same way."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_int"]


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
