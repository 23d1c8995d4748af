"""Ulysses (all-to-all) attention, and the hybrid Ulysses × ring (USP).

Ulysses (Jacobs et al., "DeepSpeed Ulysses", 2023): an all-to-all turns sequence
shards of all heads into head shards of the whole sequence (of the group), each rank
attends over that sequence, and a second all-to-all turns the result back. Query
heads must divide by the group size; key/value heads that do not are repeated to the
query heads first (their gradients add back).

Hybrid (Fang and Zhao, "USP: A Unified Sequence Parallelism Approach", 2024): ranks
form a ``ring_degree × ulysses_degree`` grid; rank ``p = j·U + u`` does Ulysses with
the ranks ``j·U .. j·U + U − 1`` and the ring with the ranks ``j'·U + u``, over the
union of its Ulysses group's tokens.
"""

from __future__ import annotations

import torch

from foveal.distributed.comm import exchange
from foveal.distributed.ring import split_kv

__all__ = ["ulysses_attention"]

_TAG = 5_000_000


def _heads(x, u, size):
    return x[:, u * size : (u + 1) * size]


def ulysses_attention(q, k, v, members, me: int, token_sets, inner, group, stats, need_lse=True, tag: int = 0):
    """All-to-all among ``members`` (group ranks; ``me`` indexes it), ``inner`` on the gathered sequence.

    ``token_sets[j]`` are the (sorted global) tokens member ``j`` holds; ``inner(q, k, v,
    tokens)`` attends over the union ``tokens`` (sorted) and returns ``(out, lse)``.
    """
    u_deg = len(members)
    hq, hkv = q.shape[1], k.shape[1]
    if hkv % u_deg:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        hkv = hq
    cq, ckv = hq // u_deg, hkv // u_deg
    b, _, n, d = q.shape
    dv = v.shape[-1]
    kv = torch.cat([k, v], -1)
    sends, recvs = {}, {}
    for j, peer in enumerate(members):
        if j == me:
            continue
        sends[peer] = torch.cat([_heads(q, j, cq).flatten(), _heads(kv, j, ckv).flatten()])
        nj = token_sets[j].numel()
        recvs[peer] = ((b * cq * nj * d + b * ckv * nj * (d + dv),), q.dtype, q.device)
    got = exchange(sends, recvs, group, _TAG + tag, "Ulysses all-to-all (q, k, v)", stats, source=kv)
    qs, kvs = [], []
    for j, peer in enumerate(members):
        nj = token_sets[j].numel()
        if j == me:
            qs.append(_heads(q, j, cq))
            kvs.append(_heads(kv, j, ckv))
        else:
            flat = got[peer]
            qs.append(flat[: b * cq * nj * d].view(b, cq, nj, d))
            kvs.append(flat[b * cq * nj * d :].view(b, ckv, nj, d + dv))
    toks = torch.cat(list(token_sets))
    order = torch.argsort(toks)
    dev_order = order.to(q.device)
    qf = torch.cat(qs, 2).index_select(2, dev_order)
    kvf = torch.cat(kvs, 2).index_select(2, dev_order)
    sorted_toks = toks[order]
    out, lse = inner(qf, *split_kv(kvf, d), sorted_toks)
    # back: member j gets its tokens of my head chunk
    sends, recvs = {}, {}
    pos = [torch.searchsorted(sorted_toks, ts).to(q.device) for ts in token_sets]
    for j, peer in enumerate(members):
        if j == me:
            continue
        sends[peer] = out.index_select(2, pos[j])
        recvs[peer] = ((b, cq, n, dv), out.dtype, out.device)
    got = exchange(sends, recvs, group, _TAG + 2 + tag, "Ulysses all-to-all (output)", stats, source=out)
    out_local = torch.cat([out.index_select(2, pos[j]) if j == me else got[peer] for j, peer in enumerate(members)], 1)
    if not need_lse:
        return out_local, None
    sends = {peer: lse.index_select(2, pos[j]) for j, peer in enumerate(members) if j != me}
    recvs = {peer: ((b, cq, n), lse.dtype, lse.device) for j, peer in enumerate(members) if j != me}
    got = exchange(sends, recvs, group, _TAG + 4 + tag, "Ulysses all-to-all (lse)", stats, source=lse)
    lse_local = torch.cat([lse.index_select(2, pos[j]) if j == me else got[peer] for j, peer in enumerate(members)], 1)
    return out_local, lse_local
