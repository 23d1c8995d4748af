"""Token orders (raster, tiles, Morton, Hilbert) and ``Ordered``: a 1-D pattern applied along an order.

An order is a permutation ``perm`` of the row-major tokens of a grid: ``perm[r]`` is
the row-major index of the ``r``-th token in that order. Along a space-filling curve,
runs of consecutive tokens are compact regions of the grid, so a 1-D pattern (a
window, a sliding window, causal) applied to the tokens in curve order is a local
2-D pattern whose blocks are dense. ``Ordered`` is that pattern, stated on the grid;
``foveal.attend`` runs it by permuting q, k and v into the order, attending with the
inner pattern, and permuting back.

All orders are computed with vectorised bit operations (O(N log N), no loop over
tokens).
"""

from __future__ import annotations

import hashlib
import math
import numbers

import torch

from foveal._checks import as_shape, fmt_axes, per_axis
from foveal.bias import WrappedBias, table_geometry
from foveal.patterns.base import Pattern

__all__ = ["raster", "tiles", "morton", "hilbert", "inverse", "Ordered", "ORDERS"]


def _coords(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Coordinates of every token of ``shape`` in row-major order, one int64 tensor per axis."""
    idx = torch.arange(math.prod(shape))
    out, stride = [], math.prod(shape)
    for length in shape:
        stride //= length
        out.append((idx // stride) % length)
    return out


def _bits(length: int) -> int:
    """Bits needed for coordinates ``0 .. length-1``."""
    return max(1, (length - 1).bit_length())


def raster(shape) -> torch.Tensor:
    """The identity order: row-major (C order) over the grid."""
    shape = as_shape("shape", shape)
    return torch.arange(math.prod(shape))


def tiles(shape, tile) -> torch.Tensor:
    """Tiles of ``tile`` tokens per axis in row-major order, row-major within each tile.

    Any number of axes; a tile that does not divide the grid leaves smaller tiles at the
    far edges (they are still whole tiles of the order, only shorter).
    """
    shape = as_shape("shape", shape)
    tile = per_axis("tile", tile, len(shape))
    for a, (length, t) in enumerate(zip(shape, tile)):
        if t > length:
            raise ValueError(f"tile must be <= the grid on every axis; tile[{a}]={t} > shape[{a}]={length}")
    tile_id = torch.zeros(math.prod(shape), dtype=torch.int64)
    for c, length, t in zip(_coords(shape), shape, tile):
        tile_id = tile_id * (-(-length // t)) + c // t
    n = math.prod(shape)
    return torch.argsort(tile_id * n + torch.arange(n))


def morton(shape) -> torch.Tensor:
    """Z-order (Morton) curve: the bits of the coordinates interleaved, axis 0 most significant.

    Any number of axes and any sizes: the codes of the grid's cells are sorted, so on a
    grid that is not a power of two per axis the curve of the enclosing power-of-two
    box is followed with the cells outside the grid skipped. An aligned ``2^k`` cube
    (``2^k × 2^k`` square in 2-D) is a contiguous run when the grid contains it and
    all cells before it in the curve.
    """
    shape = as_shape("shape", shape)
    nd = len(shape)
    bits = max(_bits(s) for s in shape)
    if bits * nd > 62:
        raise ValueError(f"shape {shape} is too large for a 63-bit Morton code")
    code = torch.zeros(math.prod(shape), dtype=torch.int64)
    for b in range(bits):
        for a, c in enumerate(_coords(shape)):
            code |= ((c >> b) & 1) << (b * nd + (nd - 1 - a))
    return torch.argsort(code)


def hilbert_index(row: torch.Tensor, col: torch.Tensor, bits: int) -> torch.Tensor:
    """Position along the Hilbert curve of side ``2^bits`` of the cells ``(row, col)``.

    The curve starts at ``(0, 0)`` and ends at ``(0, 2^bits − 1)``. One pass per bit,
    from the most significant: the quadrant of the cell gives two bits of the index,
    then the cell is reflected (xor with all-ones) and transposed (xor swap) into that
    quadrant's frame. Branch-free integer operations only.
    """
    dtype = torch.int32 if bits <= 15 else torch.int64
    x, y = col.to(dtype), row.to(dtype)
    d = torch.zeros_like(x)
    for b in range(bits - 1, -1, -1):
        low = (1 << b) - 1
        rx, ry = (x >> b) & 1, (y >> b) & 1
        d |= ((3 * rx) ^ ry) << (2 * b)
        x &= low
        y &= low
        flip = (rx & (ry ^ 1)) * low  # quadrant 3 of 0..3: reflect both coordinates
        x ^= flip
        y ^= flip
        swap = (x ^ y) * (ry ^ 1)  # quadrants 0 and 3: transpose
        x ^= swap
        y ^= swap
    return d.to(torch.int64)


def hilbert(shape) -> torch.Tensor:
    """Hilbert curve order of a 2-D grid.

    On a ``2^n × 2^n`` grid it is the Hilbert curve: consecutive tokens are grid
    neighbours and every aligned ``2^k × 2^k`` square is a contiguous run of ``4^k``
    tokens. On other grids it follows the Hilbert curve of the enclosing power-of-two
    square and skips the cells outside the grid (not a "generalized" Hilbert curve):
    still a permutation, runs stay compact, but consecutive tokens may be a few cells
    apart where the curve leaves and re-enters the grid.
    """
    shape = as_shape("shape", shape)
    if len(shape) != 2:
        raise ValueError(f"hilbert needs a 2-D grid (rows, cols), got shape {fmt_axes(shape)}")
    row, col = _coords(shape)
    bits = max(_bits(s) for s in shape)
    d = hilbert_index(row, col, bits)
    if (1 << (2 * bits)) > 4 * d.numel():  # a thin grid in a large square: sort the indices
        return torch.argsort(d)
    # every cell has its own index: place the tokens at their indices, drop the empty ones
    slots = torch.full((1 << (2 * bits),), -1, dtype=torch.int64)
    slots[d] = torch.arange(d.numel())
    return slots[slots >= 0]


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inverse(perm)[perm[r]] == r`` (the rank of each token)."""
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(perm.numel(), device=perm.device)
    return rank


#: orders that need nothing but the grid, by name
ORDERS = {"raster": raster, "morton": morton, "hilbert": hilbert}


def _check_perm(perm, n: int, grid) -> torch.Tensor:
    if isinstance(perm, (list, tuple)) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                               for v in perm):
        perm = torch.tensor(perm, dtype=torch.int64)
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"order must be one of {sorted(ORDERS)}, a LongTensor permutation or a list of ints, "
                        f"got {type(perm).__name__}")
    if perm.dtype not in (torch.int64, torch.int32) or perm.dim() != 1 or perm.numel() != n:
        raise ValueError(
            f"order must be a 1-D integer permutation of the {n} tokens of grid {fmt_axes(grid)}, "
            f"got {perm.dtype} tensor of shape {tuple(perm.shape)}"
        )
    perm = perm.detach().to("cpu", torch.int64)
    if int(perm.min()) < 0 or int(perm.max()) >= n or not bool((torch.bincount(perm, minlength=n) == 1).all()):
        raise ValueError(f"order must be a permutation of 0..{n - 1} (every token exactly once)")
    return perm.contiguous()


class Ordered(Pattern):
    """The pattern ``inner`` applied to the grid's tokens taken in the order ``order``.

    ``mask(i, j) = inner.mask(rank[i], rank[j])`` where ``rank`` is the inverse of the
    permutation ``perm`` (``perm[r]`` = row-major index of the ``r``-th token in the
    order). ``inner`` has one query and one key per grid token (typically a 1-D
    pattern of length ``prod(grid)``: ``Window``, ``SlidingWindow``, ``Causal``...).
    ``order`` is ``"raster"``, ``"morton"``, ``"hilbert"`` or a permutation tensor (for
    instance ``tiles(grid, tile)``) or a list of ints. Kernels never evaluate this
    mask: ``attend`` permutes q, k and v into the order and runs ``inner``. The repr
    rebuilds the pattern: a custom order is printed as its list of token indices.
    """

    def __init__(self, inner: Pattern, order, grid):
        shape = as_shape("grid", grid)
        n = math.prod(shape)
        if not isinstance(inner, Pattern):
            raise TypeError(f"inner must be a foveal Pattern, got {type(inner).__name__}")
        if inner.n_q != n or inner.n_kv != n:
            raise ValueError(
                f"inner must have one query and one key per token of grid {fmt_axes(shape)} ({n}), "
                f"got {inner!r} with {inner.n_q} queries and {inner.n_kv} keys"
            )
        if isinstance(order, str):
            if order not in ORDERS:
                raise ValueError(f"order must be one of {sorted(ORDERS)} or a permutation tensor, got {order!r}")
            name, perm = order, ORDERS[order](shape)
        else:
            name, perm = "custom", _check_perm(order, n, shape)
        digest = hashlib.sha1(perm.numpy().tobytes()).hexdigest()
        self._set(shape=shape, inner=inner, order=name, _perm=perm, _rank=inverse(perm), _digest=digest)

    def perm(self, device=None) -> torch.Tensor:
        """``perm[r]``: row-major index of the ``r``-th token in the order (cached per device)."""
        return self._on(device)[0]

    def rank(self, device=None) -> torch.Tensor:
        """``rank[t]``: position in the order of row-major token ``t`` (the inverse of ``perm``)."""
        return self._on(device)[1]

    def _on(self, device):
        device = torch.device("cpu") if device is None else torch.device(device)
        cache = self.__dict__.setdefault("_device_cache", {})
        if device not in cache:
            cache[device] = (self._perm.to(device), self._rank.to(device))
        return cache[device]

    def mask(self, q_idx, kv_idx):
        q_idx = torch.as_tensor(q_idx)
        kv_idx = torch.as_tensor(kv_idx, device=q_idx.device)
        rank = self.rank(q_idx.device)
        return self.inner.mask(rank[q_idx], rank[kv_idx])

    # -- what attend uses --------------------------------------------------------
    def to_order(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """``x`` with its token axis (``dim``) rearranged from row-major into the order."""
        return x.index_select(dim, self.perm(x.device))

    def from_order(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of ``to_order``: tokens back in row-major order."""
        return x.index_select(dim, self.rank(x.device))

    def ordered_bias(self, bias):
        """A score term stated on row-major tokens, restated on tokens in the order (same parameters)."""
        return _OrderedBias(bias, self)

    # -- algebra: patterns in one order combine inside it ------------------------
    def _same_order(self, other) -> bool:
        return isinstance(other, Ordered) and other.shape == self.shape and other._digest == self._digest

    def __or__(self, other):
        if self._same_order(other):
            return Ordered(self.inner | other.inner, self._perm if self.order == "custom" else self.order, self.shape)
        return super().__or__(other)

    def __and__(self, other):
        if self._same_order(other):
            return Ordered(self.inner & other.inner, self._perm if self.order == "custom" else self.order, self.shape)
        return super().__and__(other)

    def _key(self):
        return (self.shape, self.inner, self._digest)

    def __repr__(self):
        order = repr(self.order) if self.order != "custom" else str(self._perm.tolist())
        return f"Ordered({self.inner!r}, order={order}, grid={fmt_axes(self.shape)})"


class _OrderedBias(WrappedBias):
    """``bias(h, perm[i], perm[j])``: a row-major score term read at positions of the order."""

    def __init__(self, bias, pattern: Ordered):
        self.bias, self.pattern = bias, pattern

    def __call__(self, h, q_idx, kv_idx):
        perm = self.pattern.perm(q_idx.device)
        return self.bias(h, perm[q_idx], perm[kv_idx])

    @property
    def geometry(self):
        """The wrapped table term's geometry in this order (None when it is not read from a table)."""
        inner = table_geometry(self.bias)
        return None if inner is None else (inner, self.pattern)

    def table_index(self, q_idx, kv_idx):
        perm = self.pattern.perm(q_idx.device)
        return self.bias.table_index(perm[q_idx], perm[kv_idx])

    def gather(self, index):
        return self.bias.gather(index)

    def __repr__(self):
        return f"{self.bias!r} in {self.pattern.order} order"
