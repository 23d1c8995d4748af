"""Content-selected patterns on every backend that runs them: blocksparse against the dense reference of the same selection."""

import pytest
import torch

from foveal import attend
from foveal.patterns.dynamic import DHSA, BlockCover, BlockTopK, VerticalSlash, VerticalSlashCover

SELECTORS = [
    lambda n: BlockTopK(n, topk=3, block=16),
    lambda n: BlockCover(n, gamma=0.5, block=16),
    lambda n: DHSA(n, budget=40, chunk=16),
    lambda n: VerticalSlash(n, vertical=8, slash=8, last_q=16, always_vertical=2, always_slash=2, block=16),
    lambda n: VerticalSlashCover(n, alpha=0.5, min_budget=8, last_q=16),
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
    with pytest.raises(ValueError, match="backend must be 'auto', 'blocksparse' or 'reference'"):
        attend(q, k, v, BlockTopK(32, topk=1, block=16), backend="cpu")
