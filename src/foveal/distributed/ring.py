"""Ring attention with sparsity-aware skipping, forward and backward.

K/V shards travel around the ring of positions ``0..R−1`` (position ``r`` receives
from ``r−1``); at step ``t`` position ``r`` attends its queries to the visiting shard
``(r − t) mod R`` under the pattern restricted to those tokens, and the partial
results are merged with the log-sum-exp rule (``foveal.merge_attentions``, in the compute
dtype of ``foveal.inputs.lse_dtype``: float64 for float64 inputs, float32 otherwise;
the backward accumulates in the same dtype). The next transfer is posted
(asynchronous ``isend``/``irecv``) before the step's attention, so it overlaps the
compute. A step whose sub-layout is empty is skipped, and a shard travels only as far
as the farthest position that needs it (``RingSchedule``): a causal sliding window
over contiguous shards sends each shard to its next neighbour only.

Backward (Liu et al., "Ring Attention with Blockwise Transformers", 2023, and
Brandon et al., "Striped Attention", 2023, for the forward; the backward here is the
flash rule per step): K/V travel the same way again; from the first position after
the owner on, a dK/dV accumulator travels with them and every position adds its
contribution; at the end of the shard's journey the accumulator goes straight back to
the owner (one hop for a shard only the next rank needs). Per step, the contribution is the gradient of
that step's (out_t, lse_t) under the merge:
``d out_t = w_t·dO``, ``d lse_t = w_t·(dO·(out_t − out) + d lse)``, ``w_t = exp(lse_t − lse)``.
"""

from __future__ import annotations

import torch

from foveal.distributed.comm import fail_fast, post
from foveal.distributed.shardbias import shard_bias
from foveal.functional import attend
from foveal.inputs import lse_dtype
from foveal.merge import merge_attentions

__all__ = ["ring_attention", "split_kv"]

# tags: kv transfers, accumulators, accumulator returns (per pass; spaced so calls stay apart)
_TAG_KV, _TAG_ACC, _TAG_RET = 1_000_000, 2_000_000, 3_000_000


def split_kv(kv, d):
    """(k, v) from K/V packed along the last dimension (views, no copies)."""
    return kv[..., :d], kv[..., d:]


class RingConfig:
    """Everything the ring needs besides tensors: schedule, peers, shard patterns, attend options."""

    def __init__(self, sched, me, peers, patterns, group, scale, backend, stats, tag=0, bias=None, head_offset=0):
        self.sched, self.me, self.peers, self.patterns = sched, me, peers, patterns
        self.group, self.scale, self.backend, self.stats, self.tag = group, scale, backend, stats, tag
        self.bias, self.head_offset = bias, head_offset

    def attend(self, q, k, v, s):
        """Local attention of the queries to shard ``s`` (its pattern and score term): (out, lse)."""
        pattern = self.patterns(s)
        bias = shard_bias(self.bias, pattern, self.head_offset)
        return attend(q, k, v, pattern, bias=bias, scale=self.scale, backend=self.backend, return_lse=True)

    @property
    def next(self):
        return self.peers[(self.me + 1) % len(self.peers)]

    @property
    def prev(self):
        return self.peers[(self.me - 1) % len(self.peers)]


def _count(cfg, backward: bool):
    st = cfg.stats
    if st is None:
        return
    sched, me, r = cfg.sched, cfg.me, cfg.sched.world
    computed = sum(sched.computes(me, t) for t in range(sched.steps))
    sent = sum(sched.sends(me, t) for t in range(1, sched.steps))
    st.steps += r
    st.steps_computed += computed
    st.steps_skipped += r - computed
    st.transfers += r - 1
    st.transfers_skipped += (r - 1) - sent


def _ring_forward(cfg, q, kv, d):
    """(out, lse) of the local queries over every shard they need, both in the compute dtype."""
    sched, me = cfg.sched, cfg.me
    cdt = lse_dtype(q.dtype)
    out = lse = None
    buf = kv
    spec = (kv.shape, kv.dtype, kv.device)
    for t in range(sched.steps):
        waiter = None
        if t + 1 < sched.steps:
            sends = {cfg.next: buf} if sched.sends(me, t + 1) else {}
            recvs = {cfg.prev: spec} if sched.receives(me, t + 1) else {}
            if sends or recvs:
                waiter = post(sends, recvs, cfg.group, cfg.tag + _TAG_KV + t, f"ring step {t + 1}: K/V", cfg.stats)
        if sched.computes(me, t):
            s = sched.holds(me, t)
            o_t, l_t = cfg.attend(q, *split_kv(buf, d), s)
            if out is None:
                out, lse = o_t.to(cdt), l_t.to(cdt)
            else:
                out, lse = merge_attentions([out, o_t], [lse, l_t])
        if waiter is not None:
            got = waiter()
            if cfg.prev in got:
                buf = got[cfg.prev]
    if out is None:  # this rank's queries attend to nothing
        out = torch.zeros(*q.shape[:-1], kv.shape[-1] - d, dtype=cdt, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=cdt, device=q.device)
    _count(cfg, backward=False)
    return out, lse


def _step_grads(cfg, s, q, kbuf, vbuf, out, lse, dout, dlse, params=()):
    with torch.enable_grad():
        qd = q.detach().requires_grad_()
        kd = kbuf.detach().requires_grad_()
        vd = vbuf.detach().requires_grad_()
        o_t, l_t = cfg.attend(qd, kd, vd, s)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        w = torch.where(torch.isfinite(l_t), torch.exp(l_t.detach() - safe), torch.zeros_like(l_t))
        d_o = (w[..., None] * dout).to(o_t.dtype)
        d_l = (w * ((dout * (o_t.detach().to(out.dtype) - out)).sum(-1) + dlse)).to(l_t.dtype)
        gq, gk, gv, *gp = torch.autograd.grad((o_t, l_t), (qd, kd, vd, *params), (d_o, d_l), allow_unused=True)
    return gq.to(out.dtype), torch.cat([gk, gv], -1).to(out.dtype), gp


def _ring_backward(cfg, q, kv, d, out, lse, dout, dlse, params=()):
    """(dq, dK/dV of my shard, bias parameter grads); ``out``/``lse`` are the forward's, in the compute dtype."""
    sched, me, world = cfg.sched, cfg.me, cfg.sched.world
    cdt = out.dtype
    dout = dout.to(cdt)
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(cdt)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dparams = [torch.zeros_like(p) for p in params]
    spec = (kv.shape, kv.dtype, kv.device)
    aspec = (kv.shape, cdt, kv.device)
    what = "ring backward"
    # my own accumulator comes back from the end of its journey
    ret = None
    if sched.hops[me] > 0:
        end = cfg.peers[(me + sched.hops[me]) % world]
        ret = post({}, {end: aspec}, cfg.group, cfg.tag + _TAG_RET, f"{what}: dK/dV of my shard", cfg.stats)
    mine = None
    buf, acc_wait, pending = kv, None, []
    for t in range(sched.steps):
        s = sched.holds(me, t)
        held = t == 0 or sched.receives(me, t)
        waiter = None
        if t + 1 < sched.steps:
            sends = {cfg.next: buf} if sched.sends(me, t + 1) else {}
            recvs = {cfg.prev: spec} if sched.receives(me, t + 1) else {}
            if sends or recvs:
                waiter = post(sends, recvs, cfg.group, cfg.tag + _TAG_KV + t, f"{what} step {t + 1}: K/V", cfg.stats)
        if held:
            contrib = None
            if sched.computes(me, t):
                gq, contrib, gp = _step_grads(cfg, s, q, *split_kv(buf, d), out, lse, dout, dlse, params)
                dq += gq
                for acc_p, g in zip(dparams, gp):
                    if g is not None:
                        acc_p += g
            if t == 0:  # my own shard: keep my contribution; the travelling accumulator starts at the next position
                mine = contrib
            else:
                if acc_wait is not None:
                    acc = acc_wait()[cfg.prev]
                    acc = acc if contrib is None else acc + contrib
                else:
                    acc = torch.zeros(aspec[0], dtype=cdt, device=kv.device) if contrib is None else contrib
                if sched.sends(me, t + 1):
                    tag = cfg.tag + _TAG_ACC + t
                    pending.append(post({cfg.next: acc}, {}, cfg.group, tag, f"{what} step {t + 1}: dK/dV", cfg.stats))
                else:  # the end of this shard's journey: straight back to its owner
                    tag = cfg.tag + _TAG_RET
                    pending.append(post({cfg.peers[s]: acc}, {}, cfg.group, tag, f"{what}: returning dK/dV", cfg.stats))
        acc_wait = None
        if t >= 1 and t + 1 < sched.steps and sched.receives(me, t + 1):
            tag = cfg.tag + _TAG_ACC + t
            acc_wait = post({}, {cfg.prev: aspec}, cfg.group, tag, f"{what} step {t + 1}: dK/dV", cfg.stats)
        if waiter is not None:
            got = waiter()
            if cfg.prev in got:
                buf = got[cfg.prev]
    for w in pending:
        w()
    if ret is not None:
        back = ret()[cfg.peers[(me + sched.hops[me]) % world]]
        mine = back if mine is None else mine + back
    if mine is None:
        mine = torch.zeros(aspec[0], dtype=cdt, device=kv.device)
    _count(cfg, backward=True)
    return dq, mine, dparams


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, k, v, *params):
        d = k.shape[-1]
        kv = torch.cat([k, v], -1)
        out, lse = _ring_forward(cfg, q, kv, d)
        ctx.cfg, ctx.d = cfg, d
        ctx.save_for_backward(q, kv, out, lse, *params)
        ctx.k_dtype = k.dtype
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kv, out, lse, *params = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros(out.shape, dtype=out.dtype, device=q.device)
        with fail_fast(ctx.cfg.group, "ring attention (backward)"):
            dq, dkv, dparams = _ring_backward(ctx.cfg, q, kv, ctx.d, out, lse, dout, dlse, params)
        d = ctx.d
        return None, dq.to(q.dtype), dkv[..., :d].to(ctx.k_dtype), dkv[..., d:].to(ctx.k_dtype), *dparams


def ring_attention(q, k, v, cfg: RingConfig):
    """Ring attention of the local ``q`` (B, Hq, n, D) over every position's K/V; returns (out, lse)."""
    from foveal.bias import bias_parameters

    params = bias_parameters(cfg.bias) if cfg.bias is not None else []
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *params)):
        return _Ring.apply(cfg, q, k, v, *params)
    d = k.shape[-1]
    out, lse = _ring_forward(cfg, q, torch.cat([k, v], -1), d)
    return out.to(q.dtype), lse
