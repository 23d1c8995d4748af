"""DaViT channel attention and dual block against a dense DaViT written from the paper (per-head loops, windows)."""

import copy
import math
import random

import pytest
import torch

from foveal.nn.davit import ChannelAttention, ChannelBlock, DaViTBlock, SpatialBlock
from foveal.patterns import Window
from precision import assert_close64


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _cpe(x, cpe):
    """x + DWConv3x3(x) by shifted copies (channels last)."""
    b, h, w, c = x.shape
    weight, k = cpe.proj.weight, cpe.proj.weight.shape[-1]
    p = k // 2
    padded = torch.zeros(b, h + 2 * p, w + 2 * p, c, dtype=x.dtype)
    padded[:, p : p + h, p : p + w] = x
    conv = cpe.proj.bias.expand(b, h, w, c)
    for dy in range(k):
        for dx in range(k):
            conv = conv + padded[:, dy : dy + h, dx : dx + w] * weight[:, 0, dy, dx]
    return x + (_gelu(conv) if isinstance(cpe.activation, torch.nn.GELU) else conv)


def dense_channel_attention(m, x):
    """Per group g of channels (tokens = channels, N positions = features).

    v1 (DaViT): A = softmax((K_g/sqrt(Cg))ᵀ V_g), out_g = (A Q_gᵀ)ᵀ;
    v2: A = softmax((s Q_g)ᵀ K_g), out_g = (A V_gᵀ)ᵀ.
    """
    b, c = x.shape[0], x.shape[-1]
    t = _linear(x.reshape(b, -1, c), m.qkv)
    n, cg = t.shape[1], c // m.num_heads
    outs = []
    for g in range(m.num_heads):
        q, k, v = (t[:, :, i * c + g * cg : i * c + (g + 1) * cg] for i in range(3))  # (B, N, Cg)
        if m.v2:
            s = n**-0.5 if m.dynamic_scale else cg**-0.5
            attn = torch.softmax(torch.bmm((q * s).transpose(1, 2), k), -1)
            outs.append(torch.bmm(attn, v.transpose(1, 2)).transpose(1, 2))
        else:
            attn = torch.softmax(torch.bmm((k * cg**-0.5).transpose(1, 2), v), -1)
            outs.append(torch.bmm(attn, q.transpose(1, 2)).transpose(1, 2))
    return _linear(torch.cat(outs, -1), m.proj).reshape(x.shape)


def dense_window_attention(attn, x):
    """Zero-pad to whole windows, partition, full softmax attention in every window, merge, crop (DaViT)."""
    b, h, w, c = x.shape
    ws, nh = attn.window_size, attn.num_heads
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    padded = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    padded[:, :h, :w] = x
    win = padded.reshape(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    q, k, v = _linear(win, attn.qkv).reshape(win.shape[0], ws * ws, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    a = torch.softmax((q * (c // nh) ** -0.5) @ k.transpose(-1, -2), -1)
    out = _linear((a @ v).transpose(1, 2).reshape(win.shape), attn.proj)
    out = out.reshape(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return out[:, :h, :w]


def _mlp(x, mlp):
    return _linear(_gelu(_linear(x, mlp.fc1)), mlp.fc2)


def dense_block(blk, x):
    mix = dense_window_attention if isinstance(blk, SpatialBlock) else dense_channel_attention
    x = _cpe(x, blk.cpe1)
    x = x + mix(blk.attn, _layer_norm(x, blk.norm1))
    x = _cpe(x, blk.cpe2)
    return x + _mlp(_layer_norm(x, blk.norm2), blk.mlp) if blk.mlp is not None else x


def _randomize_norms(module):
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)


def _compare(out, want, params):
    """Output and every gradient, in float64 to 1e-10 of their magnitude (tests/precision.py)."""
    assert_close64(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        assert_close64(a, b)


@pytest.mark.parametrize("seed", range(4))
def test_channel_attention_matches_dense(seed):
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4])
    dim = heads * rng.choice([2, 4, 6])
    m = ChannelAttention(dim, heads, qkv_bias=seed % 2 == 0, v2=seed >= 2, dynamic_scale=seed != 3).double()
    tokens = tuple(rng.randint(2, 6) for _ in range(rng.choice([1, 2])))
    x = torch.randn(2, *tokens, dim, dtype=torch.float64, requires_grad=True)
    _compare(m(x), dense_channel_attention(m, x), [x] + list(m.parameters()))


@pytest.mark.parametrize("seed", range(3))
def test_davit_block_matches_dense(seed):
    rng = random.Random(seed + 100)
    heads = rng.choice([1, 2])
    dim = heads * rng.choice([4, 8])
    ws = rng.choice([2, 3])
    grid = (rng.randint(2, 7), rng.randint(2, 7))  # often not a multiple of the window
    blk = DaViTBlock(
        dim, heads, window_size=ws, mlp_ratio=2, qkv_bias=seed != 1, ffn=seed != 2, cpe_act=seed == 1, v2=seed == 0
    )
    _randomize_norms(blk)
    blk.double()  # two blocks deep: float64 (tests/precision.py)
    x = torch.randn(2, *grid, dim, dtype=torch.float64, requires_grad=True)
    want = dense_block(blk[1], dense_block(blk[0], x))
    _compare(blk(x), want, [x] + list(blk.parameters()))


def test_drop_path_bfloat16_pattern():
    blk = DaViTBlock(16, 2, window_size=3, drop_path=0.5)
    x = torch.randn(4, 5, 6, 16)
    assert blk.pattern((5, 6)) == Window((6, 6), 3)
    blk.eval()
    want = dense_block(blk[1], dense_block(blk[0], x))
    blk64 = copy.deepcopy(blk).double()  # eval: no stochastic depth (float64, two blocks deep)
    assert_close64(blk64(x.double()), dense_block(blk64[1], dense_block(blk64[0], x.double())))
    blk.train()
    assert not torch.allclose(blk(x), want)
    blk.eval()
    out = blk.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=1.5e-1, rtol=5e-2)
    ca = ChannelAttention(16, 4)
    want = dense_channel_attention(ca, x)
    torch.testing.assert_close(ca.to(torch.bfloat16)(x.to(torch.bfloat16)).float(), want, atol=5e-2, rtol=5e-2)


def test_errors():
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 10 and 4"):
        ChannelAttention(10, 4)
    with pytest.raises(ValueError, match="drop_path must be in \\[0, 1\\), got 1.5"):
        DaViTBlock(16, 2, drop_path=1.5)
    with pytest.raises(TypeError, match="window_size must be an int"):
        SpatialBlock(16, 2, window_size=2.5)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'fast'"):
        DaViTBlock(16, 2, backend="fast")
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        ChannelAttention(16, 2)([1.0])
    with pytest.raises(ValueError, match="x has 8 channels but dim is 16"):
        ChannelAttention(16, 2)(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match=r"ChannelBlock expects \(batch, height, width, dim\), got shape \(1, 5, 16\)"):
        ChannelBlock(16, 2)(torch.randn(1, 5, 16))


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_davit_block_bfloat16_forward_and_backward_against_dense():
    """bf16 module against the float32 dense reference on the same (rounded) weights and input."""
    torch.manual_seed(3)
    mb = DaViTBlock(16, 2, window_size=3, mlp_ratio=2).to(torch.bfloat16)
    _randomize_norms(mb)
    m = DaViTBlock(16, 2, window_size=3, mlp_ratio=2)
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    xb = torch.randn(2, 5, 7, 16, dtype=torch.bfloat16, requires_grad=True)  # 5×7: padded windows
    x = xb.detach().float().requires_grad_()
    out, want = mb(xb), dense_block(m[1], dense_block(m[0], x))
    assert out.dtype == torch.bfloat16 and _rel(out, want) < 0.02
    g = torch.randn(want.shape)
    ours = torch.autograd.grad(out, [xb] + list(mb.parameters()), g.bfloat16())
    theirs = torch.autograd.grad(want, [x] + list(m.parameters()), g)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 0.05
