"""What transformers' mask functions say, read instead of materialised: ``MaskInfo`` and ``read_mask_function``.

transformers builds each layer's mask from a *mask function* (``masking_utils``:
causal, bidirectional, sliding-window overlays, packed-sequence remapping, combined
with ``and_masks``) and hands it to the mask interface of the attention
implementation. foveal's mask interface keeps the 2D padding and the offsets
(``MaskInfo``) and reads the mask function into what foveal can honour: causal or
bidirectional, the native window and the packed-sequence ids. A piece it cannot read
(chunked attention, blockwise image-token overlays, a model's own ``or_mask_function``)
is refused with its name, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["MaskInfo", "MaskSpec", "mask_info", "read_mask_function", "documents"]


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
    spec, error = None, None
    try:
        from transformers.masking_utils import causal_mask_function

        spec = read_mask_function(kwargs.get("mask_function", causal_mask_function))
    except ValueError as e:
        error = str(e)
    return MaskInfo(
        padding=None if mask is None else mask.bool(),
        q_length=kwargs["q_length"],
        kv_length=kwargs["kv_length"],
        local_size=kwargs.get("local_size"),
        spec=spec,
        error=error,
        sdpa_kwargs={**kwargs, **offsets},
        **offsets,
    )


def documents(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, n) sequence ids of packed rows: a new sequence wherever the position does not grow by 1
    (transformers' ``find_packed_sequence_indices``)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
