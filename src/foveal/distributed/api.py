"""``shard``, ``unshard`` and ``attend_cp``: context-parallel attention for every pattern.

A long sequence (or a flattened N-D grid) of ``(B, H, N, D)`` tensors is split along
``N`` among the ranks of a process group under a token order (``orders``); each rank
holds ``N / P`` tokens. ``attend_cp`` computes on those local shards exactly what
``foveal.functional.attend`` computes on the whole tensors, by one of four methods:

* ``ring``: K/V shards travel around the ring, skipping empty steps (``ring``);
* ``allgather``: each rank gathers only the K/V blocks it needs (``allgather``);
* ``ulysses``: all-to-all to head shards of the whole sequence (``ulysses``);
* ``hybrid``: Ulysses within groups of ``ulysses_degree`` ranks, ring across them.
"""

from __future__ import annotations

import math
import numbers
import zlib

import torch

from foveal.distributed.allgather import allgather_attention
from foveal.distributed.comm import CPStats, confirm, exchange, group_info, handshake
from foveal.distributed.orders import as_order
from foveal.distributed.plan import cp_layout, group_need, ring_schedule
from foveal.distributed.ring import RingConfig, ring_attention
from foveal.distributed.shardbias import shard_bias
from foveal.distributed.ulysses import ulysses_attention
from foveal.functional import attend
from foveal.patterns.base import Pattern

__all__ = ["METHODS", "shard", "unshard", "attend_cp"]

METHODS = ("ring", "allgather", "ulysses", "hybrid")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_pattern(pattern):
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a foveal Pattern, got {type(pattern).__name__}")
    if pattern.n_q != pattern.n_kv:
        raise ValueError(
            f"context parallelism shards one sequence for queries and keys: the pattern must have as many "
            f"keys as queries, got {pattern!r} with {pattern.n_q} queries and {pattern.n_kv} keys"
        )


def shard(x: torch.Tensor, pattern, group=None, order="contiguous") -> torch.Tensor:
    """This rank's shard of ``x`` (B, H, N, …) along dimension 2 under ``order``: (B, H, N/P, …).

    ``x`` is the whole tensor, the same on every rank (e.g. from a shared seed). Tokens
    of the shard are in increasing global order.
    """
    _check_pattern(pattern)
    order = as_order(order)
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise ValueError(f"x must be a tensor (batch, heads, tokens, ...), got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[2] != pattern.n_q:
        raise ValueError(f"x has {x.shape[2]} tokens (dimension 2) but the pattern {pattern!r} has {pattern.n_q}")
    group, world, rank = group_info(group)
    lay = cp_layout(pattern, world, order)
    return x.index_select(2, lay.tokens[rank].to(x.device))


def unshard(x_local: torch.Tensor, pattern, group=None, order="contiguous") -> torch.Tensor:
    """The whole tensor (B, H, N, …) from every rank's shard (B, H, N/P, …); differentiable."""
    _check_pattern(pattern)
    order = as_order(order)
    group, world, rank = group_info(group)
    lay = cp_layout(pattern, world, order)
    n_local = pattern.n_q // world
    if not isinstance(x_local, torch.Tensor) or x_local.dim() < 3 or x_local.shape[2] != n_local:
        raise ValueError(
            f"x_local must be a (batch, heads, {n_local}, ...) shard of the pattern's {pattern.n_q} tokens "
            f"over {world} ranks, got {tuple(getattr(x_local, 'shape', ()))}"
        )
    peers = [s for s in range(world) if s != rank]
    spec = (x_local.shape, x_local.dtype, x_local.device)
    sends, recvs = {s: x_local for s in peers}, {s: spec for s in peers}
    got = exchange(sends, recvs, group, 6_000_000, "unshard", None, source=x_local)
    pieces = [x_local if s == rank else got[s] for s in range(world)]
    inv = torch.argsort(torch.cat(lay.tokens)).to(x_local.device)
    return torch.cat(pieces, 2).index_select(2, inv)


def _check(q, k, v, pattern, world, method, order, scale, ulysses_degree):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, local tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be one of {[str(d) for d in _DTYPES]}, got {t.dtype}")
    _check_pattern(pattern)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    order = as_order(order)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, n, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[:3] != v.shape[:3] or k.shape[-1] != d:
        raise ValueError(
            f"k and v must be (batch={b}, kv_heads, tokens={n}, head_dim={d}), "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if pattern.n_q % world or n != pattern.n_q // world or k.shape[2] != n:
        raise ValueError(
            f"each rank holds N/P tokens: the pattern has N={pattern.n_q} tokens over P={world} ranks, so "
            f"q, k and v need {pattern.n_q / world:g} local tokens, got q {n}, k {k.shape[2]}"
        )
    if hq % k.shape[1]:
        raise ValueError(f"query heads must be a multiple of key/value heads (GQA), got {hq} and {k.shape[1]}")
    u = None
    if method == "ulysses":
        u = world
    elif method == "hybrid":
        if ulysses_degree is None:
            raise ValueError("method='hybrid' needs ulysses_degree (ranks per Ulysses group; ring degree = P / it)")
        ok = isinstance(ulysses_degree, numbers.Integral) and not isinstance(ulysses_degree, bool)
        if not ok or ulysses_degree < 1 or world % ulysses_degree:
            raise ValueError(f"ulysses_degree must be a positive divisor of the {world} ranks, got {ulysses_degree!r}")
        u = int(ulysses_degree)
    if u is not None and hq % u:
        raise ValueError(
            f"method={method!r} splits the {hq} query heads among {u} ranks: heads must be divisible by {u}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return order, float(scale), u


def _signature(q, k, v, pattern, world, method, order, u, scale, bias=None) -> tuple:
    text = f"{pattern!r}|{method}|{order}|{u}|{scale!r}|{q.dtype}|{torch.is_grad_enabled()}|{type(bias).__name__}"
    return (
        world,
        *q.shape,
        *k.shape,
        *v.shape,
        int(any(t.requires_grad for t in (q, k, v))),
        zlib.crc32(text.encode()),
    )


def attend_cp(
    q,
    k,
    v,
    pattern,
    group=None,
    *,
    method: str = "ring",
    order="contiguous",
    scale=None,
    backend: str = "auto",
    return_lse: bool = False,
    ulysses_degree: int | None = None,
    bias=None,
    stats: CPStats | None = None,
    check: bool = True,
):
    """Attention over ``pattern`` on sequence shards: every rank passes its shard, gets its rows of ``attend``.

    ``q`` (B, Hq, N/P, D), ``k`` (B, Hkv, N/P, D) and ``v`` (B, Hkv, N/P, Dv) are this
    rank's shards under ``order`` (see ``shard``); ``pattern`` describes the whole
    sequence (or grid) of N tokens. Returns this rank's rows of
    ``attend(q_full, k_full, v_full, pattern)``: ``out`` (B, Hq, N/P, Dv) and, with
    ``return_lse``, the float32 ``lse`` (B, Hq, N/P). Differentiable in q, k and v.
    ``method`` is ``ring``, ``allgather``, ``ulysses`` (Hq divisible by P) or ``hybrid``
    (``ulysses_degree`` ranks per Ulysses group, the ring across groups). ``backend``
    is the local ``attend`` backend. ``bias`` is an additive score term on global
    indices, as in ``attend``; the gradients of its parameters on each rank are that
    rank's share (sum them over ranks, as data parallelism's all-reduce does).
    ``stats`` (a ``CPStats``) counts bytes and skipped
    steps. ``check`` makes every rank confirm with the others that they agree on
    shapes and arguments first, and that every rank finished the forward pass after
    (two small all-gathers), so a mismatch or a failing rank raises on every rank
    (within the group's timeout) instead of hanging or returning on some ranks only.
    """
    group, world, rank = group_info(group)
    order, scale, u = _check(q, k, v, pattern, world, method, order, scale, ulysses_degree)
    if bias is not None and not callable(bias):
        raise TypeError(f"bias must be None or a callable bias(h, q_idx, kv_idx) -> tensor, got {type(bias).__name__}")
    if check:
        handshake(group, _signature(q, k, v, pattern, world, method, order, u, scale, bias), f"attend_cp({method})")
    if not check:
        return _run(q, k, v, pattern, group, world, rank, method, order, scale, backend, return_lse, u, stats, bias)
    error = result = None
    try:
        result = _run(q, k, v, pattern, group, world, rank, method, order, scale, backend, return_lse, u, stats, bias)
    except Exception as e:  # report to the others, then re-raise
        error = e
    confirm(group, error, f"attend_cp({method})")
    return result


def _run(q, k, v, pattern, group, world, rank, method, order, scale, backend, return_lse, u, stats, bias):
    lay = cp_layout(pattern, world, order)
    if method == "allgather":
        out, lse = allgather_attention(q, k, v, lay, rank, group, scale, backend, stats, bias=bias)
    elif method == "ring":
        sched = ring_schedule(lay.need)
        mine = lay.tokens[rank]

        def patterns(s):
            return lay.shard_pattern(("rank", rank), mine, ("rank", s), lay.tokens[s])

        cfg = RingConfig(sched, rank, list(range(world)), patterns, group, scale, backend, stats, bias=bias)
        out, lse = ring_attention(q, k, v, cfg)
    else:
        r_deg = world // u
        j, uu = divmod(rank, u)
        members = [j * u + i for i in range(u)]
        sets = [lay.tokens[m] for m in members]
        if r_deg == 1:

            def inner(qf, kf, vf, toks):
                b = shard_bias(bias, None, uu * (q.shape[1] // u))
                return attend(qf, kf, vf, pattern, bias=b, scale=scale, backend=backend, return_lse=True)

        else:
            ring_sets = [torch.cat(lay.tokens[jj * u : (jj + 1) * u]).sort().values for jj in range(r_deg)]
            sched = ring_schedule(group_need(lay.need, r_deg))
            name = ("ring-of-ulysses", u)

            def patterns(s):
                return lay.shard_pattern((name, j), ring_sets[j], (name, s), ring_sets[s])

            def inner(qf, kf, vf, toks):
                peers = [jj * u + uu for jj in range(r_deg)]
                cfg = RingConfig(
                    sched, j, peers, patterns, group, scale, backend, stats, bias=bias, head_offset=uu * (q.shape[1] // u)
                )
                return ring_attention(qf, kf, vf, cfg)

        out, lse = ulysses_attention(q, k, v, members, uu, sets, inner, group, stats, need_lse=return_lse)
    return (out, lse) if return_lse else out
