"""Keys by which a compiled graph refers to patterns and score terms, and trace-time constants.

``torch.compile`` cannot take a pattern object as an op argument: ``foveal.custom_op``
passes it as a short string key (``"Neighborhood_3"``) that this registry maps back to
the value. Equal values get the same key (patterns are values), so a pattern built
anew does not recompile anything; the registry is bounded. ``trace_constant`` and
``built`` evaluate pure builders once at trace time. No foveal imports: ``functional``,
``eager``, ``custom_op``, ``nn`` and the integrations all stand on it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

__all__ = ["built", "key_of", "value_of", "trace_constant", "traced_key", "MAX_KEYS"]

#: how many distinct patterns and score-term descriptions the key registry holds
MAX_KEYS = 4096

_LOCK = threading.Lock()
_KEYS: "OrderedDict[object, str]" = OrderedDict()
_COUNT = [0]


class _Values:
    """The registry's values, one attribute per key: dynamo reads (and guards) one attribute at a time."""


_VALUES = _Values()


def _register(value) -> str:
    with _LOCK:
        key = _KEYS.get(value)
        if key is not None:
            _KEYS.move_to_end(value)
            return key
        _COUNT[0] += 1
        name = value[0].__name__ if isinstance(value, tuple) and isinstance(value[0], type) else type(value).__name__
        key = f"{name}_{_COUNT[0]}"
        _KEYS[value] = key
        setattr(_VALUES, key, value)
        while len(_KEYS) > MAX_KEYS:
            _, old = _KEYS.popitem(last=False)
            delattr(_VALUES, old)
        return key


def key_of(value) -> str:
    """The registry key of a hashable value (a pattern, a score term's spec): the same for equal values."""
    try:
        hash(value)
    except Exception as e:  # a pattern built while tracing reaches here as an empty shell
        raise TypeError(
            f"under torch.compile, attend takes a pattern (and score term) built outside the traced code "
            f"(e.g. in __init__, or through foveal.tracing.trace_constant / foveal.nn._common.cached_pattern); "
            f"{type(value).__name__} could not be read: {e}"
        ) from None
    return _register(value)


def value_of(key: str):
    """The value registered under ``key`` (raises if it was dropped from the bounded registry)."""
    try:
        return getattr(_VALUES, key)
    except AttributeError:
        raise RuntimeError(
            f"foveal's compiled attend lost the value of key {key!r}: more than {MAX_KEYS} distinct patterns were "
            f"used since this graph was compiled; call torch._dynamo.reset() (or raise foveal.tracing.MAX_KEYS)"
        ) from None


def trace_constant(fn):
    """``fn`` evaluated once at trace time under ``torch.compile`` and its result kept as a constant.

    For pure functions of Python values (ints, tuples, classes) that build patterns: the
    arguments must be constants under tracing (shapes that are not dynamic), and ``fn``
    must return the same value for the same arguments. Eager calls run ``fn`` as usual.
    """
    return torch.compiler.assume_constant_result(fn)


traced_key = trace_constant(key_of)


def _build_key(build, *args, **kwargs) -> str:
    return key_of(build(*args, **kwargs))


_traced_build_key = trace_constant(_build_key)


def built(build, *args, **kwargs):
    """``build(*args, **kwargs)``; under ``torch.compile``, built once at trace time and kept as a constant.

    For pure builders of values (patterns) from Python constants (ints of static shapes,
    tuples, classes): equal arguments give the registry's one value for them, which the
    graph reads by identity and ``attend`` passes to the op by its key. Eager calls just build.
    """
    if torch.compiler.is_compiling():
        return getattr(_VALUES, _traced_build_key(build, *args, **kwargs))
    return build(*args, **kwargs)
