"""Point-to-point exchanges for context parallelism: fail-fast errors, autograd, counters.

Every transfer is an asynchronous ``isend``/``irecv`` pair on the caller's process
group; a wait that fails raises ``ContextParallelError`` naming this rank, the peer,
and what was being exchanged. ``exchange`` is differentiable: its backward sends the
gradients back the way the tensors came. ``CPStats`` counts what was sent and which
ring steps were skipped.

Failing fast (``shutdown``): a rank whose part of a context-parallel call raises
after communication began shuts the group down, and so does every rank whose wait
then fails, so the failure reaches every rank of the group within milliseconds
instead of after the group's timeout. On gloo a rank shuts a group down by letting a
1 ms receive time out: gloo then closes every connection of that rank in the group,
and each peer's pending or next transfer with it fails at once (gloo's point-to-point
waits can be neither polled nor interrupted from Python, so the error has to travel
on the connections themselves). A shut-down group is refused by every later call on
this rank (its unmatched transfers would pair with the next call's). The group's
timeout (``init(timeout=)``) remains the bound for a rank that stops answering
without raising. On other backends ``shutdown`` aborts the group where the backend
allows it; peers then learn from their own backend's watchdog.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
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
    "shutdown",
    "fail_fast",
    "guarded",
    "DEFAULT_TIMEOUT",
]

#: seconds a rank waits for a peer before raising (``init(timeout=)`` sets the group's)
DEFAULT_TIMEOUT = 60.0


class ContextParallelError(RuntimeError):
    """A context-parallel collective failed on this rank: a peer failed, timed out or disagreed."""


@dataclass
class CPStats:
    """Counters filled by ``ContextParallel.attend(..., stats=)`` on this rank (forward and backward add up).

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


#: groups this process shut down: id(group) -> (group, why); later calls on them are refused
_SHUT: dict = {}
#: the tag of the 1 ms receive that shuts a gloo group down (no transfer ever uses it)
_SHUTDOWN_TAG = 9_000_000


def group_info(group):
    """(group, world size, my group rank) for ``group`` (None: the default group); refuses a shut-down group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ContextParallelError(
            "torch.distributed is not initialised: call foveal.distributed.init() (or "
            "torch.distributed.init_process_group) on every rank first"
        )
    group = dist.group.WORLD if group is None else group
    if id(group) in _SHUT:
        raise ContextParallelError(
            f"rank {dist.get_rank(group)}: this process group was shut down by an earlier context-parallel "
            f"failure ({_SHUT[id(group)][1]}); its unfinished transfers make it unusable: create a new group "
            f"(torch.distributed.new_group) to go on"
        )
    return group, dist.get_world_size(group), dist.get_rank(group)


def _first_line(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _global_rank(group, peer: int) -> int:
    return peer if group is dist.group.WORLD else dist.get_global_rank(group, peer)


def shutdown(group, why: str) -> None:
    """Shut ``group`` down on this rank so that every peer's transfer with it fails at once (see the module).

    Idempotent; never raises. Later calls on ``group`` from this process raise
    ``ContextParallelError`` naming ``why``.
    """
    if id(group) in _SHUT:
        return
    _SHUT[id(group)] = (group, why)
    try:
        backend = str(dist.get_backend(group))
        world, me = dist.get_world_size(group), dist.get_rank(group)
    except Exception:  # noqa: BLE001 - a group torch no longer knows: nothing to shut
        return
    if backend == "gloo":
        pg = None if group is dist.group.WORLD else group
        for peer in range(world):  # the first receive that times out closes all of this rank's connections
            if peer == me:
                continue
            try:
                work = dist.irecv(torch.zeros(1), _global_rank(group, peer), group=pg, tag=_SHUTDOWN_TAG)
                work.wait(timeout=datetime.timedelta(milliseconds=1))
            except Exception:  # noqa: BLE001 - the timeout (or a connection already closed) is the point
                pass
    else:
        abort = getattr(group, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # noqa: BLE001
                pass


@contextmanager
def fail_fast(group, what: str):
    """Run a block of a context-parallel call; if it raises, shut ``group`` down first (then re-raise)."""
    try:
        yield
    except BaseException as e:
        shutdown(group, f"rank {dist.get_rank(group)}: {what}: {_first_line(e)}")
        raise


def _failed(group, what: str, e: BaseException) -> ContextParallelError:
    """Shut ``group`` down after a failed transfer; the error to raise (``raise _failed(...) from e``)."""
    rank = dist.get_rank(group)
    shutdown(group, f"rank {rank}: {what}: {_first_line(e)}")
    return ContextParallelError(
        f"rank {rank}: {what} failed ({_first_line(e)}); a peer rank failed (and shut the group down so "
        f"that every rank stops at once), stopped answering or timed out"
    )


class _Guarded(torch.autograd.Function):
    """``fn(*tensors)`` with its own autograd graph, whose backward runs under ``fail_fast``."""

    @staticmethod
    def forward(ctx, fn, group, what, n_tensors, *inputs):
        tensors, params = inputs[:n_tensors], inputs[n_tensors:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            outs = fn(*leaves)
        ctx.group, ctx.what, ctx.outs = group, what, outs
        ctx.wrt = [x for x in (*leaves, *params) if x.requires_grad]
        ctx.mask = [x.requires_grad for x in (*leaves, *params)]
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        with fail_fast(ctx.group, f"{ctx.what} (backward)"):
            pairs = [(o, g) for o, g in zip(ctx.outs, grads) if g is not None and o.requires_grad]
            got = iter(())
            if pairs and ctx.wrt:
                outs, gs = zip(*pairs)
                got = iter(torch.autograd.grad(outs, ctx.wrt, gs, allow_unused=True))
            result = [next(got) if m else None for m in ctx.mask]
        ctx.outs = None
        return (None, None, None, None, *result)


def guarded(fn, group, what: str, tensors, params=()):
    """``fn(*tensors)`` (a tuple of tensors) whose backward shuts ``group`` down if it raises (``fail_fast``).

    For the local work of a context-parallel call between exchanges: a rank whose
    backward fails there tells the others at once instead of leaving them waiting for
    its gradients. ``params`` are the leaf tensors ``fn`` reads besides ``tensors``
    (a score term's parameters), so that their gradients flow too.
    """
    tensors, params = list(tensors), list(params)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*tensors, *params)):
        return fn(*tensors)
    return _Guarded.apply(fn, group, what, len(tensors), *tensors, *params)


def _wait(work, what: str, group):
    try:
        work.wait()
    except Exception as e:  # gloo/nccl raise RuntimeError (connection closed by a failed peer, timeout)
        raise _failed(group, what, e) from e


def _start(op, t, peer: int, group, tag: int, what: str):
    """``dist.isend``/``dist.irecv`` of ``t`` with ``peer`` (a group rank); a refused post raises like a failed wait."""
    try:
        return op(t, _global_rank(group, peer), group=None if group is dist.group.WORLD else group, tag=tag)
    except Exception as e:  # gloo refuses to post on a connection a failed peer closed
        raise _failed(group, what, e) from e


def post(sends: dict, recvs: dict, group, tag: int, what: str, stats: CPStats | None = None):
    """Post sends ``{peer: tensor}`` and receives ``{peer: (shape, dtype, device)}``; returns a waiter.

    Calling the waiter waits for every transfer (raising ``ContextParallelError`` on
    failure or timeout) and returns ``{peer: received tensor}``.
    """
    works = []
    out = {}
    for peer, t in sends.items():
        t = t.contiguous()
        desc = f"{what}: sending to rank {peer}"
        works.append((_start(dist.isend, t, peer, group, tag, desc), desc, t))
        if stats is not None:
            stats.add_bytes("bytes_sent", peer, t.numel() * t.element_size())
    for peer, (shape, dtype, device) in recvs.items():
        buf = torch.empty(shape, dtype=dtype, device=device)
        desc = f"{what}: receiving from rank {peer}"
        works.append((_start(dist.irecv, buf, peer, group, tag, desc), desc, buf))
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
        with fail_fast(group, f"{what} (backward)"):
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


def _device(group) -> torch.device:
    """Where the group's collectives take their tensors: the current CUDA device for NCCL, else the CPU."""
    if str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_ints(group, values: list[int], what: str) -> list[tuple]:
    """Every rank's list of ints (any lengths); a failed collective shuts the group down and raises."""
    world, rank, dev = dist.get_world_size(group), dist.get_rank(group), _device(group)
    me = torch.tensor(values, dtype=torch.int64, device=dev)
    try:
        width = torch.tensor([me.numel()], dtype=torch.int64, device=dev)
        widths = [torch.zeros_like(width) for _ in range(world)]
        dist.all_gather(widths, width, group=group)
        m = max(int(w) for w in widths)
        padded = torch.full((m,), -(2**62), dtype=torch.int64, device=dev)
        padded[: me.numel()] = me
        rows = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(rows, padded, group=group)
    except Exception as e:
        shutdown(group, f"rank {rank}: {what}: {_first_line(e)}")
        raise ContextParallelError(
            f"rank {rank}: {what}: the check with the other ranks failed ({_first_line(e)}); a peer rank "
            f"failed, stopped or timed out"
        ) from e
    return [tuple(int(x) for x in r[: int(w)]) for r, w in zip(rows, widths)]


def handshake(group, signature: tuple, what: str, error: BaseException | None = None):
    """Check that every rank of ``group`` called with the same ``signature`` (ints); raise on every rank if not.

    A rank whose own argument checks failed passes its exception as ``error``: it still
    joins (so nobody waits for it), every rank raises, and the others' error names it
    and quotes the first line of its message. The group stays usable: nothing was
    exchanged but the check. One small all-gather; a rank that does not arrive makes
    the others raise within the group's timeout.
    """
    rank = dist.get_rank(group)
    if error is not None:
        values = [1, *_first_line(error)[:300].encode()]
    else:
        values = [0, *signature]
    rows = _all_gather_ints(group, values, what)
    refused = {r: bytes(row[1:]).decode(errors="replace") for r, row in enumerate(rows) if row[0] == 1}
    if error is not None:
        raise error
    if refused:
        first = min(refused)
        raise ContextParallelError(
            f"rank {rank}: {what}: rank(s) {sorted(refused)} refused the call (rank {first}: {refused[first]}); "
            f"no rank computed anything"
        )
    mine = rows[rank]
    differ = [r for r, row in enumerate(rows) if row != mine]
    if differ:
        raise ContextParallelError(
            f"rank {rank}: {what}: ranks disagree on the call (shapes, dtype, pattern, method, order or "
            f"options); ranks {differ} differ from this rank; every rank must call with the same shapes and arguments"
        )


def confirm(group, what: str):
    """Every rank confirms it finished its part, so that no rank returns while another failed.

    A rank whose part raised shuts the group down instead of confirming (``fail_fast``):
    the others' confirmation then fails at once and raises ``ContextParallelError``.
    """
    _all_gather_ints(group, [0], f"{what}: confirming that every rank finished")
