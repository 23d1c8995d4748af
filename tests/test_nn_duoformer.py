"""ScaleWiseAttention (DuoFormer) against a dense implementation written from the paper, region by region."""

import random

import pytest
import torch
import torch.nn.functional as F

import bruteforce as bf
from foveal.nn.duoformer import ScaleWiseAttention
from foveal.patterns import Full, Neighborhood, Window


def _mha(tokens, qkv, proj, heads, scale, mask=None):
    """Multi-head softmax attention over the second-to-last axis, written out."""
    *lead, n, d = tokens.shape
    q, k, v = F.linear(tokens, qkv.weight, qkv.bias).split(d, dim=-1)
    split = lambda t: t.reshape(*lead, n, heads, d // heads).transpose(-2, -3)
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    out = (torch.softmax(s, -1) @ v).transpose(-2, -3).reshape(*lead, n, d)
    return F.linear(out, proj.weight, proj.bias)


def dense_duoformer(m, maps):
    ratios = m.grid_ratios
    base = ratios.index(1)
    rh, rw = maps[base].shape[1:3]
    order = sorted(range(len(maps)), key=lambda s: ratios[s])
    regions = []
    for i in range(rh):
        for j in range(rw):
            toks = []
            blocks = [
                x[:, i * r : (i + 1) * r, j * r : (j + 1) * r] for x, r in zip(maps, ratios)
            ]  # the region's block of every map
            if m.scale_token is not None:  # mean of every map over the region, concatenated, projected
                pooled = torch.cat([blk.mean((1, 2)) for blk in blocks], -1)
                toks.append(F.linear(pooled, m.scale_token.weight, m.scale_token.bias)[:, None])
            for s in order:  # coarse to fine, pixels of the block in row-major order
                blk = blocks[s].reshape(blocks[s].shape[0], -1, blocks[s].shape[-1])
                toks.append(F.linear(blk, m.proj_in[s].weight, m.proj_in[s].bias))
            regions.append(torch.cat(toks, 1))
    tokens = torch.stack(regions, 1) + m.pos_embed  # (B, R, T, D)
    y = _mha(tokens, m.scale_qkv, m.scale_proj, m.num_heads, m.scale)  # each region on its own
    r = y[:, :, m.region_token]
    k = m.patch_kernel_size
    mask = None if k is None else bf.neighborhood((rh, rw), (k, k), (1, 1), (1, 1), (False, False))
    out = _mha(r, m.qkv, m.proj, m.num_heads, m.scale, mask)
    return out.reshape(out.shape[0], rh, rw, -1)


def _case(seed):
    rng = random.Random(seed)
    stages = rng.randint(2, 3)
    dims = tuple(rng.choice([4, 8, 12]) for _ in range(stages))
    ratios = [1] + [rng.choice([1, 2, 3]) for _ in range(stages - 1)]
    rng.shuffle(ratios)
    regions = (rng.randint(2, 4), rng.randint(2, 4))
    heads = rng.choice([1, 2])
    kwargs = dict(
        grid_ratios=tuple(ratios),
        scale_token=rng.random() < 0.7,
        region_token=rng.randint(0, 1),
        patch_kernel_size=rng.choice([None, 2] + ([3] if min(regions) >= 3 else [])),
    )
    return dims, heads, regions, kwargs


@pytest.mark.parametrize("seed", range(5))
def test_matches_dense_forward_and_backward(seed):
    dims, heads, regions, kwargs = _case(seed)
    torch.manual_seed(seed)
    m = ScaleWiseAttention(8 * heads, heads, dims, **kwargs)
    maps = [
        torch.randn(2, regions[0] * r, regions[1] * r, c, requires_grad=True)
        for c, r in zip(dims, kwargs["grid_ratios"])
    ]
    out, want = m(maps), dense_duoformer(m, maps)
    assert out.shape == (2, *regions, m.dim)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = maps + list(m.parameters())
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    for a, b in zip(grads, torch.autograd.grad(want, params, g, allow_unused=True)):
        if b is None:  # e.g. tokens no query reads: must be unused by both
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_default_backbone_layout_bfloat16_compile_and_patterns():
    m = ScaleWiseAttention(16, 2, (4, 8, 16))  # stages fine to coarse: grids 4×, 2×, 1× the regions
    assert m.grid_ratios == (4, 2, 1) and m.tokens == 1 + 16 + 4 + 1
    maps = [torch.randn(2, 8, 12, 4), torch.randn(2, 4, 6, 8), torch.randn(2, 2, 3, 16)]
    want = dense_duoformer(m, maps)
    torch.testing.assert_close(torch.compile(m, backend="eager")(maps), want, atol=1e-5, rtol=1e-5)
    mb = ScaleWiseAttention(16, 2, (4, 8, 16)).to(torch.bfloat16)
    mb.load_state_dict(m.state_dict())
    out = mb([x.bfloat16() for x in maps])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.05, rtol=0.05)
    assert m.pattern((2, 3)) == Full(6)
    assert m.scale_pattern(6, 22) == Window((132,), 22)
    assert ScaleWiseAttention(8, 2, (4, 8), patch_kernel_size=3).pattern((4, 5)) == Neighborhood((4, 5), 3)


def test_errors():
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 10 and 4"):
        ScaleWiseAttention(10, 4, (8, 10))
    with pytest.raises(TypeError, match="in_dims must be a non-empty sequence of ints"):
        ScaleWiseAttention(8, 2, 8)
    with pytest.raises(ValueError, match=r"grid_ratios must have one entry per map \(2\), got \(1,\)"):
        ScaleWiseAttention(8, 2, (8, 8), grid_ratios=(1,))
    with pytest.raises(ValueError, match="region_token must be < the 3 tokens per region, got 3"):
        ScaleWiseAttention(8, 2, (8, 8), grid_ratios=(1, 1), region_token=3)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'fast'"):
        ScaleWiseAttention(8, 2, (8, 8), backend="fast")
    m = ScaleWiseAttention(8, 2, (4, 8))
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        m([torch.randn(2, 4, 4, 4)])
    with pytest.raises(ValueError, match=r"maps\[1\] has 4 channels but in_dims\[1\] is 8"):
        m([torch.randn(2, 4, 4, 4), torch.randn(2, 2, 2, 4)])
    with pytest.raises(ValueError, match=r"maps\[0\] must have grid_ratios\[0\]=2 times the region grid \(2, 2\)"):
        m([torch.randn(2, 5, 4, 4), torch.randn(2, 2, 2, 8)])
    with pytest.raises(ValueError, match=r"kernel_size\[0\]=3 > grid\[0\]=2"):
        ScaleWiseAttention(8, 2, (4, 8), patch_kernel_size=3)([torch.randn(2, 4, 6, 4), torch.randn(2, 2, 3, 8)])


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_bfloat16_forward_and_backward_against_dense():
    """bf16 module against the float32 dense reference on the same (rounded) weights and maps."""
    torch.manual_seed(6)
    mb = ScaleWiseAttention(16, 2, (4, 8), patch_kernel_size=3).to(torch.bfloat16)
    m = ScaleWiseAttention(16, 2, (4, 8), patch_kernel_size=3)
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    maps_b = [torch.randn(2, 6, 8, 4, dtype=torch.bfloat16), torch.randn(2, 3, 4, 8, dtype=torch.bfloat16)]
    maps_b = [t.requires_grad_() for t in maps_b]
    maps = [t.detach().float().requires_grad_() for t in maps_b]
    out, want = mb(maps_b), dense_duoformer(m, maps)
    assert out.dtype == torch.bfloat16 and _rel(out, want) < 2e-2
    g = torch.randn(want.shape)
    ours = torch.autograd.grad(out, maps_b + list(mb.parameters()), g.bfloat16())
    theirs = torch.autograd.grad(want, maps + list(m.parameters()), g)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 5e-2
