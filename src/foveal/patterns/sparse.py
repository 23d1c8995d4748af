"""Static sparse patterns of long-context LMs: LongNet dilation, PowerAttention, BigBird.

Each is built from per-axis progressions (a single one, or a union of a few), so
masks are exact and layouts analytic.
"""

from __future__ import annotations

import numbers

import torch

from foveal._checks import fmt_axes, positive_int
from foveal.patterns.algebra import Intersection, Union
from foveal.patterns.global_ import Causal, FlatPattern, GlobalTokens, _like, visible_later_args

__all__ = ["Dilated", "Power", "BigBird"]


def _int_tuple(name, value) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (positive_int(name, value),)
    if isinstance(value, (tuple, list)) and value:
        return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))
    raise TypeError(f"{name} must be a positive int or a non-empty tuple of them, got {value!r}")


class _DilatedSegment(FlatPattern):
    """One LongNet (segment, rate): same segment, and equal offsets within it modulo ``rate``."""

    def __init__(self, n, segment: int, rate: int):
        self._init_shape(n)
        self._set(segment=segment, rate=rate)

    def progression(self, axis, x):
        base = (x // self.segment) * self.segment
        first = base + (x - base) % self.rate
        end = torch.clamp(base + self.segment, max=self.n)
        return first, _like(x, self.rate), (end - 1 - first) // self.rate + 1

    def visible_later(self, key_pos, t):
        # the first query >= t of j's segment with i ≡ j (mod rate) must lie in that segment
        j, t = visible_later_args(self, key_pos, t)
        base = (j // self.segment) * self.segment
        lo = torch.clamp(base, min=t)
        last = torch.clamp(base + self.segment, max=self.n) - 1
        return lo + (j - lo) % self.rate <= last

    def _key(self):
        return (self.shape, self.segment, self.rate)

    def __repr__(self):
        return f"Dilated({self._n_repr()}, segment={self.segment}, rate={self.rate})"


class Dilated(Union):
    """LongNet dilated attention: within segments of ``segment`` tokens, tokens whose offsets agree modulo ``rate``.

    Several (segment, rate) pairs (tuples of equal length) are united, as LongNet mixes
    them. Non-causal as defined; intersect with ``Causal`` for language modelling.
    Ding et al., "LongNet: Scaling Transformers to 1,000,000,000 Tokens" (2023).
    """

    _min_parts = 1

    def __init__(self, n, segment, rate):
        segments, rates = _int_tuple("segment", segment), _int_tuple("rate", rate)
        if len(segments) != len(rates):
            raise ValueError(f"segment and rate must have the same length, got {segments} and {rates}")
        for i, (w, r) in enumerate(zip(segments, rates)):
            if r > w:
                raise ValueError(f"rate must be <= segment in each pair; pair {i} has rate {r} > segment {w}")
        super().__init__(*[_DilatedSegment(n, w, r) for w, r in zip(segments, rates)])
        self._set(segments=segments, rates=rates)

    def _key(self):
        return (self.shape, self.segments, self.rates)

    def __repr__(self):
        fmt = (lambda t: str(t[0]) if len(t) == 1 else str(t))
        return f"Dilated(n={fmt_axes(self.shape)}, segment={fmt(self.segments)}, rate={fmt(self.rates)})"


class _BlockBand(FlatPattern):
    """Keys in blocks ``qb + lo .. qb + hi`` of the query's block ``qb`` (clipped to the sequence)."""

    def __init__(self, n, block: int, lo: int, hi: int):
        self._init_shape(n)
        self._set(block=block, lo=lo, hi=hi)

    def progression(self, axis, x):
        qb = x // self.block
        first = torch.clamp((qb + self.lo) * self.block, min=0)
        last = torch.clamp((qb + self.hi + 1) * self.block - 1, max=self.n - 1)
        return torch.minimum(first, _like(x, self.n - 1)), _like(x, 1), (last - first + 1).clamp(min=0)

    def _key(self):
        return (self.shape, self.block, self.lo, self.hi)

    def __repr__(self):
        return f"_BlockBand({self._n_repr()}, block={self.block}, lo={self.lo}, hi={self.hi})"


class _BlockTable(FlatPattern):
    """Keys in block ``table[qb]`` of the query's block ``qb`` (one key block per query block)."""

    def __init__(self, n, block: int, table: torch.Tensor):
        self._init_shape(n)
        self._set(block=block, table=table)

    def progression(self, axis, x):
        first = self.table.to(x.device)[x // self.block] * self.block
        return first, _like(x, 1), torch.clamp(self.n - first, max=self.block)

    def _key(self):
        return (self.shape, self.block, tuple(self.table.tolist()))

    def __repr__(self):
        return f"_BlockTable({self._n_repr()}, block={self.block})"


class _SinkBlocks(FlatPattern):
    """Keys in the first ``sinks`` blocks."""

    def __init__(self, n, block: int, sinks: int):
        self._init_shape(n)
        self._set(block=block, sinks=sinks)

    def progression(self, axis, x):
        return _like(x, 0), _like(x, 1), _like(x, min(self.sinks * self.block, self.n))

    def _key(self):
        return (self.shape, self.block, self.sinks)

    def __repr__(self):
        return f"_SinkBlocks({self._n_repr()}, block={self.block}, sinks={self.sinks})"


class Power(Intersection):
    """PowerAttention (static, block level): causal, and key block at distance ``d = qb − kb`` with
    ``d <= window``, or ``kb < sinks``, or ``d`` a power of two.

    Each query reaches O(log N) blocks, and any token reaches any earlier one within
    O(log N) layers. Chen et al., "PowerAttention: Exponentially Scaling of Receptive
    Fields for Effective Sparse Attention" (2025).
    """

    def __init__(self, n, block: int, window: int = 1, sinks: int = 1):
        probe = Causal(n)
        block = positive_int("block", block)
        window = positive_int("window", window, minimum=0)
        sinks = positive_int("sinks", sinks, minimum=0)
        nb = -(-probe.n // block)
        parts = [_BlockBand(n, block, -window, 0)]
        d = 1
        while d < nb:
            if d > window:
                parts.append(_BlockBand(n, block, -d, -d))
            d *= 2
        if sinks:
            parts.append(_SinkBlocks(n, block, sinks))
        super().__init__(probe, Union(*parts) if len(parts) > 1 else parts[0])
        self._set(block=block, window=window, sinks=sinks)

    def visible_later(self, key_pos, t):
        # queries i >= max(t, j) (causal) in blocks qb = qlo..qhi; key block kb is seen at distances
        # d = qb − kb in [0, window], at powers of two, and always when kb < sinks
        j, t = visible_later_args(self, key_pos, t)
        start = torch.clamp(j, min=t)
        kb = j // self.block
        qhi = (self.n - 1) // self.block
        a, b = start // self.block - kb, qhi - kb
        seen = (kb < self.sinks) | (a <= self.window)
        d = 1
        while d <= qhi:
            seen |= (a <= d) & (d <= b)
            d *= 2
        return seen & (start < self.n)

    def _key(self):
        return (self.shape, self.block, self.window, self.sinks)

    def __repr__(self):
        return f"Power(n={fmt_axes(self.shape)}, block={self.block}, window={self.window}, sinks={self.sinks})"


class BigBird(Union):
    """BigBird's block-sparse pattern: a sliding window of ``window`` blocks, ``globals`` global blocks and
    ``random`` seeded random key blocks per query block.

    Global blocks (the first ``globals``) attend to everything and are attended by
    everything; random blocks are drawn per query block, without repetition, from the
    blocks its window and the global blocks do not cover (fewer when too few remain),
    with ``torch.Generator().manual_seed(seed)``. Non-causal. ``window`` must be odd.
    Zaheer et al., "Big Bird: Transformers for Longer Sequences" (2020).
    """

    _min_parts = 1

    def __init__(self, n, block: int, window: int = 3, globals: int = 1, random: int = 1, seed: int = 0):
        probe = Causal(n)
        block = positive_int("block", block)
        window = positive_int("window", window)
        if window % 2 == 0:
            raise ValueError(f"window must be odd (a centred band of blocks), got {window}")
        globals = positive_int("globals", globals, minimum=0)
        random = positive_int("random", random, minimum=0)
        seed = positive_int("seed", seed, minimum=0)
        nb = -(-probe.n // block)
        half = window // 2
        parts = [_BlockBand(n, block, -half, half)]
        if globals:
            parts.append(GlobalTokens(n, min(globals * block, probe.n)))
        if random:
            gen = torch.Generator().manual_seed(seed)
            tables = torch.full((random, nb), -1, dtype=torch.int64)
            for qb in range(nb):
                taken = set(range(max(0, qb - half), min(nb, qb + half + 1))) | set(range(min(globals, nb)))
                free = torch.tensor([b for b in range(nb) if b not in taken], dtype=torch.int64)
                picks = free[torch.randperm(free.numel(), generator=gen)[:random]]
                tables[: picks.numel(), qb] = picks
            for r in range(random):
                # query blocks with too few free blocks repeat their window's own block
                row = torch.where(tables[r] >= 0, tables[r], torch.arange(nb))
                parts.append(_BlockTable(n, block, row))
        super().__init__(*parts)
        self._set(block=block, window=window, globals=globals, random=random, seed=seed)

    def _key(self):
        return (self.shape, self.block, self.window, self.globals, self.random, self.seed)

    def __repr__(self):
        return (f"BigBird(n={fmt_axes(self.shape)}, block={self.block}, window={self.window}, globals={self.globals}, "
                f"random={self.random}, seed={self.seed})")
