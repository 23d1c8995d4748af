"""Argument checks shared by patterns, layouts and kernels.

Every check raises before any work, with a message that names the argument, the
value given and what is allowed.
"""

from __future__ import annotations

import numbers
from typing import Sequence


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """Return ``value`` as an int, refusing bools, non-integers and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def as_shape(name: str, value) -> tuple[int, ...]:
    """A token geometry: an int (a 1-D sequence) or a tuple of positive ints (a grid)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (positive_int(name, value),)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0:
        return tuple(positive_int(f"{name}[{a}]", v) for a, v in enumerate(value))
    raise TypeError(f"{name} must be a positive int or a non-empty tuple of positive ints, got {value!r}")


def per_axis(name: str, value, ndim: int, *, minimum: int = 1) -> tuple[int, ...]:
    """A per-axis parameter: one int for every axis, or a tuple with one int per axis."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (positive_int(name, value, minimum=minimum),) * ndim
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != ndim:
            raise ValueError(
                f"{name} must be an int or a tuple of {ndim} ints (one per grid axis), got {tuple(value)!r}"
            )
        return tuple(positive_int(f"{name}[{a}]", v, minimum=minimum) for a, v in enumerate(value))
    raise TypeError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")


def per_axis_bool(name: str, value, ndim: int) -> tuple[bool, ...]:
    """A per-axis flag: one bool for every axis, or a tuple with one bool per axis."""
    if isinstance(value, bool):
        return (value,) * ndim
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != ndim or not all(isinstance(v, bool) for v in value):
            raise ValueError(f"{name} must be a bool or a tuple of {ndim} bools, got {tuple(value)!r}")
        return tuple(value)
    raise TypeError(f"{name} must be a bool or a tuple of {ndim} bools, got {value!r}")


def fmt_axes(values: tuple) -> str:
    """``7`` for a 1-tuple, ``(7, 7)`` otherwise: how reprs show per-axis values."""
    return str(values[0]) if len(values) == 1 else str(tuple(values))
