"""Content-selected (dynamic) patterns: key blocks chosen from q and k at call time.

A dynamic pattern (``VerticalSlash``, ``VerticalSlashCover``, ``BlockTopK``,
``BlockCover``, ``DHSA``) knows its sequence length and block size; its
``select(q, k)`` looks at the tensors (without gradients) and returns a
``BlockSelection``: for every (batch, query head, query block) the key blocks kept,
which of them are *partial* (masked elementwise: the causal diagonal, or the
column/diagonal structure of vertical-slash), and the exact elementwise rule.
``foveal.functional.attend`` accepts either the dynamic pattern (it selects, then
attends) or a selection made beforehand (so the caller keeps the statistics:
``selection.density()``, ``blocks_kept()``...). Gradients flow to q, k and v through
the kept entries; the selection itself is not differentiable::

    sel = VerticalSlash(n, vertical=64, slash=256).select(q, k)   # no gradients
    out = attend(q, k, v, sel)          # or attend(q, k, v, VerticalSlash(...)) in one go
    sel.density(), sel.blocks_kept()    # (B, H) each: share of pairs, block pairs kept

Vertical-slash keeps whole blocks only where its kept diagonals pass and lists its
kept columns as single key tokens (``kv_tokens``), so a column costs one key, not a
block. ``foveal.kernels.blocksparse.selection_block_mask`` turns a selection into a
per-(batch, head) FlexAttention ``BlockMask``.

These are self-attention patterns on one sequence of ``n`` tokens (``n_q == n_kv``).
Selection builds block-level tables, O(B·H·(n/block)²) booleans, and, for
vertical-slash, an estimate of O(last_q·n) per head; it runs on a batch element and a
few key heads at a time when all at once would exceed ``SELECT_ELEMENTS``. Ties between
equal scores are broken by the order ``torch.sort`` gives (stable: lower index first).

``a_shape`` returns MInference's static A-shape as an ordinary (static) pattern.
"""

from __future__ import annotations

import math
import numbers

import torch

from foveal._checks import positive_int

__all__ = [
    "BlockSelection",
    "DynamicPattern",
    "a_shape",
    "VerticalSlash",
    "VerticalSlashCover",
    "BlockTopK",
    "BlockCover",
    "DHSA",
]


#: elements the selection's temporaries may hold at once: larger inputs are selected a
#: batch element and a few key heads at a time (the tables are block-level in any case)
SELECT_ELEMENTS = 1 << 24


#: MInference's A-shape defaults (its ``n_init`` and ``n_local``): the one copy, ``foveal.recipes.a_shape`` uses it too
A_SHAPE_SINKS, A_SHAPE_LOCAL = 100, 800


def a_shape(n: int, sinks: int = A_SHAPE_SINKS, local: int = A_SHAPE_LOCAL):
    """MInference's A-shape as a static Pattern: key ``j`` is visible to query ``i`` iff
    ``j <= i`` and (``i - j < local`` or ``j < sinks``).

    Each query sees its ``local`` nearest keys, itself included (MInference's
    streaming kernel with ``n_local = local``: ``0 <= i − j < n_local``), and the first
    ``sinks`` keys (``n_init``). Jiang et al., "MInference 1.0: Accelerating
    Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", 2024 (defaults
    100 sinks, 800 local keys). It is ``SlidingWindow(n, local - 1) | Sinks(n, sinks)``;
    ``sinks`` (``local``) larger than ``n`` means every key (the same mask), so it is
    capped at ``n``. ``sinks = local = 0`` (no key at all) is refused.
    """
    from foveal.patterns.global_ import Sinks
    from foveal.patterns.local import SlidingWindow

    n = positive_int("n", n)
    sinks = positive_int("sinks", sinks, minimum=0)
    local = positive_int("local", local, minimum=0)
    if sinks == 0 and local == 0:
        raise ValueError("a_shape needs sinks >= 1 or local >= 1: with sinks=0 and local=0 no query sees any key")
    parts = []
    if local:
        parts.append(SlidingWindow(n, left=min(local, n) - 1))
    if sinks:
        parts.append(Sinks(n, min(sinks, n)))
    return parts[0] if len(parts) == 1 else parts[0] | parts[1]


def _fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value <= 1):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


# -- the selection ---------------------------------------------------------------


class BlockSelection:
    """Kept key blocks per (batch, query head, query block), with an exact elementwise rule.

    ``kv_blocks`` (B, H, num_blocks, S) int64: the kept key blocks of each query block,
    ascending, ``-1`` in unused slots. ``partial`` (same shape, bool) marks kept blocks
    that are masked elementwise by ``mask_fn(b, h, q_idx, kv_idx)``; the other kept
    blocks are attended fully (tokens past ``n`` in a ragged last block never count).
    ``partial=None`` means every kept block is masked by ``mask_fn``. ``kv_tokens``
    (B, H, num_blocks, T) int64, optional: single key tokens kept besides the blocks
    (never inside a kept block of the same query block), ``-1`` unused, always masked
    by ``mask_fn`` (vertical-slash's columns). ``info`` holds mechanism-specific
    tensors (e.g. vertical-slash's kept ``columns`` and ``offsets``).
    """

    def __init__(self, n, block, kv_blocks, partial, mask_fn, method: str, info: dict | None = None,
                 kv_tokens=None, tokens_in_mask_fn: bool = False):
        self.n, self.block = n, block
        self.kv_blocks, self.partial, self.mask_fn = kv_blocks, partial, mask_fn
        self.kv_tokens = kv_tokens
        #: ``mask_fn`` alone says which single key tokens are kept (vertical-slash's columns), so the
        #: elementwise rule is pointwise (what compiled FlexAttention needs)
        self.tokens_in_mask_fn = tokens_in_mask_fn
        self.method, self.info = method, dict(info or {})

    @property
    def n_q(self) -> int:
        return self.n

    @property
    def n_kv(self) -> int:
        return self.n

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block)

    @property
    def batch(self) -> int:
        return self.kv_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_blocks.shape[1]

    # -- statistics -------------------------------------------------------------
    def counts(self) -> torch.Tensor:
        """Kept key blocks of each query block: (B, H, num_blocks)."""
        return (self.kv_blocks >= 0).sum(-1)

    def blocks_kept(self) -> torch.Tensor:
        """Kept (query block, key block) pairs per (batch, head): (B, H)."""
        return self.counts().sum(-1)

    def block_density(self) -> torch.Tensor:
        """Share of all ``num_blocks²`` block pairs that are kept, per (batch, head): (B, H) float."""
        return self.blocks_kept().double() / self.num_blocks**2

    def tokens_kept(self) -> torch.Tensor:
        """Single key tokens kept besides the blocks, summed over query blocks, per (batch, head): (B, H)."""
        if self.kv_tokens is None:
            return torch.zeros(self.batch, self.heads, dtype=torch.int64, device=self.kv_blocks.device)
        return (self.kv_tokens >= 0).sum((-1, -2))

    def keys_kept(self) -> torch.Tensor:
        """Allowed (query, key) pairs per (batch, head), counted exactly in bounded chunks: (B, H) int64."""
        b, h, nb, s = self.kv_blocks.shape
        width = 0 if self.kv_tokens is None else self.kv_tokens.shape[-1]
        total = torch.zeros(b * h * nb, dtype=torch.int64, device=self.kv_blocks.device)
        step = max(1, (1 << 20) // max(1, self.block * (s * self.block + width)))
        for r0 in range(0, b * h * nb, step):
            r1 = min(r0 + step, b * h * nb)
            total[r0:r1] = self._allowed_chunk(r0, r1).sum((1, 2))
        return total.view(b, h, nb).sum(-1)

    def density(self) -> torch.Tensor:
        """Share of the ``n²`` (query, key) pairs allowed, per (batch, head): (B, H) float."""
        return self.keys_kept().double() / (self.n * self.n)

    def _allowed_chunk(self, r0, r1):
        """Allowed pairs of instances r0:r1 (flattened (b, h, query block)) as (r, block, S·block + T) bool."""
        b, h, nb, s = self.kv_blocks.shape
        bs, dev = self.block, self.kv_blocks.device
        inst = torch.arange(r0, r1, device=dev)
        bi, hi, qb = inst // (h * nb), (inst // nb) % h, inst % nb
        tb = self.kv_blocks.reshape(b * h * nb, s)[r0:r1]
        ar = torch.arange(bs, device=dev)
        kj = (tb[:, :, None] * bs + ar).reshape(r1 - r0, -1)
        valid = (tb >= 0).repeat_interleave(bs, 1)
        part = None
        if self.partial is not None:
            part = self.partial.reshape(b * h * nb, s)[r0:r1].repeat_interleave(bs, 1)
        if self.kv_tokens is not None:
            extra = self.kv_tokens.reshape(b * h * nb, self.kv_tokens.shape[-1])[r0:r1]
            kj, valid = torch.cat([kj, extra], 1), torch.cat([valid, extra >= 0], 1)
            if part is not None:
                part = torch.cat([part, torch.ones_like(extra, dtype=torch.bool)], 1)
        kj = kj[:, None, :]
        qi = qb[:, None, None] * bs + ar[None, :, None]
        ok = valid[:, None, :] & (kj < self.n) & (qi < self.n)
        if self.mask_fn is not None:
            m = self.mask_fn(bi[:, None, None], hi[:, None, None], qi.clamp(max=self.n - 1), kj.clamp(0, self.n - 1))
            ok = ok & (m if part is None else m | ~part[:, None, :])
        return ok

    # -- the definition ---------------------------------------------------------
    def mask(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """Bool: may query ``q_idx`` of batch ``b``, head ``h`` attend to key ``kv_idx`` (broadcast indices)."""
        b, h, q_idx, kv_idx = torch.broadcast_tensors(*(torch.as_tensor(x) for x in (b, h, q_idx, kv_idx)))
        qc, kc = q_idx.clamp(0, self.n - 1), kv_idx.clamp(0, self.n - 1)
        row = self.kv_blocks[b, h, qc // self.block]  # (..., S)
        hit = row == (kc // self.block)[..., None]
        inside = (q_idx >= 0) & (q_idx < self.n) & (kv_idx >= 0) & (kv_idx < self.n)
        single = torch.zeros_like(inside)
        if self.kv_tokens is not None:
            single = (self.kv_tokens[b, h, qc // self.block] == kc[..., None]).any(-1)
        ok = (hit.any(-1) | single) & inside
        if self.mask_fn is not None:
            part = (hit & self.partial[b, h, qc // self.block]).any(-1) | single if self.partial is not None else ok
            ok = ok & (~part | self.mask_fn(b, h, qc, kc))
        return ok

    def dense_mask(self) -> torch.Tensor:
        """The full (B, H, n, n) bool mask. O(B·H·n²): for tests and pictures."""
        b, h = self.batch, self.heads
        dev = self.kv_blocks.device
        return self.mask(
            torch.arange(b, device=dev)[:, None, None, None],
            torch.arange(h, device=dev)[None, :, None, None],
            torch.arange(self.n, device=dev)[None, None, :, None],
            torch.arange(self.n, device=dev)[None, None, None, :],
        )

    def __repr__(self) -> str:
        return (
            f"BlockSelection({self.method}, n={self.n}, block={self.block}, batch={self.batch}, "
            f"heads={self.heads}, mean block_density={float(self.block_density().mean()):.4f})"
        )


# -- shared maths ----------------------------------------------------------------


def _scores(q, k):
    """q (B, Hq, M, D) against k (B, Hkv, L, D) -> (B, Hq, M, L) float32; query head h uses key head h // G."""
    b, hq, m, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    s = torch.matmul(q.float().reshape(b, hkv, g * m, d), k.float().transpose(-1, -2))
    return s.view(b, hq, m, -1)


def _pool(x, block):
    """Mean of each block of tokens (the ragged last block over its own tokens) and block sizes."""
    b, h, n, d = x.shape
    nb, full = -(-n // block), n // block
    x = x.float()
    sums = x[:, :, : full * block].reshape(b, h, full, block, d).sum(3)  # no padded copy of x
    if full < nb:
        sums = torch.cat([sums, x[:, :, full * block:].sum(2, keepdim=True)], 2)
    sizes = torch.clamp(n - torch.arange(nb, device=x.device) * block, max=block).float()
    return sums / sizes[:, None], sizes


def _table(keep):
    """Bool (B, H, nb, nkb) -> ascending key block table (B, H, nb, S), -1 in unused slots."""
    nkb = keep.shape[-1]
    idx = torch.arange(nkb, device=keep.device)
    s = int(keep.sum(-1).max()) if keep.numel() else 0
    srt = torch.where(keep, idx, nkb).sort(-1).values[..., :s]
    return torch.where(srt < nkb, srt, -1)


def _keep_ranked(key, count):
    """Bool mask of the ``count`` (int or (B, H[, nb]) tensor) largest entries of ``key`` along the last dim."""
    order = key.argsort(dim=-1, descending=True, stable=True)
    rank_ok = torch.arange(key.shape[-1], device=key.device) < torch.as_tensor(count, device=key.device)[..., None]
    return torch.zeros_like(key, dtype=torch.bool).scatter_(-1, order, rank_ok.expand_as(order))


def _cover_count(score, alpha):
    """Smallest count whose largest entries of ``score`` sum to at least ``alpha`` of the total (last dim)."""
    cs = score.sort(-1, descending=True).values.cumsum(-1)
    return ((cs < alpha * cs[..., -1:]).sum(-1) + 1).clamp(max=score.shape[-1])


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


class _ColumnsOffsets:
    """Vertical-slash's rule ``j <= i and (columns[b, h, j] or offsets[b, h, i - j])``, elementwise and tile by tile.

    ``columns`` and ``offsets`` are (B, H, n) bool. Called with broadcast index tensors it
    is the elementwise rule (FlexAttention's ``mask_mod`` contract); ``block_tiles`` gives
    the same rule on whole (query block, key block) tiles without per-element gathers: a
    tile's offsets part depends only on ``q_block - kv_block``, a window of ``2·block − 1``
    offsets read as a Toeplitz matrix (a strided view), its columns part only on ``kv_block``.
    """

    def __init__(self, columns, offsets):
        self.columns, self.offsets = columns, offsets
        self._windows = {}

    def __call__(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (self.columns[b, h, kv_idx] | self.offsets[b, h, (q_idx - kv_idx).clamp(min=0)])

    def _window(self, block):
        """(B, H, nb, 2·block − 1) bool: window ``d`` holds offsets ``d·block − (block − 1) ...  d·block + block − 1``
        (False outside [0, n)); and the columns as (B, H, nb, block), False past n."""
        if block not in self._windows:
            b, h, n = self.offsets.shape
            nb = -(-n // block)
            ext = torch.zeros(b, h, (nb + 2) * block, dtype=torch.bool, device=self.offsets.device)
            ext[:, :, block - 1:block - 1 + n] = self.offsets
            cols = torch.zeros(b, h, nb * block, dtype=torch.bool, device=self.columns.device)
            cols[:, :, :n] = self.columns
            self._windows[block] = (ext.unfold(-1, 2 * block - 1, block)[:, :, :nb].contiguous(),
                                    cols.view(b, h, nb, block))
        return self._windows[block]

    def block_tiles(self, b, h, q_block, kv_block, block):
        """(P, block, block) bool: entry (r, c) is the rule at ``i = q_block·block + r``, ``j = kv_block·block + c``."""
        win, cols = self._window(block)
        d = q_block - kv_block
        w = win[b, h, d.clamp(min=0)]  # (P, 2·block − 1)
        # offsets[d·block + r − c] = w[block − 1 + r − c]; with columns reversed (c = block − 1 − c') it is
        # w[r + c'], a strided view. Offsets are >= 0, so the diagonal tile's upper triangle is False already.
        tile = w.as_strided((w.shape[0], block, block), (w.stride(0), 1, 1)).flip(-1)
        tile |= cols[b, h, kv_block][:, None, :]
        diag = (d == 0).nonzero().squeeze(1)
        if diag.numel():  # a column is seen by the queries at or after it
            tile[diag] &= torch.ones(block, block, dtype=torch.bool, device=w.device).tril_()
        ahead = (d < 0).nonzero().squeeze(1)
        if ahead.numel():
            tile[ahead] = False
        return tile


# -- the patterns ----------------------------------------------------------------


class DynamicPattern:
    """Base class: a pattern on ``n`` tokens whose key blocks are chosen from q and k at call time."""

    n: int
    block: int

    @property
    def n_q(self) -> int:
        return self.n

    @property
    def n_kv(self) -> int:
        return self.n

    def select(self, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> BlockSelection:
        """The selection for ``q`` (B, Hq, n, D) and ``k`` (B, Hkv, n, D), computed without gradients."""
        from foveal.inputs import check_qkv, check_scale, check_tokens

        check_qkv(q, k, k)  # the one validator of attention inputs (k stands in for v)
        check_tokens(q, k, self.n, self.n, self)
        scale = check_scale(scale, q.shape[-1])
        q, k, scale = q.detach(), k.detach(), float(scale)
        b, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
        g = hq // hkv
        per_key_head = g * self._work()
        with torch.no_grad():
            if b * hkv * per_key_head <= SELECT_ELEMENTS:
                return self._select(q, k, scale)
            step = max(1, SELECT_ELEMENTS // per_key_head)
            parts = [
                (b0, h0 * g, self._select(q[b0:b0 + 1, h0 * g:(h0 + step) * g], k[b0:b0 + 1, h0:h0 + step], scale))
                for b0 in range(b) for h0 in range(0, hkv, step)
            ]
            return self._merge(parts, b, hq)

    def _select(self, q, k, scale) -> BlockSelection:
        raise NotImplementedError

    def _work(self) -> int:
        """Elements the selection's temporaries hold per query head."""
        nb = -(-self.n // self.block)
        return 4 * nb * nb

    def _mask_fn(self, info):
        """The elementwise rule of the selection's partial blocks, from its ``info``."""
        raise NotImplementedError

    def _merge(self, parts, b, hq) -> BlockSelection:
        """One selection from selections of (batch, head) slices: ``parts`` is [(b0, h0, selection)]."""
        first = parts[0][2]
        dev = first.kv_blocks.device
        nb = first.kv_blocks.shape[2]
        width = max(p.kv_blocks.shape[-1] for _, _, p in parts)
        kv = torch.full((b, hq, nb, width), -1, dtype=torch.int64, device=dev)
        partial = None if first.partial is None else torch.zeros(b, hq, nb, width, dtype=torch.bool, device=dev)
        tokens = None
        if first.kv_tokens is not None:
            twidth = max(p.kv_tokens.shape[-1] for _, _, p in parts)
            tokens = torch.full((b, hq, nb, twidth), -1, dtype=torch.int64, device=dev)
        info = {name: t.new_empty((b, hq) + tuple(t.shape[2:])) for name, t in first.info.items()}
        for b0, h0, p in parts:
            rows = (slice(b0, b0 + p.batch), slice(h0, h0 + p.heads))
            kv[rows + (slice(None), slice(0, p.kv_blocks.shape[-1]))] = p.kv_blocks
            if partial is not None:
                partial[rows + (slice(None), slice(0, p.partial.shape[-1]))] = p.partial
            if tokens is not None:
                tokens[rows + (slice(None), slice(0, p.kv_tokens.shape[-1]))] = p.kv_tokens
            for name, t in p.info.items():
                info[name][rows] = t
        return BlockSelection(self.n, self.block, kv, partial, self._mask_fn(info), first.method, info, tokens,
                              first.tokens_in_mask_fn)

    def _params(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, {self._params()})"


class VerticalSlash(DynamicPattern):
    """MInference's vertical-slash pattern: kept key columns and kept diagonals, per head, causal.

    The last ``last_q`` queries' causal softmax against all keys is the estimate: a
    column's score is its sum over those queries, an offset ``i - j``'s score the sum
    along that diagonal. Kept: ``min(n, max(vertical, min_vertical))`` columns and
    ``min(n, max(slash, min_slash))`` offsets, the highest-ranked, where the first
    ``always_vertical`` columns and the nearest ``always_slash`` offsets rank above all
    others (MInference's ``vertical[..., :30] = inf`` and ``slash[..., -100:] = inf``
    before its top-k), then the best-scoring. Mask: ``j <= i`` and (``j`` kept or
    ``i - j`` kept). Defaults as MInference's ``vertical_and_slash_kernel``:
    ``vertical=1000``, ``slash=6096`` (its most common head configuration),
    ``last_q=64``, 30 forced columns, the 100 nearest offsets forced, at least 30
    columns and 50 offsets. One difference: when fewer offsets are kept than are
    forced (``slash`` below 100), MInference's top-k picks among equal (infinite)
    scores in an unspecified order; here the nearest forced offsets win (the first
    forced columns likewise). ``block`` (64, *chosen*) only sets the kernel's tiling,
    not the mask. MInference's kernel does not attend this mask: its index conversion turns each kept
    diagonal into a whole range of keys per 64-query block and drops kept columns past the nearest
    range, which ``VerticalSlashRanges`` reproduces (a superset of this mask where no column is
    dropped); this class is the exact-diagonal rule. Causal only (``causal=False`` is refused). Selection ``info``:
    ``columns`` and ``offsets``, (B, H, n) bool. Jiang et al., "MInference 1.0:
    Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention",
    2024; Nawrot et al., "The Sparse Frontier", 2025.
    """

    def __init__(self, n: int, vertical: int = 1000, slash: int = 6096, *, last_q: int = 64, block: int = 64,
                 always_vertical: int = 30, always_slash: int = 100, min_vertical: int = 30, min_slash: int = 50,
                 causal: bool = True):
        if causal is not True:
            raise ValueError(f"causal must be True: vertical-slash is defined for causal attention, got {causal!r}")
        self.causal = True
        self.n = positive_int("n", n)
        self.vertical = positive_int("vertical", vertical, minimum=0)
        self.slash = positive_int("slash", slash, minimum=0)
        self.last_q = positive_int("last_q", last_q)
        self.block = positive_int("block", block)
        self.always_vertical = positive_int("always_vertical", always_vertical, minimum=0)
        self.always_slash = positive_int("always_slash", always_slash, minimum=0)
        self.min_vertical = positive_int("min_vertical", min_vertical, minimum=0)
        self.min_slash = positive_int("min_slash", min_slash, minimum=0)

    def _params(self):
        return (f"vertical={self.vertical}, slash={self.slash}, last_q={self.last_q}, block={self.block}, "
                f"always_vertical={self.always_vertical}, always_slash={self.always_slash}, "
                f"min_vertical={self.min_vertical}, min_slash={self.min_slash}")

    def estimate(self, q, k, scale):
        """Column and diagonal scores from the last ``last_q`` queries: two (B, H, n) float32 tensors."""
        n = self.n
        lq = min(self.last_q, n)
        s = _scores(q[:, :, n - lq:], k) * scale
        i = torch.arange(n - lq, n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        p = torch.softmax(s.masked_fill(j > i, float("-inf")), -1)  # (B, H, lq, n)
        col = p.sum(-2)
        off = (i - j).clamp(min=0).reshape(-1)  # masked entries have p = 0
        b, h = p.shape[:2]
        diag = torch.zeros(b, h, n, device=q.device).scatter_add_(-1, off.expand(b, h, -1), p.reshape(b, h, -1))
        return col, diag

    def _counts(self, col, diag):
        """How many columns and offsets are kept."""
        return min(max(self.vertical, self.min_vertical), self.n), min(max(self.slash, self.min_slash), self.n)

    def _kept(self, q, k, scale):
        """The kept columns and offsets: two (B, H, n) bool tensors."""
        n = self.n
        col, diag = self.estimate(q, k, scale)
        nv, ns = self._counts(col, diag)
        fv, fs = min(self.always_vertical, n), min(self.always_slash, n)
        first = torch.arange(n, device=q.device)
        # forced entries rank first (lower index, i.e. nearer offset, first among them), then by score
        cols = _keep_ranked(torch.where(first < fv, float("inf"), col), nv)
        offs = _keep_ranked(torch.where(first < fs, float("inf"), diag), ns)
        return cols, offs

    def _select(self, q, k, scale):
        n, bs = self.n, self.block
        cols, offs = self._kept(q, k, scale)
        band = self._slash_blocks(offs)
        info = {"columns": cols, "offsets": offs}
        return BlockSelection(n, bs, _table(band), None, self._mask_fn(info), type(self).__name__, info,
                              kv_tokens=self._column_tokens(cols, band), tokens_in_mask_fn=True)

    def _work(self):
        return super()._work() + 4 * min(self.last_q, self.n) * self.n

    def _mask_fn(self, info):
        return _ColumnsOffsets(info["columns"], info["offsets"])

    def _column_tokens(self, cols, band):
        """(B, H, nb, T): kept columns a query block can see (``j <=`` its last query) outside its slash blocks."""
        n, bs = self.n, self.block
        nb = band.shape[-1]
        idx = torch.arange(n, device=cols.device)
        colidx = torch.where(cols, idx, n).sort(-1).values[..., : max(1, int(cols.sum(-1).max()))]  # (B, H, V)
        last = torch.clamp((torch.arange(nb, device=cols.device) + 1) * bs, max=n) - 1
        blk = (colidx // bs).clamp(max=nb - 1)[:, :, None, :].expand(-1, -1, nb, -1)
        want = (colidx[:, :, None, :] <= last[:, None]) & ~band.gather(-1, blk)  # (B, H, nb, V)
        srt = torch.where(want, colidx[:, :, None, :], n).sort(-1).values
        srt = srt[..., : int(want.sum(-1).max())]
        return torch.where(srt < n, srt, -1)

    def _slash_blocks(self, offs):
        """(B, H, nb, nb) bool: the key blocks a kept diagonal of each query block passes through (exact)."""
        n, bs = self.n, self.block
        nb = -(-n // bs)
        b, h = offs.shape[:2]
        dev = offs.device
        # offset o = a·bs + r reaches key block qb - a (rows i >= qb·bs + r) and, if r > 0, qb - a - 1
        o = torch.arange(n, device=dev)
        a, r = o // bs, o % bs
        last_rows = n - (nb - 1) * bs
        f = offs.float()
        band = torch.zeros(b, h, nb + 1, device=dev).index_add_(-1, a, f).index_add_(-1, a + 1, f * (r > 0))
        band_last = torch.zeros(b, h, nb + 1, device=dev).index_add_(-1, a, f * (r < last_rows))
        band_last.index_add_(-1, a + 1, f * (r > 0))
        qb = torch.arange(nb, device=dev)[:, None]
        kb = torch.arange(nb, device=dev)[None, :]
        d = (qb - kb).clamp(min=0)
        diag = band[:, :, d] > 0
        diag[:, :, -1] = band_last[:, :, d[-1]] > 0
        return diag & (kb <= qb)


class VerticalSlashCover(VerticalSlash):
    """FlexPrefill-style vertical-slash: as many columns and offsets as cover ``alpha`` of the estimated mass.

    As ``VerticalSlash``, but per (batch, head) the number of kept columns (resp.
    offsets) is the smallest count whose largest scores sum to at least ``alpha`` of
    all scores, at least ``min_budget`` (capped at ``n``); the estimate uses the last
    ``last_q`` (512) queries. Lai et al., "FlexPrefill: A Context-Aware Sparse Attention
    Mechanism for Efficient Long-Sequence Inference", 2025, as simplified in Nawrot et
    al., "The Sparse Frontier", 2025. Defaults ``alpha=0.9``, ``min_budget=256``. As in
    ``VerticalSlash``, the first 30 columns and the 100 nearest offsets rank above all
    others (*chosen*, after MInference; set ``always_*`` to 0 to drop): they are kept
    whenever the count reaches them, which ``min_budget=256`` ensures.
    """

    def __init__(self, n: int, alpha: float = 0.9, min_budget: int = 256, *, last_q: int = 512, block: int = 64,
                 always_vertical: int = 30, always_slash: int = 100, causal: bool = True):
        super().__init__(n, 0, 0, last_q=last_q, block=block, always_vertical=always_vertical,
                         always_slash=always_slash, min_vertical=0, min_slash=0, causal=causal)
        self.alpha = _fraction("alpha", alpha)
        self.min_budget = positive_int("min_budget", min_budget, minimum=0)

    def _params(self):
        return (f"alpha={self.alpha}, min_budget={self.min_budget}, last_q={self.last_q}, block={self.block}, "
                f"always_vertical={self.always_vertical}, always_slash={self.always_slash}")

    def _counts(self, col, diag):
        def count(score):
            return _cover_count(score, self.alpha).clamp(min=min(self.min_budget, self.n))

        return count(col), count(diag)


class _PooledBlocks(DynamicPattern):
    """Shared by the block-level selectors: pooled block scores, causal at block level."""

    def _set_blocks(self, n, block, causal, block_name: str = "block"):
        self.n = positive_int("n", n)
        self.block = positive_int(block_name, block)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.causal = causal

    def _pooled(self, q, k, scale: float = 1.0):
        """(pooled block scores ``scale · mean(q_qb) · mean(k_kb)``, allowed block pairs, forced blocks, qb, kb)."""
        nb = -(-self.n // self.block)
        s = _scores(_pool(q, self.block)[0], _pool(k, self.block)[0]) * scale
        allowed, qb, kb = self._allowed(nb, q.device)
        forced = ((kb == qb) | (kb < self.sinks)) & allowed
        return s, allowed, forced, qb, kb

    def _allowed(self, nb, dev):
        qb = torch.arange(nb, device=dev)[:, None]
        kb = torch.arange(nb, device=dev)[None, :]
        return (kb <= qb) if self.causal else torch.ones(nb, nb, dtype=torch.bool, device=dev), qb, kb

    def _mask_fn(self, info):
        return _causal if self.causal else None

    def _selection(self, keep, qb, kb, info):
        nb = keep.shape[-1]
        kv = _table(keep)
        if not self.causal:
            return BlockSelection(self.n, self.block, kv, None, None, type(self).__name__, info)
        qrow = torch.arange(nb, device=keep.device)[:, None]
        partial = (kv == qrow) & (kv >= 0)  # the diagonal block is causal inside
        return BlockSelection(self.n, self.block, kv, partial, _causal, type(self).__name__, info)


class BlockTopK(_PooledBlocks):
    """Block-sparse attention with the top-k key blocks of each query block by pooled q·k.

    q and k are mean-pooled over blocks of ``block`` tokens; query block ``qb`` scores
    key block ``kb`` by ``mean(q_qb) · mean(k_kb)``. Kept: the diagonal block and the
    first ``sinks`` key blocks (always), and the best-scoring other (causal: ``kb <=
    qb``) blocks up to ``topk`` blocks in all; causal inside the diagonal block. Jiang et
    al., "MInference 1.0", 2024 (block-sparse heads); Nawrot et al., "The Sparse
    Frontier", 2025. Defaults: ``block=64``; ``topk=16`` and ``sinks=1`` are *chosen*.
    Selection ``info``: ``scores`` (B, H, nb, nb) pooled scores.
    """

    def __init__(self, n: int, topk: int = 16, *, block: int = 64, sinks: int = 1, causal: bool = True):
        self._set_blocks(n, block, causal)
        self.topk = positive_int("topk", topk)
        self.sinks = positive_int("sinks", sinks, minimum=0)

    def _params(self):
        return f"topk={self.topk}, block={self.block}, sinks={self.sinks}, causal={self.causal}"

    def _select(self, q, k, scale):
        s, allowed, forced, qb, kb = self._pooled(q, k)
        key = torch.where(forced, float("inf"), s).masked_fill(~allowed, float("-inf"))
        count = torch.maximum(allowed.sum(-1).clamp(max=self.topk), forced.sum(-1))
        keep = _keep_ranked(key, count) & allowed
        return self._selection(keep, qb, kb, {"scores": s})


class BlockCover(_PooledBlocks):
    """FlexPrefill's query-aware selection: the fewest key blocks whose estimated attention mass reaches ``gamma``.

    q and k are mean-pooled over blocks; query block ``qb``'s estimated attention over
    the allowed (causal: ``kb <= qb``) key blocks is ``softmax(scale · mean(q_qb) ·
    mean(k_kb))``. Kept: the smallest set of highest-mass blocks whose mass sums to at
    least ``gamma``, plus the diagonal block and the first ``sinks`` blocks; causal
    inside the diagonal block. Lai et al., "FlexPrefill: A Context-Aware Sparse
    Attention Mechanism for Efficient Long-Sequence Inference", 2025. Defaults
    ``gamma=0.9``, ``block=64``; ``sinks=1`` is *chosen*. Selection ``info``: ``mass``
    (B, H, nb, nb) estimated block attention.
    """

    def __init__(self, n: int, gamma: float = 0.9, *, block: int = 64, sinks: int = 1, causal: bool = True):
        self._set_blocks(n, block, causal)
        self.gamma = _fraction("gamma", gamma)
        self.sinks = positive_int("sinks", sinks, minimum=0)

    def _params(self):
        return f"gamma={self.gamma}, block={self.block}, sinks={self.sinks}, causal={self.causal}"

    def _select(self, q, k, scale):
        s, allowed, forced, qb, kb = self._pooled(q, k, scale)
        mass = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        keep = (_keep_ranked(mass, _cover_count(mass, self.gamma)) | forced) & allowed
        return self._selection(keep, qb, kb, {"mass": mass})


class DHSA(_PooledBlocks):
    """Dynamic Hierarchical Sparse Attention: whole key chunks kept by chunk-level similarity within a token budget.

    The sequence is cut into chunks of ``chunk`` tokens (the ragged last one shorter);
    a chunk's vector is ``sqrt(|c|) · mean`` of its queries (resp. keys), and chunk
    scores are ``S_c = Q_c K_cᵀ``, causal at chunk level. Each query chunk keeps its
    diagonal chunk, then whole key chunks in decreasing score while the kept key
    tokens stay within ``budget`` (stopping at the first that does not fit); causal
    inside the diagonal chunk. Xiong et al., "Long-Context Modeling with Dynamic
    Hierarchical Sparse Attention for On-Device LLMs", 2025. Fixed-size chunks only
    (given boundaries are not supported); ``chunk=64`` and ``budget=2048`` are
    *chosen*. Selection ``info``: ``scores`` (B, H, nb, nb) chunk scores.
    """

    def __init__(self, n: int, budget: int = 2048, *, chunk: int = 64, causal: bool = True):
        self._set_blocks(n, chunk, causal, block_name="chunk")
        self.budget = positive_int("budget", budget)

    @property
    def chunk(self) -> int:
        return self.block

    def _params(self):
        return f"budget={self.budget}, chunk={self.block}, causal={self.causal}"

    def _select(self, q, k, scale):
        nb = -(-self.n // self.block)
        qp, sizes = _pool(q, self.block)
        kp, _ = _pool(k, self.block)
        root = sizes.sqrt()[:, None]
        s = _scores(qp * root, kp * root)
        allowed, qb, kb = self._allowed(nb, q.device)
        key = torch.where(kb == qb, float("inf"), s).masked_fill(~allowed, float("-inf"))
        order = key.argsort(dim=-1, descending=True, stable=True)
        ok = allowed.expand_as(key).gather(-1, order)
        spent = (sizes[order] * ok).cumsum(-1)
        rank0 = torch.arange(nb, device=q.device) == 0
        keep_sorted = ok & (rank0 | (spent <= self.budget))
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return self._selection(keep, qb, kb, {"scores": s})
