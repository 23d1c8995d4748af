"""NeighborhoodAttention{1,2,3}D: NATTEN checkpoints load and agree; training matches a dense implementation."""

import itertools
import math
import random
import warnings

import pytest
import torch

import bruteforce as bf
import natten
from foveal.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

OURS = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}
THEIRS = {1: natten.NeighborhoodAttention1D, 2: natten.NeighborhoodAttention2D, 3: natten.NeighborhoodAttention3D}


def _case(rng, nd):
    shape = tuple(rng.randint(3, {1: 30, 2: 9, 3: 6}[nd]) for _ in range(nd))
    k = tuple(rng.randint(2, s) for s in shape)
    d = tuple(rng.randint(1, s // kk) for s, kk in zip(shape, k))
    st = tuple(rng.randint(1, kk) for kk in k)
    c = tuple(rng.random() < 0.3 for _ in shape)
    return shape, dict(kernel_size=k, dilation=d, stride=st, is_causal=c)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_natten_checkpoint_loads_and_gives_the_same_output(nd, seed):
    rng = random.Random(seed * 3 + nd)
    shape, kwargs = _case(rng, nd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = THEIRS[nd](32, 4, **kwargs).eval()
        ours = OURS[nd](32, 4, **kwargs).eval()
        ours.load_state_dict(theirs.state_dict())  # strict: same keys and shapes
        x = torch.randn(2, *shape, 32)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def dense_reference(module, x, mask, rpb_index=None):
    """The module's computation written densely: qkv, masked softmax attention (+ table), proj."""
    b, *grid, c = x.shape
    n, h = math.prod(grid), module.num_heads
    qkv = torch.nn.functional.linear(x.reshape(b, n, c), module.qkv.weight, module.qkv.bias)
    q, k, v = qkv.reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) * module.scale
    if rpb_index is not None:
        s = s + module.rpb.reshape(h, -1)[:, rpb_index]
    s = s.masked_fill(~mask, float("-inf"))
    out = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, c)
    return torch.nn.functional.linear(out, module.proj.weight, module.proj.bias).reshape(b, *grid, c)


def _rpb_index(shape, kernel, dilation):
    """Flat table index of every (query, key) pair, by loops: offsets in dilated steps, clamped."""
    coords = list(itertools.product(*[range(s) for s in shape]))
    sizes = [2 * k - 1 for k in kernel]
    index = torch.zeros(len(coords), len(coords), dtype=torch.int64)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            flat = 0
            for a in range(len(shape)):
                off = max(-(kernel[a] - 1), min(kernel[a] - 1, (kc[a] - qc[a]) // dilation[a]))
                flat = flat * sizes[a] + off + kernel[a] - 1
            index[i, j] = flat
    return index


@pytest.mark.parametrize("rel_pos_bias", [False, True])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_training_matches_dense_implementation(nd, rel_pos_bias):
    rng = random.Random(nd + 10 * rel_pos_bias)
    shape, kwargs = _case(rng, nd)
    module = OURS[nd](24, 3, rel_pos_bias=rel_pos_bias, **kwargs)
    x = torch.randn(2, *shape, 24, requires_grad=True)
    mask = bf.neighborhood(shape, kwargs["kernel_size"], kwargs["dilation"], kwargs["stride"], kwargs["is_causal"])
    index = _rpb_index(shape, kwargs["kernel_size"], kwargs["dilation"]) if rel_pos_bias else None
    out, want = module(x), dense_reference(module, x, mask, index)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [x] + list(module.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bfloat16_and_errors():
    m = NeighborhoodAttention2D(16, 2, 3, rel_pos_bias=True).to(torch.bfloat16)
    x = torch.randn(1, 6, 7, 16, dtype=torch.bfloat16)
    assert m(x).dtype == torch.bfloat16 and torch.isfinite(m(x).float()).all()
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads, got 10 and 4"):
        NeighborhoodAttention2D(10, 4, 3)
    with pytest.raises(ValueError, match=r"expects \(batch, 2 grid axes, embed_dim\), got shape \(6, 7, 16\)"):
        m(x[0])
    with pytest.raises(ValueError, match="x has 8 channels but embed_dim is 16"):
        m(torch.randn(1, 6, 7, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"kernel_size\[0\]=7 > grid\[0\]=6"):
        NeighborhoodAttention2D(16, 2, 7)(torch.randn(1, 6, 7, 16))
