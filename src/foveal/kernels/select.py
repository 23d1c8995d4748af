"""Backend registry: what each backend supports, why not, and the ``auto`` choice.

A backend is an object with a ``name``, ``why_not(call) -> list[str]`` (empty when
it can run the call), ``run(call) -> (out, lse)`` and the capability
``takes_exact_masks``; optionally ``auto_skip(call) -> str | None`` (``auto`` passes
over it for a call it can run but was measured slower on). ``route(call, backend)``
lowers the call (``foveal.lowering``) and gives each piece its backend: for ``"auto"``
the first in ``AUTO_ORDER`` that supports it (and does not skip it); a named backend
that cannot run a piece raises with its reasons;
``why_not(call, backend)`` gives those reasons, so that it and ``attend`` agree on
every call. A ``Call`` reaching a backend is lowered: its pattern is a static
``Pattern`` or a ``BlockSelection`` — except on a backend that ``takes_exact_masks``
(``reference``), which takes patterns as they are (``PerHead``, ``Ordered``, ``Grid``)
and evaluates their exact dense mask, so that it stays an oracle independent of the
lowering.
"""

from __future__ import annotations

import torch

from foveal.kernels.call import Call
from foveal.kernels.reference import reference_attention
from foveal.lowering import Piece, lower
from foveal.patterns.dynamic import BlockSelection
from foveal.patterns.perhead import PerHead

__all__ = ["Call", "BACKENDS", "AUTO_ORDER", "select", "route", "why_not", "backend_names", "check_backend_name"]


class ReferenceBackend:
    """Dense masked attention over the pattern's full mask: exact, O(N²) memory; the oracle."""

    name = "reference"
    #: evaluates the exact dense mask of ``PerHead``, ``Ordered`` and ``Grid`` itself (lowering leaves them)
    takes_exact_masks = True
    #: refuse above this many score elements per (batch, head): a dense N×N is the point
    #: of this backend, but not for sizes that would exhaust memory by surprise
    max_pairs = 1 << 28

    def why_not(self, call: Call) -> list[str]:
        pairs = call.pattern.n_q * call.pattern.n_kv
        if pairs > self.max_pairs:
            return [f"reference materialises {call.pattern.n_q}x{call.pattern.n_kv} scores (> {self.max_pairs} pairs)"]
        return []

    def run(self, call: Call):
        dev = call.q.device
        p = call.pattern
        if isinstance(p, BlockSelection):
            mask = p.dense_mask().to(dev)  # (B, H, n, n)
        elif isinstance(p, PerHead):
            mask = p.dense_mask(device=dev)[None]  # (1, H, n_q, n_kv)
        else:
            mask = p.dense_mask(device=dev)
        if call.key_padding_mask is not None:
            mask = mask & ~call.key_padding_mask[:, None, None, :]
        bias = None
        if call.bias is not None:
            h = torch.arange(call.q.shape[1], device=dev)[:, None, None]
            qi = torch.arange(p.n_q, device=dev)[None, :, None]
            ki = torch.arange(p.n_kv, device=dev)[None, None, :]
            bias = call.bias(h, qi, ki)
        return reference_attention(call.q, call.k, call.v, mask, scale=call.scale, bias=bias, softcap=call.softcap)


class CpuBackend:
    """Gather-based sparse attention in eager PyTorch: exact, no compile step, forward and backward."""

    name = "cpu"
    takes_exact_masks = False

    def why_not(self, call: Call) -> list[str]:
        if call.selected:
            return ["cpu runs static patterns; content selections run on 'blocksparse', 'flex' or 'reference'"]
        return []

    def run(self, call: Call):
        from foveal.kernels.cpu import gather_attention

        return gather_attention(
            call.q, call.k, call.v, call.pattern, scale=call.scale, need_lse=call.need_lse, bias=call.bias,
            key_padding_mask=call.key_padding_mask, softcap=call.softcap,
        )


class BlockSparseBackend:
    """Block-sparse attention over per-(batch, head) key-block tables: content selections, and static
    patterns through their block layout; exact, eager, forward and backward."""

    name = "blocksparse"
    takes_exact_masks = False
    #: the block of static patterns' tables (content selections bring their own)
    block = 64

    def why_not(self, call: Call) -> list[str]:
        return []

    def run(self, call: Call):
        from foveal.kernels.blocksparse import blocksparse_attention, layout_tables

        q, p = call.q, call.pattern
        terms = dict(bias=call.bias, key_padding_mask=call.key_padding_mask, softcap=call.softcap)
        if isinstance(p, BlockSelection):
            return blocksparse_attention(q, call.k, call.v, p.kv_blocks, p.block, scale=call.scale,
                                         partial=p.partial, mask_fn=p.mask_fn, kv_tokens=p.kv_tokens, **terms)
        kv, partial = layout_tables(p, self.block)
        shape = (q.shape[0], q.shape[1], *kv.shape)
        kv, partial = kv.to(q.device).expand(shape), partial.to(q.device).expand(shape)
        return blocksparse_attention(q, call.k, call.v, kv, self.block, scale=call.scale, partial=partial,
                                     mask_fn=p.mask_mod, **terms)


class SdpaBackend:
    """PyTorch's fused ``scaled_dot_product_attention``: patterns that need no mask (``Full``, ``Causal``), and
    on CPU small static patterns under their additive mask (``foveal.kernels.sdpa.SMALL_PAIRS``)."""

    name = "sdpa"
    takes_exact_masks = False

    def why_not(self, call: Call) -> list[str]:
        from foveal.kernels.sdpa import SMALL_PAIRS, dense_kind, is_small

        reasons = []
        small = not call.selected and is_small(call.pattern, call.q.device)
        if call.selected or (dense_kind(call.pattern) is None and not small):
            reasons.append("sdpa runs only patterns that need no mask (Full, and Causal with n_q <= n_kv) and, on "
                           f"CPU, patterns of at most {SMALL_PAIRS} (query, key) pairs")
        elif call.bias is not None and not small:
            reasons.append(f"sdpa takes a score term only on CPU patterns of at most {SMALL_PAIRS} pairs")
        if call.key_padding_mask is not None and call.q.device.type != "cpu":
            reasons.append(f"sdpa on {call.q.device.type} is wired without key padding")
        if call.softcap is not None:
            reasons.append("sdpa has no logit soft-cap")
        if call.v.shape[-1] != call.q.shape[-1]:
            reasons.append("sdpa's fused kernel needs v to have q's head_dim")
        if call.q.device.type != "cpu" and (call.need_lse or call.needs_grad or call.pattern.n_q != call.pattern.n_kv):
            reasons.append(f"sdpa on {call.q.device.type} is wired without its log-sum-exp (inference, n_q == n_kv)")
        return reasons

    def run(self, call: Call):
        from foveal.kernels.sdpa import sdpa_attention

        return sdpa_attention(call.q, call.k, call.v, call.pattern, scale=call.scale, need_lse=call.need_lse,
                              key_padding_mask=call.key_padding_mask, bias=call.bias)


class FlexBackend:
    """Compiled FlexAttention: static patterns by their analytic BlockMask, content selections by
    per-(batch, head) block tables (compiles once per shape)."""

    name = "flex"
    takes_exact_masks = False

    def why_not(self, call: Call) -> list[str]:
        reasons = []
        if call.selected and call.pattern.kv_tokens is not None and call.pattern.kv_tokens.shape[-1] \
                and not call.pattern.tokens_in_mask_fn:
            reasons.append("flex cannot run a selection whose single key tokens its mask_fn does not imply")
        if call.q.device.type == "cpu":
            from foveal.kernels.flex import cpu_limits

            reasons += cpu_limits(call.q.dtype, call.needs_grad, call.need_lse)
        return reasons

    def run(self, call: Call):
        from foveal.kernels.flex import block_mask_for, flex_block_mask_run

        if call.selected:
            from foveal.kernels.blocksparse import selection_block_mask

            bm = selection_block_mask(call.pattern, call.q.device)
        else:
            bm = block_mask_for(call.pattern, call.q.device)
        return flex_block_mask_run(call.q, call.k, call.v, bm, scale=call.scale, need_lse=call.need_lse,
                                   bias=call.bias, key_padding_mask=call.key_padding_mask, softcap=call.softcap)


class NativeNeighborhoodBackend:
    """foveal's native C++ neighbourhood kernel (``foveal.kernels.native.neighborhood``): a bare ``Neighborhood``
    on CPU, exactly its pairs, forward and backward; refuses other patterns, score terms other than a
    ``RelativePositionBias`` on the pattern's grid, and says so when the extension is not built or disabled."""

    name = "native-na"

    def why_not(self, call: Call) -> list[str]:
        from foveal.patterns.local import Neighborhood

        if not isinstance(call.pattern, Neighborhood):
            return [f"native-na runs a bare Neighborhood only, got {type(call.pattern).__name__}"]
        from foveal.kernels.native.neighborhood import call_why_not

        return call_why_not(call)

    def run(self, call: Call):
        from foveal.kernels.native.neighborhood import call_run

        return call_run(call)


from foveal.kernels.native.blocksparse import NativeBackend  # noqa: E402  (the C++ kernel; loaded on first use)

BACKENDS = {b.name: b for b in (ReferenceBackend(), SdpaBackend(), CpuBackend(), BlockSparseBackend(), FlexBackend(),
                                NativeBackend(), NativeNeighborhoodBackend())}

#: ``auto`` tries these in order, per device type. ``sdpa`` first: it only accepts
#: ``Full`` and ``Causal`` (no mask, no terms), which PyTorch's fused kernel runs at the
#: machine's SDPA speed (``cpu`` ran causal attention at 1.98x (4k) and 2.19x (16k) the
#: time of SDPA with ``is_causal`` on a 2-core CPU), and on CPU static patterns of at
#: most ``SMALL_PAIRS`` pairs, where one fused masked call beat the gather kernel (the
#: measured crossover is next to ``SMALL_PAIRS`` in ``foveal.kernels.sdpa``). Then, measured with ``foveal bench speed
#: --suite full`` on a 2-core CPU (BENCHMARKS.md), float32, head_dim 64, forward:
#: ``cpu`` beat compiled FlexAttention's kernel time on every case, with no compile
#: step: 7x7 neighbourhood on 64x64 15 ms vs 62 ms, on 128x128 67 ms vs 349 ms; 3x3x3
#: on 32^3 166 ms vs 997 ms; causal window 512 on 16k tokens 233 ms vs 303 ms, on 64k
#: 0.88 s vs 1.22 s. Compiled flex also pays 4-10 s of compile per shape and, on CPU,
#: has no backward pass and no log-sum-exp. So on CPU: ``cpu`` for static patterns;
#: content selections, which ``cpu`` refuses, go to ``blocksparse`` (the only eager
#: kernel with per-(batch, head) tables).
#: GPU: ``flex``, whose fused Triton kernel is FlexAttention's fast path there, then
#: ``cpu`` (runs on CUDA too). No GPU was available to measure this rule; it follows
#: FlexAttention's own GPU results and should be re-measured.
#:
#: ``native`` (the C++ block-sparse flash kernel, when built) comes after ``sdpa`` and before
#: ``cpu``/``blocksparse`` on CPU. Measured with a prototype script (``git show 729b377:tools/bench_native.py``;
#: one process, every contender in every round, medians; batch 1, 4 heads, head_dim 64, float32) on a shared 2-core
#: machine under load 6.6-10 from other jobs, one thread (two-thread ratios in brackets, inflated by the load:
#: torch's many small parallel ops suffer more from it), time over native's, forward / fwd+bwd: causal window 512
#: at 16k, cpu 1.34x / 1.51x (20.8x / 7.7x), SDPA is_causal 10.7x / 9.1x; BlockTopK at 16k (density 0.029,
#: selection included), blocksparse 1.58x / 1.49x (5.5x / 10.2x); VerticalSlash at 16k (64 columns, 512 diagonals,
#: forward, two threads) blocksparse 3.9x. So: content selections go to ``native``, and static patterns too, unless
#: they fill under ``AUTO_MIN_FILL`` (0.5) of the 64x64 tiles it computes (``NativeBackend.auto_skip``): a 7x7
#: neighbourhood on 64x64 fills 11% and there cpu took 0.81x / 0.85x native's time (12.2x / 3.6x on two threads).
#: ``sdpa`` stays first: Causal at 16k took 0.73x native's time forward (two threads), a 7x7 neighbourhood on 14x14
#: (batch 8, the small masked path) 0.68x / 0.91x.
#:
#: ``native-na`` (a bare ``Neighborhood`` on CPU, where the extension is built) comes before ``native`` (which
#: passes over a neighbourhood: it fills 11% of its tiles) and ``cpu``: on NA 7x7 over 64x64, 4 heads, head_dim 32,
#: float32, one thread's CPU time (``git show 7c2d1c6:tools/native_na_cputime.py``, a loaded 2-core machine) it
#: took 0.45x ``cpu``'s forward and 0.43x its fwd+bwd, 0.04x compiled flex's forward, 0.08x / 0.09x dense SDPA's
#: forward / fwd+bwd; ``sdpa`` keeps the small patterns it was measured to win (native against sdpa there is not
#: measured).
AUTO_ORDER = {"cpu": ("sdpa", "native-na", "native", "cpu", "blocksparse", "reference"),
              "cuda": ("sdpa", "flex", "cpu", "blocksparse", "reference")}
_AUTO_DEFAULT = ("sdpa", "native", "cpu", "blocksparse", "reference")


def backend_names() -> list[str]:
    """``"auto"`` and every registered backend, as ``attend(..., backend=)`` accepts them."""
    return ["auto", *sorted(BACKENDS)]


def check_backend_name(backend) -> str:
    """``backend`` if it is ``"auto"`` or a registered name: the one check of a backend name (``attend``, the
    modules, the integrations). ``TypeError`` for a non-string, ``ValueError`` listing the names otherwise."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or one of {sorted(BACKENDS)}), got {backend!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


def _skipped(b, call: Call) -> list[str]:
    """``auto`` passes over a backend that can run ``call`` but was measured slower on it (``auto_skip``)."""
    skip = getattr(b, "auto_skip", None)
    reason = skip(call) if skip is not None else None
    return [reason] if reason else []


def _route(call: Call, backend: str):
    """``(pieces, reasons)``: the lowered pieces of ``call``, each with the backend that runs it, or the reasons
    why ``backend`` cannot run some piece (then ``pieces`` is empty)."""
    check_backend_name(backend)
    try:  # a caller's BlockSelection that does not fit q and k is refused by the lowering
        pieces = lower(call, None if backend == "auto" else BACKENDS[backend])
    except (ValueError, TypeError) as e:
        return [], [str(e)]
    routed, reasons = [], []
    for piece in pieces:
        names = AUTO_ORDER.get(call.q.device.type, _AUTO_DEFAULT) if backend == "auto" else (backend,)
        refused = {}
        for name in names:
            r = BACKENDS[name].why_not(piece.call)
            if not r and backend == "auto":
                r = _skipped(BACKENDS[name], piece.call)
            if not r:
                routed.append((piece, BACKENDS[name]))
                break
            refused[name] = r
        else:
            if backend == "auto":
                detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in refused.items())
                reasons.append(f"no backend can run this call ({detail})")
            else:
                reasons += refused[backend]
    reasons = list(dict.fromkeys(reasons))  # pieces refused for one reason say it once
    return ([] if reasons else routed), reasons


def route(call: Call, backend: str) -> list[tuple[Piece, object]]:
    """The lowered pieces of ``call`` (``foveal.lowering.lower``), each with the backend object that runs it.

    ``ValueError`` with the reasons when ``backend`` (or, for ``"auto"``, every backend) cannot run a piece.
    """
    routed, reasons = _route(call, backend)
    if reasons:
        if backend == "auto":
            raise ValueError("; ".join(reasons))
        raise ValueError(f"backend {backend!r} cannot run this call: {'; '.join(reasons)}")
    return routed


def why_not(call: Call, backend: str) -> list[str]:
    """Reasons ``backend`` (a name or ``"auto"``) cannot run ``call`` (empty if it can): the call is lowered as
    ``attend`` lowers it (a content-selected pattern is selected from q and k), and every piece is asked."""
    return _route(call, backend)[1]


def select(call: Call, backend: str):
    """The backend object that will run ``call``, a call already lowered (one piece; ``route`` lowers)."""
    if check_backend_name(backend) == "auto":
        reasons = {}
        for name in AUTO_ORDER.get(call.q.device.type, _AUTO_DEFAULT):
            r = BACKENDS[name].why_not(call) or _skipped(BACKENDS[name], call)
            if not r:
                return BACKENDS[name]
            reasons[name] = r
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
        raise ValueError(f"no backend can run this call ({detail})")
    reasons = BACKENDS[backend].why_not(call)
    if reasons:
        raise ValueError(f"backend {backend!r} cannot run this call: {'; '.join(reasons)}")
    return BACKENDS[backend]
