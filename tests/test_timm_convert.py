"""``foveal.integrations.timm.convert`` on real timm models: same logits, more resolutions, swappable patterns.

Models are built by ``timm.create_model(name, pretrained=False)`` (random weights,
nothing downloaded; Swin made narrower through its own kwargs). Each converted model is
compared with the timm model it came from, in eval mode, on the same input, with both in
float64 to 1e-10 of the magnitudes (tests/precision.py: float32 rounding of a deep model
depends on threads and ISA); float32 is checked against the float64 truth, bounded by timm's
own float32 rounding.
"""

import copy
import math

import pytest
import torch

timm = pytest.importorskip("timm")

from foveal.integrations.timm import convert, converted_modules, own_pattern, swap_pattern  # noqa: E402
from foveal.nn import HaloAttention, MultiAxisAttention, WindowAttention  # noqa: E402
from foveal.patterns import GlobalTokens, Neighborhood  # noqa: E402
from precision import assert_close64, assert_rounding_like_peer  # noqa: E402

SWIN = ("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)))
MODELS = {
    "swin": (*SWIN, 224),
    "maxvit_rw": ("maxvit_pico_rw_256", {}, 256),
    "maxvit_rmlp": ("maxvit_rmlp_pico_rw_256", {}, 256),
    "maxvit_tf": ("maxvit_tiny_tf_224", {}, 224),
    "halonet": ("halonet26t", {}, 256),
    "focalnet": ("focalnet_tiny_srf", {}, 224),
    "davit": ("davit_tiny", {}, 224),
}
#: what convert must have put in (class names), at least this many
EXPECT = {
    "swin": ("WindowAttention", 8),
    "maxvit_rw": ("MultiAxisAttention", 22),
    "maxvit_rmlp": ("MultiAxisAttention", 22),
    "maxvit_tf": ("MultiAxisAttention", 22),
    "halonet": ("_HaloAttentionNCHW", 3),  # one of them strided
    "focalnet": ("_FocalModulationNCHW", 12),
    "davit": ("_SpatialBlockNCHW", 6),
}


def _build(key, seed=0, **extra):
    """The timm model with every parameter random (weights at fan-in scale, norm and layer scales near 1):
    timm's init makes some residual branches vanish (HaloNet's zeroed last BatchNorm, FocalNet's 0.02-std
    convs), which would hide the attention from the logits."""
    name, kwargs, size = MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs, **extra).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif pname.endswith("weight") or pname.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model, size


def _count(model, cls_name):
    return sum(type(m).__name__ == cls_name for m in model.modules())


def _timm_attention_left(model):
    import timm.layers.halo_attn as halo
    import timm.models.maxxvit as maxxvit
    import timm.models.swin_transformer as swin

    kinds = (swin.WindowAttention, maxxvit.AttentionCl, halo.HaloAttn)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("key", sorted(MODELS))
def test_converted_logits_equal_the_original(key):
    original, size = _build(key)
    state = {k: v.clone() for k, v in original.state_dict().items()}
    model = convert(copy.deepcopy(original))
    cls_name, at_least = EXPECT[key]
    assert _count(model, cls_name) >= at_least
    left = _timm_attention_left(model)
    assert left == [], left
    # every weight kept, under timm's names
    after = model.state_dict()
    assert sorted(after) == sorted(state)
    for k in state:
        torch.testing.assert_close(after[k], state[k], atol=0, rtol=0, msg=k)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)  # one image: float64 convs are slow on CPU
    with torch.no_grad():
        got32, want32 = _features_and_logits(model, x.float()), _features_and_logits(original, x.float())
        got, want = _features_and_logits(model.double(), x), _features_and_logits(original.double(), x)
    for what, a, b in zip(("features", "logits"), got, want):
        assert_close64(a, b, msg=lambda s: f"{what}: {s}")
    # float32 runs too: as far from the float64 truth as timm's own float32 rounding of the same depth
    for what, a, a_peer, truth in zip(("features", "logits"), got32, want32, want):
        assert_rounding_like_peer(a, a_peer, truth, what=what)


def _features_and_logits(model, x):
    feats = model.forward_features(x)
    return feats, model.forward_head(feats)


def test_swin_runs_at_a_resolution_the_original_refuses():
    original, _ = _build("swin")
    model = convert(copy.deepcopy(original))
    x = torch.randn(1, 3, 448, 448)
    with pytest.raises(AssertionError, match="doesn't match model"):
        original(x)
    # timm's own dynamic-mask path (strict_img_size=False) at 448 with the same weights: the same logits
    dynamic, _ = _build("swin", strict_img_size=False)
    dynamic.load_state_dict(original.state_dict())
    with torch.no_grad():
        assert_close64(model.double()(x.double()), dynamic.double()(x.double()))
    # a grid the window does not divide: refused with the reason (swap the pattern to run it)
    with pytest.raises(ValueError, match="grid\\[0\\]=64 is not divisible by window\\[0\\]=7"):
        model(torch.randn(1, 3, 256, 256, dtype=torch.float64))


@pytest.mark.parametrize("stride", [1, 2])
def test_halonet_zero_borders_on_grids_timm_refuses(stride):
    original, _ = _build("halonet")
    model = convert(copy.deepcopy(original))
    # a HaloAttn of the model, alone, on a grid its block (8) does not divide
    name = next(n for n, m in model.named_modules() if isinstance(m, HaloAttention) and m.stride == stride)
    ours, theirs = (copy.deepcopy(m.get_submodule(name)).double() for m in (model, original))
    x = torch.randn(1, theirs.q.in_channels, 12, 20, dtype=torch.float64)
    with pytest.raises(AssertionError):
        theirs(x)
    with torch.no_grad():
        out = ours(x)
        # timm's module on the map zero-padded up to whole blocks, cropped (HaloNet's q and kv have no bias)
        padded = theirs(torch.nn.functional.pad(x, (0, 4, 0, 4)))[..., : 12 // stride, : 20 // stride]
    assert_close64(out, padded)
    # so the whole model runs at 224², whose stage grids (14, 7) the block does not divide
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(AssertionError):
        original(x)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("key", ["davit", "focalnet"])
def test_resolutions_the_original_pads_or_takes(key):
    # DaViT pads to whole windows and FocalNet takes any size: the converted models do the same
    original, _ = _build(key)
    model = convert(copy.deepcopy(original)).double()
    x = torch.randn(1, 3, 256, 192, dtype=torch.float64)
    with torch.no_grad():
        assert_close64(model(x), original.double()(x))


def _dense_window_attention(m, x, pattern):
    """Attention of a foveal WindowAttention written out: pattern.mask, Swin's table at clamped offsets."""
    b, h, w, c = x.shape
    nh, d = m.num_heads, c // m.num_heads
    q, k, v = (x.reshape(b, h * w, c) @ m.qkv.weight.T + m.qkv.bias).reshape(b, h * w, 3, nh, d).permute(2, 0, 3, 1, 4)
    idx = torch.arange(h * w)
    allowed = pattern.mask(idx[:, None], idx[None, :])
    wy, wx = m.window_size
    dy = (idx[:, None] // w - idx[None, :] // w).clamp(-(wy - 1), wy - 1) + wy - 1  # query − key, Swin's rows
    dx = (idx[:, None] % w - idx[None, :] % w).clamp(-(wx - 1), wx - 1) + wx - 1
    bias = m.relative_position_bias_table[dy * (2 * wx - 1) + dx].permute(2, 0, 1)
    s = q @ k.transpose(-1, -2) * m.scale + bias
    out = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    return out.transpose(1, 2).reshape(b, h, w, c) @ m.proj.weight.T + m.proj.bias


def test_swap_pattern_keeps_every_weight_and_changes_only_the_pattern():
    # float64: the modules against attention written out, the whole model against timm (tests/precision.py)
    original, size = _build("swin")
    original.double()
    model = convert(copy.deepcopy(original))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        want = original(x)
    names = swap_pattern(model, lambda name, m, grid: Neighborhood(grid, m.window_size))
    assert len(names) == 8 and all(isinstance(model.get_submodule(n), WindowAttention) for n in names)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        neighbourhood = model(x)
    assert not torch.allclose(neighbourhood, want, atol=1e-4)
    # one module under its new pattern, against attention written out from the pattern's mask
    attn = model.get_submodule(names[2])
    grid = (28, 28)
    assert attn.pattern(grid) == Neighborhood(grid, 7) and own_pattern(attn, grid) != attn.pattern(grid)
    feat = torch.randn(2, *grid, attn.dim, dtype=torch.float64)
    assert_close64(attn(feat), _dense_window_attention(attn, feat, Neighborhood(grid, 7)))
    # a neighbourhood takes any grid: the model now runs at a resolution whose grids 7 does not divide
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 256, 256, dtype=torch.float64))).all()
    # windows + 4 global tokens, then back to the model's own windows
    swap_pattern(model, lambda name, m, grid: own_pattern(m, grid) | GlobalTokens(math.prod(grid), 4))
    feat = torch.randn(1, *grid, attn.dim, dtype=torch.float64)
    union = own_pattern(attn, grid) | GlobalTokens(math.prod(grid), 4)
    assert_close64(attn(feat), _dense_window_attention(attn, feat, union))
    swap_pattern(model, None)
    with torch.no_grad():
        assert_close64(model(x), want)


def test_maxvit_with_sliding_windows_runs_where_timm_refuses():
    # MaxViT needs the partition (8) to divide every stage grid: at 288² the stage grids are 72, 36, 18, 9
    original, _ = _build("maxvit_rw")
    x = torch.randn(1, 3, 288, 288)
    with pytest.raises(Exception):
        original(x)

    def sliding(name, m, grid):  # block: a P×P neighbourhood; grid: the dilated neighbourhood of the same keys
        p = m.partition_size
        if m.kind == "block":
            return Neighborhood(grid, p)
        return Neighborhood(grid, p, dilation=tuple(max(1, g // s) for g, s in zip(grid, p)))

    model = convert(copy.deepcopy(original), pattern=sliding)
    assert sum(isinstance(m, MultiAxisAttention) for m in model.modules()) == 22
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert("swin")
    resnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="convert found no attention it knows"):
        convert(resnet)
    with pytest.raises(ValueError, match="swap_pattern found no foveal attention"):
        swap_pattern(resnet, lambda *a: None)
    model = convert(_build("swin")[0])
    with pytest.raises(TypeError, match="fn must be a callable"):
        swap_pattern(model, 3)
    swap_pattern(model, lambda name, m, grid: Neighborhood((5, 5), 3))
    with pytest.raises(ValueError, match="pattern_override must return a self-attention pattern over the grid"):
        model(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        convert(_build("swin")[0], backend="fast")
    assert converted_modules(model)  # convert is idempotent: a second call finds its own modules
    assert convert(model) is model


def test_timm_speed_suite_writes_its_report(tmp_path, monkeypatch):
    # `foveal bench speed --suite timm` with a tiny Swin in place of its models: rows, ratios, equal logits
    from foveal.bench import timm as timm_speed

    tiny = dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), strict_img_size=False)
    monkeypatch.setattr(timm_speed, "TIMM_MODELS", {"swin_tiny_patch4_window7_224": (tiny, 64)})
    monkeypatch.setitem(timm_speed.TIMM_SUITES, "timm-tiny", (1, 2))
    result = timm_speed.run_timm("timm-tiny", str(tmp_path), "cpu")
    rows = result["rows"]
    assert [(r["side"], r["contender"]) for r in rows] == [(64, "timm"), (64, "foveal"), (128, "timm"), (128, "foveal")]
    # float32 (the suite times what users run): logits ~0.08 under timm's init, rounding ~1.5e-8, 1e-5 is ~1000 ulps
    assert all(r["median_s"] > 0 and r["peak_bytes"] >= 0 and r["max_abs_diff"] < 1e-5 for r in rows)
    md = (tmp_path / "timm-cpu.md").read_text()
    assert "| swin_tiny_patch4_window7_224 | 128² |" in md and "foveal / timm" in md
    with pytest.raises(ValueError, match="contenders must be among"):
        timm_speed.run_timm("timm-tiny", str(tmp_path), "cpu", ["resnet50"])


def test_davit_windows_swap_for_a_neighbourhood_without_padding():
    model = convert(_build("davit")[0]).double()  # float64: against attention written out (tests/precision.py)
    names = swap_pattern(model, lambda name, m, grid: Neighborhood(grid, 7))
    attn = model.get_submodule(names[0])  # DaViT's window attention (no position bias)
    grid = (10, 12)  # not whole windows: with the swap nothing is padded
    x = torch.randn(2, *grid, attn.dim, dtype=torch.float64)
    b, n, c = 2, 120, attn.dim
    q, k, v = (x.reshape(b, n, c) @ attn.qkv.weight.T + attn.qkv.bias).reshape(b, n, 3, attn.num_heads, -1).permute(
        2, 0, 3, 1, 4
    )
    idx = torch.arange(n)
    allowed = Neighborhood(grid, 7).mask(idx[:, None], idx[None, :])
    s = (q @ k.transpose(-1, -2) * attn.scale).masked_fill(~allowed, float("-inf"))
    want = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, *grid, c) @ attn.proj.weight.T + attn.proj.bias
    assert_close64(attn(x), want)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 200, 200, dtype=torch.float64))).all()
