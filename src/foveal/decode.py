"""Decoding with a key/value cache: static patterns with eviction, Quest and SnapKV selection.

``KVCache`` holds the keys and values appended so far with their absolute positions.
``attend_decode(q, cache)`` attends the newest queries (the positions appended last)
to the cached keys under a static *causal* pattern (no query sees a later key;
others are refused, see ``foveal.patterns.global_.is_causal``), through
``foveal.functional.attend`` with a cross pattern that maps cache slots to
positions; decoding a sequence token by token equals ``attend`` over the whole
sequence with the same pattern. A cache built with a pattern evicts the keys no
later query can see (``pattern.visible_later``), so ``SlidingWindow | Sinks`` keeps
``sinks + left + chunk`` keys at most (StreamingLLM).

Content-selected decoding: ``Quest`` picks, per query and head, the key pages whose
upper bound on the score is largest (Tang et al., "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference", 2024); ``SnapKV`` compresses the cache once
at the end of prefill from the attention of the last prompt queries (Li et al.,
"SnapKV: LLM Knows What You are Looking for Before Generation", 2024).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from foveal._checks import positive_int
from foveal.functional import attend
from foveal.inputs import DTYPES, check_scale, check_sink_logits, check_tensor
from foveal.patterns import Causal, Full, MaskPattern, Pattern
from foveal.patterns.causality import is_causal

__all__ = [
    "KVCache",
    "attend_decode",
    "future_visible",
    "Quest",
    "page_bounds",
    "quest_pages",
    "SnapKV",
    "snapkv_scores",
    "snapkv_select",
    "snapkv_compress",
]

#: score elements per key head that one chunk of SnapKV's scoring holds
SNAPKV_CHUNK_ELEMENTS = 1 << 20


# -- which cached keys a later query may still see ------------------------------------
def future_visible(pattern: Pattern, key_pos: torch.Tensor, t: int) -> torch.Tensor:
    """Deprecated: ``pattern.visible_later(key_pos, t)`` (exact for every pattern)."""
    warnings.warn("future_visible is deprecated; use pattern.visible_later(key_pos, t)", DeprecationWarning,
                  stacklevel=2)
    return pattern.visible_later(key_pos, t)


def _never_evicts(pattern) -> bool:
    return pattern is None or isinstance(pattern, Causal)


def _check_pattern(pattern) -> None:
    """A decoding pattern: a self-attention Pattern under which no query sees a later key."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a foveal Pattern or None, got {type(pattern).__name__}")
    if pattern.n_q != pattern.n_kv:
        raise ValueError(
            f"pattern must be a self-attention pattern over the whole sequence (n_q == n_kv), got {pattern!r}"
        )
    if not is_causal(pattern):
        raise ValueError(
            f"pattern must be causal for decoding (no query may see a later key), got {pattern!r}; "
            f"intersect it with Causal(n) if that is what is meant"
        )


# -- the cache ----------------------------------------------------------------------
class KVCache:
    """Keys and values of the tokens appended so far, with their absolute positions.

    Holds ``k`` (B, Hkv, S, D) and ``v`` (B, Hkv, S, Dv) for the S slots in use.
    With a static causal ``pattern`` (its ``n`` is the longest sequence to decode;
    a pattern under which some query sees a later key is refused), each ``append``
    first evicts the keys that no query at the new positions or later can see
    (``pattern.visible_later``), so ``SlidingWindow(n, w) | Sinks(n, s)`` holds at
    most ``s + w + chunk`` keys. ``capacity`` preallocates that many slots and refuses
    to grow beyond them; without it the buffers grow by doubling. ``keep(index)``
    compresses the cache per batch element and head (SnapKV). The cache is for
    inference: stored tensors are detached.
    """

    def __init__(self, batch, kv_heads, head_dim, dtype=torch.float32, device=None, pattern=None,
                 capacity=None, value_dim=None):
        self.batch = positive_int("batch", batch)
        self.kv_heads = positive_int("kv_heads", kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.value_dim = self.head_dim if value_dim is None else positive_int("value_dim", value_dim)
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in DTYPES]}, got {dtype!r}")
        if pattern is not None:
            _check_pattern(pattern)
        self.capacity = None if capacity is None else positive_int("capacity", capacity)
        self.dtype, self.device, self.pattern = dtype, torch.device(device or "cpu"), pattern
        alloc = self.capacity or 16
        self._k = torch.empty(batch, kv_heads, alloc, self.head_dim, dtype=dtype, device=self.device)
        self._v = torch.empty(batch, kv_heads, alloc, self.value_dim, dtype=dtype, device=self.device)
        self._pos = torch.empty(alloc, dtype=torch.int64, device=self.device)  # mask position per slot
        self._head_pos = None  # (B, Hkv, alloc) true positions once compressed per head
        self.size = 0  # slots in use
        self._evicted_for = None  # the position whose query sees every slot after eviction (see append)
        self.length = 0  # tokens appended so far: the next position
        self.complete_from = 0  # queries at positions >= this still find every key they may see
        self._bounds = {}  # page_size -> Quest page summaries (lo, hi)

    # -- views ---------------------------------------------------------------------
    @property
    def k(self) -> torch.Tensor:
        return self._k[:, :, : self.size]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, :, : self.size]

    @property
    def positions(self) -> torch.Tensor:
        """Absolute position of every cached key, (B, Hkv, S)."""
        if self._head_pos is not None:
            return self._head_pos[:, :, : self.size]
        return self._pos[: self.size].expand(self.batch, self.kv_heads, self.size)

    @property
    def compressed(self) -> bool:
        return self._head_pos is not None

    def __repr__(self):
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"length={self.length}, size={self.size}, pattern={self.pattern!r})")

    def page_bounds(self, page_size: int):
        """Quest's page summaries of the complete pages of slots: (lo, hi), each (B, Hkv, P, D) float32.

        Kept up to date incrementally: a page is summarised once, when it completes.
        Eviction and ``keep`` drop the summaries.
        """
        page_size = positive_int("page_size", page_size)
        lo, hi = self._bounds.get(page_size, (None, None))
        done = 0 if lo is None else lo.shape[2]
        total = self.size // page_size
        if total > done:
            new_lo, new_hi = page_bounds(self.k[:, :, done * page_size : total * page_size], page_size)
            lo = new_lo if lo is None else torch.cat([lo, new_lo], dim=2)
            hi = new_hi if hi is None else torch.cat([hi, new_hi], dim=2)
            self._bounds[page_size] = (lo, hi)
        return lo, hi

    # -- updates -------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append keys (B, Hkv, m, D) and values (B, Hkv, m, Dv) at positions ``length .. length+m-1``."""
        m = self._check_kv(k, v)
        t = self.length
        if self.pattern is not None and t + m > self.pattern.n:
            raise ValueError(
                f"the cache's pattern covers {self.pattern.n} positions; appending {m} tokens at position {t} "
                f"would exceed it (build the pattern with n >= the longest sequence)"
            )
        keep = None
        if not _never_evicts(self.pattern) and self.size:
            keep = self.pattern.visible_later(self._pos[: self.size], t)
        kept = self.size if keep is None else int(keep.sum())
        if self.capacity is not None and kept + m > self.capacity:
            raise ValueError(
                f"cache capacity {self.capacity} is too small: {kept} keys are still visible and "
                f"{m} new ones were appended"
            )
        if keep is not None:
            self._evict(keep)
        if self.size + m > self._k.shape[2]:
            self._grow(max(2 * self._k.shape[2], self.size + m))
        s = slice(self.size, self.size + m)
        self._k[:, :, s] = k.detach()
        self._v[:, :, s] = v.detach()
        self._pos[s] = torch.arange(t, t + m, device=self.device)
        if self._head_pos is not None:
            self._head_pos[:, :, s] = self._pos[s]
        self.size += m
        self.length += m
        # one token appended right after evicting for its position: with a pattern that sees_kept_keys(),
        # it sees every slot (attend_decode then needs no mask)
        self._evicted_for = t if m == 1 and not _never_evicts(self.pattern) else None

    def keep(self, index: torch.Tensor) -> None:
        """Keep, for each batch element and key head, the slots ``index`` (B, Hkv, K), in that order.

        After this the cache holds different positions per head; it decodes with
        ``Causal`` (every kept key precedes every later query).
        """
        if not _never_evicts(self.pattern):
            raise ValueError(f"keep() needs a cache without an evicting pattern, this one has {self.pattern!r}")
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
            raise TypeError(f"index must be an int64 tensor, got {type(index).__name__}"
                            f"{'' if not isinstance(index, torch.Tensor) else ' of ' + str(index.dtype)}")
        if index.dim() != 3 or index.shape[:2] != (self.batch, self.kv_heads):
            raise ValueError(
                f"index must be (batch, kv_heads, K) = ({self.batch}, {self.kv_heads}, K), got {tuple(index.shape)}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise ValueError(f"index values must be cache slots in [0, {self.size}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        index = index.to(self.device)
        kk = index.shape[2]
        pos = self.positions.gather(2, index)
        self._k[:, :, :kk] = self.k.gather(2, index[..., None].expand(-1, -1, -1, self.head_dim))
        self._v[:, :, :kk] = self.v.gather(2, index[..., None].expand(-1, -1, -1, self.value_dim))
        self._head_pos = torch.empty(self.batch, self.kv_heads, self._k.shape[2], dtype=torch.int64,
                                     device=self.device)
        self._head_pos[:, :, :kk] = pos
        # for the shared decode mask any position before the next query will do; take the latest
        self._pos[:kk] = pos.amax(dim=(0, 1)) if kk else self._pos[:kk]
        self.size = kk
        self.complete_from = self.length
        self._bounds = {}

    def _evict(self, keep: torch.Tensor) -> None:
        if bool(keep.all()):
            return
        self._bounds = {}
        self.complete_from = self.length  # earlier queries may have needed what goes now
        idx = torch.nonzero(keep).flatten()
        kk = idx.numel()
        self._k[:, :, :kk] = self._k[:, :, idx]
        self._v[:, :, :kk] = self._v[:, :, idx]
        self._pos[:kk] = self._pos[idx]
        if self._head_pos is not None:
            self._head_pos[:, :, :kk] = self._head_pos[:, :, idx]
        self.size = kk

    def _grow(self, alloc: int) -> None:
        k = self._k.new_empty(self.batch, self.kv_heads, alloc, self.head_dim)
        v = self._v.new_empty(self.batch, self.kv_heads, alloc, self.value_dim)
        pos = self._pos.new_empty(alloc)
        k[:, :, : self.size] = self.k
        v[:, :, : self.size] = self.v
        pos[: self.size] = self._pos[: self.size]
        if self._head_pos is not None:
            hp = self._head_pos.new_empty(self.batch, self.kv_heads, alloc)
            hp[:, :, : self.size] = self._head_pos[:, :, : self.size]
            self._head_pos = hp
        self._k, self._v, self._pos = k, v, pos

    def _check_kv(self, k, v) -> int:
        for name, t, e in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            check_tensor(name, t, "(batch, kv_heads, tokens, head_dim)")
            if t.dim() != 4 or t.shape[0] != self.batch or t.shape[1] != self.kv_heads or t.shape[3] != e:
                raise ValueError(
                    f"{name} must be (batch, kv_heads, tokens, {e}) = ({self.batch}, {self.kv_heads}, m, {e}), "
                    f"got {tuple(t.shape)}"
                )
            if t.dtype != self.dtype:
                raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, got {t.device}")
        if k.shape[2] != v.shape[2] or k.shape[2] == 0:
            raise ValueError(f"k and v must hold the same number (>= 1) of tokens, got {k.shape[2]} and {v.shape[2]}")
        return k.shape[2]


# -- Quest ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Quest:
    """Quest page selection: pages of ``page_size`` keys, the top ``token_budget // page_size``
    earlier pages by the score bound ``Σ_d max(q_d·min_d, q_d·max_d)``, plus the query's own page.

    ``page_size`` 16 is Quest's; ``token_budget`` 1024 is *(chosen)*: the paper sweeps it.
    """

    page_size: int = 16
    token_budget: int = 1024

    def __post_init__(self):
        positive_int("page_size", self.page_size)
        positive_int("token_budget", self.token_budget)

    @property
    def pages(self) -> int:
        return self.token_budget // self.page_size


def page_bounds(k: torch.Tensor, page_size: int):
    """Elementwise min and max of the keys of every complete page: two (B, Hkv, P, D) float32 tensors."""
    b, h, n, d = k.shape
    pages = n // page_size
    kp = k[:, :, : pages * page_size].reshape(b, h, pages, page_size, d)
    return kp.amin(dim=3).float(), kp.amax(dim=3).float()


def quest_pages(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, num_pages: int) -> torch.Tensor:
    """Top ``num_pages`` pages by Quest's bound ``Σ_d max(q_d·lo_d, q_d·hi_d)``, per query head: (B, Hq, k) ascending.

    ``q`` is (B, Hq, D) (one query per head); ``lo`` / ``hi`` (B, Hkv, P, D) are the
    pages' elementwise key minima and maxima (``page_bounds``). Query head ``h`` scores
    the pages of key head ``h // (Hq // Hkv)``; ties go to the earlier page.
    """
    groups = q.shape[1] // lo.shape[1]
    qf = q.float()[:, :, None, :]
    bound = torch.maximum(qf * lo.repeat_interleave(groups, dim=1), qf * hi.repeat_interleave(groups, dim=1)).sum(-1)
    top = torch.sort(bound, dim=-1, descending=True, stable=True).indices[..., :num_pages]
    return torch.sort(top, dim=-1).values


def _quest_decode(q, cache, quest, scale, backend, sink_logits=None):
    b, hq, nq, d = q.shape
    groups = hq // cache.kv_heads
    p = quest.page_size
    outs, lses, kept = [], [], []
    kf = cache.k.reshape(-1, d)
    vf = cache.v.reshape(-1, cache.value_dim)
    s = cache.size
    head_row = (torch.arange(b, device=q.device)[:, None] * cache.kv_heads
                + torch.arange(hq, device=q.device)[None, :] // groups) * s  # (B, Hq)
    for i in range(nq):
        pos = cache.length - nq + i
        cur = pos // p
        npages = min(quest.pages, cur)
        if npages:
            lo, hi = cache.page_bounds(p)
            pages = quest_pages(q[:, :, i], lo[:, :, :cur], hi[:, :, :cur], npages)
            slots = (pages[..., None] * p + torch.arange(p, device=q.device)).flatten(2)
        else:
            pages = torch.zeros(b, hq, 0, dtype=torch.int64, device=q.device)
            slots = pages
        own = torch.arange(cur * p, pos + 1, device=q.device).expand(b, hq, -1)
        slots = torch.cat([slots, own], dim=2)  # (B, Hq, L), the same L for every head
        flat = (head_row[..., None] + slots).flatten()
        n_keys = slots.shape[2]
        ks = kf.index_select(0, flat).view(b, hq, n_keys, d)
        vs = vf.index_select(0, flat).view(b, hq, n_keys, cache.value_dim)
        out, lse = attend(q[:, :, i : i + 1], ks, vs, Full(1, n_kv=n_keys), scale=scale, sink_logits=sink_logits,
                          backend=backend, return_lse=True)
        outs.append(out)
        lses.append(lse)
        kept.append({"position": pos, "pages": pages, "current_page": cur, "num_keys": n_keys})
    out = torch.cat(outs, dim=2)
    return out, torch.cat(lses, dim=2), kept


# -- SnapKV ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SnapKV:
    """SnapKV selection: score every prompt key by the attention of the last ``window`` prompt
    queries (summed over them, max over a GQA group), smooth by a ``pool`` of size ``kernel``,
    keep the top ``capacity`` keys plus the first ``sinks`` and the last ``recent``.

    Defaults as in MECHANISMS.md (window 256, avg-pool 7, sinks 4, recent 128);
    ``capacity`` 1024 is *(chosen)*.
    """

    capacity: int = 1024
    window: int = 256
    kernel: int = 7
    pool: str = "avg"
    sinks: int = 4
    recent: int = 128

    def __post_init__(self):
        positive_int("capacity", self.capacity, minimum=0)
        positive_int("window", self.window)
        positive_int("kernel", self.kernel)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (a centred pool), got {self.kernel}")
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        positive_int("sinks", self.sinks, minimum=0)
        positive_int("recent", self.recent, minimum=0)


def snapkv_scores(q: torch.Tensor, k: torch.Tensor, config: SnapKV, scale=None) -> torch.Tensor:
    """Pooled SnapKV scores of every key, (B, Hkv, L), float32.

    ``q`` (B, Hq, Nq, D) are the last prompt queries (positions ``L − Nq .. L − 1``), of which the
    last ``config.window`` vote; ``k`` (B, Hkv, L, D) the prompt keys. The attention
    probabilities are causal; they come from ``attend``'s log-sum-exp and the scores of one
    chunk of keys at a time, so memory stays O(window × chunk).
    """
    b, hq, nq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    w = min(config.window, nq)
    qw = q[:, :, nq - w :]
    scale = check_scale(scale, d)
    _, lse = attend(qw, k, k.new_zeros(b, hkv, length, 1), Causal(w, n_kv=length),
                    scale=scale, return_lse=True)
    qpos = torch.arange(length - w, length, device=q.device)
    groups = hq // hkv
    qg = qw.float().reshape(b, hkv, groups * w, d)
    votes = []
    chunk = max(1, SNAPKV_CHUNK_ELEMENTS // max(1, groups * w))
    for s in range(0, length, chunk):
        kc = k[:, :, s : s + chunk].float()
        sc = (qg @ kc.transpose(-1, -2) * scale).view(b, hkv, groups, w, -1)
        prob = torch.exp(sc - lse.view(b, hkv, groups, w, 1))
        allowed = torch.arange(s, s + kc.shape[2], device=q.device)[None, :] <= qpos[:, None]
        votes.append((prob * allowed).sum(3).amax(2))  # sum over window queries, max over the group
    vote = torch.cat(votes, dim=-1)  # (B, Hkv, L)
    pad = config.kernel // 2
    flat = vote.reshape(b * hkv, 1, length)
    if config.pool == "avg":
        pooled = F.avg_pool1d(flat, config.kernel, stride=1, padding=pad, count_include_pad=True)
    else:
        pooled = F.max_pool1d(F.pad(flat, (pad, pad), value=float("-inf")), config.kernel, stride=1)
    return pooled.view(b, hkv, length)


def snapkv_select(q: torch.Tensor, k: torch.Tensor, config: SnapKV = SnapKV(), scale=None) -> torch.Tensor:
    """Prompt key indices SnapKV keeps, (B, Hkv, K) ascending, with the same K for every head.

    Always the first ``sinks`` and the last ``recent`` keys, plus the top ``capacity`` of
    the others by ``snapkv_scores`` (all keys if the prompt is short).
    """
    if not isinstance(config, SnapKV):
        raise TypeError(f"config must be a SnapKV, got {type(config).__name__}")
    _check_q_k(q, k)
    b, hkv, length = k.shape[0], k.shape[1], k.shape[2]
    pos = torch.arange(length, device=k.device)
    forced = (pos < config.sinks) | (pos >= length - config.recent)
    n_free = int((~forced).sum())
    take = min(config.capacity, n_free)
    if take == n_free:
        return pos.expand(b, hkv, length).clone()
    scores = snapkv_scores(q, k, config, scale).masked_fill(forced, float("-inf"))
    # highest score first, the earlier key on ties (max-pooling makes ties common)
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :take]
    keep = torch.cat([top, torch.nonzero(forced).flatten().expand(b, hkv, -1)], dim=-1)
    return torch.sort(keep, dim=-1).values


def snapkv_compress(cache: KVCache, q: torch.Tensor, config: SnapKV = SnapKV(), scale=None) -> torch.Tensor:
    """Compress a prefilled cache with SnapKV; returns the kept positions (B, Hkv, K).

    ``q`` (B, Hq, Nq, D) are the last prompt queries (at least ``config.window`` of them
    for the full observation window). The cache must hold the whole prompt (no eviction,
    not yet compressed); afterwards it decodes with ``Causal``.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if cache.compressed or cache.size != cache.length:
        raise ValueError(f"snapkv_compress needs a cache holding the whole prompt ({cache.length} tokens), "
                         f"it holds {cache.size}{' (compressed)' if cache.compressed else ''}")
    index = snapkv_select(q, cache.k, config, scale)
    cache.keep(index)
    return cache.positions


def _check_q_k(q, k):
    for name, t in (("q", q), ("k", k)):
        check_tensor(name, t)
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share one dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim, "
                         f"with query heads a multiple of key heads")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} queries but k only {k.shape[2]} keys: queries are the last prompt tokens")


# -- decoding -------------------------------------------------------------------------
def _decode_pattern(pattern, qpos, kpos, n_q, n_kv):
    """Cross pattern over (new queries, cache slots): ``pattern.mask`` on absolute positions (a one-off
    pattern: ``cacheable`` is False)."""
    cached = {}

    def on(device):
        if device not in cached:
            cached[device] = (qpos.to(device), kpos.to(device))
        return cached[device]

    def decode_mask(q_idx, kv_idx):
        qp, kp = on(q_idx.device)
        return pattern.mask(qp[q_idx], kp[kv_idx.to(q_idx.device)])  # a decoding pattern is causal

    step = MaskPattern(n_q, decode_mask, name="decode", n_kv=n_kv)
    step._set(cacheable=False)  # this step's positions only: kept out of the value-keyed caches
    return step


#: a decode step looks at its (queries × cached keys) mask directly up to this many pairs
DECODE_MASK_PAIRS = 1 << 22


def step_inputs(pattern, qpos, kpos, k, v, fresh: bool = False):
    """The cross pattern and the keys of one decode step, exact, in the cheapest form.

    ``pattern`` is a causal self-attention pattern; ``qpos`` (m,) and ``kpos`` (s,) are
    the positions of the new queries and of the held keys ``k``, ``v`` (B, Hkv, s, ·).
    ``attend_decode`` and the transformers backend use it.

    ``fresh``: one query whose cache was just evicted for its position by ``pattern``;
    when ``pattern.sees_kept_keys()`` it sees every slot: ``Full``, no mask evaluated.

    A causal cache (no pattern) is bottom-right ``Causal`` (the new queries' own keys
    were appended last). With the (new queries × cached keys) mask small enough to look at: ``Full`` when
    every cached key is visible (a window cache after eviction, a plain causal cache
    for one query), ``Causal`` when the mask is bottom-right causal (a chunk over a
    causal cache) — both run on the fused ``sdpa`` backend — and for one query the
    visible keys gathered under ``Full``. Otherwise the pattern's mask on absolute
    positions (``_decode_pattern``).
    """
    m, s = qpos.numel(), kpos.numel()
    if _never_evicts(pattern):
        # a causal cache never evicts: older keys are seen by every new query, the new ones (appended last)
        # form the causal square
        return Causal(m, n_kv=s), k, v
    if fresh and m == 1 and pattern.sees_kept_keys():
        return Full(1, n_kv=s), k, v
    if m * s <= DECODE_MASK_PAIRS:
        i, j = qpos[:, None], kpos[None, :].to(qpos.device)
        allowed = pattern.mask(i, j).expand(m, s)
        if bool(allowed.all()):
            return Full(m, n_kv=s), k, v
        if m <= s and torch.equal(allowed, Causal(m, n_kv=s).dense_mask(device=allowed.device)):
            return Causal(m, n_kv=s), k, v
        if m == 1 and bool(allowed.any()):
            idx = torch.nonzero(allowed[0]).flatten().to(k.device)
            return Full(1, n_kv=idx.numel()), k.index_select(2, idx), v.index_select(2, idx)
    return _decode_pattern(pattern, qpos, kpos, m, s), k, v


def attend_decode(q, cache: KVCache, pattern=None, *, select=None, scale=None, sink_logits=None,
                  backend: str = "auto", return_lse: bool = False, return_kept: bool = False):
    """Attention of the newest queries to the cached keys.

    ``q`` (B, Hq, m, D) are the queries at the last ``m`` positions appended to ``cache``
    (``Hq`` a multiple of the cache's key heads). Query ``i`` sees cached key ``j`` iff
    ``pattern.mask(i, j)`` (absolute positions); ``pattern`` must be causal (a
    pattern under which some query sees a later key is refused, not silently
    intersected with ``Causal``), defaults to the cache's (plain causal if none) and
    must match it when the cache evicts. ``q`` of another dtype than the cache is a
    ``TypeError``, on another device a ``ValueError`` (``foveal.inputs``' policy). With
    ``select=Quest(...)`` each query attends exactly over its Quest pages (causal cache
    only). ``sink_logits`` (Hq,) joins every query's softmax as one zero-value key, as in
    ``attend``. Returns ``out`` (B, Hq, m, Dv); with ``return_lse`` the log-sum-exp (float64 for
    float64 inputs, float32 otherwise)
    (B, Hq, m); with ``return_kept`` what Quest kept per query (a list of dicts with
    ``pages`` (B, Hq, k), ``current_page`` and ``num_keys``), or for a static pattern the
    number of cached keys.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    check_tensor("q", q)
    b, hq, m, d = q.shape
    if b != cache.batch or d != cache.head_dim or hq % cache.kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} must have the cache's batch {cache.batch} and head_dim {cache.head_dim}, and a "
            f"multiple of its {cache.kv_heads} key heads"
        )
    if q.dtype != cache.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q must be on the cache's device {cache.device}, got {q.device}")
    check_sink_logits(sink_logits, hq, q.device)
    if pattern is None:
        pattern = cache.pattern
    else:
        _check_pattern(pattern)
    if pattern is not cache.pattern and not _never_evicts(cache.pattern) and pattern != cache.pattern:
        raise ValueError(f"pattern {pattern!r} differs from the pattern {cache.pattern!r} the cache evicts by")
    if select is not None:
        if not isinstance(select, Quest):
            raise TypeError(f"select must be None or a Quest, got {type(select).__name__}")
        if cache.compressed or not _never_evicts(pattern):
            raise ValueError(f"Quest selection needs an uncompressed causal cache (pattern None or Causal), got "
                             f"{'a compressed cache' if cache.compressed else repr(pattern)}")
    first = cache.length - m
    if m == 0 or first < cache.complete_from:
        raise ValueError(
            f"q has {m} queries; they must be 1 .. {cache.length - cache.complete_from} (queries at positions "
            f"{cache.complete_from} .. {cache.length - 1}): the cache has evicted or dropped keys that earlier "
            f"queries need"
        )
    if pattern is not None and cache.length > pattern.n:
        raise ValueError(f"pattern covers {pattern.n} positions but the cache holds {cache.length} tokens")
    if cache.compressed and not _never_evicts(pattern):
        raise ValueError(f"a compressed (SnapKV) cache decodes with Causal only, got pattern {pattern!r}")
    if select is not None:
        out, lse, kept = _quest_decode(q, cache, select, scale, backend, sink_logits)
    else:
        qpos = torch.arange(first, cache.length, device=q.device)
        fresh = cache._evicted_for == first and m == 1
        decode, k, v = step_inputs(pattern, qpos, cache._pos[: cache.size], cache.k, cache.v, fresh)
        out, lse = attend(q, k, v, decode, scale=scale, sink_logits=sink_logits, backend=backend, return_lse=True) \
            if return_lse else (attend(q, k, v, decode, scale=scale, sink_logits=sink_logits, backend=backend), None)
        kept = cache.size
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_kept:
        result += (kept,)
    return result[0] if len(result) == 1 else result
