"""FocalModulation against a dense focal modulation written from the FocalNets paper (shifts, not convs)."""

import math
import random

import pytest
import torch

from foveal.nn.focal import FocalModulation


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _depthwise(x, weight):
    """Zero-padded 'same' depth-wise conv on channels-last x (B, H, W, C) by summing shifted copies."""
    b, h, w, c = x.shape
    k = weight.shape[-1]
    p = k // 2
    padded = torch.zeros(b, h + 2 * p, w + 2 * p, c, dtype=x.dtype)
    padded[:, p : p + h, p : p + w] = x
    out = torch.zeros_like(x)
    for dy in range(k):
        for dx in range(k):
            out = out + padded[:, dy : dy + h, dx : dx + w] * weight[:, 0, dy, dx]
    return out


def dense_focal_modulation(m, x):
    """Eqs. of FocalNets: q, ctx, gates = f(x); ctx^ℓ = GELU(DWConv(ctx^{ℓ-1})); global = GELU(avg(ctx^L));
    modulator = h(Σ gates · ctx); out = proj(q ⊙ modulator)."""
    c, levels = m.dim, m.focal_level
    z = x @ m.f.weight.flatten(1).T + (m.f.bias if m.f.bias is not None else 0)
    q, ctx, gates = z[..., :c], z[..., c : 2 * c], z[..., 2 * c :]
    total = torch.zeros_like(q)
    for level in range(levels):
        ctx = _gelu(_depthwise(ctx, m.focal_layers[level][0].weight))
        total = total + ctx * gates[..., level : level + 1]
    total = total + _gelu(ctx.mean((1, 2), keepdim=True)) * gates[..., levels:]
    if m.normalize_modulator:
        total = total / (levels + 1)
    modulator = total @ m.h.weight[:, :, 0, 0].T + (m.h.bias if m.h.bias is not None else 0)
    out = q * modulator
    if m.use_post_norm:
        mu = out.mean(-1, keepdim=True)
        var = ((out - mu) ** 2).mean(-1, keepdim=True)
        out = (out - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight + m.norm.bias
    return out @ m.proj.weight.flatten(1).T + m.proj.bias


@pytest.mark.parametrize("seed", range(4))
def test_matches_dense_focal_modulation_forward_and_backward(seed):
    rng = random.Random(seed)
    kwargs = dict(
        focal_window=rng.choice([1, 3, 5]),
        focal_level=rng.choice([1, 2, 3]),
        focal_factor=rng.choice([2, 4]),
        bias=rng.random() < 0.7,
        use_post_norm=seed % 2 == 1,
        normalize_modulator=seed >= 2,
    )
    dim = rng.choice([8, 12, 16])
    m = FocalModulation(dim, **kwargs)
    if m.use_post_norm:
        with torch.no_grad():
            m.norm.weight.normal_()
            m.norm.bias.normal_()
    x = torch.randn(2, rng.randint(2, 8), rng.randint(2, 8), dim, requires_grad=True)
    out, want = m(x), dense_focal_modulation(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [x] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_defaults_and_bfloat16():
    m = FocalModulation(16)
    assert m.kernel_sizes == [3, 5] and m.f.out_channels == 2 * 16 + 3
    x = torch.randn(2, 6, 5, 16)
    want = dense_focal_modulation(m, x)
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=5e-2, rtol=5e-2)


def test_official_layout_loads():
    # the official FocalNets code: f and proj are Linear ([C', C]), the post norm is ``ln``
    torch.manual_seed(0)
    m = FocalModulation(8, use_post_norm=True)
    official = {k.replace("norm.", "ln."): v for k, v in m.state_dict().items()}
    official["f.weight"] = official["f.weight"].flatten(1)
    official["proj.weight"] = official["proj.weight"].flatten(1)
    other = FocalModulation(8, use_post_norm=True)
    other.load_state_dict(official)
    x = torch.randn(2, 5, 4, 8)
    torch.testing.assert_close(other(x), m(x), atol=0, rtol=0)
    assert other.norm.eps == 1e-5 and FocalModulation(8, use_post_norm=True, norm_eps=1e-6).norm.eps == 1e-6


def test_errors():
    with pytest.raises(ValueError, match=r"must be odd.*got kernels \[4, 6\] from focal_window=4, focal_factor=2"):
        FocalModulation(16, focal_window=4)
    with pytest.raises(ValueError, match="focal_level must be >= 1, got 0"):
        FocalModulation(16, focal_level=0)
    with pytest.raises(ValueError, match="norm_eps must be > 0.0, got 0"):
        FocalModulation(16, norm_eps=0)
    with pytest.raises(ValueError, match="proj_drop must be in \\[0, 1\\), got 2"):
        FocalModulation(16, proj_drop=2)
    m = FocalModulation(16)
    msg = r"FocalModulation expects \(batch, height, width, dim\), got shape \(6, 5, 16\)"
    with pytest.raises(ValueError, match=msg):
        m(torch.randn(6, 5, 16))
    with pytest.raises(ValueError, match="x has 8 channels but dim is 16"):
        m(torch.randn(1, 6, 5, 8))
