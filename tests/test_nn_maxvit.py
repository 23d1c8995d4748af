"""MaxViT multi-axis attention and block against an independent dense MaxViT (partition reshapes, attention)."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from foveal.nn.maxvit import MaxViTBlock, MBConv, MultiAxisAttention
from foveal.patterns.local import Grid, Window
from precision import assert_close64


# -- MaxViT's partitions, written with reshapes as in the paper's code ------------------
def block_partition(x, p):
    b, h, w, c = x.shape
    x = x.reshape(b, h // p[0], p[0], w // p[1], p[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, p[0] * p[1], c)


def block_reverse(parts, p, h, w):
    c = parts.shape[-1]
    x = parts.reshape(-1, h // p[0], w // p[1], p[0], p[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def grid_partition(x, g):
    b, h, w, c = x.shape
    x = x.reshape(b, g[0], h // g[0], g[1], w // g[1], c)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, g[0] * g[1], c)


def grid_reverse(parts, g, h, w):
    c = parts.shape[-1]
    x = parts.reshape(-1, h // g[0], w // g[1], g[0], g[1], c)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, h, w, c)


def rel_index(p):
    """timm's relative_position_index: (q − k + P − 1) per axis, row-major over (2P0−1, 2P1−1)."""
    coords = torch.tensor(list(itertools.product(range(p[0]), range(p[1]))))
    rel = coords[:, None, :] - coords[None, :, :] + torch.tensor(p) - 1
    return rel[..., 0] * (2 * p[1] - 1) + rel[..., 1]


def dense_multi_axis(m, x):
    """Partition, attention with the table bias inside every partition, reverse."""
    b, h, w, c = x.shape
    p, heads = m.partition_size, m.num_heads
    parts = block_partition(x, p) if m.kind == "block" else grid_partition(x, p)
    bw, n, _ = parts.shape
    q, k, v = F.linear(parts, m.qkv.weight, m.qkv.bias).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) * m.scale
    if m.relative_position_bias_table is not None:
        s = s + m.relative_position_bias_table[rel_index(p).view(-1)].view(n, n, heads).permute(2, 0, 1)
    out = (s.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
    out = F.linear(out, m.proj.weight, m.proj.bias)
    return block_reverse(out, p, h, w) if m.kind == "block" else grid_reverse(out, p, h, w)


def _random_attention(rng, kind, **kwargs):
    p = (rng.randint(2, 3), rng.randint(2, 4))
    grid = tuple(pp * rng.randint(1, 3) for pp in p)
    heads = rng.choice([1, 2, 3])
    m = MultiAxisAttention(heads * rng.choice([4, 8]), heads, p, kind, qkv_bias=rng.random() < 0.8, **kwargs)
    if m.relative_position_bias_table is not None:
        with torch.no_grad():
            m.relative_position_bias_table.normal_()
    return m, grid


def _grads(out, g, tensors):
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["block", "grid"])
def test_multi_axis_attention_matches_dense_maxvit(kind, seed):
    rng = random.Random(seed + 100 * (kind == "grid"))
    m, grid = _random_attention(rng, kind, rel_pos_bias=seed != 3)
    x = torch.randn(rng.randint(2, 3), *grid, m.dim, requires_grad=True)
    out, want = m(x), dense_multi_axis(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    tensors = [x] + list(m.parameters())
    for name, a, b in zip(names, _grads(out, g, tensors), _grads(want, g, tensors)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda s: f"d{name}: {s}")


def test_grid_attention_bias_counts_offsets_in_partition_coordinates():
    # 6x6 grid, P = 3: stride 2, token (i, j) sits at (i // 2, j // 2) of its partition.
    # Zero q and k, v = x = one-hot of that position: the output of a query is its weights.
    m = MultiAxisAttention(9, 1, 3, "grid")
    assert m.pattern((6, 6)) == Grid((6, 6), 3) and MultiAxisAttention(9, 1, 3).pattern((6, 6)) == Window((6, 6), 3)
    table = torch.randn(25, 1) * 2
    with torch.no_grad():
        m.qkv.weight.zero_()
        m.qkv.bias.zero_()
        m.qkv.weight[18:27] = torch.eye(9)
        m.proj.weight.copy_(torch.eye(9))
        m.proj.bias.zero_()
        m.relative_position_bias_table.copy_(table)
    x = torch.zeros(1, 6, 6, 9)
    for i, j in itertools.product(range(6), range(6)):
        x[0, i, j, (i // 2) * 3 + j // 2] = 1.0
    out = m(x)[0]
    for i, j in [(0, 0), (3, 4), (5, 5)]:
        want = torch.softmax(table[rel_index((3, 3))[(i // 2) * 3 + j // 2], 0], 0)
        torch.testing.assert_close(out[i, j], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["block", "grid"])
def test_bfloat16_loosely(kind):
    m32, grid = _random_attention(random.Random(5), kind)
    m = MultiAxisAttention(m32.dim, m32.num_heads, m32.partition_size, kind, qkv_bias=m32.qkv.bias is not None)
    m.load_state_dict(m32.state_dict())
    m = m.bfloat16()
    with torch.no_grad():
        for p32, p16 in zip(m32.parameters(), m.parameters()):
            p32.copy_(p16.float())
    x = torch.randn(2, *grid, m.dim, dtype=torch.bfloat16, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    out, want = m(x), dense_multi_axis(m32, x32)
    assert out.dtype == torch.bfloat16

    def rel(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm().clamp(min=1e-6))

    assert rel(out, want) < 2e-2
    g = torch.randn_like(want)
    ours = _grads(out, g.bfloat16(), [x] + list(m.parameters()))
    theirs = _grads(want, g, [x32] + list(m32.parameters()))
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and rel(a, b) < 5e-2


# -- the block -----------------------------------------------------------------------
def _bn(mod, t):
    return F.batch_norm(t, None, None, mod.weight, mod.bias, True, 0.0, mod.eps)  # batch statistics (training)


def dense_block(blk, x):
    """MBConv -> (block attention, MLP) -> (grid attention, MLP), pre-norm residuals, from the paper."""
    c = blk.conv
    y = x.permute(0, 3, 1, 2)
    z = F.conv2d(_bn(c.pre_norm, y), c.conv1_1x1.weight)
    z = F.gelu(_bn(c.norm1, z))
    z = F.gelu(_bn(c.norm2, F.conv2d(z, c.conv2_kxk.weight, padding=1, groups=z.shape[1])))
    s = F.silu(F.conv2d(z.mean((2, 3), keepdim=True), c.se.fc1.weight, c.se.fc1.bias))
    z = z * torch.sigmoid(F.conv2d(s, c.se.fc2.weight, c.se.fc2.bias))
    y = y + F.conv2d(z, c.conv3_1x1.weight, c.conv3_1x1.bias)
    x = y.permute(0, 2, 3, 1)
    for stage in (blk.attn_block, blk.attn_grid):
        ln1, ln2 = stage.norm1, stage.norm2
        x = x + dense_multi_axis(stage.attn, F.layer_norm(x, (x.shape[-1],), ln1.weight, ln1.bias, ln1.eps))
        hnorm = F.layer_norm(x, (x.shape[-1],), ln2.weight, ln2.bias, ln2.eps)
        fc1, fc2 = stage.mlp.fc1, stage.mlp.fc2
        x = x + F.linear(F.gelu(F.linear(hnorm, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    return x


def test_block_matches_dense_maxvit_forward_and_backward():
    torch.manual_seed(1)
    blk = MaxViTBlock(16, 2, partition_size=(2, 3), expand_ratio=2, mlp_ratio=2).train()
    with torch.no_grad():
        for stage in (blk.attn_block, blk.attn_grid):
            stage.attn.relative_position_bias_table.normal_()
    blk.double()  # MBConv, two attentions and MLPs deep: float64 (tests/precision.py)
    x = torch.randn(2, 4, 6, 16, dtype=torch.float64, requires_grad=True)
    out, want = blk(x), dense_block(blk, x)
    assert_close64(out, want)
    g = torch.randn_like(out)
    names = ["x"] + [n for n, _ in blk.named_parameters()]
    tensors = [x] + list(blk.parameters())
    for name, a, b in zip(names, _grads(out, g, tensors), _grads(want, g, tensors)):
        assert_close64(a, b, msg=lambda s: f"d{name}: {s}")


def test_block_trains():
    torch.manual_seed(0)
    blk = MaxViTBlock(16, 2, partition_size=2, expand_ratio=2, mlp_ratio=2)
    x, target = torch.randn(4, 4, 4, 16), torch.randn(4, 4, 4, 16)
    opt = torch.optim.Adam(blk.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(blk(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_block_under_torch_compile():
    torch.manual_seed(0)
    blk = MaxViTBlock(8, 2, partition_size=2, expand_ratio=2, mlp_ratio=2).eval()
    x = torch.randn(2, 4, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(blk, backend="eager")(x), blk(x), atol=1e-5, rtol=1e-5)
    assert blk.pattern((4, 4)) == Window((4, 4), 2) | Grid((4, 4), 2)


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: MultiAxisAttention(8, 2, 2, kind="axial"), ValueError, r"kind must be one of .*, got 'axial'"),
        (lambda: MultiAxisAttention(10, 4), ValueError, "dim must be divisible by num_heads, got 10 and 4"),
        (lambda: MultiAxisAttention(8, 2, 0), ValueError, "partition_size must be >= 1, got 0"),
        (lambda: MultiAxisAttention(8, 2, attn_drop=0.5), ValueError, "attn_drop must be 0.0"),
        (lambda: MaxViTBlock(8, 2, mlp_ratio=0), ValueError, "mlp_ratio must be > 0.0, got 0"),
        (lambda: MaxViTBlock(8, 2, drop_path=1.0), ValueError, r"drop_path must be in \[0, 1\), got 1.0"),
        (lambda: MaxViTBlock(8, 2, expand_ratio="4"), TypeError, "expand_ratio must be a number, got '4'"),
    ],
)
def test_bad_arguments(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_bad_inputs():
    m = MultiAxisAttention(8, 2, 3, "grid")
    with pytest.raises(ValueError, match=r"grid\[1\]=8 is not divisible by partition_size\[1\]=3"):
        m(torch.randn(1, 6, 8, 8))
    with pytest.raises(ValueError, match="x has 4 channels but dim is 8"):
        m(torch.randn(1, 6, 6, 4))
    blk = MaxViTBlock(8, 2, 2)
    with pytest.raises(ValueError, match=r"expects \(batch, H, W, dim\), got shape \(4, 4, 8\)"):
        blk(torch.randn(4, 4, 8))
    with pytest.raises(ValueError, match=r"grid\[0\]=5 is not divisible by partition_size\[0\]=2"):
        blk(torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match=r"MBConv expects \(batch, dim=8, H, W\), got \(1, 4, 4, 8\)"):
        MBConv(8)(torch.randn(1, 4, 4, 8))
