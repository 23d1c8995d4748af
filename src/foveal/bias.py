"""Score terms: additive terms on the attention scores, defined elementwise like a pattern.

A score term is a callable ``bias(h, q_idx, kv_idx) -> tensor`` over broadcastable
integer tensors (query head, query token, key token), FlexAttention's ``score_mod``
contract for an additive term; ``attend(..., bias=...)`` adds it to the scaled scores
before the mask and the softmax. If it has ``parameters()``, gradients flow to those
that require grad, on every backend. Plain functions work too (no parameters).

Under ``torch.compile`` a term reaches the custom op ``foveal::attend`` through
``compile_spec() -> (spec, tensors)``: ``spec`` a hashable tuple whose first item is a
class with ``from_spec(spec[1:], tensors)`` that rebuilds the term, ``tensors`` the
tensors it reads (their gradients flow). Terms without it and without parameters that
require grad (plain functions) are passed as they are; see ``foveal.custom_op``.
"""

from __future__ import annotations

import copy
import math

import torch

from foveal._checks import as_shape, per_axis, positive_int
from foveal.inputs import HALF

__all__ = ["ALiBi", "RelativePositionBias", "bias_parameters", "table_geometry", "WrappedBias", "float32_term"]


def bias_parameters(bias) -> list[torch.Tensor]:
    """The tensors of ``bias`` that require grad (empty for plain functions)."""
    params = getattr(bias, "parameters", None)
    if params is None:
        return []
    return [p for p in params() if isinstance(p, torch.Tensor) and p.requires_grad]


def table_geometry(bias):
    """The ``geometry`` of a score term read from a table (it has ``table_index`` and ``gather``, as
    ``RelativePositionBias``): what its cached index is keyed by. None for any other term."""
    geometry = getattr(bias, "geometry", None)
    return geometry if geometry is not None and hasattr(bias, "table_index") else None


def float32_term(bias):
    """``bias`` reading float32 copies of its half-precision tables that require grad (other terms as they are).

    A chunked kernel differentiates the copy, chunk by chunk: ``bias_parameters`` of the copy line up with
    those of ``bias``, and a table's gradient sums in float32, rounded to the table's dtype once at the end.
    """
    promote = getattr(bias, "with_float32_tables", None)
    return bias if promote is None else promote()


def _float32_table(table: torch.Tensor) -> torch.Tensor:
    """A half table as a float32 leaf that requires grad (a copy of its values); any other table as it is."""
    if table.dtype in HALF and table.requires_grad:
        return table.detach().float().requires_grad_()
    return table


class WrappedBias:
    """Base of a score term read through an index map (other heads, tokens or order): ``self.bias`` is the
    wrapped term, whose ``parameters()`` this one forwards, so gradients reach them."""

    bias: object

    def parameters(self):
        params = getattr(self.bias, "parameters", None)
        return list(params()) if params is not None else []

    def with_float32_tables(self):
        """This wrapper around ``float32_term(self.bias)``."""
        out = copy.copy(self)
        out.bias = float32_term(self.bias)
        return out


def _coords(idx: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    out, stride = [], math.prod(shape)
    for length in shape:
        stride //= length
        out.append((idx // stride) % length)
    return out


class ALiBi:
    """ALiBi: ``-slope_h · |i − j|`` with the geometric slopes ``2^(-8(h+1)/H)`` of Press et al. (2022).

    For ``H`` not a power of two, the slopes of the next power of two are interleaved
    as in the paper's reference code. Causal use sees ``slope_h · (j − i)``.
    """

    def __init__(self, num_heads: int):
        num_heads = positive_int("num_heads", num_heads)

        def slopes(n):
            start = 2 ** (-8 / n)
            return [start ** (i + 1) for i in range(n)]

        p = 2 ** math.floor(math.log2(num_heads))
        values = slopes(p)
        if p < num_heads:
            values += slopes(2 * p)[0::2][: num_heads - p]
        self.num_heads = num_heads
        self.slopes = torch.tensor(values, dtype=torch.float32)

    def __call__(self, h, q_idx, kv_idx):
        return -self.slopes.to(q_idx.device)[h] * (q_idx - kv_idx).abs()

    def parameters(self):
        return []

    def compile_spec(self):
        """``((ALiBi, num_heads), [])``: the slopes follow from the head count (``foveal.custom_op``)."""
        return (ALiBi, self.num_heads), []

    @staticmethod
    def from_spec(rest, tensors):
        return ALiBi(rest[0])

    def __repr__(self):
        return f"ALiBi(num_heads={self.num_heads})"


class RelativePositionBias:
    """A learned relative-position table per head on a grid (Swin, MaxViT, neighbourhood attention).

    ``table`` has shape ``(heads, 2·max_offset_0 + 1, ..., 2·max_offset_{d-1} + 1)``;
    the term for query ``i`` and key ``j`` on grid ``grid`` is
    ``table[h, j_0 − i_0 + max_offset_0, ...]``, offsets clamped to the table (pairs
    beyond it are normally masked by the pattern). Swin and MaxViT use
    ``max_offset = window − 1``; neighbourhood attention ``kernel_size − 1`` with
    ``step = dilation`` (offsets counted in dilated steps, NAT's (2k−1)-wide table).
    Pass a tensor that requires grad (e.g. an ``nn.Parameter``) to learn it.
    """

    def __init__(self, grid, max_offset, table: torch.Tensor | None = None, heads: int | None = None, step=1):
        grid = as_shape("grid", grid)
        max_offset = per_axis("max_offset", max_offset, len(grid), minimum=0)
        self.step = per_axis("step", step, len(grid))
        sizes = tuple(2 * m + 1 for m in max_offset)
        if table is None:
            heads = positive_int("heads", heads if heads is not None else 1)
            table = torch.zeros(heads, *sizes)
        if not isinstance(table, torch.Tensor) or table.dim() != len(grid) + 1 or tuple(table.shape[1:]) != sizes:
            got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(f"table must have shape (heads, {', '.join(map(str, sizes))}), got {got}")
        self.grid, self.max_offset, self.table = grid, max_offset, table

    @property
    def num_heads(self) -> int:
        """The heads of the table: ``attend`` refuses it for another number of query heads."""
        return self.table.shape[0]

    @property
    def geometry(self) -> tuple:
        """``(grid, max_offset, step)``: what ``table_index`` depends on (a key for caching it)."""
        return (self.grid, self.max_offset, self.step)

    def table_index(self, q_idx, kv_idx) -> torch.Tensor:
        """Flat index into ``table[h].flatten()`` of each (query, key) pair, broadcast over the two index tensors.

        Independent of the table's values: kernels cache it per pattern and ``geometry`` and read the term as
        one gather ``table.flatten(1)[:, index]``.
        """
        index = 0
        for qc, kc, m, st in zip(_coords(q_idx, self.grid), _coords(kv_idx, self.grid), self.max_offset, self.step):
            offset = kc - qc if st == 1 else (kc - qc) // st
            index = index * (2 * m + 1) + offset.clamp(-m, m) + m
        return index

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The term at a ``table_index`` for every head: ``(heads, *index.shape)``, differentiable in the table."""
        flat = self._flat()
        return flat.index_select(1, index.flatten()).view(flat.shape[0], *index.shape)

    def __call__(self, h, q_idx, kv_idx):
        index = self.table_index(q_idx, kv_idx)
        h, index = torch.broadcast_tensors(h, index)
        return self._flat()[h, index]

    def _flat(self) -> torch.Tensor:
        """The table as (heads, entries); a half table read as float32, so that its gradient sums in float32."""
        flat = self.table.flatten(1)
        return flat.float() if flat.dtype in HALF else flat

    def parameters(self):
        return [self.table]

    def compile_spec(self):
        """``((RelativePositionBias, grid, max_offset, step), [table])`` for ``foveal.custom_op``."""
        return (RelativePositionBias, self.grid, self.max_offset, self.step), [self.table]

    @staticmethod
    def from_spec(rest, tensors):
        grid, max_offset, step = rest
        return RelativePositionBias(grid, max_offset, tensors[0], step=step)

    def with_float32_tables(self):
        """This term over a float32 copy of a half table that requires grad (``float32_term``)."""
        out = copy.copy(self)
        out.table = _float32_table(self.table)
        return out

    def __repr__(self):
        return f"RelativePositionBias(grid={self.grid}, max_offset={self.max_offset}, heads={self.table.shape[0]})"
