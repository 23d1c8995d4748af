"""WindowAttention against an independent Swin implementation: roll, window_partition, region mask, table, reverse."""

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from foveal.nn.window import WindowAttention
from foveal.patterns.local import Window


def _partition(x, window):
    """(B, *grid, C) -> (B·num_windows, prod(window), C), windows in row-major order (Swin's window_partition)."""
    b, *grid, c = x.shape
    nd = len(grid)
    x = x.reshape(b, *[v for g, w in zip(grid, window) for v in (g // w, w)], c)
    perm = [0] + [1 + 2 * a for a in range(nd)] + [2 + 2 * a for a in range(nd)] + [2 * nd + 1]
    return x.permute(perm).reshape(-1, math.prod(window), c)


def _reverse(windows, window, grid):
    """Inverse of ``_partition`` (Swin's window_reverse)."""
    nd = len(grid)
    c = windows.shape[-1]
    counts = [g // w for g, w in zip(grid, window)]
    x = windows.reshape(-1, *counts, *window, c)
    perm = [0] + [v for a in range(nd) for v in (1 + a, 1 + nd + a)] + [2 * nd + 1]
    return x.permute(perm).reshape(-1, *grid, c)


def _swin_index(window):
    """Swin's relative_position_index: row-major over (q − k + w − 1) per axis."""
    coords = torch.tensor(list(itertools.product(*[range(w) for w in window])))  # (N, nd)
    rel = coords[:, None, :] - coords[None, :, :] + torch.tensor(window) - 1
    index = torch.zeros(rel.shape[:2], dtype=torch.int64)
    for a, w in enumerate(window):
        index = index * (2 * w - 1) + rel[..., a]
    return index


def _region_mask(grid, window, shift):
    """Swin's attention mask for SW-MSA: (num_windows, N, N) with 0 / -100."""
    img = torch.zeros(1, *grid, 1)
    cnt = 0
    for sl in itertools.product(*[(slice(0, -w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]):
        img[(slice(None), *sl, slice(None))] = cnt
        cnt += 1
    mw = _partition(img, window)[..., 0]  # (nW, N)
    diff = mw[:, None, :] - mw[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def swin_reference(m, x):
    """Swin's (shifted) window attention, written as the paper's code does it."""
    b, *grid, c = x.shape
    nd, window, shift = len(grid), m.window_size, m.shift_size
    h, hd = m.num_heads, c // m.num_heads
    dims = tuple(range(1, nd + 1))
    xs = torch.roll(x, shifts=tuple(-s for s in shift), dims=dims) if any(shift) else x
    win = _partition(xs, window)  # (B·nW, N, C)
    bw, n, _ = win.shape
    q, k, v = F.linear(win, m.qkv.weight, m.qkv.bias).reshape(bw, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    attn = (q * m.scale) @ k.transpose(-2, -1)  # (B·nW, h, N, N)
    if m.relative_position_bias_table is not None:
        rpb = m.relative_position_bias_table[_swin_index(window).view(-1)].view(n, n, h).permute(2, 0, 1)
        attn = attn + rpb[None]
    if any(shift):
        mask = _region_mask(grid, window, shift).to(attn.dtype)
        nw = mask.shape[0]
        attn = (attn.view(bw // nw, nw, h, n, n) + mask[None, :, None]).view(bw, h, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
    out = F.linear(out, m.proj.weight, m.proj.bias)
    out = _reverse(out, window, grid)
    return torch.roll(out, shifts=shift, dims=dims) if any(shift) else out


def _random_module(rng, nd, dtype=torch.float32, **kwargs):
    max_w, max_m = {1: (6, 4), 2: (4, 3), 3: (3, 2)}[nd]
    window = tuple(rng.randint(2, max_w) for _ in range(nd))
    grid = tuple(w * rng.randint(1, max_m) for w in window)
    shift = tuple(rng.randrange(w) for w in window) if rng.random() < 0.75 else 0
    heads = rng.choice([1, 2, 3])
    dim = heads * rng.choice([4, 8])
    m = WindowAttention(dim, heads, window_size=window, shift_size=shift, qkv_bias=rng.random() < 0.8, **kwargs)
    if m.relative_position_bias_table is not None:
        with torch.no_grad():
            m.relative_position_bias_table.normal_()  # large enough to matter
    return m.to(dtype), grid


def _grads(out, g, tensors):
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("nd, seed", [(2, s) for s in range(6)] + [(1, 0), (1, 1), (3, 0), (3, 1)])
def test_matches_swin_forward_and_backward(nd, seed):
    rng = random.Random(seed + 10 * nd)
    m, grid = _random_module(rng, nd, rel_pos_bias=seed != 1)
    x = torch.randn(rng.randint(2, 3), *grid, m.dim, requires_grad=True)
    out, want = m(x), swin_reference(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    tensors = [x] + list(m.parameters())
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, _grads(out, g, tensors), _grads(want, g, tensors)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda s: f"d{name}: {s}")


def test_reference_backend_and_auto_agree():
    rng = random.Random(7)
    m, grid = _random_module(rng, 2)
    x = torch.randn(2, *grid, m.dim)
    ref = WindowAttention(
        m.dim, m.num_heads, m.window_size, m.shift_size, qkv_bias=m.qkv.bias is not None, backend="reference"
    )
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)


def _rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-6))


def test_bfloat16_loosely():
    m, grid = WindowAttention(16, 2, window_size=(4, 2), shift_size=(2, 1)).bfloat16(), (8, 6)
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(2, *grid, m.dim, dtype=torch.bfloat16, requires_grad=True)
    m32 = WindowAttention(m.dim, m.num_heads, m.window_size, m.shift_size)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    x32 = x.detach().float().requires_grad_()
    out, want = m(x), swin_reference(m32, x32)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, want) < 2e-2
    g = torch.randn_like(want)
    ours = _grads(out, g.bfloat16(), [x] + list(m.parameters()))
    theirs = _grads(want, g, [x32] + list(m32.parameters()))
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and _rel_err(a, b) < 5e-2


def test_timm_state_dict_loads():
    # timm's WindowAttention state dict: qkv, proj, the table and (in older timm) the index buffer.
    # Weights at trained-layer scale (fan-in std), so scores are O(1) as in a real checkpoint: with
    # std-1 weights scores reach ~100 and Swin's -100 region mask stops being negligible against
    # exact exclusion (it is then a different function). Run in float64 with a tight tolerance.
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    m = WindowAttention(16, 2, window_size=4, shift_size=2).double()
    sd = {
        "qkv.weight": rand(48, 16, std=16**-0.5),
        "qkv.bias": rand(48, std=0.1),
        "proj.weight": rand(16, 16, std=16**-0.5),
        "proj.bias": rand(16, std=0.1),
        "relative_position_bias_table": rand(49, 2, std=1.0),
        "relative_position_index": _swin_index((4, 4)),
    }
    m.load_state_dict(sd)  # strict
    assert set(m.state_dict()) == set(sd) - {"relative_position_index"}
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k])
    x = rand(2, 8, 8, 16, std=1.0)
    torch.testing.assert_close(m(x), swin_reference(m, x), atol=1e-12, rtol=1e-12)


def test_pattern_and_shift_zero_is_plain_windows():
    m = WindowAttention(8, 2, window_size=(2, 4), shift_size=(1, 2))
    assert m.pattern((4, 8)) == Window((4, 8), (2, 4), shift=(1, 2))
    assert WindowAttention(8, 2, 4).pattern((8, 8)) == Window((8, 8), 4)


def test_torch_compile_eager_backend():
    m = WindowAttention(8, 2, window_size=2, shift_size=1)
    x = torch.randn(2, 4, 4, 8)
    torch.testing.assert_close(torch.compile(m, backend="eager")(x), m(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: WindowAttention(10, 4), ValueError, "dim must be divisible by num_heads, got 10 and 4"),
        (lambda: WindowAttention(8, 2, 4, shift_size=4), ValueError, r"shift_size\[0\]=4 is not < window_size\[0\]=4"),
        (lambda: WindowAttention(8, 2, 4, attn_drop=0.1), ValueError, "attn_drop must be 0.0 .*got 0.1"),
        (lambda: WindowAttention(8, 2, (2, 2, 2, 2)), ValueError, r"window_size must be an int .* got \(2, 2, 2, 2\)"),
        (lambda: WindowAttention(8, 2, 4, backend="fast"), ValueError, "backend must be 'auto' or one of .*got 'fast'"),
        (lambda: WindowAttention(8, 2, 2.5), TypeError,
         "window_size must be an int or a tuple of 1 to 3 ints, got 2.5"),
    ],
)
def test_bad_arguments(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_bad_inputs():
    m = WindowAttention(8, 2, 4)
    with pytest.raises(ValueError, match=r"expects \(batch, 2 grid axes, dim\), got shape \(8, 8, 8\)"):
        m(torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match="x has 6 channels but dim is 8"):
        m(torch.randn(1, 8, 8, 6))
    with pytest.raises(ValueError, match=r"grid\[1\]=6 is not divisible by window\[1\]=4"):
        m(torch.randn(1, 8, 6, 8))
