"""Pictures of patterns and of attention modules: the mask beside the block layout.

``foveal show "EXPR"``, ``foveal show --module "EXPR" --grid 16,16`` and
``foveal show --gallery DIR`` call ``render``, ``render_module`` and ``gallery``.
The arrays drawn come from ``mask_image`` and ``layout_image``, so what a picture
shows can be tested against ``pattern.mask`` without reading pixels.
"""

from __future__ import annotations

import functools
import inspect
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from foveal._checks import as_shape, fmt_axes, positive_int
from foveal.patterns.base import Pattern

__all__ = [
    "render",
    "render_module",
    "gallery",
    "parse_pattern",
    "parse_module",
    "parse_grid",
    "module_classes",
    "module_pattern",
    "mask_image",
    "layout_image",
    "MaskImage",
]

_EMPTY, _PARTIAL, _FULL = "#f4f4f4", "#f2b134", "#2a6fb0"
_ALLOWED, _QUERY, _QUERY_OFF = "#1f4e79", "#d62728", "#ff9896"
#: groups and seed of the ``group_ids`` that ``module_pattern`` makes up for modules that need them
DEFAULT_GROUPS, DEFAULT_SEED = 4, 0


# -- parsing -----------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=1)
def _module_namespace() -> tuple[dict[str, type], dict[str, str]]:
    import importlib
    import pkgutil

    import foveal.nn as package

    classes, failed = {}, {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception as e:  # a broken module must not hide the others
            failed[info.name] = f"{type(e).__name__}: {e}"
            continue
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name, None)
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
                classes[name] = obj
    return classes, failed


def module_classes() -> dict[str, type]:
    """The public ``nn.Module`` classes of ``foveal.nn`` (every submodule's ``__all__``), by name."""
    return dict(_module_namespace()[0])


def _available_modules() -> str:
    classes, failed = _module_namespace()
    text = f"Available modules: {', '.join(classes)}"
    if failed:
        text += "; not importable: " + "; ".join(f"foveal.nn.{m} ({e})" for m, e in failed.items())
    return text


def parse_module(expr: str) -> torch.nn.Module:
    """Build a module from an expression such as ``"WindowAttention(dim=32, num_heads=2, window_size=4)"``.

    Only the public module classes of ``foveal.nn`` are in scope (no builtins). Errors
    raise a ``ValueError`` that quotes the expression and lists the module names.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"expected a module expression, got {expr!r}. {_available_modules()}")
    try:
        value = eval(expr, {"__builtins__": {}}, module_classes())  # noqa: S307 - restricted namespace
    except Exception as e:  # syntax, unknown names, bad arguments
        raise ValueError(
            f"cannot build a module from {expr!r}: {type(e).__name__}: {e}. {_available_modules()}"
        ) from None
    if not isinstance(value, torch.nn.Module):
        raise ValueError(f"{expr!r} is a {type(value).__name__}, not a module. {_available_modules()}")
    return value


def parse_grid(grid) -> tuple[int, ...]:
    """A grid as a tuple of positive ints, from ``"16,16"`` (also ``"16x16"``, ``"(16, 16)"``), an int or a tuple."""
    if isinstance(grid, str):
        text = grid.strip().strip("()[]").replace("x", ",").replace("×", ",")
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise ValueError(f"grid must be positive integers separated by commas, such as 16,16; got {grid!r}")
        grid = tuple(int(p) for p in parts)
    return as_shape("grid", grid)


# -- the pattern of a module -------------------------------------------------------------------


def _one_d(cls: str, arg: str, grid: tuple[int, ...]) -> int:
    if len(grid) != 1:
        raise ValueError(
            f"{cls}.pattern takes {arg} (a sequence), not a grid; give a 1-D grid such as (64,) "
            f"(--grid 64), got grid {fmt_axes(grid)}"
        )
    return grid[0]


def module_pattern(module, grid) -> tuple[Pattern, str]:
    """The pattern ``module`` attends over on ``grid``, and a note on any argument made up for it.

    Calls ``module.pattern(grid)``. Modules whose ``pattern`` takes a token count ``n``
    get ``grid[0]`` (the grid must be 1-D); a module whose ``pattern`` takes
    ``group_ids`` gets ``DEFAULT_GROUPS`` random groups of the ``grid[0]`` tokens (seed
    ``DEFAULT_SEED``), and the note says so. Raises ``TypeError`` for an object that is
    not a module or has no ``pattern``, ``ValueError`` for a grid the module refuses.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    cls = type(module).__name__
    fn = getattr(module, "pattern", None)
    if not callable(fn):
        with_pattern = [n for n, c in module_classes().items() if callable(getattr(c, "pattern", None))]
        raise TypeError(
            f"{cls} has no pattern(grid): it does not attend over a foveal pattern, so there is no mask to draw; "
            f"modules with a pattern: {', '.join(with_pattern)}"
        )
    grid = parse_grid(grid)
    required = [
        p.name for p in inspect.signature(fn).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    note = ""
    if required == ["grid"]:
        arg = grid
    elif required == ["n"]:
        arg = _one_d(cls, "a number of tokens n", grid)
    elif required == ["group_ids"]:
        n = _one_d(cls, "group_ids", grid)
        gen = torch.Generator().manual_seed(DEFAULT_SEED)
        arg = torch.randint(0, min(DEFAULT_GROUPS, n), (n,), generator=gen)
        note = f"group_ids: {DEFAULT_GROUPS} random groups of {n} tokens (seed {DEFAULT_SEED}), tokens sorted by group"
    else:
        raise ValueError(
            f"{cls}.pattern takes ({', '.join(required)}); foveal show can only give it a grid, "
            f"a number of tokens n or made-up group_ids"
        )
    try:
        pattern = fn(arg)
    except (ValueError, TypeError) as e:
        if isinstance(arg, torch.Tensor):
            shown = f"{arg.shape[0]} group ids"
        else:
            shown = fmt_axes(arg) if isinstance(arg, tuple) else arg
        raise ValueError(f"{cls}.pattern({shown}) refused: {e}") from None
    if not isinstance(pattern, Pattern):
        raise TypeError(f"{cls}.pattern returned a {type(pattern).__name__}, not a foveal Pattern")
    return pattern, note


# -- the arrays drawn --------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskImage:
    """What the mask panel draws.

    ``kind == "matrix"``: ``data`` is the ``(n_q, n_kv)`` mask (queries in row-major
    order), 0/1. ``kind == "grid"``: ``data`` has the key grid's shape (``kv_shape``)
    and holds, for one query, 0 (not allowed) and 1 (allowed); where the query itself
    sits on the key grid (``marker``, when it does) 2 if it sees itself, 3 if not.
    ``coords`` are the query's coordinates on the query grid; ``box`` is the query grid
    on the key grid (per axis ``[lo, hi)``) for cross patterns that place it there.
    """

    kind: str
    data: torch.Tensor
    query: int | None = None
    coords: tuple[int, ...] | None = None
    marker: tuple[int, ...] | None = None
    box: tuple[tuple[int, int], ...] | None = None

    def allowed(self) -> torch.Tensor:
        """Bool tensor of the allowed keys (the query's marker decoded)."""
        return (self.data == 1) | (self.data == 2)


def _unravel(index: int, shape) -> tuple[int, ...]:
    coords = []
    for s in reversed(shape):
        coords.append(index % s)
        index //= s
    return tuple(coords[::-1])


def default_query(pattern: Pattern) -> int:
    """The token at the centre of the query grid."""
    query = 0
    for s in pattern.shape:
        query = query * s + s // 2
    return query


def mask_image(pattern: Pattern, query: int | None = None) -> MaskImage:
    """The mask panel's data: one query's keys on the key grid, or the whole mask when keys are 1-D.

    Patterns whose keys lie on a 1-D axis (sequences, and cross patterns with flat keys)
    give the ``n_q × n_kv`` matrix. Patterns with an N-D key grid give one query's keys
    on that grid (``kv_shape``): the query grid for self-attention, the key grid of a
    cross pattern. ``query`` defaults to the centre of the query grid.
    """
    query = default_query(pattern) if query is None else query
    kv_shape = pattern.kv_shape
    if len(kv_shape) == 1:
        return MaskImage("matrix", pattern.dense_mask().to(torch.int64))
    keys = torch.arange(pattern.n_kv)
    data = pattern.mask(torch.tensor(query), keys).expand(pattern.n_kv).reshape(kv_shape).to(torch.int64)
    coords = _unravel(query, pattern.shape)
    marker = box = None
    if kv_shape == pattern.shape:
        marker = coords
    else:
        offset = getattr(pattern, "kv_offset", None)
        if offset is not None and len(offset) == len(kv_shape) == len(pattern.shape):
            marker = tuple(c + o for c, o in zip(coords, offset))
            box = tuple((o, o + s) for o, s in zip(offset, pattern.shape))
    if marker is not None:
        data[marker] = 2 if bool(data[marker]) else 3
    return MaskImage("grid", data, query, coords, marker, box)


def _layout_of(pattern: Pattern):
    """The pattern whose block layout the kernels run, and how to label it."""
    from foveal.patterns.order import Ordered

    if isinstance(pattern, Ordered):
        return pattern.inner, f"block layout in {pattern.order} order\n(the blocks the kernels run)"
    return pattern, "block layout"


def layout_image(pattern: Pattern, block_q: int, block_k: int | None = None) -> tuple[torch.Tensor, object, str]:
    """The layout panel's data: block states (0 empty, 1 partial, 2 full), the layout and its label.

    For an ``Ordered`` pattern this is the layout of ``pattern.inner`` — the blocks of
    the tokens taken in the order, which is what ``attend`` runs.
    """
    block_k = block_q if block_k is None else block_k
    runs, label = _layout_of(pattern)
    lay = runs.layout(block_q, block_k)
    return lay.block_states().to(torch.int64), lay, label


# -- drawing -----------------------------------------------------------------------------------


def _default_block(n: int) -> int:
    """A power of two giving 4 to 32 blocks per side."""
    return max(1, 2 ** round(math.log2(max(n / 16, 1))))


def _tile_slices(img: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A 3-D (or more) grid as its slices along axis 0 side by side, separated by -1 lines."""
    shape = img.shape
    flat = img.reshape(shape[0], -1, shape[-1])
    rows_n, cols_n = flat.shape[1], flat.shape[2]
    per_row = math.ceil(math.sqrt(shape[0]))
    n_rows = math.ceil(shape[0] / per_row)
    canvas = torch.full((n_rows * (rows_n + 1) - 1, per_row * (cols_n + 1) - 1), -1, dtype=torch.int64)
    for i in range(shape[0]):
        r, c = divmod(i, per_row)
        canvas[r * (rows_n + 1) : r * (rows_n + 1) + rows_n, c * (cols_n + 1) : c * (cols_n + 1) + cols_n] = flat[i]
    return canvas, per_row


def _integer_ticks(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _mask_panel(ax, pattern: Pattern, img: MaskImage):
    import matplotlib.colors as mcolors
    from matplotlib.patches import Rectangle

    _integer_ticks(ax)
    if img.kind == "matrix":
        n_q, n_kv = img.data.shape
        ratio = max(n_q, n_kv) / max(1, min(n_q, n_kv))
        ax.imshow(img.data.numpy(), cmap=mcolors.ListedColormap(["white", _ALLOWED]), vmin=0, vmax=1,
                  interpolation="nearest", aspect="equal" if ratio <= 4 else "auto")
        ax.set_xlabel("key j")
        ax.set_ylabel("query i" if len(pattern.shape) == 1 else "query i (row-major over the grid)")
        cross = "" if pattern.kv_shape == pattern.shape else f" {n_q} × {n_kv}"
        ax.set_title(f"mask (queries × keys){cross}", fontsize=10)
        return
    kv_shape = tuple(img.data.shape)
    colors = ["white", _ALLOWED, _QUERY, _QUERY_OFF]
    if len(kv_shape) == 2:
        ax.imshow(img.data.numpy(), cmap=mcolors.ListedColormap(colors),
                  norm=mcolors.BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], 4), interpolation="nearest")
        ax.set_xlabel("grid axis 1")
        ax.set_ylabel("grid axis 0")
        if img.box is not None:
            (y0, y1), (x0, x1) = img.box
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=_QUERY,
                                   linestyle="--", linewidth=1.2))
    else:  # 3-D and up: the slices along axis 0 in a grid, separated by grey lines
        canvas, per_row = _tile_slices(img.data)
        ax.imshow(canvas.numpy(), cmap=mcolors.ListedColormap(["#bbbbbb"] + colors),
                  norm=mcolors.BoundaryNorm([-1.5, -0.5, 0.5, 1.5, 2.5, 3.5], 5), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{kv_shape[0]} slices along axis 0, row-major, {per_row} per row (axes 1, 2 in each)")
    where = f"keys of query {img.query} at {img.coords}"
    if kv_shape == tuple(pattern.shape):
        ax.set_title(f"{where} (red)", fontsize=10)
    elif img.marker is not None:
        extra = ", dashed: the query grid" if img.box is not None and len(kv_shape) == 2 else ""
        ax.set_title(f"{where}\non the key grid {fmt_axes(kv_shape)} (red: the query at {img.marker}{extra})",
                     fontsize=10)
    else:
        ax.set_title(f"{where}\non the key grid {fmt_axes(kv_shape)}", fontsize=10)


def _layout_panel(ax, pattern: Pattern, block_q: int, block_k: int):
    import matplotlib.colors as mcolors

    states, lay, label = layout_image(pattern, block_q, block_k)
    _integer_ticks(ax)
    ax.imshow(states.numpy(), cmap=mcolors.ListedColormap([_EMPTY, _PARTIAL, _FULL]),
              norm=mcolors.BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3), interpolation="nearest",
              aspect="equal" if max(states.shape) <= 4 * min(states.shape) else "auto")
    ax.set_xlabel(f"key block ({block_k} token{'s' if block_k > 1 else ''})")
    ax.set_ylabel(f"query block ({block_q} token{'s' if block_q > 1 else ''})")
    ax.set_title(f"{label}: {lay.num_full} full, {lay.num_partial} partial", fontsize=10)


def _legend(img: MaskImage):
    from matplotlib.patches import Patch

    handles = [Patch(color=_ALLOWED, label="allowed key")]
    if img.marker is not None:
        handles.append(Patch(color=_QUERY, label="the query"))
    return handles + [Patch(color=_FULL, label="full block"), Patch(color=_PARTIAL, label="partial block"),
                      Patch(facecolor=_EMPTY, edgecolor="#999999", label="empty block")]


def _check_render_args(pattern, query, block) -> tuple[int, int, int]:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a foveal Pattern, got {type(pattern).__name__}")
    if query is None:
        query = default_query(pattern)
    elif isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < pattern.n:
        raise ValueError(f"query must be a token index in [0, {pattern.n - 1}], got {query!r}")
    if block is None:
        return query, _default_block(pattern.n_q), _default_block(pattern.n_kv)
    block = positive_int("block", block)
    most = max(pattern.n_q, pattern.n_kv)
    if block > most:
        raise ValueError(f"block must be <= the number of tokens {most}, got {block}")
    return query, block, block


def _draw(pattern: Pattern, path, query, block, heading: str) -> Path:
    query, block_q, block_k = _check_render_args(pattern, query, block)
    img = mask_image(pattern, query)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = img.kind == "grid" and img.data.dim() >= 3
    fig, axes = plt.subplots(1, 2, figsize=(13 if wide else 10, 6.2),
                             gridspec_kw={"width_ratios": [1.6, 1] if wide else [1, 1]})
    _mask_panel(axes[0], pattern, img)
    _layout_panel(axes[1], pattern, block_q, block_k)
    handles = _legend(img)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    pairs = f"{pattern.n}²" if pattern.n_kv == pattern.n_q else f"{pattern.n_q} × {pattern.n_kv}"
    title = f"{heading}\ndensity {pattern.density():.2%} of {pairs} pairs"
    fig.suptitle(title, fontsize=11)
    # fixed margins: tight_layout would measure every tick label (a third of the time of a picture)
    two_line_panel = (img.kind == "grid" and tuple(img.data.shape) != pattern.shape) or "\n" in _layout_of(pattern)[1]
    top = 0.94 - 0.034 * (title.count("\n") + 1) - (0.035 if two_line_panel else 0)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=top, wspace=0.28)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 100) -> str:
    return "\n".join(textwrap.wrap(text, width))


def render(pattern: Pattern, path, *, query: int | None = None, block: int | None = None) -> Path:
    """Write a PNG of ``pattern``: its mask (``mask_image``) beside its block layout (``layout_image``).

    ``query`` is the token whose keys are drawn on an N-D key grid (default: the centre
    of the query grid); ``block`` the tile size of the layout (default: 4 to 32 blocks
    per side).
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a foveal Pattern, got {type(pattern).__name__}")
    return _draw(pattern, path, query, block, _wrap(repr(pattern), 90))


def _describe(module: torch.nn.Module) -> str:
    extra = module.extra_repr() if hasattr(module, "extra_repr") else ""
    return f"{type(module).__name__}({extra})"


def render_module(
    module: torch.nn.Module, grid, path, *, query: int | None = None, block: int | None = None, label: str | None = None
) -> Path:
    """Write a PNG of the pattern ``module`` attends over on ``grid`` (``module_pattern``), as ``render`` does.

    ``label`` heads the picture (default: the module's class and ``extra_repr``).
    """
    pattern, note = module_pattern(module, grid)
    heading = _wrap(_describe(module) if label is None else str(label))
    line = f"pattern on grid {fmt_axes(parse_grid(grid))}: {pattern!r}" + (f"; {note}" if note else "")
    heading += "\n" + _wrap(line)
    return _draw(pattern, path, query, block, heading)


def gallery(directory, *, modules: bool = True) -> list[Path]:
    """One picture per built-in gallery pattern, ``<name>.png`` in ``directory``, and per module in ``modules/``."""
    from foveal.gallery import GALLERY, MODULE_GALLERY

    directory = Path(directory)
    paths = [render(p, directory / f"{name}.png") for name, p in GALLERY.items()]
    if modules:
        for name, (expr, grid) in MODULE_GALLERY.items():
            paths.append(render_module(parse_module(expr), grid, directory / "modules" / f"{name}.png", label=expr))
    return paths
