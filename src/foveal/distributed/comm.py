"""Point-to-point exchanges for context parallelism: timeouts, clear errors, autograd, counters.

Every transfer is an asynchronous ``isend``/``irecv`` pair on the caller's process
group; a wait that does not complete within the group's timeout (``init(timeout=)``)
or that fails because a peer died raises ``ContextParallelError`` naming this rank,
the peer, and what was being exchanged, so no rank hangs. ``exchange`` is
differentiable: its backward sends the gradients back the way the tensors came.
``CPStats`` counts what was sent and which ring steps were skipped.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "ContextParallelError",
    "CPStats",
    "init",
    "exchange",
    "group_info",
    "handshake",
    "confirm",
    "DEFAULT_TIMEOUT",
]

#: seconds a rank waits for a peer before raising (``init(timeout=)`` sets the group's)
DEFAULT_TIMEOUT = 60.0


class ContextParallelError(RuntimeError):
    """A context-parallel collective failed on this rank: a peer failed, timed out or disagreed."""


@dataclass
class CPStats:
    """Counters filled by ``attend_cp(..., stats=)`` on this rank (forward and backward add up).

    ``bytes_sent[peer]`` / ``bytes_received[peer]`` per group rank; ``steps`` ring steps
    possible (P per ring pass), ``steps_computed`` those that attended, ``steps_skipped``
    those whose sub-layout was empty, ``transfers_skipped`` ring transfers not made.
    """

    bytes_sent: dict = field(default_factory=dict)
    bytes_received: dict = field(default_factory=dict)
    steps: int = 0
    steps_computed: int = 0
    steps_skipped: int = 0
    transfers: int = 0
    transfers_skipped: int = 0

    def add_bytes(self, table: str, peer: int, n: int):
        d = getattr(self, table)
        d[peer] = d.get(peer, 0) + n

    @property
    def total_sent(self) -> int:
        return sum(self.bytes_sent.values())

    @property
    def peers_sent_to(self) -> list:
        return sorted(p for p, b in self.bytes_sent.items() if b > 0)


def init(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT, **kwargs):
    """Initialise ``torch.distributed`` from the environment (``torchrun``) with a timeout in seconds.

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. A rank that
    fails or stops answering makes the others raise within ``timeout``. Returns the
    default group. Does nothing but return it if already initialised.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    return dist.group.WORLD


def group_info(group):
    """(group, world size, my group rank) for ``group`` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ContextParallelError(
            "torch.distributed is not initialised: call foveal.distributed.init() (or "
            "torch.distributed.init_process_group) on every rank first"
        )
    group = dist.group.WORLD if group is None else group
    return group, dist.get_world_size(group), dist.get_rank(group)


def _wait(work, what: str, group):
    try:
        work.wait()
    except Exception as e:  # gloo/nccl raise RuntimeError (timeout, connection closed)
        rank = dist.get_rank(group)
        raise ContextParallelError(
            f"rank {rank}: {what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); "
            f"a peer rank failed, stopped, timed out or called with different arguments"
        ) from e


def post(sends: dict, recvs: dict, group, tag: int, what: str, stats: CPStats | None = None):
    """Post sends ``{peer: tensor}`` and receives ``{peer: (shape, dtype, device)}``; returns a waiter.

    Calling the waiter waits for every transfer (raising ``ContextParallelError`` on
    failure or timeout) and returns ``{peer: received tensor}``.
    """
    works = []
    out = {}
    world = group is dist.group.WORLD
    pg = None if world else group

    def global_rank(peer):
        return peer if world else dist.get_global_rank(group, peer)

    for peer, t in sends.items():
        t = t.contiguous()
        work = dist.isend(t, global_rank(peer), group=pg, tag=tag)
        works.append((work, f"{what}: sending to rank {peer}", t))
        if stats is not None:
            stats.add_bytes("bytes_sent", peer, t.numel() * t.element_size())
    for peer, (shape, dtype, device) in recvs.items():
        buf = torch.empty(shape, dtype=dtype, device=device)
        work = dist.irecv(buf, global_rank(peer), group=pg, tag=tag)
        works.append((work, f"{what}: receiving from rank {peer}", buf))
        out[peer] = buf
        if stats is not None:
            stats.add_bytes("bytes_received", peer, buf.numel() * buf.element_size())

    def wait():
        for work, desc, _ in works:
            _wait(work, desc, group)
        return out

    return wait


class _Exchange(torch.autograd.Function):
    """Differentiable exchange: sends ``tensors[i]`` to ``send_peers[i]``, returns what ``recv_peers`` sent."""

    @staticmethod
    def forward(ctx, meta, source, *tensors):
        group, send_peers, recv_specs, tag, what, stats = meta
        ctx.meta = meta
        ctx.send_specs = [(t.shape, t.dtype, t.device) for t in tensors]
        waiter = post(dict(zip(send_peers, tensors)), dict(recv_specs), group, tag, what, stats)
        got = waiter()
        anchor = torch.zeros((), dtype=torch.float32, device=source.device)
        return (anchor, *(got[p] for p, _ in recv_specs))

    @staticmethod
    def backward(ctx, _anchor, *grads):
        group, send_peers, recv_specs, tag, what, stats = ctx.meta
        sends = {}
        for (p, spec), g in zip(recv_specs, grads):
            sends[p] = torch.zeros(spec[0], dtype=spec[1], device=spec[2]) if g is None else g
        recvs = dict(zip(send_peers, ctx.send_specs))
        got = post(sends, recvs, group, tag + 1, f"{what} (backward)", stats)()
        return (None, None, *(got[p] for p in send_peers))


def exchange(sends: dict, recv_specs: dict, group, tag: int, what: str, stats: CPStats | None = None, source=None):
    """Send ``{peer: tensor}``, receive ``{peer: (shape, dtype, device)}``; differentiable; returns ``{peer: tensor}``.

    Sends to oneself are not allowed (keep local tensors local). Empty dicts are fine.
    The result also holds, under the key ``"anchor"``, a zero scalar that depends on
    the sent tensors: a rank that only sends must add it to its output, so that its
    backward pass runs the reverse exchange (and receives the gradients of what it sent).
    ``source`` is a local tensor the exchanged data comes from: it puts the exchange in
    the autograd graph of a rank that only receives.
    """
    send_peers = list(sends)
    specs = list(recv_specs.items())
    if not send_peers and not specs:
        return {}
    if source is None:
        source = next(iter(sends.values())) if sends else torch.zeros(())
    meta = (group, send_peers, specs, tag, what, stats)
    anchor, *got = _Exchange.apply(meta, source, *[sends[p] for p in send_peers])
    out = {p: t for (p, _), t in zip(specs, got)}
    out["anchor"] = anchor
    return out


def handshake(group, signature: tuple, what: str):
    """Check that every rank of ``group`` called with the same ``signature`` (ints); raise on every rank if not.

    One small all-gather: a rank that does not arrive makes the others raise within the
    group's timeout.
    """
    world = dist.get_world_size(group)
    me = torch.tensor(signature, dtype=torch.int64)
    width = torch.tensor([me.numel()], dtype=torch.int64)
    try:
        widths = [torch.zeros_like(width) for _ in range(world)]
        dist.all_gather(widths, width, group=group)
        m = max(int(w) for w in widths)
        padded = torch.full((m,), -(2**62), dtype=torch.int64)
        padded[: me.numel()] = me
        allsig = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(allsig, padded, group=group)
    except Exception as e:
        raise ContextParallelError(
            f"rank {dist.get_rank(group)}: {what}: the argument check with the other ranks failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); a peer rank failed, "
            f"stopped or timed out"
        ) from e
    rows = [tuple(int(x) for x in s) for s in allsig]
    if len(set(rows)) > 1:
        mine = rows[dist.get_rank(group)]
        differ = [r for r, row in enumerate(rows) if row != mine]
        raise ContextParallelError(
            f"rank {dist.get_rank(group)}: {what}: ranks disagree on the call (shapes, dtype, pattern, "
            f"method or order); ranks {differ} differ from this rank; every rank must call with "
            f"the same shapes and arguments"
        )


def confirm(group, error: BaseException | None, what: str):
    """Every rank reports whether its part succeeded; raise on every rank if any failed.

    A rank whose part raised passes its exception as ``error`` (it is re-raised after
    the report, so the others learn at once instead of waiting for a timeout); ranks that
    succeeded raise ``ContextParallelError`` naming the ranks that failed. A rank that
    never reports makes the others raise within the group's timeout.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    flags = [torch.zeros_like(flag) for _ in range(world)]
    try:
        dist.all_gather(flags, flag, group=group)
    except Exception as e:
        if error is not None:
            raise error
        raise ContextParallelError(
            f"rank {rank}: {what}: could not confirm completion with the other ranks "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); a peer rank failed, stopped or timed out"
        ) from e
    if error is not None:
        raise error
    failed = [r for r, f in enumerate(flags) if int(f)]
    if failed:
        raise ContextParallelError(
            f"rank {rank}: {what}: rank(s) {failed} failed during the call; this rank's result is discarded"
        )
