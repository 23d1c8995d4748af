"""VaryingWindowAttention (VWFormer) against a dense implementation written from the paper's description."""

import pytest
import torch
import torch.nn.functional as F

from foveal.nn.vwformer import VaryingWindowAttention
from foveal.patterns import Window
from precision import assert_close64


def _bn(x, norm):
    """Training-mode batch norm of a channels-first tensor with the module's affine parameters (none: identity)."""
    if isinstance(norm, torch.nn.Identity):
        return x
    bn = norm.layer
    return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)


def _csp(ctx, r, n, p, dim):
    """Copy-shift padding on one axis of a channels-first map, by concatenation (the paper's form)."""
    length = ctx.shape[dim]
    a = (r + 1) * p // 2
    if r > n:  # the context window is longer than the axis: zero-pad it to r·p first, centred
        extra = r * p - length
        pad = [0, 0, 0, 0]
        pad[2 * (3 - dim)] = extra // 2
        pad[2 * (3 - dim) + 1] = extra - extra // 2
        padded = F.pad(ctx, pad)
        middle = padded.narrow(dim, extra // 2, length)
    else:
        padded, middle = ctx, ctx
    size = padded.shape[dim]
    left = padded.narrow(dim, a, r * p - a)
    right = padded.narrow(dim, size - r * p, r * p - a)
    return torch.cat([left, middle, right], dim)


def dense_branch(br, x, nh, nw):
    """One VWA ratio, channels first: DOPE, CSP, per-window context crops folded, softmax attention."""
    b, c, h, w = x.shape
    r, heads = br.ratio, br.num_heads
    ph, pw = h // nh, w // nw
    lo, hi = (r // 2 - 1, r // 2) if r % 2 == 0 else (r // 2, r // 2)
    ctx = F.conv2d(F.pad(x, (lo, hi, lo, hi)), br.dope.weight, br.dope.bias)
    ctx = F.relu(_bn(ctx, br.dope_norm))
    ctx = _csp(_csp(ctx, r, nw, pw, 3), r, nh, ph, 2)
    out = torch.zeros(b, c, h, w, dtype=x.dtype)
    lin = lambda t, layer: torch.einsum("bchw,oc->bohw", t, layer.weight) + layer.bias[:, None, None]
    q_all = lin(x, br.theta)
    for i in range(nh):
        for j in range(nw):
            crop = ctx[:, :, i * ph : i * ph + r * ph, j * pw : j * pw + r * pw]  # (B, c/r², r·ph, r·pw)
            # fold each r×r sub-block into channels, ordered (row, column, channel)
            folded = crop.reshape(b, -1, ph, r, pw, r).permute(0, 3, 5, 1, 2, 4).reshape(b, c, ph * pw)
            k = torch.einsum("bcn,oc->bon", folded, br.phi.weight) + br.phi.bias[:, None]
            v = torch.einsum("bcn,oc->bon", folded, br.g.weight) + br.g.bias[:, None]
            q = q_all[:, :, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].reshape(b, c, ph * pw)
            d = c // heads
            q, k, v = (t.reshape(b, heads, d, ph * pw) for t in (q, k, v))
            attn = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) / d**0.5, -1)
            y = torch.einsum("bhnm,bhdm->bhdn", attn, v).reshape(b, c, ph, pw)
            out[:, :, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw] = y
    out = torch.einsum("bchw,oc->bohw", out, br.conv_out.weight)
    if br.conv_out.bias is not None:
        out = out + br.conv_out.bias[:, None, None]
    return _bn(out, br.out_norm)


def dense_vwformer(m, x):
    xc = x.permute(0, 3, 1, 2)
    b, c, h, w = xc.shape
    ph, pw = m.window((h, w))
    nh, nw = h // ph, w // pw

    def cna(t, seq):  # 1×1 conv + BN + ReLU
        t = torch.einsum("bchw,oc->bohw", t, seq[0].weight)
        if seq[0].bias is not None:
            t = t + seq[0].bias[:, None, None]
        return F.relu(_bn(t, seq[1]))

    outs = [cna(xc, m.short_path), cna(xc.mean((2, 3), keepdim=True), m.image_pool).expand(b, c, h, w)]
    for br in m.branches:
        y = dense_branch(br, xc, nh, nw)
        outs.append(y + xc if m.short_cut else y)
    return cna(torch.cat(outs, 1), m.fuse).permute(0, 2, 3, 1)


CASES = [  # grid, dim, heads, window_size, ratios, num_windows, short_cut
    ((8, 8), 64, 2, None, (2, 4, 8), 4, False),  # a fixed set of windows (the paper: 8×8); ratio 8 > 4 windows
    ((12, 8), 16, 2, (3, 2), (2, 4), 8, True),  # fixed windows, uneven window sides
    ((6, 9), 36, 3, 3, (3, 2), 8, False),  # odd ratio, 2×3 windows
    ((4, 8), 16, 1, (2, 4), (4,), 8, False),  # ratio larger than the number of windows: zero padding first
]


@pytest.mark.parametrize("case", CASES)
def test_matches_dense_forward_and_backward(case):
    grid, dim, heads, ws, ratios, nwin, sc = case
    torch.manual_seed(sum(grid) + dim)
    m = VaryingWindowAttention(dim, heads, window_size=ws, ratios=ratios, num_windows=nwin, short_cut=sc)
    with torch.no_grad():  # make the norms' affine parameters matter
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_()
    # float64: three window attentions, convs and batch norms deep (tests/precision.py)
    m.double()
    x = torch.randn(2, *grid, dim, dtype=torch.float64, requires_grad=True)
    out, want = m(x), dense_vwformer(m, x)
    assert_close64(out, want)
    g = torch.randn_like(out)
    # exact gradient zero, computed values are rounding noise: a key bias shifts every score of a query
    # alike; a value bias adds a constant per channel that the output batch norm removes
    zero = ("phi.bias", "g.bias")
    names, params = zip(*[("x", x)] + [(n, p) for n, p in m.named_parameters() if not n.endswith(zero)])
    for name, a, b in zip(names, torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        assert_close64(a, b, msg=name)


def test_bfloat16_compile_and_pattern():
    m = VaryingWindowAttention(16, 2, window_size=2, ratios=(2, 4))
    x = torch.randn(2, 4, 6, 16)
    want = dense_vwformer(m, x)
    torch.testing.assert_close(torch.compile(m, backend="eager")(x), want, atol=1e-5, rtol=1e-5)
    mb = VaryingWindowAttention(16, 2, window_size=2, ratios=(2, 4)).to(torch.bfloat16)
    mb.load_state_dict(m.state_dict())
    out = mb(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.15, rtol=0.1)
    assert m.pattern((4, 6)) == Window((4, 6), 2)


def test_errors():
    with pytest.raises(ValueError, match="dim must be divisible by R² for every ratio R, got dim=32 and ratio 8"):
        VaryingWindowAttention(32, 2)
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 64 and 3"):
        VaryingWindowAttention(64, 3)
    with pytest.raises(TypeError, match=r"ratios\[1\] must be an int"):
        VaryingWindowAttention(64, 2, ratios=(2, 2.5))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'fast'"):
        VaryingWindowAttention(64, 2, backend="fast")
    m = VaryingWindowAttention(64, 2)
    with pytest.raises(ValueError, match=r"divisible by num_windows=8 on both axes, got grid \(8, 12\)"):
        m(torch.randn(2, 8, 12, 64))
    with pytest.raises(ValueError, match="x has 32 channels but dim is 64"):
        m(torch.randn(2, 8, 8, 32))
    with pytest.raises(ValueError, match=r"window_size \(3, 3\) must divide the grid, got grid \(8, 8\)"):
        VaryingWindowAttention(64, 2, window_size=3)(torch.randn(2, 8, 8, 64))


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_vwformer_bfloat16_forward_and_backward_against_dense():
    """bf16 module against the float32 dense reference on the same (rounded) weights and input.

    Without batch norms: in training mode over a few pixels they amplify bf16 rounding in the gradients
    (the pooled path normalises two values) far beyond what the attention does.
    """
    torch.manual_seed(3)
    mb = VaryingWindowAttention(16, 2, window_size=2, ratios=(2, 4), norm_layer=None).to(torch.bfloat16)
    m = VaryingWindowAttention(16, 2, window_size=2, ratios=(2, 4), norm_layer=None)
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    xb = torch.randn(2, 4, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    x = xb.detach().float().requires_grad_()
    out, want = mb(xb), dense_vwformer(m, x)
    assert out.dtype == torch.bfloat16 and _rel(out, want) < 0.02
    g = torch.randn(want.shape)
    zero = ("branches.0.phi.bias", "branches.1.phi.bias")  # exact gradient zero: both sides are rounding noise
    pb, p = ([t for n, t in mod.named_parameters() if n not in zero] for mod in (mb, m))
    ours = torch.autograd.grad(out, [xb] + pb, g.bfloat16())
    theirs = torch.autograd.grad(want, [x] + p, g)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 0.05
