"""What ``foveal bench speed`` times: foveal's backends and what users would use instead.

Each contender's ``prepare(case, q, k, v)`` either returns a ``Prepared`` (the call
to time, its one-off setup time, and a forward function for the exactness check) or
a string saying why it does not run this case.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from foveal.bench.timing import timed
from foveal.functional import attend
from foveal.patterns import Neighborhood, SlidingWindow

__all__ = ["Prepared", "CONTENDERS", "user_mask_mod"]

#: dense contenders are skipped above these sizes (they would run for minutes or exhaust memory)
DENSE_MAX_WORK = 1 << 38  # N² · batch · heads · head_dim
MASK_MAX_PAIRS = 1 << 28  # N² booleans
REFERENCE_MAX_TOKENS = 8192


@dataclass
class Prepared:
    forward: Callable[[], torch.Tensor]  # returns out (B, H, N, Dv)
    setup_seconds: float = 0.0  # layout / mask / plan built before the first call
    comparable: bool = True  # computes the case's pattern exactly (else: a different mask)


def _quiet(fn):
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()

    return run


class FoveaBackend:
    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"foveal {backend}"

    def prepare(self, case, q, k, v):
        from foveal.kernels.select import Call, select

        pattern = case.pattern
        if self.backend == "reference" and pattern.n > REFERENCE_MAX_TOKENS:
            return f"dense reference above {REFERENCE_MAX_TOKENS} tokens"
        call = Call(q, k, v, pattern, q.shape[-1] ** -0.5, need_lse=False)
        try:
            chosen = select(call, self.backend).name
        except ValueError as e:
            return str(e).split(": ", 1)[-1]
        if chosen == "cpu":
            from foveal.kernels.cpu import plan_for

            _, setup = timed(lambda: plan_for(pattern), q.device)
        elif chosen == "blocksparse":
            from foveal.kernels.blocksparse import layout_tables
            from foveal.kernels.select import BACKENDS

            _, setup = timed(lambda: layout_tables(pattern, BACKENDS["blocksparse"].block), q.device)
        elif chosen == "native":
            from foveal.kernels.native.blocksparse import tables_for

            _, setup = timed(lambda: tables_for(pattern, q, k), q.device)
        elif chosen == "flex":
            from foveal.kernels.flex import block_mask_for

            _, setup = timed(lambda: block_mask_for(pattern, q.device), q.device)
        else:
            setup = 0.0
        return Prepared(lambda: attend(q, k, v, pattern, backend=self.backend), setup)


class DenseSDPA:
    name = "torch sdpa (dense)"

    def prepare(self, case, q, k, v):
        n = case.pattern.n
        if n * n * q.shape[0] * q.shape[1] * q.shape[-1] > DENSE_MAX_WORK:
            return "dense attention too large for this machine"
        return Prepared(lambda: F.scaled_dot_product_attention(q, k, v), comparable=False)


class MaskedSDPA:
    name = "torch sdpa + bool mask"

    def prepare(self, case, q, k, v):
        n = case.pattern.n
        if n * n > MASK_MAX_PAIRS or n * n * q.shape[0] * q.shape[1] * q.shape[-1] > DENSE_MAX_WORK:
            return f"an N×N mask of {n}² entries is too large"
        mask, setup = timed(lambda: case.pattern.dense_mask(device=q.device), q.device)
        return Prepared(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), setup)


def user_mask_mod(pattern):
    """The few-operation ``mask_mod`` a user writes for this pattern (attention-gym's), or None.

    Neighbourhood attention without dilation, stride or causality (attention-gym's
    ``natten`` mask), a causal sliding window, plain causal, and StreamingLLM's window
    plus sinks.
    """
    from foveal.patterns import Causal, Sinks, Union

    if isinstance(pattern, Neighborhood) and len(pattern.shape) == 2 and not any(pattern.causal) \
            and pattern.dilation == (1, 1) and pattern.stride == (1, 1) and all(k % 2 for k in pattern.kernel_size):
        (h, w), (kh, kw) = pattern.shape, pattern.kernel_size

        def natten_mask(b, hd, q_idx, kv_idx):
            qx, qy, kx, ky = q_idx // w, q_idx % w, kv_idx // w, kv_idx % w
            cx, cy = qx.clamp(kh // 2, h - 1 - kh // 2), qy.clamp(kw // 2, w - 1 - kw // 2)
            return ((cx - kx).abs() <= kh // 2) & ((cy - ky).abs() <= kw // 2)

        return natten_mask
    if isinstance(pattern, SlidingWindow) and pattern.right == 0 and pattern.dilation == 1 \
            and pattern.n_q == pattern.n_kv:
        left = pattern.left

        def window_mask(b, hd, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= left)

        return window_mask
    if isinstance(pattern, Causal) and pattern.n_q == pattern.n_kv:
        def causal_mask(b, hd, q_idx, kv_idx):
            return q_idx >= kv_idx

        return causal_mask
    if isinstance(pattern, Union) and len(pattern.parts) == 2:
        window = next((p for p in pattern.parts if isinstance(p, SlidingWindow)), None)
        sinks = next((p for p in pattern.parts if isinstance(p, Sinks)), None)
        if window is None or sinks is None or user_mask_mod(window) is None or sinks.n_kv != sinks.n_q:
            return None
        left, count = window.left, sinks.count

        def streaming_mask(b, hd, q_idx, kv_idx):
            return (q_idx >= kv_idx) & ((q_idx - kv_idx <= left) | (kv_idx < count))

        return streaming_mask
    return None


class FlexCreateBlockMask:
    """Compiled FlexAttention under ``create_block_mask``, as a user runs it: with the few-operation mask a
    user writes for the pattern (``user=True``, where one is known) or with foveal's own ``mask_mod``."""

    def __init__(self, user: bool = False):
        self.user = user
        self.name = "flex + create_block_mask" + (" (user mask)" if user else "")

    def prepare(self, case, q, k, v):
        if case.backward and q.device.type == "cpu":
            return "compiled FlexAttention on CPU has no backward"
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        from foveal.kernels.flex import raise_recompile_limit

        raise_recompile_limit()
        p = case.pattern
        mask_mod = user_mask_mod(p) if self.user else p.mask_mod
        if mask_mod is None:
            return "no simpler user mask known for this pattern (the row without '(user mask)' runs foveal's)"
        bm, setup = timed(_quiet(lambda: create_block_mask(mask_mod, 1, 1, p.n, p.n, device=q.device)), q.device)
        fn = torch.compile(flex_attention, dynamic=False)
        return Prepared(_quiet(lambda: fn(q, k, v, block_mask=bm)), setup)


class Natten:
    name = "natten"

    def prepare(self, case, q, k, v):
        p = case.pattern
        if not isinstance(p, Neighborhood):
            return "not a neighbourhood pattern"
        if case.backward and q.device.type == "cpu":
            return "NATTEN refuses gradients on CPU"
        if q.device.type == "cpu" and p.n > 16384:
            return "NATTEN on CPU materialises every score (N² per head)"
        try:
            import natten.functional as nf
        except ImportError:
            return "natten is not installed"
        op = {1: nf.na1d, 2: nf.na2d, 3: nf.na3d}[len(p.shape)]
        b, h, _, d = q.shape

        def to_natten(t):
            return t.transpose(1, 2).reshape(b, *p.shape, h, t.shape[-1]).contiguous()

        qn, kn, vn = to_natten(q), to_natten(k), to_natten(v)
        kwargs = dict(kernel_size=p.kernel_size, stride=p.stride, dilation=p.dilation, is_causal=p.causal)

        def run():
            out = op(qn, kn, vn, **kwargs)
            return out.reshape(b, -1, h, v.shape[-1]).transpose(1, 2)

        return Prepared(_quiet(run))


class LocalAttention:
    name = "local-attention"

    def prepare(self, case, q, k, v):
        p = case.pattern
        if not (isinstance(p, SlidingWindow) and p.right == 0 and p.dilation == 1 and p.left > 0):
            return "not a causal sliding window"
        try:
            from local_attention import LocalAttention as LA
        except ImportError:
            return "local-attention is not installed"
        # causal, look back one bucket, exact window: keys i-left..i, i.e. SlidingWindow(n, left)
        la = LA(window_size=p.left, causal=True, look_backward=1, look_forward=0, exact_windowsize=True,
                autopad=True, use_rotary_pos_emb=False).to(q.device)
        return Prepared(lambda: la(q, k, v))


CONTENDERS = [
    FoveaBackend("sdpa"),
    FoveaBackend("cpu"),
    FoveaBackend("blocksparse"),
    FoveaBackend("native"),
    FoveaBackend("native-na"),
    FoveaBackend("flex"),
    FoveaBackend("auto"),
    FoveaBackend("reference"),
    DenseSDPA(),
    MaskedSDPA(),
    FlexCreateBlockMask(),
    FlexCreateBlockMask(user=True),
    Natten(),
    LocalAttention(),
]
