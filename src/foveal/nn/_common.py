"""Helpers shared by the modules of ``foveal.nn``: argument checks, stochastic depth, ``attend``,
one bounded cache of the patterns modules attend under.

Every check raises before any work, with a message that names the argument, the value
given and what is allowed (``TypeError`` for the wrong kind, ``ValueError`` for the wrong
value). Every module of ``foveal.nn`` calls ``attend`` (re-exported here) and gets its
patterns from ``cached_pattern``. Under ``torch.compile`` both stay in the graph: ``attend``
is one opaque custom op there (``foveal.custom_op``) and ``cached_pattern`` a trace-time
constant, so a compiled model built from these modules has no graph break.
"""

from __future__ import annotations

import math
import numbers

import torch

from foveal._checks import positive_int
from foveal.cache import LRU
from foveal.custom_op import built
from foveal.functional import attend
from foveal.kernels.select import check_backend_name

__all__ = [
    "attend",
    "cached_pattern",
    "init_attention",
    "check_backend",
    "check_bool",
    "check_input",
    "check_channels_last",
    "check_heads",
    "check_no_attn_drop",
    "check_probability",
    "check_ratio",
    "drop_path",
    "qk_scale_or_default",
    "set_pattern_override",
    "overridden_pattern",
]

#: the patterns of every module, keyed by how they are built (patterns are values: equal
#: arguments give equal patterns, so modules with the same geometry share one entry)
PATTERNS = LRU("foveal.nn patterns", maxsize=256)


def cached_pattern(build, *args, **kwargs):
    """``build(*args, **kwargs)`` (a pattern), built once per distinct arguments and kept in one bounded LRU.

    The arguments must be hashable (ints, tuples, strings, patterns); a build that raises
    stores nothing. Under ``torch.compile`` it runs once at trace time and its result is a
    constant of the graph (the arguments are Python values there: ints of static shapes).
    """
    return built(_cached, build, args, tuple(sorted(kwargs.items())))


def _cached(build, args, kwargs):
    return PATTERNS.get((build, args, kwargs), lambda: build(*args, **dict(kwargs)))


def set_pattern_override(module, fn) -> None:
    """Make ``module`` attend under ``fn(grid)`` instead of its own pattern (``None``: its own again).

    ``fn(grid) -> Pattern | None`` is called with the token grid of each forward call; a
    ``None`` result keeps the module's own pattern for that grid. Weights are untouched:
    only which (query, key) pairs interact changes. Modules that support it (those whose
    keys are their queries' grid: ``WindowAttention``, ``MultiAxisAttention``, DaViT's
    window attention, ``HaloAttention`` with ``border="mask"``) read it in ``pattern(grid)``.
    """
    if fn is not None and not callable(fn):
        raise TypeError(f"fn must be a callable grid -> Pattern (or None), got {type(fn).__name__}")
    if not hasattr(module, "pattern") or not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a foveal.nn attention module with pattern(grid), got {type(module).__name__}")
    module.pattern_override = fn


def overridden_pattern(module, grid):
    """The pattern ``module.pattern_override`` gives for ``grid``, or None (no override, or it declined)."""
    fn = getattr(module, "pattern_override", None)
    if fn is None:
        return None
    from foveal.patterns.base import Pattern

    pattern = fn(grid)
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern_override must return a foveal Pattern or None, got {type(pattern).__name__}")
    if pattern is not None and (pattern.n_q, pattern.n_kv) != (math.prod(grid),) * 2:
        raise ValueError(
            f"pattern_override must return a self-attention pattern over the grid {tuple(grid)} "
            f"({math.prod(grid)} tokens), got {pattern!r} ({pattern.n_q} queries, {pattern.n_kv} keys)"
        )
    return pattern


def check_heads(dim, num_heads, dim_name: str = "dim") -> tuple[int, int]:
    """``(dim, num_heads)`` as ints, ``dim`` divisible by ``num_heads``."""
    dim = positive_int(dim_name, dim)
    num_heads = positive_int("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"{dim_name} must be divisible by num_heads, got {dim} and {num_heads}")
    return dim, num_heads


#: ``"auto"`` or the name of a registered ``attend`` backend: the one check, ``foveal.kernels.select``'s
check_backend = check_backend_name


def check_bool(name: str, value) -> bool:
    """A flag: ``True`` or ``False`` only (not 0/1, not None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_input(name: str, x, who: str) -> torch.Tensor:
    """Refuse a ``forward`` input that is not a floating tensor (``TypeError``), before any work."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_no_attn_drop(attn_drop) -> None:
    """Accept ``attn_drop`` only as 0 (timm's signature; ``attend`` has no attention dropout)."""
    if isinstance(attn_drop, bool) or not isinstance(attn_drop, numbers.Real):
        raise TypeError(f"attn_drop must be a float, got {attn_drop!r} ({type(attn_drop).__name__})")
    if attn_drop != 0:
        raise ValueError(
            f"attn_drop must be 0.0 (attend applies no dropout to attention weights; use proj_drop), got {attn_drop!r}"
        )


def check_probability(name: str, value) -> float:
    """A probability in ``[0, 1)`` (dropout, stochastic depth)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_ratio(name: str, value) -> float:
    """A positive width ratio (expansion, MLP, squeeze-excitation)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not value > 0:
        raise ValueError(f"{name} must be > 0.0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def qk_scale_or_default(qk_scale, head_dim: int) -> float:
    """The score scale: ``qk_scale`` if given (a positive number), else ``head_dim ** -0.5``."""
    if qk_scale is None:
        return head_dim**-0.5
    if isinstance(qk_scale, bool) or not isinstance(qk_scale, numbers.Real):
        raise TypeError(f"qk_scale must be a number or None, got {qk_scale!r} ({type(qk_scale).__name__})")
    if not qk_scale > 0:  # 0 is refused, never read as "use the default"
        raise ValueError(f"qk_scale must be > 0 (or None for head_dim ** -0.5), got {qk_scale!r}")
    if not math.isfinite(qk_scale):
        raise ValueError(f"qk_scale must be finite (or None for head_dim ** -0.5), got {qk_scale!r}")
    return float(qk_scale)


def check_channels_last(x, dim: int, who: str, ndim: int | None = 4, layout: str = "(batch, height, width, dim)"):
    """Refuse anything but a tensor of ``ndim`` dimensions (at least 3 when None) whose last axis is ``dim``."""
    check_input("x", x, who)
    if (x.dim() != ndim) if ndim is not None else (x.dim() < 3):
        raise ValueError(f"{who} expects {layout}, got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has {x.shape[-1]} channels but dim is {dim}")


def init_attention(module, dim, num_heads, qkv_bias, qk_scale=None, proj_drop=0.0, backend="auto") -> None:
    """Give ``module`` timm's attention parts, after checking every argument.

    Sets ``dim``, ``num_heads``, ``head_dim``, ``scale`` (``qk_scale`` or ``head_dim ** -0.5``),
    ``backend``, and the layers ``qkv`` (dim → 3·dim), ``proj`` (dim → dim), ``proj_drop``,
    registered in that order (timm's ``Attention`` state-dict keys).
    """
    dim, num_heads = check_heads(dim, num_heads)
    qkv_bias = check_bool("qkv_bias", qkv_bias)
    scale = qk_scale_or_default(qk_scale, dim // num_heads)
    proj_drop = check_probability("proj_drop", proj_drop)
    module.backend = check_backend(backend)
    module.dim, module.num_heads, module.head_dim, module.scale = dim, num_heads, dim // num_heads, scale
    module.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias)
    module.proj = torch.nn.Linear(dim, dim)
    module.proj_drop = torch.nn.Dropout(proj_drop)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep
