"""Lowering: the step of ``attend`` that turns any pattern into calls a kernel runs.

A kernel sees a static ``Pattern`` or a ``BlockSelection``. Lowering rewrites the rest,
each rule exact (the mask is unchanged) and independent of the backend:

* ``PerHead`` → one call per distinct part, on the query heads that use it and their
  key heads (never repeated: a query-head subset keeps GQA where its heads fill whole
  key groups, else each key group runs on its own);
* a content-selected pattern → its ``BlockSelection``, selected from q and k without
  gradients;
* ``Grid`` → ``Grid.as_ordered()`` (contiguous groups);
* ``Ordered`` → q, k, v (and the key padding and score term) permuted into the order,
  the inner pattern there, the outputs permuted back.

A backend that declares ``takes_exact_masks`` (``reference``) gets lowered only what
has no mask before q and k are seen (content selection): it evaluates the exact dense
mask of ``PerHead``, ``Ordered`` and ``Grid`` itself, so that it stays an oracle for the
lowering.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from foveal.bias import WrappedBias, table_geometry
from foveal.kernels.call import Call
from foveal.patterns.dynamic import BlockSelection, DynamicPattern
from foveal.patterns.local import Grid
from foveal.patterns.order import Ordered
from foveal.patterns.perhead import PerHead

__all__ = ["Piece", "lower", "assemble", "check_selection"]


@dataclass(frozen=True)
class Piece:
    """One kernel call of a lowered ``attend``: ``call``, for the query ``heads`` (None: all), with tokens
    in the ``orders`` (outermost first) that its outputs are taken back from."""

    call: Call
    heads: torch.Tensor | None = None
    orders: tuple = ()


def lower(call: Call, backend=None) -> list[Piece]:
    """The kernel calls that compute ``call`` exactly, for ``backend`` (a backend object; None: any backend).

    What is lowered depends only on the backend's capability ``takes_exact_masks``.
    """
    if isinstance(backend, str):  # a name would read as no capability: refuse it rather than lower differently
        raise TypeError(f"lower takes a backend object (foveal.kernels.select.BACKENDS[name]) or None, got {backend!r}")
    p, exact_mask = call.pattern, bool(getattr(backend, "takes_exact_masks", False))
    if isinstance(p, PerHead) and not (exact_mask and not p.dynamic):
        return [piece for sub, heads in _split_heads(call) for piece in _within(lower(sub, backend), heads)]
    if isinstance(p, DynamicPattern):  # selected here: well-formed by construction
        return [Piece(replace(call, pattern=p.select(call.q, call.k, call.scale)))]
    if isinstance(p, BlockSelection):  # made by the caller: checked before any backend sees it
        check_selection(p, call.q, call.k)
        return [Piece(call)]
    if isinstance(p, Grid) and not exact_mask:
        return lower(replace(call, pattern=p.as_ordered()), backend)
    if isinstance(p, Ordered) and not exact_mask:
        inner = _to_order(call, p)
        return [replace(piece, orders=(p, *piece.orders)) for piece in lower(inner, backend)]
    return [Piece(call)]


def assemble(pieces: list[Piece], results: list[tuple], heads: int):
    """The pieces' ``(out, lse)`` put back into token order and query-head order: ``(out, lse)``."""
    if len(pieces) == 1 and pieces[0].heads is None and not pieces[0].orders:
        return results[0]
    outs, lses, order = [], [], []
    for piece, (out, lse) in zip(pieces, results):
        for o in reversed(piece.orders):  # innermost order first
            out = o.from_order(out)
            lse = None if lse is None else o.from_order(lse, dim=-1)
        outs.append(out)
        lses.append(lse)
        order.append(torch.arange(heads, device=out.device) if piece.heads is None else piece.heads.to(out.device))
    if len(pieces) == 1 and pieces[0].heads is None:
        return outs[0], lses[0]
    rank = torch.argsort(torch.cat(order))  # position of each query head among the pieces' heads
    out = torch.cat(outs, 1).index_select(1, rank)
    lse = None if any(x is None for x in lses) else torch.cat(lses, 1).index_select(1, rank)
    return out, lse


# -- PerHead ----------------------------------------------------------------------------
def _split_heads(call: Call):
    """(sub-call, its query heads) per distinct part and key-group size."""
    p = call.pattern  # its head count matches q: checked by attend
    hq, hkv = call.q.shape[1], call.k.shape[1]
    g = hq // hkv
    for part, heads in p.groups():
        by_group: dict[int, list[int]] = {}
        for h in heads:
            by_group.setdefault(h // g, []).append(h)
        by_size: dict[int, list[int]] = {}  # key groups by how many of their query heads use this part
        for j, hs in by_group.items():
            by_size.setdefault(len(hs), []).append(j)
        if len(heads) == hq:  # one part for every head: the call itself, no copies
            yield replace(call, pattern=part), None
            continue
        for _, groups in sorted(by_size.items()):
            qh = torch.tensor([h for j in groups for h in by_group[j]], device=call.q.device)
            kh = torch.tensor(groups, device=call.q.device)
            sub = replace(
                call, pattern=part, q=call.q.index_select(1, qh), k=call.k.index_select(1, kh),
                v=call.v.index_select(1, kh), bias=None if call.bias is None else _HeadsBias(call.bias, qh),
            )
            yield sub, qh


def _within(pieces: list[Piece], heads: torch.Tensor | None) -> list[Piece]:
    """Pieces of a sub-call on query ``heads`` (None: all), restated in the heads of the whole call."""
    if heads is None:
        return pieces
    return [replace(piece, heads=heads if piece.heads is None else heads[piece.heads]) for piece in pieces]


class _HeadsBias(WrappedBias):
    """``bias(heads[h], q_idx, kv_idx)``: a score term of the whole call read on a subset of its query heads."""

    def __init__(self, bias, heads: torch.Tensor):
        self.bias, self.heads = bias, heads

    def __call__(self, h, q_idx, kv_idx):
        return self.bias(self.heads.to(h.device)[h], q_idx, kv_idx)

    @property
    def geometry(self):
        """The wrapped table term's geometry (its index does not depend on heads), or None."""
        return table_geometry(self.bias)

    def table_index(self, q_idx, kv_idx):
        return self.bias.table_index(q_idx, kv_idx)

    def gather(self, index):
        return self.bias.gather(index)[self.heads.to(index.device)]

    def __repr__(self):
        return f"{self.bias!r} on heads {self.heads.tolist()}"


# -- Ordered ----------------------------------------------------------------------------
def _to_order(call: Call, p: Ordered) -> Call:
    padding = call.key_padding_mask
    return replace(
        call, pattern=p.inner, q=p.to_order(call.q), k=p.to_order(call.k), v=p.to_order(call.v),
        bias=None if call.bias is None else p.ordered_bias(call.bias),
        key_padding_mask=None if padding is None else p.to_order(padding, dim=-1),
    )


# -- content selection ----------------------------------------------------------------
def check_selection(sel: BlockSelection, q: torch.Tensor, k: torch.Tensor) -> None:
    """A selection made by the caller fits q and k and lists each key block (and single key) at most once.

    Every backend then gives the same answer: a block listed twice would count twice on
    the block-sparse kernels and once on the reference's dense mask.
    """
    from foveal.kernels.blocksparse import check_tables

    if tuple(sel.kv_blocks.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError(
            f"the selection is for (batch, heads) {tuple(sel.kv_blocks.shape[:2])} but q has {tuple(q.shape[:2])}"
        )
    check_tables(q, k, k, sel.kv_blocks, sel.block, sel.partial, sel.mask_fn, sel.kv_tokens)
    rows = sel.kv_blocks.reshape(-1, sel.kv_blocks.shape[-1])
    srt = rows.sort(-1).values
    if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
        raise ValueError("the selection lists a key block twice for one query block: list each at most once")
    if sel.kv_tokens is not None and sel.kv_tokens.shape[-1]:
        tok = sel.kv_tokens.reshape(rows.shape[0], -1)
        inside = ((tok[:, :, None] // sel.block) == rows[:, None, :]) & (tok[:, :, None] >= 0) & (rows[:, None, :] >= 0)
        ts = tok.sort(-1).values
        if bool(inside.any()) or bool(((ts[:, 1:] == ts[:, :-1]) & (ts[:, 1:] >= 0)).any()):
            raise ValueError("the selection's single key tokens must be distinct and outside its kept blocks")
