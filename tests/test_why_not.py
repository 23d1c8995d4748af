"""``why_not`` and ``attend`` agree on every call: ``why_not(call, name) == []`` iff ``attend`` runs it.

``why_not`` lowers the call as ``attend`` does (a content-selected pattern is selected, ``PerHead``,
``Grid`` and ``Ordered`` are split or permuted unless the backend takes exact masks) and asks the
backend about every piece; ``attend`` raises with the same reasons.
"""

import pytest
import torch

from foveal import (
    ALiBi,
    BlockTopK,
    Causal,
    Grid,
    Neighborhood,
    Ordered,
    PerHead,
    SlidingWindow,
    VerticalSlash,
    attend,
)
from foveal.kernels.select import BACKENDS, Call, backend_names, why_not
from foveal.patterns.dynamic import BlockSelection

N, GRID = 64, (8, 8)


def _patterns(q, k):
    twice = torch.tensor([[0, 0, -1, -1], [0, 1, -1, -1], [1, 2, -1, -1], [2, 3, -1, -1]])
    return {
        "static": SlidingWindow(N, left=5),
        "causal": Causal(N),
        "neighborhood": Neighborhood(GRID, 3),
        "per-head": PerHead([Causal(N), SlidingWindow(N, left=5), BlockTopK(N, topk=2, block=16), Causal(N)]),
        "ordered": Ordered(SlidingWindow(N, left=5), "hilbert", GRID),
        "grid": Grid(GRID, 4),
        "block-top-k": BlockTopK(N, topk=2, block=16),
        "vertical-slash": VerticalSlash(N, vertical=8, slash=8, block=16, last_q=16),
        "selection": BlockTopK(N, topk=2, block=16).select(q, k),
        "bad selection": BlockSelection(N, 16, twice.expand(1, 4, 4, 4), None, None, "by hand"),
    }


VARIANTS = {
    "grad+lse": dict(grad=True, need_lse=True),
    "terms": dict(grad=True, need_lse=False, bias=True, padding=True, softcap=2.0),
    "float64": dict(grad=False, need_lse=True, dtype=torch.float64),
    "inference": dict(grad=False, need_lse=False),
}


def _agree(name, variant, backend):
    opts = VARIANTS[variant]
    gen = torch.Generator().manual_seed(0)
    dtype = opts.get("dtype", torch.float32)
    q = torch.randn(1, 4, N, 16, generator=gen, dtype=dtype)
    k, v = (torch.randn(1, 2, N, 16, generator=gen, dtype=dtype) for _ in range(2))
    pattern = _patterns(q, k)[name]
    q, k, v = (t.requires_grad_(opts["grad"]) for t in (q, k, v))
    bias = ALiBi(4) if opts.get("bias") else None
    pad = (torch.arange(N) >= N - 7)[None] if opts.get("padding") else None
    kwargs = dict(bias=bias, key_padding_mask=pad, softcap=opts.get("softcap"))
    call = Call(q, k, v, pattern, 16 ** -0.5, need_lse=opts["need_lse"], **kwargs)
    reasons = why_not(call, backend)
    try:
        attend(q, k, v, pattern, backend=backend, return_lse=opts["need_lse"], **kwargs)
    except ValueError as e:
        assert reasons, f"why_not({name}, {variant}, {backend!r}) == [] but attend refused: {e}"
        assert reasons[0] in str(e), f"attend refused for another reason than why_not's {reasons[0]!r}: {e}"
        return
    assert not reasons, f"attend ran ({name}, {variant}) on {backend!r} but why_not says {reasons}"


@pytest.mark.parametrize("backend", [b for b in backend_names() if b != "flex"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_why_not_agrees_with_attend(backend, variant):
    for name in ("static", "causal", "neighborhood", "per-head", "ordered", "grid", "block-top-k",
                 "vertical-slash", "selection", "bad selection"):
        _agree(name, variant, backend)


@pytest.mark.parametrize("variant", ["grad+lse", "float64"])
def test_why_not_agrees_with_attend_on_flex_where_it_refuses_quickly(variant):
    for name in ("static", "per-head", "ordered", "block-top-k", "vertical-slash", "selection", "bad selection"):
        _agree(name, variant, "flex")


@pytest.mark.parametrize("name", ["static", "vertical-slash", "selection"])
def test_why_not_agrees_with_attend_on_flex_inference(name):
    """Compiled flex runs inference on CPU (one compile per case); vertical-slash's single tokens it refuses."""
    _agree(name, "inference", "flex")


def test_why_not_names_every_backend_and_auto():
    q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))
    call = Call(q, k, v, BlockTopK(N, topk=2, block=16), 0.25)
    assert why_not(call, "auto") == []
    assert why_not(call, "cpu") and "cpu runs static patterns" in why_not(call, "cpu")[0]
    assert set(backend_names()) == {"auto", *BACKENDS}
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        why_not(call, "triton")


def test_lowering_reads_the_backends_capability_not_its_name(monkeypatch):
    from foveal.kernels.select import route

    q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))
    call = Call(q, k, v, PerHead([Causal(N), SlidingWindow(N, left=5)]), 0.25)
    assert [b.name for _, b in route(call, "reference")] == ["reference"]  # the exact mask, unlowered
    assert [b.name for _, b in route(call, "blocksparse")] == ["blocksparse"] * 2  # one piece per part
    monkeypatch.setattr(BACKENDS["reference"], "takes_exact_masks", False)
    assert [b.name for _, b in route(call, "reference")] == ["reference"] * 2
