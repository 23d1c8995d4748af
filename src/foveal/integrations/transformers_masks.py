"""What transformers' mask functions say, read instead of materialised: ``MaskInfo`` and ``read_mask_function``.

transformers builds each layer's mask from a *mask function* (``masking_utils``:
causal, bidirectional, sliding-window overlays, packed-sequence remapping, combined
with ``and_masks``) and hands it to the mask interface of the attention
implementation. foveal's mask interface keeps the 2D padding and the offsets
(``MaskInfo``) and reads the mask function into what foveal can honour: causal or
bidirectional, the native window and the packed-sequence ids. A piece it cannot read
(chunked attention, blockwise image-token overlays, a model's own ``or_mask_function``)
is refused with its name, never dropped.

Under ``torch.compile`` the mask function is made inside the traced forward and dynamo
cannot read its closure cells (its ``__module__`` and code object's ``co_qualname`` it can). There
``mask_info`` keeps the function itself (``MaskInfo.traced``) and refuses by name what
is not one of transformers' own pieces at the top; each layer then derives the spec
from what it knows (its causality, its native window: ``traced_spec``), treats every
row as one sequence, and checks both on the real mask function at run time with an
O(N) probe (``torch._assert_async``, no Python branch on tensor values): the first and
last query rows over every key and the three central diagonals. A chunked, blockwise
or packed mask, or another window, differs from the derived one there (a foreign piece
that differs only elsewhere would pass the probe unseen: the eager reader has no such gap).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

__all__ = ["MaskInfo", "MaskSpec", "mask_info", "read_mask_function", "traced_spec", "documents"]


@dataclass(frozen=True)
class MaskSpec:
    """What a mask function allows: ``causal`` (True, False for bidirectional), the native ``window``
    ``(left, right)`` in key distances (``None``: none) and the packed-sequence ids (B, n) (``None``: none)."""

    causal: bool
    window: tuple | None = None
    packed: torch.Tensor | None = field(default=None, compare=False)


def _cells(fn) -> dict:
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def read_mask_function(fn) -> MaskSpec:
    """The ``MaskSpec`` of a transformers mask function, or ValueError naming the piece foveal cannot read."""
    found = {"causal": set(), "window": set(), "packed": []}
    _read(fn, found)
    if len(found["causal"]) != 1:
        raise ValueError(f"mask_function {_name(fn)} is neither causal nor bidirectional "
                         f"(found {sorted(found['causal'])}); foveal cannot read it")
    causal = found["causal"].pop()
    if len(found["window"]) > 1:
        raise ValueError(f"mask_function {_name(fn)} holds several sliding windows {sorted(found['window'])}")
    window = found["window"].pop() if found["window"] else None
    if window is not None and causal and window[1]:
        raise ValueError(f"mask_function {_name(fn)} is causal with a bidirectional window {window}")
    packed = found["packed"][0] if found["packed"] else None
    return MaskSpec(causal, window, packed)


def _read(fn, found) -> None:
    module, name, cells = getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""), _cells(fn)
    if module != "transformers.masking_utils":
        raise ValueError(f"mask_function {_name(fn)} is not one of transformers' own (causal, bidirectional, sliding "
                         f"window, packed sequences); foveal cannot read what it allows: refused rather than dropped")
    if name == "causal_mask_function":
        found["causal"].add(True)
    elif name == "bidirectional_mask_function":
        found["causal"].add(False)
    elif name == "and_masks.<locals>.and_mask":
        for part in cells["mask_functions"]:
            _read(part, found)
    elif name == "sliding_window_overlay.<locals>.inner_mask":  # kv > q - w: w - 1 keys back
        found["window"].add((int(cells["sliding_window"]) - 1, 0))
    elif name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":  # |q - kv| <= w
        w = int(cells["sliding_window"])
        found["window"].add((w, w))
    elif name == "remap_positions_for_packed_sequence.<locals>.inner_mask":  # positions within each sequence
        _read(cells["mask_function"], found)
    elif name == "packed_sequence_mask_function.<locals>.inner_mask":
        found["packed"].append(cells["packed_sequence_mask"])
    else:
        raise ValueError(f"mask_function {_name(fn)} (e.g. chunked attention, a blockwise or image-token overlay, "
                         f"or_masks) is not a mask foveal can honour; run this model without foveal")


@dataclass
class MaskInfo:
    """What a layer needs instead of a dense mask: the 2D padding, offsets and sizes transformers computed.

    ``padding`` (B, ≥ kv_offset + kv_length) bool, True = real token, or None; query
    ``i`` is at absolute position ``q_offset + i``, key ``j`` at ``kv_offset + j``.
    ``spec`` is what the mask function allows (``read_mask_function``), ``None`` where it
    cannot be read (``error`` says why: refused by the layers foveal runs).
    ``sdpa_kwargs`` rebuild transformers' own sdpa mask for the layers left dense.
    """

    padding: torch.Tensor | None
    q_offset: int
    kv_offset: int
    q_length: int
    kv_length: int
    local_size: int | None
    spec: MaskSpec | None = None
    error: str | None = None
    sdpa_kwargs: dict = field(repr=False, default_factory=dict)
    #: while torch.compile traces: the mask function, unread (``traced_spec`` derives and probes the spec per layer)
    traced: object = field(repr=False, default=None)
    _sdpa: list = field(repr=False, default_factory=list)
    #: what the layers of one forward share (read once: a device sync per forward, not per layer)
    memo: dict = field(repr=False, default_factory=dict)
    #: transformers reads ``attention_mask.ndim`` on anything that is not a 4D tensor
    ndim = 0

    def sdpa_mask(self):
        """transformers' own ``sdpa_mask`` for these arguments (built once)."""
        if not self._sdpa:
            from transformers.masking_utils import sdpa_mask

            self._sdpa.append(sdpa_mask(**self.sdpa_kwargs))
        return self._sdpa[0]


def mask_info(**kwargs):
    """transformers' mask function for ``"foveal"``: a ``MaskInfo`` instead of an N×N mask."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, MaskInfo):  # generate() with a static cache feeds the prepared mask back in
        return mask
    # a static cache's offsets are tensors updated in place: read them now
    offsets = {"q_offset": int(kwargs.get("q_offset", 0)), "kv_offset": int(kwargs.get("kv_offset", 0))}
    from transformers.masking_utils import causal_mask_function

    fn = kwargs.get("mask_function", causal_mask_function)
    spec, error, traced = None, None, None
    if torch.compiler.is_compiling():  # closure cells cannot be read while tracing: each layer derives and probes
        error, traced = _traced_refusal(fn), fn
    else:
        try:
            spec = read_mask_function(fn)
        except ValueError as e:
            error = str(e)
    return MaskInfo(
        padding=None if mask is None else mask.bool(),
        q_length=kwargs["q_length"],
        kv_length=kwargs["kv_length"],
        local_size=kwargs.get("local_size"),
        spec=spec,
        error=error,
        traced=None if error else traced,
        sdpa_kwargs={**kwargs, **offsets},
        **offsets,
    )


#: the mask functions whose name dynamo reads and that are transformers' own pieces (what ``_read`` reads)
_TRACED_NAMES = ("causal_mask_function", "bidirectional_mask_function", "and_masks.<locals>.and_mask",
                 "sliding_window_overlay.<locals>.inner_mask", "sliding_window_bidirectional_overlay.<locals>.inner_mask",
                 "remap_positions_for_packed_sequence.<locals>.inner_mask",
                 "packed_sequence_mask_function.<locals>.inner_mask")


def _traced_refusal(fn) -> str | None:
    """Under compile: why the mask function is refused by its name (its parts cannot be read there), or None."""
    module = getattr(fn, "__module__", "")
    # dynamo answers getattr(fn, "__qualname__", default) with the default for a function made in the traced code,
    # and fn.__qualname__ with the descriptor for some functions made before; it reads the code object's
    code = fn.__code__ if isinstance(fn, types.FunctionType) else None
    name = type(fn).__qualname__ if code is None else code.co_qualname
    if module != "transformers.masking_utils":
        return (f"mask_function {module}.{name} is not one of transformers' own (causal, bidirectional, sliding "
                f"window, packed sequences); foveal cannot read what it allows: refused rather than dropped")
    if name not in _TRACED_NAMES:
        return (f"mask_function {module}.{name} (e.g. chunked attention, a blockwise or image-token overlay, "
                f"or_masks) is not a mask foveal can honour; run this model without foveal")
    return None


def traced_spec(info: MaskInfo, causal: bool, window, batch: int, device=None) -> MaskSpec:
    """Under compile: the spec a layer derives from its own ``causal`` and native ``window`` (``(left, right)`` key
    distances or None), every row one sequence, checked at run time against ``info.traced`` on an O(N) probe."""
    key = ("probe", causal, window)
    if key not in info.memo:  # one probe per forward and geometry, not per layer
        info.memo[key] = True
        _probe(info, causal, window, batch, device)
    return MaskSpec(causal, window, None)


def _probe(info: MaskInfo, causal: bool, window, batch: int, device) -> None:
    n_q, n_kv, q0, k0 = info.q_length, info.kv_length, info.q_offset, info.kv_offset
    keys = torch.arange(k0, k0 + n_kv, device=device)
    first, last = torch.full_like(keys, q0), torch.full_like(keys, q0 + n_q - 1)
    diag = torch.arange(q0, q0 + n_q, device=device)
    q = torch.cat([first, last, diag, diag, diag])
    k = torch.cat([keys, keys, diag - 1, diag, diag + 1]).clamp(k0, k0 + n_kv - 1)
    b = torch.arange(batch, device=device)[:, None]
    got = torch.as_tensor(info.traced(b, 0, q[None, :], k[None, :])).to(device).expand(batch, q.shape[0])
    want = k <= q if causal else torch.ones_like(q, dtype=torch.bool)
    if window is not None:
        want = want & (q - k <= window[0]) & (k - q <= window[1])
    torch._assert_async((got == want[None, :]).all(),
                        f"foveal: under torch.compile the model's mask function is not the "
                        f"{'causal' if causal else 'bidirectional'} mask with window {window} (keys back, forward) "
                        f"of one sequence per row that the layer derived (packed sequences, chunked attention or "
                        f"another overlay): run it eagerly, where foveal reads or refuses each piece")


def documents(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, n) sequence ids of packed rows: a new sequence wherever the position does not grow by 1
    (transformers' ``find_packed_sequence_indices``)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
