"""EfficientLocalAttention against a dense ELA written from the paper (channels-first, loops), forward and backward."""

import random

import pytest
import torch

from foveal.nn.ela import EfficientLocalAttention


def _conv1d(s, weight, groups):
    """Zero-padded 'same' grouped 1-D convolution by explicit windows: s (B, C, L), weight (C, C/groups, k)."""
    b, c, length = s.shape
    k = weight.shape[-1]
    padded = torch.cat([s.new_zeros(b, c, k // 2), s, s.new_zeros(b, c, k // 2)], dim=2)
    per_group = c // groups
    out = torch.zeros(b, c, length, dtype=s.dtype)
    for o in range(c):
        first = (o // per_group) * per_group
        for t in range(k):
            out[:, o] += (padded[:, first : first + per_group, t : t + length] * weight[o, :, t, None]).sum(1)
    return out


def _group_norm(s, groups, weight, bias, eps):
    b, c, length = s.shape
    g = s.reshape(b, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps)).reshape(b, c, length) * weight[:, None] + bias[:, None]


def dense_ela(module, x):
    """ELA on (B, C, H, W): y_h = σ(GN(conv(mean_W))), y_w = σ(GN(conv(mean_H))), out = x·y_h·y_w."""
    xc = x.permute(0, 3, 1, 2)
    w, gn = module.conv.weight, module.gn

    def gate(strip):
        conv = _conv1d(strip, w, module.conv.groups)
        return torch.sigmoid(_group_norm(conv, gn.num_groups, gn.weight, gn.bias, gn.eps))

    y_h = gate(xc.mean(3))[:, :, :, None]
    y_w = gate(xc.mean(2))[:, :, None, :]
    return (xc * y_h * y_w).permute(0, 2, 3, 1)


@pytest.mark.parametrize("seed", range(3))
def test_matches_dense_ela_forward_and_backward(seed):
    rng = random.Random(seed)
    dim = rng.choice([16, 32])
    kernel, num_groups, conv_groups = rng.choice([(7, 16, None), (5, 16, dim // 8), (5, 8, None), (3, 4, 2)])
    module = EfficientLocalAttention(dim, kernel, num_groups, conv_groups)
    with torch.no_grad():  # non-trivial norm affine parameters
        module.gn.weight.normal_()
        module.gn.bias.normal_()
    x = torch.randn(2, rng.randint(2, 9), rng.randint(2, 9), dim, requires_grad=True)
    out, want = module(x), dense_ela(module, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [x] + list(module.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bfloat16_close_to_float32_reference():
    module = EfficientLocalAttention(32)
    x = torch.randn(2, 5, 6, 32)
    want = dense_ela(module, x)
    out = module.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=5e-2, rtol=5e-2)


def test_defaults_and_errors():
    m = EfficientLocalAttention(32)
    assert m.conv.kernel_size == (7,) and m.gn.num_groups == 16 and m.conv.groups == 32 and m.conv.bias is None
    with pytest.raises(ValueError, match="kernel_size must be odd.*got 4"):
        EfficientLocalAttention(32, kernel_size=4)
    with pytest.raises(ValueError, match="num_groups must divide dim, got num_groups=16 and dim=24"):
        EfficientLocalAttention(24)
    with pytest.raises(TypeError, match="dim must be an int"):
        EfficientLocalAttention(32.0)
    msg = r"EfficientLocalAttention expects \(batch, height, width, dim\), got shape \(5, 6, 32\)"
    with pytest.raises(ValueError, match=msg):
        m(torch.randn(5, 6, 32))
    with pytest.raises(ValueError, match="x has 16 channels but dim is 32"):
        m(torch.randn(1, 5, 6, 16))
