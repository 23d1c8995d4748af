"""Content-selected patterns on every backend that runs them: blocksparse against the dense reference of the same selection."""

import pytest
import torch

from foveal import attend
from foveal.patterns.dynamic import DHSA, BlockCover, BlockTopK, VerticalSlash, VerticalSlashCover
from foveal.patterns.vertical_slash_ranges import VerticalSlashRanges

SELECTORS = [
    lambda n: BlockTopK(n, topk=3, block=16),
    lambda n: BlockCover(n, gamma=0.5, block=16),
    lambda n: DHSA(n, budget=40, chunk=16),
    lambda n: VerticalSlash(n, vertical=8, slash=8, last_q=16, always_vertical=2, always_slash=2, block=16),
    lambda n: VerticalSlashCover(n, alpha=0.5, min_budget=8, last_q=16),
    lambda n: VerticalSlashRanges(n, vertical=8, slash=4, last_q=16, always_vertical=2, always_slash=0, min_slash=0,
                                  block=16),
]


@pytest.mark.parametrize("make", SELECTORS)
@pytest.mark.parametrize("n", [50, 64])
def test_blocksparse_equals_reference_on_the_same_selection(make, n):
    torch.manual_seed(n)
    pattern = make(n)
    q = torch.randn(2, 4, n, 8, requires_grad=True)
    k = torch.randn(2, 2, n, 8, requires_grad=True)
    v = torch.randn(2, 2, n, 8, requires_grad=True)
    sel = pattern.select(q, k)
    outs = {b: attend(q, k, v, sel, backend=b, return_lse=True) for b in ("blocksparse", "reference")}
    (o1, l1), (o2, l2) = outs.values()
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(l2)
    assert torch.equal(torch.isfinite(l1), finite)
    torch.testing.assert_close(l1[finite], l2[finite], atol=1e-5, rtol=1e-5)
    g = torch.randn_like(o1)
    g1 = torch.autograd.grad((o1 * g).sum(), (q, k, v))
    g2 = torch.autograd.grad((o2 * g).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_other_backends_are_refused_with_the_reason():
    q = k = v = torch.randn(1, 1, 32, 8)
    with pytest.raises(ValueError, match="backend 'cpu' cannot run this call: cpu runs static patterns; content selections run on"):
        attend(q, k, v, BlockTopK(32, topk=1, block=16), backend="cpu")


@pytest.mark.parametrize("make", SELECTORS)
def test_flex_runs_a_selection_forward_on_cpu(make):
    """Compiled FlexAttention (inference only on CPU) under the selection's per-(batch, head) BlockMask."""
    n = 80  # a ragged last block of 16
    torch.manual_seed(3)
    pattern = make(n)
    q, k, v = torch.randn(2, 2, n, 16), torch.randn(2, 1, n, 16), torch.randn(2, 1, n, 16)
    sel = pattern.select(q, k)
    with torch.no_grad():
        out = attend(q, k, v, sel, backend="flex")
    torch.testing.assert_close(out, attend(q, k, v, sel, backend="reference"), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="inference only"):
        attend(q.requires_grad_(), k, v, sel, backend="flex")


def test_flex_refuses_single_tokens_its_mask_fn_does_not_imply():
    from foveal.patterns.dynamic import BlockSelection

    n, block = 32, 16
    table = torch.tensor([[[[0, -1], [1, -1]]]])
    tokens = torch.tensor([[[[-1], [3]]]])
    sel = BlockSelection(n, block, table, None, lambda b, h, i, j: j <= i, "test", kv_tokens=tokens)
    q = k = v = torch.randn(1, 1, n, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="single key tokens"):
        attend(q, k, v, sel, backend="flex")
