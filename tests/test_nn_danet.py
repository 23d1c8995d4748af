"""DANet PAM / CAM against dense implementations written from the paper (channels-first bmm form)."""

import random

import pytest
import torch

from foveal.nn.danet import ChannelAffinityAttention, PositionAttention
from foveal.patterns import Full


def _conv1x1(xc, conv):
    """1×1 conv on (B, C, N) by a sum over input channels."""
    w = conv.weight[:, :, 0, 0]
    return (w[None, :, :, None] * xc[:, None, :, :]).sum(2) + conv.bias[None, :, None]


def dense_pam(m, x):
    """PAM as in the paper: S = softmax(Bᵀ C) over positions, E = α · D Sᵀ + A, on (B, C, N)."""
    b, *grid, c = x.shape
    xc = x.reshape(b, -1, c).transpose(1, 2)
    q, k, v = _conv1x1(xc, m.query_conv), _conv1x1(xc, m.key_conv), _conv1x1(xc, m.value_conv)
    energy = torch.bmm(q.transpose(1, 2), k)  # (B, N, N), no scaling
    attn = torch.softmax(energy, dim=-1)
    out = torch.bmm(v, attn.transpose(1, 2))  # (B, C, N)
    return (m.gamma * out + xc).transpose(1, 2).reshape(x.shape)


def dense_cam(m, x):
    """CAM as in DANet: E = A Aᵀ, softmax(max − E) over channels, β · (X A) + A, on (B, C, N)."""
    b, *grid, c = x.shape
    xc = x.reshape(b, -1, c).transpose(1, 2)
    energy = torch.bmm(xc, xc.transpose(1, 2))
    energy = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    out = torch.bmm(torch.softmax(energy, dim=-1), xc)
    return (m.gamma * out + xc).transpose(1, 2).reshape(x.shape)


def _check_grads(out, want, params, tol):
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("seed", range(3))
def test_pam_matches_dense_forward_and_backward(seed):
    rng = random.Random(seed)
    dim = rng.choice([8, 16, 24])
    grid = tuple(rng.randint(2, 7) for _ in range(rng.choice([1, 2, 2, 3])))
    m = PositionAttention(dim, reduction=rng.choice([4, 8]))
    with torch.no_grad():
        m.gamma.fill_(rng.uniform(0.5, 1.5))
    x = (0.5 * torch.randn(2, *grid, dim)).requires_grad_()
    out, want = m(x), dense_pam(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    _check_grads(out, want, [x] + list(m.parameters()), 1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_cam_matches_dense_forward_and_backward(seed):
    rng = random.Random(seed + 10)
    dim = rng.randint(3, 20)
    grid = tuple(rng.randint(2, 7) for _ in range(rng.choice([1, 2, 3])))
    m = ChannelAffinityAttention(dim)
    with torch.no_grad():
        m.gamma.fill_(rng.uniform(0.5, 1.5))
    x = (0.3 * torch.randn(2, *grid, dim)).requires_grad_()
    out, want = m(x), dense_cam(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    _check_grads(out, want, [x, m.gamma], 1e-4)


def test_gamma_starts_at_zero_and_bfloat16():
    pam, cam = PositionAttention(16), ChannelAffinityAttention(16)
    x = 0.3 * torch.randn(2, 4, 5, 16)
    assert torch.equal(pam(x), x) and torch.equal(cam(x), x)
    with torch.no_grad():
        pam.gamma.fill_(1.0)
        cam.gamma.fill_(1.0)
    for m, ref in ((pam, dense_pam), (cam, dense_cam)):
        want = ref(m, x)
        out = m.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, atol=6e-2, rtol=5e-2)


def test_pattern_compile_and_errors():
    m = PositionAttention(16)
    assert m.pattern((4, 5)) == Full((4, 5)) and m.pattern((4, 5)) is m.pattern([4, 5])  # cached with its plan
    cam = ChannelAffinityAttention(16)
    with torch.no_grad():
        cam.gamma.fill_(1.0)
    x = torch.randn(2, 4, 5, 16)
    torch.testing.assert_close(torch.compile(cam, backend="eager")(x), cam(x))
    with torch.no_grad():
        m.gamma.fill_(1.0)
    torch.testing.assert_close(torch.compile(m, backend="eager")(x), m(x))  # attend: one opaque call
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'fast'"):
        PositionAttention(16, backend="fast")
    with pytest.raises(ValueError, match="dim // reduction must be >= 1, got dim=4 and reduction=8"):
        PositionAttention(4)
    with pytest.raises(ValueError, match="x has 8 channels but dim is 16"):
        m(torch.randn(1, 4, 5, 8))
    with pytest.raises(ValueError, match=r"at least one grid axis, got shape \(16,\)"):
        ChannelAffinityAttention(16)(torch.randn(16))
    with pytest.raises(TypeError, match="dim must be an int"):
        ChannelAffinityAttention("16")


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_pam_bfloat16_forward_and_backward_against_dense():
    """bf16 module against the float32 dense reference on the same (rounded) weights and input."""
    torch.manual_seed(3)
    mb = PositionAttention(16, reduction=4).to(torch.bfloat16)
    m = PositionAttention(16, reduction=4)
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    with torch.no_grad():
        mb.gamma.fill_(1.0)
        m.gamma.fill_(1.0)
    xb = torch.randn(2, 4, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    x = xb.detach().float().requires_grad_()
    out, want = mb(xb), dense_pam(m, x)
    assert out.dtype == torch.bfloat16 and _rel(out, want) < 0.02
    g = torch.randn(want.shape)
    # key_conv.bias: exact gradient zero (it shifts all scores of a query alike), computed values are noise
    pb, p = ([t for n, t in mod.named_parameters() if n != "key_conv.bias"] for mod in (mb, m))
    ours = torch.autograd.grad(out, [xb] + pb, g.bfloat16())
    theirs = torch.autograd.grad(want, [x] + p, g)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 0.05
