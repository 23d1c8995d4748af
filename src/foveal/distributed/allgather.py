"""Sparse all-gather attention: each rank gathers only the K/V blocks its queries' layout reaches.

Rank ``r`` receives from every rank ``s`` the blocks of ``s``'s shard that some
non-empty block pair of ``pattern.layout(block, block)`` joins to ``r``'s query
blocks (``CPLayout.kv_blocks``; every rank computes the same plan, so no sizes are
exchanged), then attends once over the gathered keys under the pattern restricted
to them. A dense all-gather is the special case of a pattern that needs everything.
The backward pass sends dK/dV back to the owners (the exchange is differentiable); a
rank whose local backward fails shuts the group down (``comm.guarded``).
"""

from __future__ import annotations

import torch

from foveal.bias import bias_parameters
from foveal.distributed.comm import exchange, guarded
from foveal.distributed.ring import split_kv
from foveal.distributed.shardbias import shard_bias
from foveal.functional import attend
from foveal.inputs import lse_dtype

__all__ = ["allgather_attention"]

_TAG = 4_000_000


def allgather_attention(q, k, v, lay, me: int, group, scale, backend, stats, tag: int = 0, bias=None):
    """Attention of rank ``me``'s local queries over the key blocks they need; returns (out, lse)."""
    d = k.shape[-1]
    kv = torch.cat([k, v], -1)
    world = lay.world
    b, hkv, _, e = kv.shape
    sends, recvs = {}, {}
    for s in range(world):
        if s == me:
            continue
        idx = lay.needed_kv_tokens(s, me)
        if idx.numel():
            sends[s] = kv.index_select(2, idx.to(kv.device))
        nrecv = lay.needed_kv_tokens(me, s).numel()
        if nrecv:
            recvs[s] = ((b, hkv, nrecv, e), kv.dtype, kv.device)
    got = exchange(sends, recvs, group, _TAG + tag, "all-gather of K/V blocks", stats, source=kv)
    pieces, toks = [], []
    for s in range(world):
        idx = lay.needed_kv_tokens(me, s)
        if idx.numel() == 0:
            continue
        pieces.append(kv.index_select(2, idx.to(kv.device)) if s == me else got[s])
        toks.append(lay.tokens[s][idx])
    anchor = got.get("anchor")
    if not pieces:
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device) + 0 * q.sum()
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        return (out if anchor is None else out + anchor.to(out.dtype)), lse
    toks = torch.cat(toks)
    order = torch.argsort(toks)
    kv_all = torch.cat(pieces, 2).index_select(2, order.to(kv.device))
    pattern = lay.shard_pattern(("rank", me), lay.tokens[me], ("allgather", me), toks[order])
    sbias = shard_bias(bias, pattern)

    def local(qq, kv_):
        return attend(qq, *split_kv(kv_, d), pattern, bias=sbias, scale=scale, backend=backend, return_lse=True)

    params = bias_parameters(bias) if bias is not None else []
    out, lse = guarded(local, group, "all-gather attention", (q, kv_all), params)
    return (out if anchor is None else out + anchor.to(out.dtype)), lse
