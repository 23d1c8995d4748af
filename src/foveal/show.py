"""Pictures of patterns: the mask (one query on its grid, or the N×N matrix) beside the block layout.

``foveal show "EXPR"`` and ``foveal show --gallery DIR`` call ``render`` and ``gallery``.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

from foveal._checks import positive_int
from foveal.patterns.base import Pattern

__all__ = ["render", "gallery", "parse_pattern"]

_EMPTY, _PARTIAL, _FULL = "#f4f4f4", "#f2b134", "#2a6fb0"


def parse_pattern(expr: str) -> Pattern:
    """Evaluate a pattern expression such as ``"SlidingWindow(64, 8) | Sinks(64, 4)"``.

    Only the public pattern classes are in scope (no builtins). Errors raise a
    ``ValueError`` that quotes the expression and lists the pattern names.
    """
    import foveal.patterns as P

    names = {n: getattr(P, n) for n in P.__all__ if n not in ("Pattern", "ProgressionPattern")}
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"expected a pattern expression, got {expr!r}; available: {', '.join(names)}")
    try:
        value = eval(expr, {"__builtins__": {}}, names)  # noqa: S307 - restricted namespace
    except Exception as e:  # syntax, unknown names, bad arguments
        raise ValueError(f"cannot build a pattern from {expr!r}: {type(e).__name__}: {e}. "
                         f"Available patterns: {', '.join(names)}") from None
    if not isinstance(value, Pattern):
        raise ValueError(f"{expr!r} is a {type(value).__name__}, not a pattern; available: {', '.join(names)}")
    return value


def _default_block(n: int) -> int:
    """A power of two giving 4 to 32 blocks per side."""
    return max(1, 2 ** round(math.log2(max(n / 16, 1))))


def _mask_panel(ax, pattern: Pattern, query: int):
    import matplotlib.colors as mcolors

    shape = pattern.shape
    if len(shape) == 1:
        ax.imshow(pattern.dense_mask().numpy(), cmap=mcolors.ListedColormap(["white", "#1f4e79"]),
                  interpolation="nearest", aspect="equal")
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_title("mask (queries × keys)", fontsize=10)
        return
    if pattern.kv_shape != shape:
        raise ValueError(f"drawing one query on its grid needs keys on the same grid; {pattern!r} has keys {pattern.kv_shape}")
    row = pattern.mask(torch.tensor(query), torch.arange(pattern.n_kv)).reshape(shape).to(torch.int64)
    coords = []
    rest = query
    for s in reversed(shape):
        coords.append(rest % s)
        rest //= s
    coords = coords[::-1]
    img = row.clone()
    img[tuple(coords)] = 2 if bool(row[tuple(coords)]) else 3
    cmap = mcolors.ListedColormap(["white", "#1f4e79", "#d62728", "#ff9896"])
    norm = mcolors.BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], 4)
    if len(shape) == 2:
        ax.imshow(img.numpy(), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_xlabel("grid axis 1")
        ax.set_ylabel("grid axis 0")
    else:  # 3-D and up: the slices along axis 0 in a grid, separated by grey lines
        flat = img.reshape(shape[0], -1, shape[-1])
        rows_n, cols_n = flat.shape[1], flat.shape[2]
        per_row = math.ceil(math.sqrt(shape[0]))
        n_rows = math.ceil(shape[0] / per_row)
        canvas = torch.full((n_rows * (rows_n + 1) - 1, per_row * (cols_n + 1) - 1), -1, dtype=torch.int64)
        for i in range(shape[0]):
            r, c = divmod(i, per_row)
            canvas[r * (rows_n + 1) : r * (rows_n + 1) + rows_n, c * (cols_n + 1) : c * (cols_n + 1) + cols_n] = flat[i]
        cmap = mcolors.ListedColormap(["#bbbbbb", "white", "#1f4e79", "#d62728", "#ff9896"])
        norm = mcolors.BoundaryNorm([-1.5, -0.5, 0.5, 1.5, 2.5, 3.5], 5)
        ax.imshow(canvas.numpy(), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{shape[0]} slices along axis 0, row-major, {per_row} per row (axes 1, 2 in each)")
    ax.set_title(f"keys of query {query} at {tuple(coords)} (red)", fontsize=10)


def _layout_panel(ax, pattern: Pattern, block: int):
    import matplotlib.colors as mcolors
    from matplotlib.patches import Patch

    lay = pattern.layout(block, block)
    ax.imshow(lay.block_states().numpy(), cmap=mcolors.ListedColormap([_EMPTY, _PARTIAL, _FULL]),
              norm=mcolors.BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3), interpolation="nearest")
    ax.set_xlabel(f"key block ({block} tokens)")
    ax.set_ylabel(f"query block ({block} tokens)")
    ax.set_title(f"block layout: {lay.num_full} full, {lay.num_partial} partial", fontsize=10)
    return [Patch(color="#1f4e79", label="allowed key"), Patch(color="#d62728", label="the query"),
            Patch(color=_FULL, label="full block"), Patch(color=_PARTIAL, label="partial block"),
            Patch(facecolor=_EMPTY, edgecolor="#999999", label="empty block")]


def render(pattern: Pattern, path, *, query: int | None = None, block: int | None = None) -> Path:
    """Write a PNG of ``pattern``: its mask (one query on the grid for N-D patterns, the N×N mask for 1-D) and its block layout."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a foveal Pattern, got {type(pattern).__name__}")
    if query is None:
        query = 0
        for s in pattern.shape:
            query = query * s + s // 2
    elif isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < pattern.n:
        raise ValueError(f"query must be a token index in [0, {pattern.n - 1}], got {query!r}")
    block = _default_block(pattern.n) if block is None else positive_int("block", block)
    if isinstance(block, int) and block > pattern.n:
        raise ValueError(f"block must be <= the number of tokens {pattern.n}, got {block}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = len(pattern.shape) >= 3
    fig, axes = plt.subplots(1, 2, figsize=(13 if wide else 10, 5.8), gridspec_kw={"width_ratios": [1.6, 1] if wide else [1, 1]})
    _mask_panel(axes[0], pattern, query)
    handles = _layout_panel(axes[1], pattern, block)
    if len(pattern.shape) == 1:
        handles = handles[:1] + handles[2:]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    title = "\n".join(textwrap.wrap(repr(pattern), 90))
    fig.suptitle(f"{title}\ndensity {pattern.density():.2%} of {pattern.n}² pairs", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def gallery(directory) -> list[Path]:
    """One picture per built-in gallery pattern, ``<name>.png`` in ``directory``."""
    from foveal.gallery import GALLERY

    return [render(p, Path(directory) / f"{name}.png") for name, p in GALLERY.items()]
