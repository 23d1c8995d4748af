"""``ContextParallel``: one plan that shards, attends and unshards, so that no two steps can disagree.

A long sequence (or a flattened N-D grid) of ``(B, H, N, D)`` tensors is split along
``N`` among the ranks of a process group under a token order (``orders``); each rank
holds ``N / P`` tokens. The plan fixes the pattern, the group, the order and the
method once; its ``shard``, ``attend`` and ``unshard`` all use them, so a shard taken
under one order can never be attended or reassembled under another. ``attend``
computes on the local shards exactly what ``foveal.functional.attend`` computes on
the whole tensors, by one of four methods:

* ``ring``: K/V shards travel around the ring, skipping empty steps (``ring``);
* ``allgather``: each rank gathers only the K/V blocks it needs (``allgather``);
* ``ulysses``: all-to-all to head shards of the whole sequence (``ulysses``);
* ``hybrid``: Ulysses within groups of ``ulysses_degree`` ranks, ring across them.

Shards carry their plan: ``shard`` and ``attend`` mark the tensors they return, and a
plan refuses a tensor marked by a plan with another layout (pattern, ranks or order).
"""

from __future__ import annotations

import numbers
import zlib

import torch

from foveal.bias import bias_parameters
from foveal.distributed.allgather import allgather_attention
from foveal.distributed.comm import CPStats, confirm, exchange, fail_fast, group_info, guarded, handshake
from foveal.distributed.orders import as_order
from foveal.distributed.plan import cp_layout, group_need, ring_schedule
from foveal.distributed.ring import RingConfig, ring_attention
from foveal.distributed.shardbias import shard_bias
from foveal.distributed.ulysses import ulysses_attention
from foveal.functional import attend
from foveal.inputs import check_bias, check_qkv, check_scale, check_sink_logits
from foveal.merge import add_sink
from foveal.patterns.base import Pattern

__all__ = ["METHODS", "ContextParallel", "check_call"]

METHODS = ("ring", "allgather", "ulysses", "hybrid")

#: the attribute under which a shard carries the layout of the plan that made it
_MARK = "_foveal_cp_layout"


def _check_pattern(pattern):
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a foveal Pattern, got {type(pattern).__name__}")
    if pattern.n_q != pattern.n_kv:
        raise ValueError(
            f"context parallelism shards one sequence for queries and keys: the pattern must have as many "
            f"keys as queries, got {pattern!r} with {pattern.n_q} queries and {pattern.n_kv} keys"
        )


def _ulysses_degree(method, world: int, ulysses_degree) -> int | None:
    """Ranks per Ulysses group: P for ``ulysses``, the given divisor of P for ``hybrid``, None otherwise."""
    if not isinstance(method, str):
        raise TypeError(f"method must be one of {METHODS}, got {method!r} ({type(method).__name__})")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "hybrid":
        if ulysses_degree is not None:
            raise ValueError(
                f"ulysses_degree is for method='hybrid' only, got {ulysses_degree!r} with method={method!r}"
            )
        return world if method == "ulysses" else None
    if ulysses_degree is None:
        raise ValueError("method='hybrid' needs ulysses_degree (ranks per Ulysses group; ring degree = P / it)")
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, numbers.Integral):
        raise TypeError(f"ulysses_degree must be an int, got {ulysses_degree!r} ({type(ulysses_degree).__name__})")
    if ulysses_degree < 1 or world % ulysses_degree:
        raise ValueError(f"ulysses_degree must be a positive divisor of the {world} ranks, got {ulysses_degree!r}")
    return int(ulysses_degree)


def check_call(q, k, v, pattern, world: int, method: str, u, scale, bias) -> float:
    """Check one rank's shards for ``attend``; returns the scale (``foveal.inputs`` rules and messages).

    ``q`` (B, Hq, N/P, D), ``k`` (B, Hkv, N/P, D), ``v`` (B, Hkv, N/P, Dv); ``u`` the ranks
    per Ulysses group (None for ring and all-gather), which must divide the query heads.
    """
    check_qkv(q, k, v, layout="(batch, heads, local tokens, head_dim)")
    n_local = pattern.n_q // world
    if q.shape[2] != n_local or k.shape[2] != n_local:
        raise ValueError(
            f"each rank holds N/P tokens: the pattern has N={pattern.n_q} tokens over P={world} ranks, so "
            f"q, k and v need {n_local} local tokens, got q {q.shape[2]}, k {k.shape[2]}"
        )
    hq = q.shape[1]
    if u is not None and hq % u:
        raise ValueError(
            f"method={method!r} splits the {hq} query heads among {u} ranks: heads must be divisible by {u}"
        )
    scale = check_scale(scale, q.shape[-1])
    check_bias(bias, hq, q.device)
    return scale


class ContextParallel:
    """Context-parallel attention over ``pattern`` on ``group``: shard, attend and unshard under one order.

    ``pattern`` describes the whole sequence (or grid) of N tokens; every rank holds
    N/P of them under ``order`` (``contiguous``, ``zigzag``, ``striped``, ``balanced`` or
    an ``Order``). ``method`` is ``ring``, ``allgather``, ``ulysses`` (query heads
    divisible by P) or ``hybrid`` (``ulysses_degree`` ranks per Ulysses group, the ring
    across groups); ``backend`` is the local ``attend`` backend. Every rank builds the
    same plan (nothing is exchanged until ``attend`` or ``unshard``). Ring attention:
    Liu et al., 2023; striped order: Brandon et al., 2023; Ulysses: Jacobs et al.,
    2023; hybrid: Fang and Zhao (USP), 2024.
    """

    def __init__(self, pattern, group=None, *, order="contiguous", method: str = "ring", ulysses_degree=None,
                 backend: str = "auto"):
        _check_pattern(pattern)
        order = as_order(order)
        group, world, rank = group_info(group)
        self.u = _ulysses_degree(method, world, ulysses_degree)
        self.pattern, self.group, self.world, self.rank = pattern, group, world, rank
        self.order, self.method, self.backend = order, method, backend
        self.ulysses_degree = self.u if method == "hybrid" else None
        self.layout = cp_layout(pattern, world, order)  # refuses orders the token count does not divide
        self._mark = (pattern, world, order)

    @property
    def tokens(self) -> torch.Tensor:
        """The sorted global token indices this rank holds, (N/P,) int64."""
        return self.layout.tokens[self.rank]

    @property
    def n_local(self) -> int:
        return self.pattern.n_q // self.world

    def __repr__(self):
        extra = f", ulysses_degree={self.ulysses_degree}" if self.ulysses_degree is not None else ""
        order = self.order.name if self.order.block is None else self.order
        return f"ContextParallel({self.pattern!r}, world={self.world}, order={order!r}, method={self.method!r}{extra})"

    # -- marks: a shard knows the layout it was taken under ---------------------------

    def _tag(self, t: torch.Tensor) -> torch.Tensor:
        setattr(t, _MARK, self._mark)
        return t

    def _check_mark(self, name: str, t) -> None:
        mark = getattr(t, _MARK, None)
        if mark is not None and mark != self._mark:
            pattern, world, order = mark
            raise ValueError(
                f"{name} was sharded under another layout (pattern {pattern!r}, {world} ranks, order {order.name!r}"
                f"{'' if order.block is None else f', block {order.block}'}) than this plan's ({self!r}): its rows "
                f"are other tokens; shard, attend and unshard with the same plan"
            )

    # -- shard / unshard --------------------------------------------------------------

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``x`` (B, H, N, …) along dimension 2: (B, H, N/P, …), tokens in increasing order.

        ``x`` is the whole tensor, the same on every rank (e.g. from a shared seed).
        Differentiable; the result is marked with this plan's layout.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (batch, heads, tokens, ...), got {type(x).__name__}")
        if x.dim() < 3 or x.shape[2] != self.pattern.n_q:
            raise ValueError(
                f"x must be (batch, heads, {self.pattern.n_q} tokens, ...) for the pattern {self.pattern!r}, "
                f"got shape {tuple(x.shape)}"
            )
        return self._tag(x.index_select(2, self.tokens.to(x.device)))

    def unshard(self, x_local: torch.Tensor) -> torch.Tensor:
        """The whole tensor (B, H, N, …) from every rank's shard (B, H, N/P, …); differentiable.

        Every rank of the group calls it (it exchanges the shards).
        """
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(
                f"x_local must be a torch.Tensor (batch, heads, local tokens, ...), got {type(x_local).__name__}"
            )
        if x_local.dim() < 3 or x_local.shape[2] != self.n_local:
            raise ValueError(
                f"x_local must be a (batch, heads, {self.n_local}, ...) shard of the pattern's {self.pattern.n_q} "
                f"tokens over {self.world} ranks, got {tuple(x_local.shape)}"
            )
        self._check_mark("x_local", x_local)
        group, world, rank = group_info(self.group)  # refuses a group shut down by a failure
        peers = [s for s in range(world) if s != rank]
        spec = (x_local.shape, x_local.dtype, x_local.device)
        sends, recvs = {s: x_local for s in peers}, {s: spec for s in peers}
        with fail_fast(group, "unshard"):
            got = exchange(sends, recvs, group, 6_000_000, "unshard", None, source=x_local)
            pieces = [x_local if s == rank else got[s] for s in range(world)]
            inv = torch.argsort(torch.cat(self.layout.tokens)).to(x_local.device)
            return torch.cat(pieces, 2).index_select(2, inv)

    # -- attend -----------------------------------------------------------------------

    def _signature(self, q, k, v, scale, bias, return_lse, sink_logits=None) -> tuple:
        text = (
            f"{self.pattern!r}|{self.method}|{self.order}|{self.u}|{scale!r}|{q.dtype}|{torch.is_grad_enabled()}|"
            f"{type(bias).__name__}|{bool(return_lse)}|{sink_logits is not None}"
        )
        return (
            self.world,
            *q.shape,
            *k.shape,
            *v.shape,
            int(any(t.requires_grad for t in (q, k, v))),
            zlib.crc32(text.encode()),
        )

    def attend(self, q, k, v, *, scale=None, bias=None, sink_logits=None, return_lse: bool = False,
               stats: CPStats | None = None, check: bool = True):
        """This rank's rows of ``attend(q_full, k_full, v_full, pattern)``, from this rank's shards.

        ``q`` (B, Hq, N/P, D), ``k`` (B, Hkv, N/P, D) and ``v`` (B, Hkv, N/P, Dv) are this
        rank's shards (``shard``). Returns ``out`` (B, Hq, N/P, Dv) and, with
        ``return_lse``, ``lse`` (B, Hq, N/P) (float64 for float64 inputs, else float32);
        differentiable in q, k and v. ``bias`` is an additive score term on global
        indices, as in ``attend``; the gradients of its parameters on each rank are that
        rank's share (sum them over ranks, as data parallelism's all-reduce does).
        ``sink_logits`` (Hq,) joins every row's softmax once, after the partial results are
        merged (``foveal.merge.add_sink``); its gradient on each rank is that rank's share too.
        ``stats`` (a ``CPStats``) counts bytes and skipped steps. ``check`` makes every
        rank confirm with the others that they agree on shapes and arguments first (a
        rank whose own checks failed tells the others), and that every rank finished
        after (two small all-gathers). A rank that raises once the exchange has begun
        (or at all, with ``check=False``) shuts the group down, so every rank raises
        ``ContextParallelError`` at once (``comm.shutdown``).
        """
        group, world, rank = group_info(self.group)  # refuses a group shut down by a failure
        what = f"ContextParallel.attend({self.method})"
        error = None
        try:
            for name, t in (("q", q), ("k", k), ("v", v)):
                self._check_mark(name, t)
            scale = check_call(q, k, v, self.pattern, world, self.method, self.u, scale, bias)
            sink_logits = check_sink_logits(sink_logits, q.shape[1], q.device)
        except Exception as e:  # told to the others by the handshake, then raised here
            if not check:  # no handshake to tell them: shut the group down so that nobody waits for this rank
                with fail_fast(group, what):
                    raise
            error = e
        if check:
            sig = None if error is not None else self._signature(q, k, v, scale, bias, return_lse, sink_logits)
            handshake(group, sig, what, error=error)
        with fail_fast(group, what):
            out, lse = self._run(q, k, v, scale, bias, return_lse or sink_logits is not None, stats)
            if sink_logits is not None:
                out, lse = add_sink(out, lse, sink_logits)
        if check:
            confirm(group, what)
        self._tag(out)
        if return_lse:
            return out, self._tag(lse)
        return out

    __call__ = attend

    def _run(self, q, k, v, scale, bias, return_lse, stats):
        lay, group, world, rank, backend = self.layout, self.group, self.world, self.rank, self.backend
        if self.method == "allgather":
            return allgather_attention(q, k, v, lay, rank, group, scale, backend, stats, bias=bias)
        if self.method == "ring":
            sched = ring_schedule(lay.need)
            mine = lay.tokens[rank]

            def patterns(s):
                return lay.shard_pattern(("rank", rank), mine, ("rank", s), lay.tokens[s])

            cfg = RingConfig(sched, rank, list(range(world)), patterns, group, scale, backend, stats, bias=bias)
            return ring_attention(q, k, v, cfg)
        u = self.u
        r_deg = world // u
        j, uu = divmod(rank, u)
        members = [j * u + i for i in range(u)]
        sets = [lay.tokens[m] for m in members]
        head_offset = uu * (q.shape[1] // u)
        pattern = self.pattern
        if r_deg == 1:

            b = shard_bias(bias, None, head_offset)
            params = bias_parameters(bias) if bias is not None else []

            def local(qf, kf, vf):
                return attend(qf, kf, vf, pattern, bias=b, scale=scale, backend=backend, return_lse=True)

            def inner(qf, kf, vf, toks):
                return guarded(local, group, "Ulysses attention", (qf, kf, vf), params)

        else:
            ring_sets = [torch.cat(lay.tokens[jj * u : (jj + 1) * u]).sort().values for jj in range(r_deg)]
            sched = ring_schedule(group_need(lay.need, r_deg))
            name = ("ring-of-ulysses", u)

            def patterns(s):
                return lay.shard_pattern((name, j), ring_sets[j], (name, s), ring_sets[s])

            def inner(qf, kf, vf, toks):
                peers = [jj * u + uu for jj in range(r_deg)]
                cfg = RingConfig(sched, j, peers, patterns, group, scale, backend, stats, bias=bias,
                                 head_offset=head_offset)
                return ring_attention(qf, kf, vf, cfg)

        return ulysses_attention(q, k, v, members, uu, sets, inner, group, stats, need_lse=return_lse)
